package qcow2

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// qemuIO runs qemu-io commands on an image, failing the test if any fails.
func qemuIO(t testing.TB, format, img string, cmds ...string) {
	t.Helper()
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, img)...).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("failed")) {
		t.Fatalf("qemu-io %v %s: %v: %s", cmds, img, err, out)
	}
}

// qemuRaw is what QEMU reads from an image: the reference every byte of
// the Reader is compared against.
func qemuRaw(t *testing.T, format, img string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "ref.raw")
	qemuImg(t, "convert", "-f", format, "-O", "raw", img, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// qemuDataExtents lists the ranges qemu-img map says hold data, merged.
func qemuDataExtents(t *testing.T, format, img string) []Extent {
	t.Helper()
	out, err := exec.Command("qemu-img", "map", "-f", format, "--output=json", img).Output()
	if err != nil {
		t.Fatalf("qemu-img map %s: %v", img, err)
	}
	var m []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("qemu-img map %s: %v: %s", img, err, out)
	}
	var ext []Extent
	for _, e := range m {
		if e.Data {
			ext = addExtent(ext, e.Start, e.Length)
		}
	}
	return ext
}

func writeFile(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// patch overwrites bytes of a file.
func patch(t testing.TB, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func patch32(t testing.TB, path string, off int64, v uint32) {
	t.Helper()
	patch(t, path, off, binary.BigEndian.AppendUint32(nil, v))
}

func patch64(t testing.TB, path string, off int64, v uint64) {
	t.Helper()
	patch(t, path, off, binary.BigEndian.AppendUint64(nil, v))
}

func read64(t testing.TB, path string, off int64) uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var b [8]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[:])
}

// l1EntryPos and l2EntryPos find where in an image file the L1 and L2
// entries for a guest offset are, so tests can damage them.
func l1EntryPos(t testing.TB, img string, guest int64) int64 {
	t.Helper()
	cb := int64(read64(t, img, 16) & 0xffffffff)
	return int64(read64(t, img, 40)) + (guest>>(2*cb-3))*8
}

func l2EntryPos(t testing.TB, img string, guest int64) int64 {
	t.Helper()
	cb := int64(read64(t, img, 16) & 0xffffffff)
	l2 := int64(read64(t, img, l1EntryPos(t, img, guest)) & entryOffsetMask)
	if l2 == 0 {
		t.Fatalf("%s: no L2 table for guest offset %d", img, guest)
	}
	return l2 + ((guest>>cb)&(1<<(cb-3)-1))*8
}

// mixedData is a disk's worth of zeros, incompressible noise and
// compressible text, so that compressed images hold clusters of every kind.
func mixedData(size int, seed int64) []byte {
	rng := rand.New(rand.NewSource(seed))
	words := []string{"lodge ", "qcow2 ", "cluster ", "backup ", "\n", "zero ", "data ", "\x00\x00\x00"}
	b := make([]byte, 0, size)
	for len(b) < size {
		n := min(size-len(b), 1000+rng.Intn(100000))
		switch rng.Intn(4) {
		case 0:
			b = append(b, make([]byte, n)...)
		case 1:
			chunk := make([]byte, n)
			rng.Read(chunk)
			b = append(b, chunk...)
		default:
			for end := len(b) + n; len(b) < end; {
				w := words[rng.Intn(len(words))]
				b = append(b, w[:min(len(w), end-len(b))]...)
			}
		}
	}
	return b
}

// compressedFrom makes a compressed qcow2 of mixed data with qemu-img
// convert -c.
func compressedFrom(t *testing.T, dir string, size int, opts string) string {
	raw := filepath.Join(dir, "src.raw")
	writeFile(t, raw, mixedData(size, int64(len(opts))))
	img := filepath.Join(dir, "c.qcow2")
	qemuImg(t, "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, img)
	return img
}

// dropBackingFormat renames the backing format header extension to an
// unknown type, leaving the image naming no format for its backing file.
func dropBackingFormat(t *testing.T, img string) {
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b[:4096], []byte{0xe2, 0x79, 0x2a, 0xca})
	if i < 0 {
		t.Fatalf("%s has no backing format extension", img)
	}
	patch32(t, img, int64(i), 0x12345678)
}

type imageCase struct {
	name   string
	format string // of the top image, for qemu-img; qcow2 if empty
	build  func(t *testing.T, dir string) string
}

