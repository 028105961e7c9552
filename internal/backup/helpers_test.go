package backup

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testChunk keeps disks small while still cutting them into many chunks.
const testChunk = 64 << 10

func testRepo(t *testing.T) *Repo {
	t.Helper()
	r, err := initRepo(filepath.Join(t.TempDir(), "repo"), testChunk)
	if err != nil {
		t.Fatalf("init repo: %v", err)
	}
	return r
}

// makeDisk is a disk of random chunks, except the zero ones, with a last
// chunk of tail bytes if tail > 0.
func makeDisk(seed uint64, full int, tail int, zero ...int) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	disk := make([]byte, full*testChunk+tail)
	for i := range disk {
		disk[i] = byte(rng.Uint32())
	}
	for _, z := range zero {
		clear(disk[z*testChunk : min(len(disk), (z+1)*testChunk)])
	}
	return disk
}

func allChunks(size int64) []int64 {
	n := chunkCount(size, testChunk)
	out := make([]int64, n)
	for i := range out {
		out[i] = int64(i)
	}
	return out
}

func begin(t *testing.T, r *Repo) *Writer {
	t.Helper()
	w, err := r.BeginWrite(context.Background())
	if err != nil {
		t.Fatalf("begin write: %v", err)
	}
	t.Cleanup(func() { _ = w.Close() })
	return w
}

func backupDisk(t *testing.T, w *Writer, name string, disk []byte, read []int64, parent []Digest) (DiskManifest, Stats) {
	t.Helper()
	dm, st, err := w.BackupDisk(context.Background(), DiskInput{Name: name, Size: int64(len(disk)), Reader: bytes.NewReader(disk), Read: read, Parent: parent}, nil)
	if err != nil {
		t.Fatalf("back up disk %s: %v", name, err)
	}
	return dm, st
}

var clock = time.Date(2026, 12, 1, 19, 1, 2, 0, time.UTC)

func manifest(vm string, at time.Time, parent string, disks ...DiskManifest) Manifest {
	m := Manifest{
		Format: 1, ID: NewID(at), VM: vm, VMUUID: "0b7c1d1e-5f0e-4a5b-9f3e-7d3c2a1b0c9d", CreatedAt: at,
		Kind: KindFull, Consistency: ConsistencyFrozen, Spec: json.RawMessage(`{"cpus":2}`), Disks: disks,
	}
	if parent != "" {
		m.Kind, m.Parent = KindIncremental, parent
	}
	return m
}

func commit(t *testing.T, w *Writer, m Manifest) Manifest {
	t.Helper()
	if err := w.Commit(context.Background(), &m); err != nil {
		t.Fatalf("commit %s: %v", m.ID, err)
	}
	return m
}

// readBack restores a disk into memory, checking the order ReadDisk
// promises.
func readBack(t *testing.T, r *Repo, dm DiskManifest) []byte {
	t.Helper()
	out := make([]byte, dm.Size)
	last := int64(-1)
	err := r.ReadDisk(context.Background(), dm, func(off int64, data []byte) error {
		if off <= last {
			t.Fatalf("read disk %s: offset %d after %d", dm.Name, off, last)
		}
		last = off
		copy(out[off:], data)
		return nil
	})
	if err != nil {
		t.Fatalf("read disk %s: %v", dm.Name, err)
	}
	return out
}

// age makes files look written long ago, as GC's cutoff wants.
func age(t *testing.T, paths ...string) {
	t.Helper()
	old := time.Now().Add(-2 * time.Hour)
	for _, p := range paths {
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatalf("age %s: %v", p, err)
		}
	}
}

func ageAllChunks(t *testing.T, r *Repo) {
	t.Helper()
	var paths []string
	if err := r.walkChunks(func(_ Digest, path string, _ os.FileInfo) error {
		paths = append(paths, path)
		return nil
	}); err != nil {
		t.Fatalf("walk chunks: %v", err)
	}
	age(t, paths...)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func flockNB(f *os.File) error {
	return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
}
