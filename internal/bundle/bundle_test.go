package bundle

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// memDisk is a disk in memory, with the regions that hold data.
type memDisk struct {
	data    []byte
	extents []Extent
}

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	return copy(p, m.data[off:]), nil
}

// newDisk makes a disk of size bytes with random data in the given
// regions, one of them all zeros.
func newDisk(t testing.TB, size int64, extents []Extent) *memDisk {
	t.Helper()
	d := &memDisk{data: make([]byte, size), extents: extents}
	for i, e := range extents {
		if i == 1 {
			continue // stored, but zeros: the importer must not write it
		}
		if _, err := rand.Read(d.data[e.Offset : e.Offset+e.Length]); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// memTarget collects an import.
type memTarget struct {
	mu      sync.Mutex
	m       Manifest
	disks   map[string][]byte
	written map[string]int64
	began   bool
	failAt  string
}

func (t *memTarget) Begin(_ context.Context, m Manifest) error {
	if t.failAt == "begin" {
		return errors.New("no room")
	}
	t.m, t.began = m, true
	t.disks, t.written = map[string][]byte{}, map[string]int64{}
	for _, d := range m.Disks {
		t.disks[d.Name] = make([]byte, d.Size)
	}
	return nil
}

type memWriter struct {
	t    *memTarget
	name string
}

func (w memWriter) WriteAt(p []byte, off int64) (int, error) {
	w.t.mu.Lock()
	defer w.t.mu.Unlock()
	w.t.written[w.name] += int64(len(p))
	return copy(w.t.disks[w.name][off:], p), nil
}

func (t *memTarget) Entry(name string) (io.WriterAt, error) {
	return memWriter{t, strings.TrimSuffix(strings.TrimPrefix(name, "disks/"), ".raw")}, nil
}

func testManifest() Manifest {
	return Manifest{
		CreatedAt:   time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC),
		Consistency: "stopped",
		VM: VMSpec{
			Name: "web", UUID: "0a1b2c3d-4e5f-4071-8899-aabbccddeeff", Hostname: "web", InstanceID: "1a1b2c3d-4e5f-4071-8899-aabbccddeeff",
			CPUs: 2, Memory: 512 << 20, NICs: []NIC{{MAC: "52:54:00:12:34:56"}},
		},
	}
}

func exportBundle(t testing.TB, level Compression, disks map[string]*memDisk) ([]byte, Stats) {
	t.Helper()
	var srcs []Source
	for _, name := range []string{"vda", "vdb"} {
		if d, ok := disks[name]; ok {
			srcs = append(srcs, Source{Name: name, Bus: "virtio", Size: int64(len(d.data)), Extents: d.extents, Data: d})
		}
	}
	var buf bytes.Buffer
	st, err := Write(context.Background(), &buf, testManifest(), srcs, WriteOptions{Compression: level})
	if err != nil {
		t.Fatalf("write: %v", err)
	}
	return buf.Bytes(), st
}

func testDisks(t testing.TB) map[string]*memDisk {
	return map[string]*memDisk{
		"vda": newDisk(t, 64<<20, []Extent{{0, 1 << 20}, {4 << 20, 3 << 20}, {9<<20 + 4096, 5<<20 + 512}, {60 << 20, 4 << 20}}),
		"vdb": newDisk(t, 8<<20, nil),
	}
}

func TestRoundTrip(t *testing.T) {
	for _, level := range []Compression{CompressNone, CompressFast, CompressBest} {
		t.Run(string(level), func(t *testing.T) {
			disks := testDisks(t)
			b, st := exportBundle(t, level, disks)
			if st.Written != int64(len(b)) {
				t.Errorf("stats say %d bytes written, buffer holds %d", st.Written, len(b))
			}
			var tg memTarget
			m, err := Import(context.Background(), bytes.NewReader(b), &tg, ReadOptions{})
			if err != nil {
				t.Fatalf("import: %v", err)
			}
			if m.VM.UUID != testManifest().VM.UUID || len(m.Disks) != 2 {
				t.Errorf("manifest came back as %+v", m)
			}
			for name, d := range disks {
				if !bytes.Equal(tg.disks[name], d.data) {
					t.Errorf("disk %s differs after the round trip", name)
				}
			}
			// The zero region (3 MiB) is stored but not written.
			if got, want := tg.written["vda"], dataLen(disks["vda"].extents)-3<<20; got != want {
				t.Errorf("wrote %d bytes of vda, want %d (zeros skipped)", got, want)
			}
			if tg.written["vdb"] != 0 {
				t.Errorf("wrote %d bytes of the empty disk", tg.written["vdb"])
			}
		})
	}
}

// Standard tools read a bundle: zstd decompresses it to a tar archive,
// and GNU tar recreates the disks, holes included.
func TestStandardTools(t *testing.T) {
	for _, tool := range []string{"zstd", "tar"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: apt-get install %s", tool, tool)
		}
	}
	disks := testDisks(t)
	b, _ := exportBundle(t, CompressFast, disks)
	dir := t.TempDir()
	path := filepath.Join(dir, "web.lodge")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("zstd", "-t", "-q", path).CombinedOutput(); err != nil {
		t.Fatalf("zstd -t: %v: %s", err, out)
	}
	out, err := exec.Command("tar", "--zstd", "-xSf", path, "-C", dir).CombinedOutput()
	if err != nil {
		t.Fatalf("tar -x: %v: %s", err, out)
	}
	got, err := os.ReadFile(filepath.Join(dir, "disks", "vda.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, disks["vda"].data) {
		t.Errorf("tar extracted a vda of %d bytes that differs from the disk", len(got))
	}
	man, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseManifest(man); err != nil {
		t.Errorf("extracted manifest: %v", err)
	}
	fi, err := os.Stat(filepath.Join(dir, "disks", "vdb.raw"))
	if err != nil || fi.Size() != 8<<20 {
		t.Errorf("vdb extracted as %v, %v; want 8 MiB of holes", fi, err)
	}
}

func TestCorruption(t *testing.T) {
	disks := testDisks(t)
	good, _ := exportBundle(t, CompressFast, disks)
	flip := func(at int) []byte {
		b := bytes.Clone(good)
		b[at] ^= 0x40
		return b
	}
	cases := []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "ends at byte 0"},
		{"plain zstd", []byte{0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0}, "plain zstd stream"},
		{"not a bundle", []byte("hello, this is not a bundle at all"), "expected a chunk header"},
		{"truncated in the middle", good[:len(good)/2], "truncated"},
		{"no end record", good[:len(good)-(8+endLen)], "before its end marker"},
		{"flipped byte in disk data", flip(len(good) / 2), `disk "vda" at offset`},
		{"flipped byte in a chunk header", flip(8 + startLen + 8 + 10), "chunk"},
		{"trailing garbage", append(bytes.Clone(good), 1, 2, 3), "data after the end record"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var tg memTarget
			_, err := Import(context.Background(), bytes.NewReader(c.in), &tg, ReadOptions{})
			if err == nil {
				t.Fatal("a damaged bundle was imported")
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("error does not wrap ErrCorrupt: %v", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not mention %q", err, c.want)
			}
		})
	}
}

