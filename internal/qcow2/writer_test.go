package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func needQEMUImg(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed: apt-get install qemu-utils")
	}
}

type write struct {
	off int64
	n   int
}

// TestWriterMatchesRaw writes the same data to a qcow2 and to a raw file,
// from several goroutines in random order, and has qemu-img check the
// image and compare the two.
func TestWriterMatchesRaw(t *testing.T) {
	needQEMUImg(t)
	cases := []struct {
		name   string
		size   int64
		writes []write
	}{
		{"empty", 1 << 20, nil},
		{"partial and crossing clusters", 64 << 20, []write{{512, 512}, {65536 - 512, 4096}, {3 << 20, 1 << 20}, {64<<20 - 512, 512}}},
		{"across L2 tables", 4 << 30, []write{{0, 65536}, {512<<20 - 4096, 8192}, {2 << 30, 3 << 20}, {4<<30 - 65536, 65536}}},
		{"several L1 clusters", 64 << 40, []write{{0, 4096}, {40 << 40, 65536}, {64<<40 - 512, 512}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			img, raw := filepath.Join(dir, "d.qcow2"), filepath.Join(dir, "d.raw")
			w, err := Create(img, c.size)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewSource(1))
			bufs := make([][]byte, len(c.writes))
			// ext4 holds files up to 16 TiB: the huge case is filled with
			// patterns and read back with qemu-io instead.
			huge := c.size > 1<<40
			for i, wr := range c.writes {
				bufs[i] = make([]byte, wr.n)
				rng.Read(bufs[i])
				if huge {
					bufs[i] = bytes.Repeat([]byte{byte(0x11 * (i + 1))}, wr.n)
				}
			}
			if !huge {
				writeRaw(t, raw, c.size, c.writes, bufs)
			}
			var wg sync.WaitGroup
			for _, i := range rng.Perm(len(c.writes)) {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					if _, err := w.WriteAt(bufs[i], c.writes[i].off); err != nil {
						t.Error(err)
					}
				}(i)
			}
			wg.Wait()
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("qemu-img", "check", "-f", "qcow2", img).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img check: %v: %s", err, out)
			}
			if huge {
				// qemu-img compare would read 64 TiB of holes; read the
				// written places back instead.
				for i, wr := range c.writes {
					cmd := fmt.Sprintf("read -P %d %d %d", bufs[i][0], wr.off, wr.n)
					out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, img).CombinedOutput()
					if err != nil || strings.Contains(string(out), "Pattern verification failed") {
						t.Errorf("write %d at %d reads back differently: %v: %s", i, wr.off, err, out)
					}
				}
				return
			}
			if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img compare: %v: %s", err, out)
			}
		})
	}
}

func writeRaw(t *testing.T, path string, size int64, writes []write, bufs [][]byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for i, wr := range writes {
		if _, err := f.WriteAt(bufs[i], wr.off); err != nil {
			t.Fatal(err)
		}
	}
}

func TestWriterRefuses(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int64{0, -512, 1000, MaxSize + 512} {
		if _, err := Create(filepath.Join(dir, "x"), size); err == nil {
			t.Errorf("size %d was accepted", size)
		}
	}
	w, err := Create(filepath.Join(dir, "d"), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Create(filepath.Join(dir, "d"), 1<<20); !errors.Is(err, os.ErrExist) {
		t.Errorf("an existing file was overwritten: %v", err)
	}
	if _, err := w.WriteAt(make([]byte, 1024), 1<<20-512); err == nil || !strings.Contains(err.Error(), "outside") {
		t.Errorf("a write past the end: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(make([]byte, 512), 0); err == nil {
		t.Error("a write after Close was accepted")
	}
}