var imageCases = []imageCase{
	{name: "plain data, unaligned ranges", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "8M")
		qemuIO(t, "qcow2", img, "write -P 0xab 0 1M", "write -P 0x11 3149824 70000",
			"write -P 0x5a 5001 3", "write -P 0x22 8388096 512")
		return img
	}},
	{name: "zeros and discards over backing data", build: func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.qcow2")
		img := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", base, "8M")
		qemuIO(t, "qcow2", base, "write -P 0xab 0 8M")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", img)
		qemuIO(t, "qcow2", img, "write -z 1M 128k", "write -z 2098152 3000",
			"discard 4M 64k", "discard 5242980 200", "write -P 0x33 6M 128k",
			"write -z 6M 64k", "write -z -u 7M 64k")
		return img
	}},
	{name: "discard without backing", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "4M")
		qemuIO(t, "qcow2", img, "write -P 1 0 2M", "discard 0 64k", "discard 512k 1M",
			"write -P 2 3M 4k")
		return img
	}},
	{name: "deflate, qemu-io", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "8M")
		qemuIO(t, "qcow2", img, "write -P 0xab 0 1M", "write -z 2M 128k", "write -c -P 7 4M 64k",
			"write -c -P 9 5M 192k", "discard 0 64k")
		return img
	}},
	{name: "deflate, convert", build: func(t *testing.T, dir string) string {
		return compressedFrom(t, dir, 6<<20, "compression_type=zlib")
	}},
	{name: "zstd, qemu-io", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", img, "8M")
		qemuIO(t, "qcow2", img, "write -c -P 7 0 64k", "write -c -P 9 1M 192k",
			"write -P 3 2M 64k", "write -z 3M 64k")
		return img
	}},
	{name: "zstd, convert", build: func(t *testing.T, dir string) string {
		return compressedFrom(t, dir, 6<<20, "compression_type=zstd")
	}},
	{name: "512-byte clusters", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "2M")
		qemuIO(t, "qcow2", img, "write -P 1 0 4k", "write -z 1024 512", "write -c -P 3 8k 4k",
			"write -P 5 100000 7777", "discard 512 512", "write -P 6 2096640 512")
		return img
	}},
	{name: "512-byte clusters, deflate", build: func(t *testing.T, dir string) string {
		return compressedFrom(t, dir, 1<<20, "cluster_size=512")
	}},
	{name: "512-byte clusters, zstd", build: func(t *testing.T, dir string) string {
		return compressedFrom(t, dir, 1<<20, "cluster_size=512,compression_type=zstd")
	}},
	{name: "2M clusters", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img, "16M")
		qemuIO(t, "qcow2", img, "write -P 1 0 3M", "write -z 4M 2M", "write -c -P 2 6M 2M",
			"write -P 3 9449577 100000", "discard 12M 2M")
		return img
	}},
	{name: "2M clusters, zstd", build: func(t *testing.T, dir string) string {
		return compressedFrom(t, dir, 12<<20, "cluster_size=2M,compression_type=zstd")
	}},
	{name: "3-deep chain, short raw base", build: func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.raw")
		writeFile(t, base, mixedData(3<<20+100, 3))
		mid := filepath.Join(dir, "mid.qcow2")
		top := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", mid, "6M")
		qemuIO(t, "qcow2", mid, "write -P 0x44 2M 2M", "write -z 0 64k")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", top, "8M")
		qemuIO(t, "qcow2", top, "write -P 0x55 7M 4k", "discard 1M 64k", "write -P 0x66 2621443 10",
			"write -P 0x77 3145800 100")
		return top
	}},
	{name: "qcow2 base smaller than its data", build: func(t *testing.T, dir string) string {
		// Past its virtual size a backing file reads as zeros, even where
		// its L2 table maps data.
		base := filepath.Join(dir, "base.qcow2")
		top := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", base, "2M")
		qemuIO(t, "qcow2", base, "write -P 0xab 0 2M")
		patch64(t, base, 24, 1<<20+512)
		qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", top, "4M")
		qemuIO(t, "qcow2", top, "write -P 1 0 4k")
		return top
	}},
	{name: "sparse raw base", build: func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.raw")
		f, err := os.Create(base)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(8 << 20); err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(bytes.Repeat([]byte{3}, 4096), 1<<20); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		top := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, top)
		qemuIO(t, "qcow2", top, "write -P 9 4M 4k")
		return top
	}},
	{name: "version 2", build: func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.qcow2")
		img := filepath.Join(dir, "v2.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", base, "4M")
		qemuIO(t, "qcow2", base, "write -P 0xab 0 4M")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-F", "qcow2", "-b", base, img)
		qemuIO(t, "qcow2", img, "write -P 1 64k 64k", "discard 1M 64k", "write -z 2M 64k",
			"write -c -P 2 3M 64k", "write -P 3 3500000 1000")
		return img
	}},
	{name: "backing format not named, qcow2 base", build: func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.qcow2")
		img := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", base, "2M")
		qemuIO(t, "qcow2", base, "write -P 0xab 0 2M")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, img)
		qemuIO(t, "qcow2", img, "write -P 1 64k 64k")
		dropBackingFormat(t, img)
		return img
	}},
	{name: "backing format not named, raw base", build: func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.img")
		img := filepath.Join(dir, "top.qcow2")
		writeFile(t, base, mixedData(2<<20, 5))
		qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, img)
		qemuIO(t, "qcow2", img, "write -P 1 64k 64k")
		dropBackingFormat(t, img)
		return img
	}},
	{name: "internal snapshot", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "4M")
		qemuIO(t, "qcow2", img, "write -P 1 0 2M")
		qemuImg(t, "snapshot", "-c", "s1", img)
		qemuIO(t, "qcow2", img, "write -P 2 64k 64k", "discard 1M 128k", "write -P 3 3M 64k")
		return img
	}},
	{name: "metadata preallocation", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, "4M")
		qemuIO(t, "qcow2", img, "write -P 1 1M 100k")
		return img
	}},
	{name: "data past the end of the file", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "4M")
		qemuIO(t, "qcow2", img, "write -P 1 0 1M")
		// Cut the file in the middle of the data: QEMU reads zeros there.
		fi, err := os.Stat(img)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, fi.Size()-300000); err != nil {
			t.Fatal(err)
		}
		return img
	}},
	{name: "size not a multiple of 512", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", img, "1M")
		qemuIO(t, "qcow2", img, "write -P 1 0 1M")
		patch64(t, img, 24, 1<<20-100)
		return img
	}},
	{name: "raw, odd size", format: "raw", build: func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "d.raw")
		writeFile(t, img, mixedData(100000+3, 7))
		return img
	}},
}

