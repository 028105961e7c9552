package image

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/storage"
	"github.com/lodge-vm/lodge/internal/store"
)

func TestValidateName(t *testing.T) {
	for name, ok := range map[string]bool{
		"debian-12": true, "base.v2": true, "a_b": true,
		"": false, "..": false, "../x": false, "a/b": false, "a..b": false, ".hidden": false,
	} {
		if err := ValidateName(name); (err == nil) != ok {
			t.Errorf("ValidateName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
}

func TestImport(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed: apt-get install qemu-utils")
	}
	ctx := context.Background()
	home := t.TempDir()
	img := storage.NewQEMUImg("")
	lib := New(home, store.NewMemory(), img, nil)
	src := t.TempDir()

	raw := filepath.Join(src, "disk.raw")
	if err := os.WriteFile(raw, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := lib.Import(ctx, "base", raw, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.SourceFormat != "raw" || got.Format != "qcow2" || got.VirtualSize != 4<<20 {
		t.Fatalf("imported = %+v", got)
	}
	if st, err := os.Stat(got.Path); err != nil || st.Mode().Perm() != 0o444 {
		t.Fatalf("image file %s: %v, mode %v; want read-only", got.Path, err, st.Mode())
	}
	if _, err := lib.Import(ctx, "base", raw, nil); !errors.Is(err, errdefs.ErrExists) {
		t.Fatalf("second import under one name = %v", err)
	}

	// A qcow2 whose header points at a host file is refused, and nothing
	// is left behind.
	evil := filepath.Join(src, "evil.qcow2")
	cmd := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/passwd", evil, "1M")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make evil image: %v: %s", err, out)
	}
	_, err = lib.Import(ctx, "evil", evil, nil)
	if !errors.Is(err, storage.ErrUnsafeImage) || !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("import of an image with a backing file = %v", err)
	}
	if _, err := os.Stat(filepath.Join(home, "images", "evil")); !os.IsNotExist(err) {
		t.Fatal("refused import left a directory behind")
	}
	if _, err := lib.Get(ctx, "evil"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("refused import left a record: %v", err)
	}

	lib.Users = func(context.Context, string) ([]string, error) { return []string{"web"}, nil }
	if err := lib.Delete(ctx, "base"); !errors.Is(err, errdefs.ErrInUse) {
		t.Fatalf("delete of used image = %v", err)
	}
	lib.Users = nil
	if err := lib.Delete(ctx, "base"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(got.Path); !os.IsNotExist(err) {
		t.Fatal("deleted image's file remains")
	}
}

// TestPublishChainFlatten publishes a VM-like top (on a clone layer) as a
// child image, checks chain and dependents, and flattens it.
func TestPublishChainFlatten(t *testing.T) {
	if _, err := exec.LookPath("qemu-io"); err != nil {
		t.Skip("qemu-io not installed: apt-get install qemu-utils")
	}
	ctx := context.Background()
	home := t.TempDir()
	img := storage.NewQEMUImg("")
	st := store.NewMemory()
	lib := New(home, st, img, nil)
	src := t.TempDir()
	raw := filepath.Join(src, "disk.raw")
	if err := os.WriteFile(raw, make([]byte, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	base, err := lib.Import(ctx, "base", raw, nil)
	if err != nil {
		t.Fatal(err)
	}
	qemuIO := func(file, cmd string) {
		if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, file).CombinedOutput(); err != nil {
			t.Fatalf("qemu-io %s: %v: %s", cmd, err, out)
		}
	}
	layer, top := filepath.Join(src, "layer.qcow2"), filepath.Join(src, "top.qcow2")
	if err := img.CreateOverlay(ctx, base.Path, layer, 16<<20); err != nil {
		t.Fatal(err)
	}
	qemuIO(layer, "write -P 7 0 1M")
	if err := img.CreateOverlay(ctx, layer, top, 16<<20); err != nil {
		t.Fatal(err)
	}
	qemuIO(top, "write -P 8 4M 1M")

	// A failing preparation (generalize) leaves nothing behind.
	boom := errors.New("guest would not boot")
	_, err = lib.Publish(ctx, PublishSpec{Name: "child", Parent: "base", Top: top, TopBacking: layer, VM: "web",
		Prepare: func(context.Context, string) error { return boom }})
	if !errors.Is(err, boom) {
		t.Fatalf("publish with a failing preparation = %v", err)
	}
	if _, err := os.Stat(filepath.Join(home, "images", "child")); !os.IsNotExist(err) {
		t.Fatal("failed publish left a directory")
	}

	prepared := ""
	child, err := lib.Publish(ctx, PublishSpec{Name: "child", Parent: "base", Top: top, TopBacking: layer, VM: "web",
		Prepare: func(_ context.Context, path string) error { prepared = path; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	if prepared == "" || child.Parent != "base" || !child.Generalized || child.PublishedFrom != "web" || strings.Join(child.Chain, ",") != "child,base" {
		t.Fatalf("published = %+v (prepared %q)", child, prepared)
	}
	if out, err := exec.Command("qemu-img", "compare", "-q", top, child.Path).CombinedOutput(); err != nil {
		t.Fatalf("published image differs from the VM's disk: %v: %s", err, out)
	}
	info, err := img.Info(ctx, child.Path)
	if err != nil || info.BackingFilename != base.Path {
		t.Fatalf("published image backing = %q (%v), want %s", info.BackingFilename, err, base.Path)
	}
	if got, _ := lib.Get(ctx, "base"); strings.Join(got.Children, ",") != "child" {
		t.Fatalf("base children = %v", got.Children)
	}
	if err := lib.Delete(ctx, "base"); !errors.Is(err, errdefs.ErrInUse) || !strings.Contains(err.Error(), "image child") {
		t.Fatalf("delete of a parent = %v", err)
	}
	if _, err := lib.Flatten(ctx, "base", nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("flatten of a standalone image = %v", err)
	}

	flat, err := lib.Flatten(ctx, "child", nil)
	if err != nil {
		t.Fatal(err)
	}
	if flat.Parent != "" || len(flat.Chain) != 1 {
		t.Fatalf("flattened = %+v", flat)
	}
	if out, err := exec.Command("qemu-img", "compare", "-q", top, flat.Path).CombinedOutput(); err != nil {
		t.Fatalf("flattened image changed content: %v: %s", err, out)
	}
	if err := lib.Delete(ctx, "base"); err != nil {
		t.Fatalf("delete of the former parent: %v", err)
	}

	// A flatten whose record update was lost is finished at recovery.
	if err := st.Update(ctx, func(tx store.Tx) error {
		var r record
		if err := store.GetJSON(tx, bucket, "child", &r); err != nil {
			return err
		}
		r.Parent = "gone"
		return store.PutJSON(tx, bucket, "child", r)
	}); err != nil {
		t.Fatal(err)
	}
	if err := lib.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if got, _ := lib.Get(ctx, "child"); got.Parent != "" {
		t.Fatalf("after recovery parent = %q", got.Parent)
	}
}
