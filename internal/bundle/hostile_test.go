package bundle

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"lukechampine.com/blake3"
)

func jsonOf(m Manifest) ([]byte, error) { return json.Marshal(m) }

// goodManifest is a manifest for one 1 MiB disk with 64 KiB of data.
func goodManifest() Manifest {
	m := testManifest()
	m.Format = FormatVersion
	m.Disks = []Disk{{Name: "vda", Bus: "virtio", Size: 1 << 20, Entry: DiskEntry("vda"), Data: 4 << 10}}
	return m
}

func fileEntry(name string, body []byte) []byte {
	b := entryHeader(name, int64(len(body)), nil)
	b = append(b, body...)
	return append(b, make([]byte, padLen(int64(len(body))))...)
}

func manifestEntry(t testing.TB, m Manifest) []byte {
	b, err := jsonOf(m)
	if err != nil {
		t.Fatal(err)
	}
	return fileEntry(ManifestName, b)
}

func sparseEntry(name string, realSize int64, ext []Extent) []byte {
	mp := sparseMap(ext, realSize)
	content := int64(len(mp)) + dataLen(ext)
	b := entryHeader(name, content, sparsePax(name, realSize))
	b = append(b, mp...)
	b = append(b, make([]byte, dataLen(ext))...)
	return append(b, make([]byte, padLen(content))...)
}

// typed makes an entry of another tar type (link, device...).
func typed(name string, typ byte) []byte {
	return ustarHeader(name, 0, typ)
}

// hostileArchives are tar archives a hostile bundle could carry inside
// valid framing, keyed by what they try.
func hostileArchives(t testing.TB) map[string][]byte {
	m := goodManifest()
	disk := sparseEntry(DiskEntry("vda"), 1<<20, []Extent{{64 << 10, 4 << 10}})
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	badCPU := goodManifest()
	badCPU.VM.CPUs = 100000
	badSize := goodManifest()
	badSize.Disks[0].Size = 1 << 50
	badEntry := goodManifest()
	badEntry.Disks[0].Entry = "../../etc/passwd"
	return map[string][]byte{
		"traversal":         cat(manifestEntry(t, m), fileEntry("../../etc/cron.d/x", []byte("* * * * * root sh\n"))),
		"absolute path":     cat(manifestEntry(t, m), fileEntry("/etc/passwd", []byte("x"))),
		"symlink":           cat(manifestEntry(t, m), typed("disks/vda.raw", '2')),
		"hard link":         cat(manifestEntry(t, m), typed("disks/vda.raw", '1')),
		"char device":       cat(manifestEntry(t, m), typed("disks/vda.raw", '3')),
		"block device":      cat(manifestEntry(t, m), typed("disks/vda.raw", '4')),
		"fifo":              cat(manifestEntry(t, m), typed("disks/vda.raw", '6')),
		"directory first":   cat(typed("disks", '5'), manifestEntry(t, m)),
		"disk not sparse":   cat(manifestEntry(t, m), fileEntry(DiskEntry("vda"), make([]byte, 4<<10))),
		"size mismatch":     cat(manifestEntry(t, m), sparseEntry(DiskEntry("vda"), 2<<20, []Extent{{64 << 10, 4 << 10}})),
		"data mismatch":     cat(manifestEntry(t, m), sparseEntry(DiskEntry("vda"), 1<<20, []Extent{{64 << 10, 8 << 10}})),
		"region outside":    cat(manifestEntry(t, m), sparseEntry(DiskEntry("vda"), 1<<20, []Extent{{1 << 20, 4 << 10}})),
		"cpus out of range": cat(manifestEntry(t, badCPU), disk),
		"disk too big":      cat(manifestEntry(t, badSize), disk),
		"entry name":        cat(manifestEntry(t, badEntry), disk),
		"unknown field":     cat(fileEntry(ManifestName, []byte(`{"format":1,"evil":true}`)), disk),
		"no sums":           cat(manifestEntry(t, m), disk, endOfArchive),
		"manifest missing":  cat(disk, endOfArchive),
	}
}

