//go:build unix

package ovf

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestReadOVASparse(t *testing.T) {
	disk := testFile{"sparse.vmdk", sparseDisk(), true}
	ova := writeOVA(t, member{name: "app.ovf", data: makeDescriptor(disk)}, member{name: disk.name, data: disk.data})
	dir := t.TempDir()
	_, paths, err := ReadOVA(context.Background(), ova, dir, 64<<20)
	if err != nil {
		t.Fatalf("ReadOVA: %v", err)
	}
	if want := []string{filepath.Join(dir, disk.name)}; len(paths) != 1 || paths[0] != want[0] {
		t.Fatalf("paths = %q, want %q", paths, want)
	}
	got, err := os.ReadFile(paths[0])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, disk.data) {
		t.Fatalf("extracted disk differs from the original")
	}
	fi, err := os.Stat(paths[0])
	if err != nil {
		t.Fatal(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		t.Skip("no Stat_t on this platform")
	}
	// Of the 1 MiB zero region and the 200 KiB zero tail, every whole 64 KiB
	// block must have become a hole: at least 1 MiB unallocated.
	allocated := st.Blocks * 512
	if limit := fi.Size() - 1<<20; allocated > limit {
		t.Errorf("%d of %d bytes allocated, want at most %d: zero blocks were written", allocated, fi.Size(), limit)
	}
}
