package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/nbd"
)

// bitmapCase builds an image whose chain holds the bitmaps it names.
type bitmapCase struct {
	name    string
	bitmaps []string
	// depth is how many layers AllocatedAbove is asked about.
	depth int
	build func(t *testing.T, dir string) string
}

var bitmapCases = []bitmapCase{
	{name: "64k granularity, scattered writes", bitmaps: []string{"b"}, depth: 1, build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "64M")
		qemuIO(t, "qcow2", img, "write -P 9 32M 1M")
		qemuImg(t, "bitmap", "--add", "-f", "qcow2", img, "b")
		qemuIO(t, "qcow2", img, "write -P 1 0 4k", "write -P 2 1048676 8k", "write -z 10M 3M", "write -P 3 66060288 1000", "discard 32M 64k")
		return img
	}},
	{name: "512-byte clusters and granularity, many table entries", bitmaps: []string{"b"}, depth: 1, build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "16M")
		qemuImg(t, "bitmap", "--add", "-g", "512", "-f", "qcow2", img, "b")
		qemuIO(t, "qcow2", img, "write -P 1 0 512", "write -P 2 3000 5000", "write -P 3 8M 4k", "write -P 4 16776704 512")
		return img
	}},
	{name: "1M granularity, size not a multiple of it", bitmaps: []string{"b"}, depth: 1, build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "10737664") // 10 MiB + 512
		qemuImg(t, "bitmap", "--add", "-g", "1M", "-f", "qcow2", img, "b")
		qemuIO(t, "qcow2", img, "write -P 1 10485760 512", "write -P 2 3M 1")
		return img
	}},
	{name: "two bitmaps, one disabled", bitmaps: []string{"old", "new", "off"}, depth: 1, build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "32M")
		qemuImg(t, "bitmap", "--add", "-f", "qcow2", img, "old")
		qemuImg(t, "bitmap", "--add", "--disable", "-f", "qcow2", img, "off")
		qemuIO(t, "qcow2", img, "write -P 1 1M 1M")
		qemuImg(t, "bitmap", "--add", "-f", "qcow2", img, "new")
		qemuIO(t, "qcow2", img, "write -P 2 20M 100k")
		return img
	}},
	{name: "no writes since", bitmaps: []string{"b"}, depth: 1, build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "8M")
		qemuIO(t, "qcow2", img, "write -P 1 0 1M")
		qemuImg(t, "bitmap", "--add", "-f", "qcow2", img, "b")
		return img
	}},
	{name: "bitmap in the backing file, layers above it", bitmaps: []string{"b"}, depth: 2, build: func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.qcow2")
		mid := filepath.Join(dir, "mid.qcow2")
		img := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", base, "16M")
		qemuImg(t, "bitmap", "--add", "-f", "qcow2", base, "b")
		qemuIO(t, "qcow2", base, "write -P 1 1M 64k")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid, "24M")
		qemuIO(t, "qcow2", mid, "write -P 2 4M 8k", "write -z 20M 1M")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", img)
		qemuIO(t, "qcow2", img, "write -P 3 8M 4k")
		return img
	}},
}

// TestBitmapsMatchQEMU checks each bitmap's dirty ranges, and the ranges
// the top layers hold, against qemu-nbd's answers for the same image.
func TestBitmapsMatchQEMU(t *testing.T) {
	needQEMUImg(t)
	for _, c := range bitmapCases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img := c.build(t, t.TempDir())
			r, err := OpenReader(img)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = r.Close() }()
			var names []string
			for _, l := range r.Layers() {
				for _, b := range l.Bitmaps {
					if b.InUse || !b.Usable {
						t.Errorf("bitmap %q in %s: in use %v, usable %v; want a clean, usable one", b.Name, l.Path, b.InUse, b.Usable)
					}
					names = append(names, b.Name)
				}
			}
			slices.Sort(names)
			if want := slices.Sorted(slices.Values(c.bitmaps)); !slices.Equal(names, want) {
				t.Fatalf("chain holds bitmaps %v, want %v", names, want)
			}
			for _, name := range c.bitmaps {
				want := nbdAnswer(t, img, name, func(ctx context.Context, conn *nbd.Conn) ([]nbd.Extent, error) {
					return conn.DirtyExtents(ctx, name, 0, r.Size())
				})
				got, err := r.DirtyExtents(name, 0, r.Size())
				if err != nil {
					t.Fatalf("DirtyExtents(%q): %v", name, err)
				}
				checkWellFormed(t, got, 0, r.Size())
				if !slices.Equal(got, want) {
					t.Errorf("DirtyExtents(%q) = %v\nqemu-nbd says %v", name, got, want)
				}
				checkDirtyClipped(t, r, name, got)
			}
			want := nbdAnswer(t, img, "", func(ctx context.Context, conn *nbd.Conn) ([]nbd.Extent, error) {
				return conn.AllocatedAbove(ctx, uint32(c.depth), 0, r.Size())
			})
			got, err := r.AllocatedAbove(c.depth, 0, r.Size())
			if err != nil {
				t.Fatalf("AllocatedAbove(%d): %v", c.depth, err)
			}
			if !slices.Equal(got, want) {
				t.Errorf("AllocatedAbove(%d) = %v\nqemu-nbd says %v", c.depth, got, want)
			}
		})
	}
}