// TestReaderMatchesQEMU reads images of every kind qemu-img makes and
// checks every byte, and every data extent, against QEMU's own reading.
func TestReaderMatchesQEMU(t *testing.T) {
	needQEMUImg(t)
	for _, c := range imageCases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			format := c.format
			if format == "" {
				format = "qcow2"
			}
			img := c.build(t, t.TempDir())
			want := qemuRaw(t, format, img)
			r, err := OpenReader(img)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = r.Close() }()
			if r.Size() != int64(len(want)) {
				t.Fatalf("Size = %d, QEMU reads %d bytes", r.Size(), len(want))
			}
			checkSequential(t, r, want)
			checkConcurrent(t, r, want)
			checkExtents(t, r, want)
			if got, qemu := mustExtents(t, r, 0, r.Size()), qemuDataExtents(t, format, img); !slices.Equal(got, qemu) {
				t.Errorf("DataExtents = %v\nqemu-img map data = %v", got, qemu)
			}
		})
	}
}

// checkSequential reads the whole disk in odd-sized pieces.
func checkSequential(t *testing.T, r *Reader, want []byte) {
	t.Helper()
	for _, piece := range []int{999, 4097, 65536 + 13, 1<<20 + 511} {
		buf := make([]byte, piece)
		for off := int64(0); ; off += int64(piece) {
			n, err := r.ReadAt(buf, off)
			wantN := max(0, min(piece, len(want)-int(off)))
			if n != wantN {
				t.Fatalf("ReadAt(%d bytes, %d) = %d, %v; want %d", piece, off, n, err, wantN)
			}
			if !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
				t.Fatalf("ReadAt(%d bytes, %d): %s", piece, off, firstDiff(buf[:n], want[off:], off))
			}
			if wantN < piece {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("short ReadAt(%d bytes, %d) = %d, %v; want io.EOF", piece, off, n, err)
				}
				break
			}
			if err != nil {
				t.Fatalf("ReadAt(%d bytes, %d): %v", piece, off, err)
			}
		}
	}
}

// checkConcurrent reads random ranges from several goroutines at once.
func checkConcurrent(t *testing.T, r *Reader, want []byte) {
	t.Helper()
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(g)))
			buf := make([]byte, 300000)
			for range 100 {
				off := rng.Int63n(int64(len(want)) + 1)
				p := buf[:rng.Intn(len(buf))+1]
				n, err := r.ReadAt(p, off)
				wantN := min(len(p), len(want)-int(off))
				if n != wantN || (n < len(p)) != errors.Is(err, io.EOF) || (err != nil && !errors.Is(err, io.EOF)) {
					t.Errorf("ReadAt(%d bytes, %d) = %d, %v; want %d bytes", len(p), off, n, err, wantN)
					return
				}
				if !bytes.Equal(p[:n], want[off:off+int64(n)]) {
					t.Errorf("ReadAt(%d bytes, %d): %s", len(p), off, firstDiff(p[:n], want[off:], off))
					return
				}
			}
		}()
	}
	wg.Wait()
}

func firstDiff(got, want []byte, off int64) string {
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("byte %d is %#x, QEMU reads %#x", off+int64(i), got[i], want[i])
		}
	}
	return "no difference"
}

func mustExtents(t *testing.T, r *Reader, off, n int64) []Extent {
	t.Helper()
	ext, err := r.DataExtents(off, n)
	if err != nil {
		t.Fatalf("DataExtents(%d, %d): %v", off, n, err)
	}
	return ext
}