// A damaged chunk is named with the disk and the offset in it.
func TestCorruptionNamesDiskAndOffset(t *testing.T) {
	disks := map[string]*memDisk{"vda": newDisk(t, 64<<20, []Extent{{0, 1 << 20}, {8 << 20, 1 << 20}, {16 << 20, 16 << 20}})}
	good, _ := exportBundle(t, CompressNone, disks)
	// Uncompressed, vda's byte at 20 MiB sits near the same place in the
	// file; find it by content.
	needle := disks["vda"].data[20<<20 : 20<<20+64]
	at := bytes.Index(good, needle)
	if at < 0 {
		t.Fatal("disk data not found in an uncompressed bundle")
	}
	b := bytes.Clone(good)
	b[at] ^= 1
	var tg memTarget
	_, err := Import(context.Background(), bytes.NewReader(b), &tg, ReadOptions{})
	if err == nil || !strings.Contains(err.Error(), `disk "vda" at offset`) || !strings.Contains(err.Error(), "digest mismatch") {
		t.Fatalf("got %v, want a digest mismatch naming vda and an offset", err)
	}
	var off int64
	if _, serr := fmt.Sscanf(err.Error()[strings.Index(err.Error(), "at offset ")+len("at offset "):], "%d", &off); serr != nil {
		t.Fatalf("no offset in %q", err)
	}
	if off > 20<<20 || off < 16<<20 {
		t.Errorf("error names offset %d; the damage is at %d", off, 20<<20)
	}
}

