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
	if err := CheckSelfContained(over, info); !errors.Is(err, ErrUnsafeImage) {
		t.Fatalf("overlay is not self-contained: err = %v, want ErrUnsafeImage", err)
	}
	baseInfo, err := q.Info(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckSelfContained(base, baseInfo); err != nil {
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

func TestVMDKExtents(t *testing.T) {
	q := needQEMUImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("flat.bin", strings.Repeat("x", 4096))
	if err := os.Symlink("/etc/hostname", filepath.Join(dir, "link.bin")); err != nil {
		t.Fatal(err)
	}
	descriptor := func(extent string) string {
		return "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8 FLAT \"" + extent + "\" 0\n\nddb.adapterType = \"ide\"\n"
	}
	for _, tc := range []struct {
		name, extent string
		safe         bool
	}{
		{"beside", "flat.bin", true},
		{"absolute host file", "/etc/hostname", false},
		{"climbs out", "../../../../etc/hostname", false},
		{"symlink beside", "link.bin", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := write(strings.ReplaceAll(tc.name, " ", "-")+".vmdk", descriptor(tc.extent))
			info, err := q.Info(ctx, p)
			if err != nil {
				t.Fatal(err)
			}
			err = CheckSelfContained(p, info)
			if tc.safe && err != nil || !tc.safe && !errors.Is(err, ErrUnsafeImage) {
				t.Fatalf("CheckSelfContained with extent %q = %v, want safe=%v", tc.extent, err, tc.safe)
			}
		})
	}
}

// TestCopyTopAndRebase publishes the top of a three-file chain onto its
// bottom, as image publish does, and checks nothing changed in content.
func TestCopyTopAndRebase(t *testing.T) {
	q := needQEMUImg(t)
	if _, err := exec.LookPath("qemu-io"); err != nil {
		t.Skip("qemu-io not installed")
	}
	ctx := context.Background()
	dir := t.TempDir()
	base, mid, top, pub := filepath.Join(dir, "base"), filepath.Join(dir, "mid"), filepath.Join(dir, "top"), filepath.Join(dir, "pub")
	qemuIO := func(file, cmd string) {
		if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, file).CombinedOutput(); err != nil {
			t.Fatalf("qemu-io %s: %v: %s", cmd, err, out)
		}
	}
	if err := q.Create(ctx, base, 64<<20); err != nil {
		t.Fatal(err)
	}
	qemuIO(base, "write -P 1 0 8M")
	if err := q.CreateOverlay(ctx, base, mid, 64<<20); err != nil {
		t.Fatal(err)
	}
	qemuIO(mid, "write -P 2 8M 4M")
	if err := q.CreateOverlay(ctx, mid, top, 64<<20); err != nil {
		t.Fatal(err)
	}
	if has, err := q.HasData(ctx, top); err != nil || has {
		t.Fatalf("HasData(fresh overlay) = %v, %v; want false", has, err)
	}
	qemuIO(top, "write -P 3 16M 1M")
	if has, err := q.HasData(ctx, top); err != nil || !has {
		t.Fatalf("HasData(written overlay) = %v, %v; want true", has, err)
	}
	if err := q.CreateOverlay(ctx, base, top, 64<<20); !errors.Is(err, os.ErrExist) {
		t.Fatalf("CreateOverlay over an existing file = %v, want ErrExist", err)
	}
	if err := q.CopyTop(ctx, top, mid, pub); err != nil {
		t.Fatal(err)
	}
	if err := q.Rebase(ctx, pub, base); err != nil {
		t.Fatal(err)
	}
	info, err := q.Info(ctx, pub)
	if err != nil || info.BackingFilename != base {
		t.Fatalf("published layer: backing %q (%v), want %s", info.BackingFilename, err, base)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", top, pub).CombinedOutput(); err != nil {
		t.Fatalf("published layer differs from the VM's chain: %v: %s", err, out)
	}
}
