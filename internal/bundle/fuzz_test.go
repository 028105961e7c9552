package bundle

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// boundTarget accepts an import without holding the disks, checking that
// every write stays inside the disk the manifest declared.
type boundTarget struct{ sizes map[string]int64 }

func (b *boundTarget) Begin(_ context.Context, m Manifest) error {
	b.sizes = map[string]int64{}
	for _, d := range m.Disks {
		b.sizes[d.Entry] = d.Size
	}
	for _, e := range m.Entries() {
		b.sizes[e.Name] = e.RealSize
	}
	return nil
}

type boundWriter struct{ size int64 }

func (w boundWriter) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > w.size {
		panic(fmt.Sprintf("write %d+%d outside a %d-byte disk", off, len(p), w.size))
	}
	return len(p), nil
}

func (b *boundTarget) Entry(name string) (io.WriterAt, error) {
	return boundWriter{b.sizes[name]}, nil
}

// smallBundle is a valid bundle of a 1 MiB disk, for seeds.
func smallBundle(t testing.TB) []byte {
	d := newDisk(t, 1<<20, []Extent{{64 << 10, 4 << 10}})
	var buf bytes.Buffer
	src := []Source{{Name: "vda", Bus: "virtio", Size: 1 << 20, Extents: d.extents, Data: d}}
	if _, err := Write(context.Background(), &buf, testManifest(), src, WriteOptions{Compression: CompressFast}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// FuzzImport feeds whole bundles: the framing, the chunk checks and the
// decompressor must refuse anything broken without panicking, and never
// write outside a declared disk.
func FuzzImport(f *testing.F) {
	f.Add(smallBundle(f))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = Import(context.Background(), bytes.NewReader(b), &boundTarget{}, ReadOptions{})
	})
}

// FuzzArchive feeds the tar layer directly, since random bytes rarely get
// past the chunk digests: hostile archives inside valid framing.
func FuzzArchive(f *testing.F) {
	f.Add(archiveOf(f, smallBundle(f)))
	f.Fuzz(func(t *testing.T, archive []byte) {
		s := NewStream()
		go func() {
			for len(archive) > 0 {
				n := min(len(archive), 4096)
				if s.Deliver(context.Background(), archive[:n], [32]byte{}) != nil {
					return
				}
				archive = archive[n:]
			}
			s.Close(nil)
		}()
		_, _ = Finish(context.Background(), s, &boundTarget{}, ReadOptions{})
		s.Close(nil)
	})
}

// FuzzManifest checks the manifest parser alone.
func FuzzManifest(f *testing.F) {
	m := testManifest()
	m.Format = FormatVersion
	m.Disks = []Disk{{Name: "vda", Bus: "virtio", Size: 1 << 30, Entry: DiskEntry("vda"), Data: 1 << 20}}
	b, err := jsonOf(m)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseManifest(b)
		if err == nil {
			if verr := m.Validate(); verr != nil {
				t.Fatalf("ParseManifest accepted what Validate refuses: %v", verr)
			}
		}
	})
}

// archiveOf decompresses a bundle to its tar archive.
func archiveOf(t testing.TB, b []byte) []byte {
	dec, err := NewDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	var out []byte
	if err := dec.Feed(context.Background(), bytes.NewReader(b), func(raw []byte, _ [32]byte) error {
		out = append(out, raw...)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestWriteSeedCorpus refreshes the committed seed corpus when asked:
// LODGE_WRITE_CORPUS=1 go test -run TestWriteSeedCorpus ./internal/bundle/
func TestWriteSeedCorpus(t *testing.T) {
	if os.Getenv("LODGE_WRITE_CORPUS") == "" {
		t.Skip("set LODGE_WRITE_CORPUS=1 to rewrite testdata/fuzz")
	}
	b := smallBundle(t)
	a := archiveOf(t, b)
	write := func(fuzz, name string, data []byte) {
		dir := filepath.Join("testdata", "fuzz", fuzz)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", data)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("FuzzImport", "valid", b)
	write("FuzzImport", "truncated", b[:len(b)/2])
	write("FuzzArchive", "valid", a)
	for name, h := range hostileArchives(t) {
		write("FuzzArchive", strings.ReplaceAll(name, " ", "-"), h)
	}
}