// Resuming: a stream cut anywhere continues from the decoder's Next()
// with a writer that skips what was delivered.
func TestResume(t *testing.T) {
	disks := testDisks(t)
	full, _ := exportBundle(t, CompressFast, disks)
	dec, err := NewDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	s := NewStream()
	var tg memTarget
	done := make(chan error, 1)
	go func() {
		_, err := Finish(context.Background(), s, &tg, ReadOptions{Total: dec.Total})
		done <- err
	}()
	deliver := func(raw []byte, sum [32]byte) error { return s.Deliver(context.Background(), raw, sum) }
	// First attempt: cut at a third of the file.
	err = dec.Feed(context.Background(), bytes.NewReader(full[:len(full)/3]), deliver)
	if err == nil {
		t.Fatal("a cut stream was taken as whole")
	}
	next := dec.Next()
	if next == 0 {
		t.Fatal("nothing was delivered before the cut")
	}
	var srcs []Source
	for _, name := range []string{"vda", "vdb"} {
		d := disks[name]
		srcs = append(srcs, Source{Name: name, Bus: "virtio", Size: int64(len(d.data)), Extents: d.extents, Data: d})
	}
	var rest bytes.Buffer
	if _, err := Write(context.Background(), &rest, testManifest(), srcs, WriteOptions{Compression: CompressFast, Skip: next}); err != nil {
		t.Fatal(err)
	}
	if rest.Len() >= len(full) {
		t.Errorf("the resumed stream is %d bytes, the whole one %d", rest.Len(), len(full))
	}
	if err := dec.Feed(context.Background(), &rest, deliver); err != nil {
		t.Fatalf("resume: %v", err)
	}
	s.Close(nil)
	if err := <-done; err != nil {
		t.Fatalf("import after resume: %v", err)
	}
	if !bytes.Equal(tg.disks["vda"], disks["vda"].data) {
		t.Error("vda differs after a resumed transfer")
	}
}

