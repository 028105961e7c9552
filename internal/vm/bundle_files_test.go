package vm

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/lodge-vm/lodge/api"
)

// TestOpenFiles: a stopped VM's disk is read straight from its files when
// package qcow2 reads its chain, and through qemu-nbd otherwise.
func TestOpenFiles(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed")
	}
	dir := t.TempDir()
	img := func(name string, args ...string) string {
		p := filepath.Join(dir, name)
		out, err := exec.Command("qemu-img", append(append([]string{"create", "-q", "-f", "qcow2"}, args...), p, "4M")...).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img create %s: %v: %s", name, err, out)
		}
		return p
	}
	base := img("base.qcow2")
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", base).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	tests := []struct {
		name string
		path string
		ok   bool
	}{
		{"overlay on a qcow2 base", img("top.qcow2", "-F", "qcow2", "-b", base), true},
		{"subclusters", img("l2.qcow2", "-o", "extended_l2=on"), false},
		{"missing", filepath.Join(dir, "nope.qcow2"), false},
	}
	f := newFixture(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ed, ok := f.svc.openFiles(api.Disk{Name: "root", Path: tt.path})
			if ok != tt.ok {
				t.Fatalf("openFiles(%s): ok %t, want %t", tt.path, ok, tt.ok)
			}
			if !ok {
				return
			}
			defer func() { _ = ed.Data.(fileView).Close() }()
			if ed.Source != tt.path || ed.Format != "qcow2" || ed.Conn != nil || ed.Data.Size() != 4<<20 {
				t.Fatalf("disk read from its files: source %s format %s conn %v size %d", ed.Source, ed.Format, ed.Conn, ed.Data.Size())
			}
			ext, err := ed.Data.DataExtents(context.Background(), 0, 4<<20)
			if err != nil || len(ext) != 1 || ext[0].Offset != 1<<20 || ext[0].Length != 64<<10 {
				t.Fatalf("data extents: %+v, %v; want the base's 64 KiB at 1 MiB", ext, err)
			}
			got := make([]byte, 64<<10)
			if _, err := ed.Data.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 64<<10)) {
				t.Fatalf("read through the overlay: %v, first byte %#x", err, got[0])
			}
		})
	}
}