// checkExtents checks that DataExtents covers every non-zero byte, is
// well-formed, and that asking for part of the disk gives that part of the
// whole answer.
func checkExtents(t *testing.T, r *Reader, want []byte) {
	t.Helper()
	all := mustExtents(t, r, 0, r.Size())
	checkWellFormed(t, all, 0, r.Size())
	pos := int64(0)
	for _, e := range append(all, Extent{int64(len(want)), 0}) {
		for i, c := range want[pos:e.Offset] {
			if c != 0 {
				t.Fatalf("byte %d is non-zero outside DataExtents %v", pos+int64(i), all)
			}
		}
		pos = e.Offset + e.Length
	}
	rng := rand.New(rand.NewSource(1))
	for range 20 {
		off := rng.Int63n(r.Size() + 1)
		n := rng.Int63n(r.Size()/2 + 1)
		got := mustExtents(t, r, off, n)
		var clipped []Extent
		for _, e := range all {
			s, end := max(e.Offset, off), min(e.Offset+e.Length, off+n, r.Size())
			if s < end {
				clipped = append(clipped, Extent{s, end - s})
			}
		}
		if !slices.Equal(got, clipped) {
			t.Fatalf("DataExtents(%d, %d) = %v; the whole disk's, clipped, is %v", off, n, got, clipped)
		}
	}
}

func checkWellFormed(t *testing.T, ext []Extent, off, end int64) {
	t.Helper()
	prev := off - 1
	for _, e := range ext {
		if e.Length <= 0 || e.Offset <= prev || e.Offset < off || e.Offset+e.Length > end {
			t.Fatalf("extents %v are not merged, ascending and within [%d, %d)", ext, off, end)
		}
		prev = e.Offset + e.Length
	}
}