func TestHostileArchives(t *testing.T) {
	for name, archive := range hostileArchives(t) {
		t.Run(name, func(t *testing.T) {
			s := NewStream()
			go func() {
				_ = s.Deliver(context.Background(), archive, [32]byte{})
				s.Close(nil)
			}()
			var tg memTarget
			_, err := Finish(context.Background(), s, &tg, ReadOptions{})
			s.Close(nil)
			if err == nil {
				t.Fatal("a hostile archive was imported")
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("error does not wrap ErrCorrupt: %v", err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			if tg.began && tg.written["vda"] > 0 {
				t.Errorf("wrote %d bytes before refusing", tg.written["vda"])
			}
		})
	}
}

// bundleOf frames stored chunks by hand, as a hostile writer could.
func bundleOf(total uint64, chunks ...struct {
	stored []byte
	raw    uint32
}) []byte {
	var b []byte
	b = append(b, startHeader{Version: FormatVersion, TotalRaw: total, ChunkSize: ChunkSize}.marshal()...)
	root := newRootHash()
	var off uint64
	for i, c := range chunks {
		sum := blake3.Sum256(c.stored)
		root.add(sum)
		b = append(b, chunkHeader{Seq: uint64(i), Offset: off, RawLen: c.raw, StoredLen: uint32(len(c.stored)), Sum: sum}.marshal()...)
		b = append(b, c.stored...)
		off += uint64(c.raw)
	}
	return append(b, endHeader{Chunks: uint64(len(chunks)), TotalRaw: total, Root: root.sum()}.marshal()...)
}

// Decompression bombs: a chunk's frame may not produce more than its
// header says, however it tries.
func TestDecompressionBombs(t *testing.T) {
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	big := enc.EncodeAll(make([]byte, 64<<20), nil) // 64 MiB of zeros in a few KB
	small := enc.EncodeAll(make([]byte, 4096), nil)
	noFCS, err := func() ([]byte, error) {
		var buf bytes.Buffer
		w, err := zstd.NewWriter(&buf)
		if err != nil {
			return nil, err
		}
		_, _ = w.Write(make([]byte, 1<<20))
		err = w.Close()
		return buf.Bytes(), err
	}()
	if err != nil {
		t.Fatal(err)
	}
	type chunk = struct {
		stored []byte
		raw    uint32
	}
	cases := map[string][]byte{
		"frame larger than its chunk":  bundleOf(4096, chunk{big, 4096}),
		"chunk larger than chunk size": bundleOf(64<<20, chunk{big, 64 << 20}),
		"two frames in one chunk":      bundleOf(4096, chunk{append(bytes.Clone(small), big...), 4096}),
		"frame without a size":         bundleOf(1<<20, chunk{noFCS, 1 << 20}),
		"total past the announcement":  bundleOf(1024, chunk{small, 4096}),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			dec, err := NewDecoder()
			if err != nil {
				t.Fatal(err)
			}
			defer dec.Close()
			var got int
			err = dec.Feed(context.Background(), bytes.NewReader(b), func(raw []byte, _ [32]byte) error {
				got += len(raw)
				return nil
			})
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("got %v, want a corrupt-bundle error", err)
			}
			if got > 4096 {
				t.Errorf("delivered %d bytes before refusing", got)
			}
		})
	}
}

func TestManifestRanges(t *testing.T) {
	cases := map[string]func(*Manifest){
		"format":      func(m *Manifest) { m.Format = 2 },
		"consistency": func(m *Manifest) { m.Consistency = "hopeful" },
		"name":        func(m *Manifest) { m.VM.Name = "../x" },
		"uuid":        func(m *Manifest) { m.VM.UUID = "not-a-uuid" },
		"memory":      func(m *Manifest) { m.VM.Memory = 1 },
		"max_memory":  func(m *Manifest) { m.VM.MaxMemory = m.VM.Memory - 1 },
		"mac":         func(m *Manifest) { m.VM.NICs[0].MAC = "ff:ff" },
		"bus":         func(m *Manifest) { m.Disks[0].Bus = "floppy" },
		"disk size":   func(m *Manifest) { m.Disks[0].Size = 1000 },
		"disk data":   func(m *Manifest) { m.Disks[0].Data = m.Disks[0].Size + 1 },
		"disk name":   func(m *Manifest) { m.Disks[0].Name = "../vda" },
		"no disks":    func(m *Manifest) { m.Disks = nil },
		"two same":    func(m *Manifest) { m.Disks = append(m.Disks, m.Disks[0]) },
	}
	for field, mutate := range cases {
		t.Run(field, func(t *testing.T) {
			m := goodManifest()
			mutate(&m)
			b, err := jsonOf(m)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ParseManifest(b); err == nil || !strings.Contains(err.Error(), "manifest") {
				t.Errorf("got %v, want a manifest error", err)
			}
		})
	}
	b, _ := jsonOf(goodManifest())
	if _, err := ParseManifest(b); err != nil {
		t.Errorf("a good manifest was refused: %v", err)
	}
}
