package storage

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func needQEMUImg(t *testing.T) *QEMUImg {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed: apt-get install qemu-utils")
	}
	return NewQEMUImg("")
}

func TestOverlayChainAndSafety(t *testing.T) {
	q := needQEMUImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	if err := q.Create(ctx, base, 1<<30); err != nil {
		t.Fatal(err)
	}
	over := filepath.Join(dir, "over.qcow2")
	if err := q.CreateOverlay(ctx, base, over, 2<<30); err != nil {
		t.Fatal(err)
	}
	info, err := q.Info(ctx, over)
	if err != nil {
		t.Fatal(err)
	}
	if info.Format != "qcow2" || info.VirtualSize != 2<<30 || info.BackingFilename != base {
		t.Fatalf("overlay info = %+v", info)
	}
	if err := CheckSelfContained(info); !errors.Is(err, ErrUnsafeImage) {
		t.Fatalf("overlay is not self-contained: err = %v, want ErrUnsafeImage", err)
	}
	baseInfo, err := q.Info(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckSelfContained(baseInfo); err != nil {
		t.Fatalf("base: %v", err)
	}
	// A thin overlay takes almost no room.
	if info.ActualSize > 1<<20 {
		t.Fatalf("overlay actual size %d, want < 1 MiB", info.ActualSize)
	}
}

func TestConvertKeepsHoles(t *testing.T) {
	q := needQEMUImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(512 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("hello"), 100<<20); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	dst := filepath.Join(dir, "disk.qcow2")
	if err := q.ConvertProgress(ctx, raw, "raw", dst, nil); err != nil {
		t.Fatal(err)
	}
	info, err := q.Info(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != 512<<20 || info.ActualSize > 2<<20 {
		t.Fatalf("converted = virtual %d actual %d, want 512 MiB virtual and < 2 MiB used", info.VirtualSize, info.ActualSize)
	}
}

func TestErrorsCarryStderr(t *testing.T) {
	q := needQEMUImg(t)
	_, err := q.Info(context.Background(), filepath.Join(t.TempDir(), "missing.qcow2"))
	if err == nil || !strings.Contains(err.Error(), "missing.qcow2") {
		t.Fatalf("Info(missing) = %v, want qemu-img's message naming the file", err)
	}
}

func TestPool(t *testing.T) {
	dir := t.TempDir()
	p := Pool{Name: "fast", Path: dir}
	if err := p.Check(); err != nil {
		t.Fatal(err)
	}
	u, err := p.Usage()
	if err != nil || u.Total <= 0 || u.Free <= 0 || u.Free > u.Total {
		t.Fatalf("Usage = %+v, %v", u, err)
	}
	gone := Pool{Name: "gone", Path: filepath.Join(dir, "nope")}
	if err := gone.Check(); !errors.Is(err, ErrPoolMissing) {
		t.Fatalf("Check(missing) = %v, want ErrPoolMissing", err)
	}
	a, b := p.NewVolumePath("web", "root"), p.NewVolumePath("web", "root")
	if filepath.Dir(a) != dir || !strings.HasPrefix(filepath.Base(a), "web-root-") || !strings.HasSuffix(a, ".qcow2") || a == b {
		t.Fatalf("NewVolumePath = %s, %s: want two different web-root-*.qcow2 in %s", a, b, dir)
	}
}
