package qcow2

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed")
	}
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v: %s", args, err, out)
	}
}

func TestChain(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	mid := filepath.Join(dir, "mid.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	raw := filepath.Join(dir, "disk.raw")
	overRaw := filepath.Join(dir, "over-raw.qcow2")
	v2 := filepath.Join(dir, "v2.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "64M")
	// mid names base relatively, as QEMU allows.
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", mid)
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", mid, top)
	qemuImg(t, "create", "-q", "-f", "raw", raw, "64M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", raw, overRaw)
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-F", "qcow2", "-b", base, v2)
	// The same with its extensions cut off: it names no format.
	noFormat := filepath.Join(dir, "v2-no-format.qcow2")
	img, err := os.ReadFile(v2)
	if err != nil {
		t.Fatal(err)
	}
	clear(img[72:80])
	if err := os.WriteFile(noFormat, img, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		path    string
		want    []string // path:format, nearest first
		wantErr string
	}{
		{name: "standalone", path: base},
		{name: "two levels, one relative", path: top, want: []string{mid + ":qcow2", base + ":qcow2"}},
		{name: "raw base ends the chain", path: overRaw, want: []string{raw + ":raw"}},
		{name: "version 2 names its format", path: v2, want: []string{base + ":qcow2"}},
		{name: "no format named", path: noFormat, wantErr: `format ""`},
		{name: "not qcow2", path: raw, wantErr: "not a qcow2 image"},
		{name: "missing", path: filepath.Join(dir, "nope.qcow2"), wantErr: "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			chain, err := Chain(tt.path)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Chain = %v, %v; want an error with %q", chain, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, b := range chain {
				got = append(got, b.Path+":"+b.Format)
			}
			if strings.Join(got, " ") != strings.Join(tt.want, " ") {
				t.Fatalf("Chain = %v, want %v", got, tt.want)
			}
		})
	}
}

// FuzzParseBacking feeds hostile headers: it must never panic or read
// outside the header, and a name it returns lies within it.
func FuzzParseBacking(f *testing.F) {
	h := make([]byte, 512)
	copy(h, "QFI\xfb\x00\x00\x00\x03")
	h[15] = 200 // backing name at 200
	h[19] = 9
	copy(h[200:], "base.img!")
	h[103] = 112 // extensions at 112
	copy(h[112:], []byte{0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 5, 'q', 'c', 'o', 'w', '2'})
	f.Add(h)
	f.Add([]byte("QFI\xfb\x00\x00\x00\x02"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := parseBacking(bytes.NewReader(data))
		if err != nil {
			return
		}
		if b.File != "" && !bytes.Contains(data, []byte(b.File)) {
			t.Fatalf("name %q is not in the header", b.File)
		}
	})
}
