package nbd

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func needQemu(t testing.TB) {
	t.Helper()
	for _, bin := range []string{"qemu-nbd", "qemu-img"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skip("qemu-nbd not installed: apt-get install qemu-utils")
		}
	}
}

func qemuImg(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// serveImage starts qemu-nbd for the test and stops it at the end.
func serveImage(t testing.TB, opts ServerOptions) *Server {
	t.Helper()
	if opts.Socket == "" {
		opts.Socket = filepath.Join(t.TempDir(), "nbd.sock")
	}
	s, err := Serve(context.Background(), opts)
	if err != nil {
		t.Fatalf("Serve: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return s
}

func dialServer(t testing.TB, s *Server, contexts ...string) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := s.Dial(ctx, contexts...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func readAll(t testing.TB, c *Conn) []byte {
	t.Helper()
	got := make([]byte, c.Size())
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	return got
}

func TestQemuReadWrite(t *testing.T) {
	needQemu(t)
	ctx := t.Context()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "64M")
	s := serveImage(t, ServerOptions{Path: img, Format: "qcow2", Writeback: true})
	c := dialServer(t, s, ContextAllocation)
	if c.Size() != 64<<20 || c.ReadOnly() {
		t.Fatalf("Size %d, ReadOnly %v; want 64 MiB, writable", c.Size(), c.ReadOnly())
	}
	if ext, err := c.DataExtents(ctx, 0, c.Size()); err != nil || len(ext) != 0 {
		t.Fatalf("DataExtents of a new image = %v, %v; want none", ext, err)
	}

	want := make([]byte, 64<<20)
	writes := []struct{ off, n int64 }{
		{0, 4096},
		{1<<20 + 512, 10000},
		{40 << 20, 128 << 10},
		{64<<20 - 65536, 65536},
	}
	for i, w := range writes {
		p := pattern(int(w.n), uint64(i)+100)
		if _, err := c.WriteAt(p, w.off); err != nil {
			t.Fatalf("WriteAt: %v", err)
		}
		copy(want[w.off:], p)
	}
	if !bytes.Equal(readAll(t, c), want) {
		t.Fatalf("read back different data")
	}
	// qcow2 allocates whole 64 KiB clusters.
	ext, err := c.DataExtents(ctx, 0, c.Size())
	wantExt := []Extent{{0, 65536, 0}, {1 << 20, 65536, 0}, {40 << 20, 128 << 10, 0}, {64<<20 - 65536, 65536, 0}}
	if err != nil || !reflect.DeepEqual(ext, wantExt) {
		t.Fatalf("DataExtents = %v, %v; want %v", ext, err, wantExt)
	}

	if err := c.WriteZeroes(ctx, 40<<20, 128<<10, true); err != nil {
		t.Fatalf("WriteZeroes: %v", err)
	}
	clear(want[40<<20 : 40<<20+128<<10])
	if err := c.Trim(ctx, 64<<20-65536, 65536); err != nil {
		t.Fatalf("Trim: %v", err)
	}
	clear(want[64<<20-65536:])
	ext, err = c.DataExtents(ctx, 0, c.Size())
	wantExt = []Extent{{0, 65536, 0}, {1 << 20, 65536, 0}}
	if err != nil || !reflect.DeepEqual(ext, wantExt) {
		t.Errorf("DataExtents after zeroing and trimming = %v, %v; want %v", ext, err, wantExt)
	}
	if err := c.WriteZeroes(ctx, 0, 4096, false); err != nil {
		t.Fatalf("WriteZeroes without trim: %v", err)
	}
	clear(want[:4096])
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if !bytes.Equal(readAll(t, c), want) {
		t.Fatalf("read back different data after zeroing")
	}

	// A running writer holds the image lock: a plain read-only server is
	// refused, and says why.
	_, err = Serve(ctx, ServerOptions{Path: img, Format: "qcow2", ReadOnly: true, Socket: filepath.Join(dir, "ro.sock")})
	if err == nil || !strings.Contains(err.Error(), "lock") {
		t.Errorf("read-only Serve of a locked image: %v", err)
	}
	t.Logf("read-only Serve of a locked image: %v", err)
	// ForceShare reads it anyway.
	ro := serveImage(t, ServerOptions{Path: img, Format: "qcow2", ReadOnly: true, ForceShare: true})
	rc := dialServer(t, ro, ContextAllocation)
	if !rc.ReadOnly() {
		t.Errorf("force-share export is writable")
	}
	if !bytes.Equal(readAll(t, rc), want) {
		t.Errorf("force-share read differs from what was written")
	}
	if _, err := rc.WriteAt(make([]byte, 512), 0); err == nil {
		t.Errorf("WriteAt on the read-only export succeeded")
	}
	if ext, err := rc.DataExtents(ctx, 0, rc.Size()); err != nil || len(ext) != 2 || ext[1] != (Extent{1 << 20, 65536, 0}) {
		t.Errorf("force-share DataExtents = %v, %v", ext, err)
	}
}

func TestQemuBackingChain(t *testing.T) {
	needQemu(t)
	ctx := t.Context()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	overlay := filepath.Join(dir, "overlay.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "64M")

	baseData := pattern(65536, 1)
	func() {
		s := serveImage(t, ServerOptions{Path: base, Format: "qcow2"})
		c := dialServer(t, s)
		for _, off := range []int64{0, 8 << 20} {
			if _, err := c.WriteAt(baseData, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		_ = c.Close()
		if err := s.Stop(); err != nil {
			t.Fatal(err)
		}
	}()
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)

	s := serveImage(t, ServerOptions{Path: overlay, Format: "qcow2"})
	c := dialServer(t, s, ContextAllocation)
	got := make([]byte, 65536)
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, baseData) {
		t.Fatalf("overlay does not read through to its base: %v", err)
	}
	top := pattern(4096, 2)
	if _, err := c.WriteAt(top, 8<<20); err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Clone(top), baseData[4096:]...)
	if _, err := c.ReadAt(got, 8<<20); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("overlay write over base data reads back wrong: %v", err)
	}
	ext, err := c.DataExtents(ctx, 0, c.Size())
	wantExt := []Extent{{0, 65536, 0}, {8 << 20, 65536, 0}}
	if err != nil || !reflect.DeepEqual(ext, wantExt) {
		t.Errorf("DataExtents of the chain = %v, %v; want %v", ext, err, wantExt)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}

	// The base is untouched, and can be read while the overlay is open.
	bs := serveImage(t, ServerOptions{Path: base, Format: "qcow2", ReadOnly: true, ForceShare: true})
	bc := dialServer(t, bs)
	if _, err := bc.ReadAt(got, 8<<20); err != nil || !bytes.Equal(got, baseData) {
		t.Errorf("base changed under its overlay: %v", err)
	}
}

func TestQemuSparseDataExtentsFast(t *testing.T) {
	needQemu(t)
	ctx := t.Context()
	img := filepath.Join(t.TempDir(), "big.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "4G")
	s := serveImage(t, ServerOptions{Path: img, Format: "qcow2"})
	c := dialServer(t, s, ContextAllocation)

	r := rand.New(rand.NewPCG(42, 42))
	clusters := map[int64]bool{}
	for len(clusters) < 300 {
		clusters[r.Int64N(4<<30/65536)] = true
	}
	keys := slices.Sorted(func(yield func(int64) bool) {
		for k := range clusters {
			if !yield(k) {
				return
			}
		}
	})
	p := pattern(65536, 3)
	var want []Extent
	for _, k := range keys {
		off := k * 65536
		if _, err := c.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		if n := len(want); n > 0 && want[n-1].Offset+want[n-1].Length == off {
			want[n-1].Length += 65536
		} else {
			want = append(want, Extent{Offset: off, Length: 65536})
		}
	}
	start := time.Now()
	got, err := c.DataExtents(ctx, 0, c.Size())
	elapsed := time.Since(start)
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("DataExtents = %d extents, %v; want %d", len(got), err, len(want))
	}
	t.Logf("DataExtents over 4 GiB with %d data extents took %v", len(got), elapsed)
	if elapsed > 2*time.Second {
		t.Errorf("DataExtents over 4 GiB took %v", elapsed)
	}
}

func TestQemuServeErrors(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "1M")
	notSocket := filepath.Join(dir, "file")
	if err := os.WriteFile(notSocket, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	tests := []struct {
		name    string
		opts    ServerOptions
		wantErr string
	}{
		{"missing image", ServerOptions{Path: filepath.Join(dir, "nope.qcow2"), Format: "qcow2", Socket: sock}, "No such file or directory"},
		{"wrong format", ServerOptions{Path: img, Format: "vmdk", Socket: sock}, "invalid VMDK image descriptor"},
		{"no format", ServerOptions{Path: img, Socket: sock}, "not a format name"},
		{"format injection", ServerOptions{Path: img, Format: "qcow2,file.filename=/etc/passwd", Socket: sock}, "not a format name"},
		{"force-share writable", ServerOptions{Path: img, Format: "qcow2", ForceShare: true, Socket: sock}, "read-only"},
		{"socket path is a file", ServerOptions{Path: img, Format: "qcow2", Socket: notSocket}, "not a socket"},
		{"socket path too long", ServerOptions{Path: img, Format: "qcow2", Socket: "/" + strings.Repeat("x", 120)}, "longer than"},
		{"missing binary", ServerOptions{Binary: filepath.Join(dir, "no-qemu-nbd"), Path: img, Format: "qcow2", Socket: sock}, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Serve(t.Context(), tt.opts)
			if err == nil {
				_ = s.Stop()
				t.Fatalf("Serve succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
			if _, err := os.Lstat(sock); err == nil {
				t.Errorf("socket left behind")
			}
		})
	}
}

func TestQemuStop(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	qemuImg(t, "create", "-q", "-f", "raw", img, "1M")
	sock := filepath.Join(dir, "s.sock")

	s, err := Serve(context.Background(), ServerOptions{Path: img, Format: "raw", Socket: sock, Export: "disk"})
	if err != nil {
		t.Fatal(err)
	}
	// Several clients at once, and one after another.
	a := dialServer(t, s)
	b := dialServer(t, s)
	_ = a.Close()
	c := dialServer(t, s)
	for _, conn := range []*Conn{b, c} {
		if _, err := conn.WriteAt(make([]byte, 512), 0); err != nil {
			t.Errorf("WriteAt: %v", err)
		}
	}
	if err := s.Stop(); err != nil {
		t.Errorf("Stop: %v", err)
	}
	// Neither the readiness probe nor a client's Close should make
	// qemu-nbd complain.
	if msg := s.stderr.firstLines(3); msg != "" {
		t.Errorf("qemu-nbd said %q", msg)
	}
	if err := s.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still there after Stop: %v", err)
	}
	if _, err := b.ReadAt(make([]byte, 512), 0); err == nil {
		t.Errorf("ReadAt succeeded after the server stopped")
	}

	// Ending the context ends the server too.
	ctx, cancel := context.WithCancel(context.Background())
	s, err = Serve(ctx, ServerOptions{Path: img, Format: "raw", Socket: sock})
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-s.exited:
	case <-time.After(stopTimeout + time.Second):
		t.Fatalf("qemu-nbd still running after its context ended")
	}
	if err := s.Stop(); err != nil {
		t.Errorf("Stop after the context ended: %v", err)
	}
	if _, err := s.Dial(context.Background()); err == nil {
		t.Errorf("Dial to a stopped server succeeded")
	}
}

// benchImage makes a 1 GiB qcow2 and serves it writable.
func benchImage(b *testing.B) (*Server, string) {
	dir := b.TempDir()
	img := filepath.Join(dir, "bench.qcow2")
	qemuImg(b, "create", "-q", "-f", "qcow2", img, "1G")
	return serveImage(b, ServerOptions{Path: img, Format: "qcow2", Writeback: true, Socket: filepath.Join(dir, "s.sock")}), img
}

// parallelChunks runs fn over every chunk of size bytes with workers
// goroutines sharing one connection.
func parallelChunks(b *testing.B, workers int, chunk, size int64, fn func(buf []byte, off int64) error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	for w := range workers {
		buf := pattern(int(chunk), uint64(w))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				off := next.Add(chunk) - chunk
				if off >= size {
					return
				}
				if err := fn(buf, off); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		b.Fatal(err)
	}
}

// BenchmarkQemuRead reads 1 GiB of allocated qcow2 data through
// qemu-nbd with 4 goroutines issuing 2 MiB reads on one connection.
func BenchmarkQemuRead(b *testing.B) {
	needQemu(b)
	s, _ := benchImage(b)
	c := dialServer(b, s)
	parallelChunks(b, 4, 2<<20, c.Size(), func(buf []byte, off int64) error {
		_, err := c.WriteAt(buf, off)
		return err
	})
	if err := c.Flush(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(c.Size())
	b.ResetTimer()
	for b.Loop() {
		parallelChunks(b, 4, 2<<20, c.Size(), func(buf []byte, off int64) error {
			_, err := c.ReadAt(buf, off)
			return err
		})
	}
}

// BenchmarkQemuWrite writes 1 GiB into a fresh qcow2 through qemu-nbd
// with 4 goroutines issuing 2 MiB writes on one connection, then flushes.
func BenchmarkQemuWrite(b *testing.B) {
	needQemu(b)
	b.SetBytes(1 << 30)
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		s, img := benchImage(b)
		c := dialServer(b, s)
		b.StartTimer()
		parallelChunks(b, 4, 2<<20, c.Size(), func(buf []byte, off int64) error {
			_, err := c.WriteAt(buf, off)
			return err
		})
		if err := c.Flush(context.Background()); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		_ = c.Close()
		if err := s.Stop(); err != nil {
			b.Fatal(err)
		}
		_ = os.Remove(img)
	}
}