// checkDirtyClipped checks that asking for part of the disk gives that
// part of the whole answer.
func checkDirtyClipped(t *testing.T, r *Reader, name string, all []Extent) {
	t.Helper()
	size := r.Size()
	for _, q := range [][2]int64{{0, 1}, {size / 3, size / 3}, {size - 1, 100}, {4097, 1 << 20}, {size, 10}} {
		got, err := r.DirtyExtents(name, q[0], q[1])
		if err != nil {
			t.Fatalf("DirtyExtents(%q, %d, %d): %v", name, q[0], q[1], err)
		}
		var want []Extent
		for _, e := range all {
			s, end := max(e.Offset, q[0]), min(e.Offset+e.Length, q[0]+q[1], size)
			if s < end {
				want = append(want, Extent{s, end - s})
			}
		}
		if !slices.Equal(got, want) {
			t.Errorf("DirtyExtents(%q, %d, %d) = %v; the whole disk's, clipped, is %v", name, q[0], q[1], got, want)
		}
	}
}

// nbdAnswer serves img through qemu-nbd, with bitmap if it is not "", and
// returns what ask gets from it, as qcow2 extents.
func nbdAnswer(t *testing.T, img, bitmap string, ask func(context.Context, *nbd.Conn) ([]nbd.Extent, error)) []Extent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "bm")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	srv, err := nbd.Serve(ctx, nbd.ServerOptions{
		Path: img, Format: "qcow2", ReadOnly: true, Bitmap: bitmap, AllocationDepth: true,
		Socket: filepath.Join(dir, "s.sock"),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Stop() }()
	contexts := []string{nbd.ContextAllocationDepth}
	if bitmap != "" {
		contexts = append(contexts, nbd.ContextBitmap(bitmap))
	}
	conn, err := srv.Dial(ctx, contexts...)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ext, err := ask(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	var out []Extent
	for _, e := range ext {
		out = addExtent(out, e.Offset, e.Length)
	}
	return out
}

// bitmapDirectory returns where img's bitmap directory starts.
func bitmapDirectory(t *testing.T, img string) int64 {
	t.Helper()
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	var dir int64 = -1
	hdrLen := binary.BigEndian.Uint32(b[100:])
	err = headerExtensions(b[:65536], uint64(hdrLen), 65536, func(typ uint32, data []byte) error {
		if typ == extBitmaps {
			dir = int64(binary.BigEndian.Uint64(data[16:]))
		}
		return nil
	})
	if err != nil || dir < 0 {
		t.Fatalf("%s: no bitmaps extension (%v)", img, err)
	}
	return dir
}

// TestBitmapStates checks bitmaps that must not be trusted or read, made
// by changing what qemu-img wrote.
func TestBitmapStates(t *testing.T) {
	needQEMUImg(t)
	fresh := func(t *testing.T) (img string, dir int64, table int64) {
		img = filepath.Join(t.TempDir(), "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "8M")
		qemuImg(t, "bitmap", "--add", "-f", "qcow2", img, "b")
		qemuIO(t, "qcow2", img, "write -P 1 1M 64k")
		r, err := OpenReader(img)
		if err != nil {
			t.Fatal(err)
		}
		table = r.layers[0].bitmaps[0].tableOff
		_ = r.Close()
		return img, bitmapDirectory(t, img), table
	}
	cases := []struct {
		name   string
		change func(t *testing.T, img string, dir, table int64)
		// check looks at the reopened image.
		check func(t *testing.T, r *Reader, err error)
	}{
		{"in use: not saved by its last writer", func(t *testing.T, img string, dir, _ int64) {
			patch32(t, img, dir+12, bitmapInUse|bitmapAuto)
		}, func(t *testing.T, r *Reader, err error) {
			b := mustBitmap(t, r, err)
			if !b.InUse {
				t.Fatal("InUse = false for a bitmap flagged in use")
			}
			if _, err := r.DirtyExtents("b", 0, r.Size()); !errors.Is(err, errCorrupt) {
				t.Fatalf("DirtyExtents of an in-use bitmap: %v, want errCorrupt", err)
			}
		}},
		{"autoclear bit cleared: every bitmap ignored", func(t *testing.T, img string, _, _ int64) {
			patch64(t, img, 88, 0)
		}, func(t *testing.T, r *Reader, err error) {
			if err != nil {
				t.Fatal(err)
			}
			if bm := r.Layers()[0].Bitmaps; len(bm) != 0 {
				t.Fatalf("bitmaps %v read despite the cleared autoclear bit", bm)
			}
			if _, err := r.DirtyExtents("b", 0, r.Size()); err == nil {
				t.Fatal("DirtyExtents of an ignored bitmap succeeded")
			}
		}},
		{"unknown type: kept, not used", func(t *testing.T, img string, dir, _ int64) {
			patch(t, img, dir+16, []byte{2})
		}, func(t *testing.T, r *Reader, err error) {
			if b := mustBitmap(t, r, err); b.Usable {
				t.Fatal("a bitmap of type 2 is usable")
			}
			if _, err := r.DirtyExtents("b", 0, r.Size()); !errors.Is(err, ErrUnsupported) {
				t.Fatalf("DirtyExtents: %v, want ErrUnsupported", err)
			}
		}},
		{"all-ones table entry", func(t *testing.T, img string, _, table int64) {
			patch64(t, img, table, bitmapAllOnes)
		}, func(t *testing.T, r *Reader, err error) {
			mustBitmap(t, r, err)
			got, err := r.DirtyExtents("b", 0, r.Size())
			if err != nil || !slices.Equal(got, []Extent{{0, r.Size()}}) {
				t.Fatalf("DirtyExtents = %v, %v; want the whole disk", got, err)
			}
		}},
		{"reserved bits in a table entry", func(t *testing.T, img string, _, table int64) {
			patch64(t, img, table, 1<<60)
		}, func(t *testing.T, r *Reader, err error) {
			mustBitmap(t, r, err)
			if _, err := r.DirtyExtents("b", 0, r.Size()); !errors.Is(err, errCorrupt) {
				t.Fatalf("DirtyExtents: %v, want errCorrupt", err)
			}
		}},
		{"table entry past the end of the file", func(t *testing.T, img string, _, table int64) {
			patch64(t, img, table, 1<<40)
		}, func(t *testing.T, r *Reader, err error) {
			mustBitmap(t, r, err)
			if _, err := r.DirtyExtents("b", 0, r.Size()); !errors.Is(err, errCorrupt) {
				t.Fatalf("DirtyExtents: %v, want errCorrupt", err)
			}
		}},
		{"table too short for the disk", func(t *testing.T, img string, dir, _ int64) {
			patch32(t, img, dir+8, 0)
		}, func(t *testing.T, _ *Reader, err error) {
			if !errors.Is(err, ErrNotQcow2) {
				t.Fatalf("OpenReader: %v, want ErrNotQcow2", err)
			}
		}},
		{"directory past the end of the file", func(t *testing.T, img string, _, _ int64) {
			b, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			hdrLen := binary.BigEndian.Uint32(b[100:])
			_ = headerExtensions(b[:65536], uint64(hdrLen), 65536, func(typ uint32, data []byte) error {
				if typ == extBitmaps {
					binary.BigEndian.PutUint64(data[16:], 1<<40)
				}
				return nil
			})
			writeFile(t, img, b)
		}, func(t *testing.T, _ *Reader, err error) {
			if !errors.Is(err, ErrNotQcow2) {
				t.Fatalf("OpenReader: %v, want ErrNotQcow2", err)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img, dir, table := fresh(t)
			c.change(t, img, dir, table)
			r, err := OpenReader(img)
			if r != nil {
				defer func() { _ = r.Close() }()
			}
			c.check(t, r, err)
		})
	}
}

func mustBitmap(t *testing.T, r *Reader, err error) Bitmap {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	bm := r.Layers()[0].Bitmaps
	if len(bm) != 1 || bm[0].Name != "b" {
		t.Fatalf("bitmaps %v, want one named b", bm)
	}
	return bm[0]
}