// TestDataExtentsFresh checks that nothing is reported where nothing was
// ever written, at the granularity of the cluster that decides.
func TestDataExtentsFresh(t *testing.T) {
	needQEMUImg(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "d.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "1G")
	r, err := OpenReader(img)
	if err != nil {
		t.Fatal(err)
	}
	if ext := mustExtents(t, r, 0, 1<<30); len(ext) != 0 {
		t.Errorf("fresh image: DataExtents = %v, want none", ext)
	}
	_ = r.Close()

	qemuIO(t, "qcow2", img, "write -P 1 536871012 4000", "write -z 600M 64k")
	r, err = OpenReader(img)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	tests := []struct {
		off, n int64
		want   []Extent
	}{
		{0, 1 << 30, []Extent{{512 << 20, 64 << 10}}},
		{512<<20 + 200, 10, []Extent{{512<<20 + 200, 10}}},
		{0, 512 << 20, nil},
		{512<<20 + 64<<10, 512 << 20, nil},
		{1<<30 - 1, 100, nil},
		{2 << 30, 100, nil},
	}
	for _, tt := range tests {
		if got := mustExtents(t, r, tt.off, tt.n); !slices.Equal(got, tt.want) {
			t.Errorf("DataExtents(%d, %d) = %v, want %v", tt.off, tt.n, got, tt.want)
		}
	}
	if _, err := r.DataExtents(-1, 10); err == nil {
		t.Error("DataExtents at a negative offset succeeded")
	}
}

func TestReadAtEdges(t *testing.T) {
	needQEMUImg(t)
	img := filepath.Join(t.TempDir(), "d.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "1M")
	qemuIO(t, "qcow2", img, "write -P 7 0 1M")
	r, err := OpenReader(img)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	buf := make([]byte, 100)
	tests := []struct {
		off   int64
		n     int
		eof   bool
		other bool
	}{
		{0, 100, false, false},
		{1<<20 - 100, 100, false, false},
		{1<<20 - 40, 40, true, false},
		{1 << 20, 0, true, false},
		{1<<20 + 5, 0, true, false},
		{-1, 0, false, true},
	}
	for _, tt := range tests {
		n, err := r.ReadAt(buf, tt.off)
		if n != tt.n || errors.Is(err, io.EOF) != tt.eof || (err != nil && !errors.Is(err, io.EOF)) != tt.other {
			t.Errorf("ReadAt(100 bytes, %d) = %d, %v; want %d bytes, EOF %v", tt.off, n, err, tt.n, tt.eof)
		}
	}
	if n, err := r.ReadAt(nil, 5); n != 0 || err != nil {
		t.Errorf("empty ReadAt = %d, %v", n, err)
	}
}

// TestOpenReaderRefuses covers images the reader must not read: those with
// features it does not handle (ErrUnsupported, so the caller goes through
// QEMU) and nonsense (ErrNotQcow2).
func TestOpenReaderRefuses(t *testing.T) {
	needQEMUImg(t)
	fresh := func(t *testing.T, dir string, opts ...string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, append(append([]string{"create", "-q", "-f", "qcow2"}, opts...), img, "1M")...)
		qemuIO(t, "qcow2", img, "write -P 1 0 64k")
		return img
	}
	tests := []struct {
		name  string
		build func(t *testing.T, dir string) string
		want  error  // nil: any error
		text  string // the error must contain this
	}{
		{"extended L2", func(t *testing.T, dir string) string {
			return fresh(t, dir, "-o", "extended_l2=on")
		}, ErrUnsupported, "extended L2"},
		{"LUKS encryption", func(t *testing.T, dir string) string {
			img := filepath.Join(dir, "d.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=secret",
				"-o", "encrypt.format=luks,encrypt.key-secret=s0", img, "1M")
			return img
		}, ErrUnsupported, "encryption"},
		{"external data file", func(t *testing.T, dir string) string {
			img := filepath.Join(dir, "d.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw"), img, "1M")
			return img
		}, ErrUnsupported, "external data file"},
		{"dirty bit", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch(t, img, 79, []byte{incompatDirty})
			return img
		}, ErrUnsupported, "dirty"},
		{"corrupt bit", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch(t, img, 79, []byte{incompatCorrupt})
			return img
		}, ErrUnsupported, "corrupt"},
		{"unknown incompatible feature", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch(t, img, 75, []byte{1})
			return img
		}, ErrUnsupported, "unknown incompatible"},
		{"unknown compression type", func(t *testing.T, dir string) string {
			img := fresh(t, dir, "-o", "compression_type=zstd")
			patch(t, img, 104, []byte{2})
			return img
		}, ErrUnsupported, "compression_type 2"},
		{"zstd without its feature bit", func(t *testing.T, dir string) string {
			img := fresh(t, dir, "-o", "compression_type=zstd")
			patch(t, img, 79, []byte{0})
			return img
		}, ErrNotQcow2, "without the compression type bit"},
		{"version 4", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch32(t, img, 4, 4)
			return img
		}, ErrUnsupported, "version 4"},
		{"truncated header", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			if err := os.Truncate(img, 50); err != nil {
				t.Fatal(err)
			}
			return img
		}, ErrNotQcow2, "truncated"},
		{"truncated version 3 header", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			if err := os.Truncate(img, 100); err != nil {
				t.Fatal(err)
			}
			return img
		}, ErrNotQcow2, "truncated"},
		{"L1 table past the end of the file", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch64(t, img, 40, 1<<30)
			return img
		}, ErrNotQcow2, "l1_table_offset"},
		{"L1 table not cluster-aligned", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch64(t, img, 40, read64(t, img, 40)+512)
			return img
		}, ErrNotQcow2, "not cluster-aligned"},
		{"L1 table too small for the size", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch64(t, img, 24, 1<<40)
			return img
		}, ErrNotQcow2, "l1_size"},
		{"cluster_bits too large", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch32(t, img, 20, 22)
			return img
		}, ErrNotQcow2, "cluster_bits 22"},
		{"cluster_bits too small", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch32(t, img, 20, 8)
			return img
		}, ErrNotQcow2, "cluster_bits 8"},
		{"header_length too small", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch32(t, img, 100, 96)
			return img
		}, ErrNotQcow2, "header_length 96"},
		{"no refcount table", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch32(t, img, 56, 0)
			return img
		}, ErrNotQcow2, "refcount_table_clusters"},
		{"backing name past the first cluster", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			patch64(t, img, 8, 1<<20)
			patch32(t, img, 16, 4)
			return img
		}, ErrNotQcow2, "backing_file_offset"},
		{"header extension too large", func(t *testing.T, dir string) string {
			img := fresh(t, dir)
			// The first extension follows the 112-byte header.
			patch32(t, img, 116, 1<<20)
			return img
		}, ErrNotQcow2, "header extension"},
		{"backing chain loops", func(t *testing.T, dir string) string {
			a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", a, "1M")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "a.qcow2", b)
			qemuImg(t, "rebase", "-q", "-u", "-F", "qcow2", "-b", "b.qcow2", a)
			return b
		}, nil, "loops"},
		{"image is its own backing file", func(t *testing.T, dir string) string {
			a := filepath.Join(dir, "a.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", a, "1M")
			qemuImg(t, "rebase", "-q", "-u", "-F", "qcow2", "-b", "./a.qcow2", a)
			return a
		}, nil, "loops"},
		{"backing chain too deep", func(t *testing.T, dir string) string {
			tmpl := filepath.Join(dir, "tmpl")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "d000.qcow2", tmpl, "1M")
			b, err := os.ReadFile(tmpl)
			if err != nil {
				t.Fatal(err)
			}
			i := bytes.Index(b, []byte("d000.qcow2"))
			for n := range MaxChain + 2 {
				copy(b[i:], fmt.Sprintf("d%03d", n+1))
				writeFile(t, filepath.Join(dir, fmt.Sprintf("d%03d.qcow2", n)), b)
			}
			return filepath.Join(dir, "d000.qcow2")
		}, nil, "deeper than"},
		{"backing file missing", func(t *testing.T, dir string) string {
			img := filepath.Join(dir, "d.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "gone.qcow2", img, "1M")
			return img
		}, os.ErrNotExist, "gone.qcow2"},
		{"backing format vmdk", func(t *testing.T, dir string) string {
			base, img := filepath.Join(dir, "b.vmdk"), filepath.Join(dir, "d.qcow2")
			qemuImg(t, "create", "-q", "-f", "vmdk", base, "1M")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "vmdk", "-b", base, img)
			return img
		}, ErrUnsupported, `format "vmdk"`},
		{"unnamed backing format, vmdk base", func(t *testing.T, dir string) string {
			base, img := filepath.Join(dir, "b.vmdk"), filepath.Join(dir, "d.qcow2")
			qemuImg(t, "create", "-q", "-f", "vmdk", base, "1M")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "vmdk", "-b", base, img)
			dropBackingFormat(t, img)
			return img
		}, ErrUnsupported, "looks like vmdk"},
		{"backing file over a protocol", func(t *testing.T, dir string) string {
			img := filepath.Join(dir, "d.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "nbd:localhost:10809", img, "1M")
			return img
		}, ErrUnsupported, "not a plain file"},
		{"not a regular file", func(t *testing.T, dir string) string {
			return dir
		}, ErrUnsupported, "not a regular file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			img := tt.build(t, dir)
			r, err := OpenReader(img)
			if err == nil {
				_ = r.Close()
				t.Fatal("OpenReader succeeded")
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("OpenReader: %v; want %v", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.text) {
				t.Errorf("OpenReader: %v; want it to say %q", err, tt.text)
			}
			if !strings.Contains(err.Error(), dir) {
				t.Errorf("OpenReader: %v: names no file", err)
			}
			if !errors.Is(tt.want, ErrUnsupported) && errors.Is(err, ErrUnsupported) {
				t.Errorf("OpenReader: %v: nonsense must not read as unsupported", err)
			}
		})
	}
}