func TestParseCompression(t *testing.T) {
	for in, want := range map[string]Compression{"": CompressFast, "none": CompressNone, "fast": CompressFast, "best": CompressBest} {
		if got, err := ParseCompression(in); err != nil || got != want {
			t.Errorf("ParseCompression(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseCompression("gzip"); err == nil || !strings.Contains(err.Error(), `"gzip"`) {
		t.Errorf("gzip: got %v", err)
	}
}

func TestWatch(t *testing.T) {
	b, st := exportBundle(t, CompressFast, testDisks(t))
	var last, total int64
	calls := 0
	r := Watch(bytes.NewReader(b), func(done, tot int64) { last, total = done, tot; calls++ })
	// Small reads split every header, as a network does.
	buf := make([]byte, 7)
	for {
		if _, err := r.Read(buf); err != nil {
			break
		}
	}
	if total != st.Archive || last != st.Archive {
		t.Errorf("watch ended at %d of %d; the archive is %d bytes", last, total, st.Archive)
	}
	if calls < int(st.Chunks) {
		t.Errorf("%d progress calls for %d chunks", calls, st.Chunks)
	}
}

// entryTarget keeps every entry by name.
type entryTarget struct {
	mu      sync.Mutex
	m       Manifest
	entries map[string][]byte
}

func (t *entryTarget) Begin(_ context.Context, m Manifest) error {
	t.m, t.entries = m, map[string][]byte{}
	for _, e := range m.Entries() {
		t.entries[e.Name] = make([]byte, e.RealSize)
	}
	return nil
}

type entryWriter struct {
	t    *entryTarget
	name string
}

func (w entryWriter) WriteAt(p []byte, off int64) (int, error) {
	w.t.mu.Lock()
	defer w.t.mu.Unlock()
	return copy(w.t.entries[w.name][off:], p), nil
}

func (t *entryTarget) Entry(name string) (io.WriterAt, error) { return entryWriter{t, name}, nil }

// A bundle with snapshots carries the base, each layer and each memory
// state, and refuses a tree that does not hang together.
func TestSnapshotTree(t *testing.T) {
	m := testManifest()
	m.Disks = []Disk{{Name: "root", Bus: "virtio", Size: 64 << 20, Base: BaseEntry("root"), BaseSize: 64 << 20, Top: "l2"}}
	m.Layers = []Layer{
		{ID: "l1", Disk: "root", Entry: LayerEntry("l1"), Size: 8 << 20},
		{ID: "l2", Disk: "root", Parent: "l1", Entry: LayerEntry("l2"), Size: 4 << 20},
	}
	m.Snapshots = []Snapshot{{Name: "before", CreatedAt: m.CreatedAt, Layers: map[string]string{"root": "l1"},
		Memory: &MemoryState{Entry: MemoryEntry("before"), Size: 2 << 20, CPUs: 1, MemorySize: 256 << 20}}}
	m.CurrentSnapshot = "before"
	base := newDisk(t, 64<<20, []Extent{{0, 1 << 20}, {4 << 20, 1 << 20}, {32 << 20, 1 << 20}})
	l1 := newDisk(t, 8<<20, []Extent{{0, 2 << 20}})
	l2 := newDisk(t, 4<<20, []Extent{{1 << 20, 1 << 20}})
	mem := newDisk(t, 2<<20, []Extent{{0, 2 << 20}})
	srcs := []Source{
		{Entry: BaseEntry("root"), Size: 64 << 20, Extents: base.extents, Data: base},
		{Entry: LayerEntry("l1"), Size: 8 << 20, Extents: l1.extents, Data: l1},
		{Entry: LayerEntry("l2"), Size: 4 << 20, Extents: l2.extents, Data: l2},
		{Entry: MemoryEntry("before"), Size: 2 << 20, Extents: mem.extents, Data: mem},
	}
	var buf bytes.Buffer
	if _, err := Write(context.Background(), &buf, m, srcs, WriteOptions{}); err != nil {
		t.Fatalf("write: %v", err)
	}
	var tg entryTarget
	got, err := Import(context.Background(), bytes.NewReader(buf.Bytes()), &tg, ReadOptions{})
	if err != nil {
		t.Fatalf("import: %v", err)
	}
	if got.CurrentSnapshot != "before" || len(got.Layers) != 2 || got.Snapshots[0].Memory.Data != 2<<20 {
		t.Errorf("manifest came back as %+v", got)
	}
	for name, want := range map[string]*memDisk{BaseEntry("root"): base, LayerEntry("l1"): l1, LayerEntry("l2"): l2, MemoryEntry("before"): mem} {
		if !bytes.Equal(tg.entries[name], want.data) {
			t.Errorf("entry %s differs after the round trip", name)
		}
	}

	broken := map[string]func(*Manifest){
		"parent after child":      func(m *Manifest) { m.Layers[0].Parent = "l2" },
		"top is a snapshot layer": func(m *Manifest) { m.Disks[0].Top = "l1" },
		"unknown current":         func(m *Manifest) { m.CurrentSnapshot = "nope" },
		"snapshot on a top":       func(m *Manifest) { m.Snapshots[0].Layers["root"] = "l2" },
		"snapshot parent unknown": func(m *Manifest) { m.Snapshots[0].Parent = "ghost" },
		"flattened and layered":   func(m *Manifest) { m.Disks[0].Entry = DiskEntry("root") },
		"layer entry elsewhere":   func(m *Manifest) { m.Layers[1].Entry = "../l2.qcow2" },
	}
	good := got
	if err := good.Validate(); err != nil {
		t.Fatalf("the imported manifest does not validate: %v", err)
	}
	for name, mutate := range broken {
		t.Run(name, func(t *testing.T) {
			bm := good
			bm.Disks = append([]Disk(nil), good.Disks...)
			bm.Layers = append([]Layer(nil), good.Layers...)
			sn := good.Snapshots[0]
			sn.Layers = map[string]string{"root": "l1"}
			bm.Snapshots = []Snapshot{sn}
			mutate(&bm)
			err := bm.Validate()
			if err == nil || !errors.Is(err, ErrCorrupt) || strings.Contains(err.Error(), "format") {
				t.Errorf("got %v, want the tree refused", err)
			}
		})
	}
}
