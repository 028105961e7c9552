package extfs

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

func TestCheckPath(t *testing.T) {
	for _, tc := range []struct {
		path string
		ok   bool
	}{
		{"/etc/hostname", true},
		{"/", true},
		{"/a b/c", true},
		{"etc/hostname", false},
		{"", false},
		{`/x" ; write /etc/passwd`, false},
		{"/x\nls", false},
		{`/a\b`, false},
	} {
		if err := CheckPath(tc.path); (err == nil) != tc.ok || (err != nil && !errors.Is(err, errdefs.ErrInvalid)) {
			t.Errorf("CheckPath(%q): %v, want ok %v", tc.path, err, tc.ok)
		}
	}
}

func TestParseList(t *testing.T) {
	got, err := ParseList("/91/040755/0/0/.//\n/2/040755/0/0/..//\n/92/040755/0/0/acpi//\n/95/100644/0/7/fstab/321/\n/96/120777/0/0/sh/7/\n")
	if err != nil {
		t.Fatal(err)
	}
	want := []File{{Name: "acpi", Type: "dir", Mode: 0o755}, {Name: "fstab", Type: "file", Mode: 0o644, GID: 7, Size: 321}, {Name: "sh", Type: "symlink", Mode: 0o777, Size: 7}}
	if len(got) != len(want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("entry %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
	for _, bad := range []string{"/1/zz/0/0/x//", "/1/0644/0/0/x", "garbage", "/1/0644/a/0/x/1/", "/1/0644/0/0/x/-5/"} {
		if _, err := ParseList(bad); err == nil {
			t.Errorf("ParseList(%q) took it", bad)
		}
	}
}

func FuzzParseList(f *testing.F) {
	f.Add("/91/040755/0/0/.//\n/95/100644/0/0/fstab/321/\n")
	f.Add("/1/0644/0/0/x//")
	f.Fuzz(func(t *testing.T, s string) {
		fs, err := ParseList(s)
		if err != nil {
			return
		}
		for _, f := range fs {
			if f.Size < 0 || f.Name == "" || f.Name == "." || f.Name == ".." {
				t.Fatalf("entry %+v", f)
			}
		}
	})
}

func FuzzParseStat(f *testing.F) {
	f.Add("Inode: 97   Type: regular    Mode:  0644   Flags: 0x80000\nUser:     0   Group:     0   Project:     0   Size: 6\n")
	f.Fuzz(func(t *testing.T, s string) {
		st, err := parseStat(s)
		if err == nil && (st.Size < 0 || st.Type == "") {
			t.Fatalf("stat %+v from %q", st, s)
		}
	})
}

// TestImage reads a real ext4 image made with mkfs.ext4 -d.
func TestImage(t *testing.T) {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Skip("mkfs.ext4 not installed")
	}
	if _, err := exec.LookPath("debugfs"); err != nil {
		t.Skip("debugfs not installed")
	}
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	if err := os.MkdirAll(filepath.Join(root, "etc", "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "hostname"), []byte("inside\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "fs.img")
	if out, err := exec.Command(mkfs, "-q", "-F", "-d", root, img, "8M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	ctx := context.Background()
	im := Image{Path: img}
	var buf bytes.Buffer
	if err := im.Cat(ctx, "/etc/hostname", &buf); err != nil || buf.String() != "inside\n" {
		t.Fatalf("cat: %q, %v", buf.String(), err)
	}
	ls, err := im.List(ctx, "/etc")
	if err != nil || len(ls) != 2 || ls[0].Name != "hostname" && ls[1].Name != "hostname" {
		t.Fatalf("ls /etc: %+v, %v", ls, err)
	}
	if err := im.Cat(ctx, "/etc/nothing", &buf); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("cat of a missing file: %v", err)
	}
	if err := im.Cat(ctx, "/etc/sub", &buf); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("cat of a directory: %v", err)
	}
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := im.Stat(ctx, "/"); !errors.Is(err, ErrNotExt) {
		t.Fatalf("stat on zeros: %v, want ErrNotExt", err)
	}
}