// TestReaderCorrupt damages metadata behind a valid header: reads and
// DataExtents must fail where QEMU fails, not return made-up bytes.
func TestReaderCorrupt(t *testing.T) {
	needQEMUImg(t)
	mk := func(t *testing.T, dir string, opts ...string) string {
		img := filepath.Join(dir, "d.qcow2")
		qemuImg(t, append(append([]string{"create", "-q", "-f", "qcow2"}, opts...), img, "4M")...)
		qemuIO(t, "qcow2", img, "write -P 1 0 1M", "write -c -P 2 2M 64k", "write -z 3M 64k")
		return img
	}
	// damageCompressed overwrites the compressed data of the cluster at 2M.
	damageCompressed := func(t *testing.T, img string) {
		e := read64(t, img, l2EntryPos(t, img, 2<<20))
		patch(t, img, int64(e&(1<<54-1)), bytes.Repeat([]byte{0x5a}, 64))
	}
	tests := []struct {
		name      string
		build     func(t *testing.T, dir string) string
		at        int64 // a guest offset whose read fails
		qemuFails bool  // qemu-img convert fails too
		// DataExtents fails too: it reads L1 and L2 but not compressed data.
		extentsFail bool
	}{
		{"L2 table past the end of the file", func(t *testing.T, dir string) string {
			img := mk(t, dir)
			l2 := int64(read64(t, img, l1EntryPos(t, img, 0)) & entryOffsetMask)
			if err := os.Truncate(img, l2+100); err != nil {
				t.Fatal(err)
			}
			return img
		}, 0, false, true},
		{"L2 table not cluster-aligned", func(t *testing.T, dir string) string {
			img := mk(t, dir)
			pos := l1EntryPos(t, img, 0)
			patch64(t, img, pos, read64(t, img, pos)+512)
			return img
		}, 0, true, true},
		{"data cluster not cluster-aligned", func(t *testing.T, dir string) string {
			img := mk(t, dir)
			pos := l2EntryPos(t, img, 64<<10)
			patch64(t, img, pos, read64(t, img, pos)+1024)
			return img
		}, 64 << 10, true, true},
		{"zero cluster not cluster-aligned", func(t *testing.T, dir string) string {
			img := mk(t, dir)
			pos := l2EntryPos(t, img, 128<<10)
			patch64(t, img, pos, read64(t, img, pos)+1024|l2Zero)
			return img
		}, 128 << 10, true, true},
		{"zero flag in version 2", func(t *testing.T, dir string) string {
			img := mk(t, dir, "-o", "compat=0.10")
			pos := l2EntryPos(t, img, 64<<10)
			patch64(t, img, pos, read64(t, img, pos)|l2Zero)
			return img
		}, 64 << 10, true, true},
		{"damaged deflate cluster", func(t *testing.T, dir string) string {
			img := mk(t, dir)
			damageCompressed(t, img)
			return img
		}, 2 << 20, true, false},
		{"damaged zstd cluster", func(t *testing.T, dir string) string {
			img := mk(t, dir, "-o", "compression_type=zstd")
			damageCompressed(t, img)
			return img
		}, 2 << 20, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			img := tt.build(t, dir)
			out, err := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, filepath.Join(dir, "out.raw")).CombinedOutput()
			if (err != nil) != tt.qemuFails {
				t.Fatalf("qemu-img convert: %v: %s; want failure %v", err, out, tt.qemuFails)
			}
			r, err := OpenReader(img)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = r.Close() }()
			buf := make([]byte, 4096)
			if n, err := r.ReadAt(buf, tt.at); !errors.Is(err, errCorrupt) {
				t.Errorf("ReadAt(%d) = %d, %v; want a corruption error", tt.at, n, err)
			} else if !strings.Contains(err.Error(), img) {
				t.Errorf("ReadAt: %v: does not name the file", err)
			}
			if _, err := r.DataExtents(0, r.Size()); errors.Is(err, errCorrupt) != tt.extentsFail {
				t.Errorf("DataExtents: %v; want a corruption error: %v", err, tt.extentsFail)
			}
		})
	}
}

