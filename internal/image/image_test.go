package image

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
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