// TestDecompress pins the edges of QEMU's decompression that qemu-img
// does not produce: the output must be filled exactly, and what follows
// the data that fills it is ignored.
func TestDecompress(t *testing.T) {
	const cs = 4096
	rng := rand.New(rand.NewSource(9))
	text := make([]byte, 3*cs)
	for i := range text {
		text[i] = "lodge qcow2\n"[rng.Intn(12)]
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = enc.Close() }()
	zst := func(b []byte) []byte { return enc.EncodeAll(b, nil) }
	skippable := append([]byte{0x5e, 0x2a, 0x4d, 0x18, 3, 0, 0, 0}, "abc"...)
	def := func(b []byte) []byte {
		var buf bytes.Buffer
		w, err := flate.NewWriter(&buf, flate.BestCompression)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = w.Write(b)
		_ = w.Close()
		return buf.Bytes()
	}
	cat := func(b ...[]byte) []byte { return bytes.Join(b, nil) }
	tests := []struct {
		name string
		fn   func(out, in []byte) error
		in   []byte
		ok   bool
	}{
		{"zstd, one frame", unzstd, zst(text[:cs]), true},
		{"zstd, garbage after the frame", unzstd, cat(zst(text[:cs]), []byte("garbage")), true},
		{"zstd, next cluster's frame after", unzstd, cat(zst(text[:cs]), zst(text[cs:2*cs])), true},
		{"zstd, two frames and a skippable one", unzstd, cat(zst(text[:1000]), skippable, zst(text[1000:cs])), true},
		{"zstd, frame too large", unzstd, zst(text[:cs+1]), false},
		{"zstd, frame too small", unzstd, zst(text[:cs-1]), false},
		{"zstd, truncated", unzstd, func() []byte { b := zst(text[:cs]); return b[:len(b)/2] }(), false},
		{"zstd, garbage", unzstd, []byte("garbage garbage garbage"), false},
		{"deflate", inflate, def(text[:cs]), true},
		{"deflate, garbage after", inflate, cat(def(text[:cs]), []byte("garbage")), true},
		{"deflate, stream longer than a cluster", inflate, def(text[:2*cs]), true},
		{"deflate, stream too short", inflate, def(text[:cs-1]), false},
		{"deflate, truncated", inflate, func() []byte { b := def(text[:cs]); return b[:len(b)/2] }(), false},
	}
	for _, tt := range tests {
		out := make([]byte, cs)
		err := tt.fn(out, tt.in)
		if (err == nil) != tt.ok {
			t.Errorf("%s: %v, want success %v", tt.name, err, tt.ok)
		}
		if err == nil && !bytes.Equal(out, text[:cs]) {
			t.Errorf("%s: wrong bytes", tt.name)
		}
	}
}

func TestBackingPath(t *testing.T) {
	tests := []struct{ image, name, want string }{
		{"/a/b/top.qcow2", "base.qcow2", "/a/b/base.qcow2"},
		{"/a/b/top.qcow2", "/c/base.qcow2", "/c/base.qcow2"},
		// Not cleaned: with b a symlink, ".." is b's target's parent.
		{"/a/b/top.qcow2", "../base.qcow2", "/a/b/../base.qcow2"},
		{"top.qcow2", "base.qcow2", "base.qcow2"},
		{"x/top.qcow2", "y/base.qcow2", "x/y/base.qcow2"},
	}
	for _, tt := range tests {
		if got := backingPath(tt.image, tt.name); got != tt.want {
			t.Errorf("backingPath(%q, %q) = %q, want %q", tt.image, tt.name, got, tt.want)
		}
	}
}

// FuzzReader feeds hostile images: opening and reading them must not
// panic, hang or allocate without bound, and what is returned must be
// well-formed.
func FuzzReader(f *testing.F) {
	if _, err := exec.LookPath("qemu-img"); err == nil {
		dir := f.TempDir()
		seed := func(opts, cmds string) {
			img := filepath.Join(dir, "seed.qcow2")
			_ = os.Remove(img)
			args := []string{"create", "-q", "-f", "qcow2", "-u", "-o", "cluster_size=512," + opts, img, "64k"}
			if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
				f.Fatalf("qemu-img %v: %v: %s", args, err, out)
			}
			if cmds != "" {
				args := []string{"-f", "qcow2"}
				for _, c := range strings.Split(cmds, ";") {
					args = append(args, "-c", c)
				}
				if out, err := exec.Command("qemu-io", append(args, img)...).CombinedOutput(); err != nil {
					f.Fatalf("qemu-io %v: %v: %s", args, err, out)
				}
			}
			b, err := os.ReadFile(img)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b)
		}
		seed("compat=1.1", "write -P 1 0 4k;write -z 4k 1k;write -c -P 2 8k 4k;discard 512 512;write -P 3 9000 100")
		seed("compression_type=zstd", "write -c -P 2 0 2k;write -c -P 3 4k 512;write -P 4 8k 1k")
		seed("compat=0.10", "write -P 1 0 2k;write -c -P 2 4k 2k")
		seed("extended_l2=on,cluster_size=16k", "write -P 1 0 2k")
		seed("backing_file=img,backing_fmt=qcow2", "")
		seed("backing_file=other,backing_fmt=raw", "")
		img := filepath.Join(dir, "seed.qcow2")
		_ = os.Remove(img)
		for _, args := range [][]string{
			{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "64k"},
			{"qemu-img", "bitmap", "--add", "-g", "512", "-f", "qcow2", img, "b"},
			{"qemu-io", "-f", "qcow2", "-c", "write -P 1 1k 3k", img},
		} {
			if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
				f.Fatalf("%v: %v: %s", args, err, out)
			}
		}
		if b, err := os.ReadFile(img); err == nil {
			f.Add(b)
		}
	}
	h := make([]byte, 1024)
	copy(h, "QFI\xfb\x00\x00\x00\x03")
	binary.BigEndian.PutUint32(h[20:], 9)          // 512-byte clusters
	binary.BigEndian.PutUint64(h[24:], 4096)       // size
	binary.BigEndian.PutUint32(h[36:], 1)          // l1_size
	binary.BigEndian.PutUint64(h[40:], 512)        // l1_table_offset
	binary.BigEndian.PutUint64(h[48:], 512)        // refcount_table_offset
	binary.BigEndian.PutUint32(h[56:], 1)          // refcount_table_clusters
	binary.BigEndian.PutUint32(h[96:], 4)          // refcount_order
	binary.BigEndian.PutUint32(h[100:], 104)       // header_length
	binary.BigEndian.PutUint64(h[512:], 512|1<<63) // L1[0] → L2 at 512 (the L1 itself)
	f.Add(h)
	f.Add([]byte("not an image at all"))
	// One file, rewritten for each input: a directory per input would
	// cost more than the reading.
	path := filepath.Join(f.TempDir(), "img")
	f.Fuzz(func(t *testing.T, data []byte) {
		writeFile(t, path, data)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		r, err := OpenReader(path)
		if err != nil {
			return
		}
		defer func() { _ = r.Close() }()
		size := r.Size()
		if size < 0 {
			t.Fatalf("Size = %d", size)
		}
		buf := make([]byte, 64<<10)
		for _, off := range []int64{0, size/2 - 1000, size - 3000} {
			off = max(off, 0)
			n, err := r.ReadAt(buf, off)
			if n < 0 || n > len(buf) || (n < len(buf) && err == nil) {
				t.Fatalf("ReadAt(%d) = %d, %v", off, n, err)
			}
		}
		for _, e := range [][2]int64{{0, 64 << 20}, {size - 1<<20, 1 << 20}} {
			off := max(e[0], 0)
			ext, err := r.DataExtents(off, e[1])
			if err == nil {
				checkWellFormed(t, ext, off, min(off+e[1], size))
			}
		}
		for _, l := range r.Layers() {
			for _, b := range l.Bitmaps {
				if ext, err := r.DirtyExtents(b.Name, 0, 64<<20); err == nil {
					checkWellFormed(t, ext, 0, min(64<<20, size))
				}
			}
		}
		if ext, err := r.AllocatedAbove(MaxChain, 0, 64<<20); err == nil {
			checkWellFormed(t, ext, 0, min(64<<20, size))
		}
		runtime.ReadMemStats(&after)
		if d := after.TotalAlloc - before.TotalAlloc; d > 256<<20 {
			t.Fatalf("allocated %d MiB", d>>20)
		}
	})
}

// BenchmarkReaderSequential reads a fully allocated 256 MiB image in 1 MiB
// pieces from two goroutines, as a backup does.
func BenchmarkReaderSequential(b *testing.B) {
	const size, piece = 256 << 20, 1 << 20
	img := filepath.Join(b.TempDir(), "d.qcow2")
	w, err := Create(img, size)
	if err != nil {
		b.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("lodge!!\x01"), piece/8)
	for off := int64(0); off < size; off += piece {
		if _, err := w.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		b.Fatal(err)
	}
	r, err := OpenReader(img)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	b.SetBytes(size)
	b.ResetTimer()
	for range b.N {
		var next atomic.Int64
		var wg sync.WaitGroup
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, piece)
				for {
					off := next.Add(piece) - piece
					if off >= size {
						return
					}
					if _, err := r.ReadAt(buf, off); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
	}
}
