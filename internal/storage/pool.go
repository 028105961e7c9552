package storage

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// ErrPoolMissing means a pool's directory is gone (its drive unmounted).
var ErrPoolMissing = errors.New("pool directory is missing")

// Pool is a directory holding VM disks.
type Pool struct {
	Name string `json:"name"`
	Path string `json:"path"`
}

// Usage is a pool's filesystem capacity.
type Usage struct {
	Total int64 `json:"total"`
	Free  int64 `json:"free"`
}

// Check confirms the pool's directory exists and is writable.
func (p Pool) Check() error {
	st, err := os.Stat(p.Path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("pool %q at %s: %w", p.Name, p.Path, ErrPoolMissing)
		}
		return fmt.Errorf("pool %q: %w", p.Name, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("pool %q: %s is not a directory", p.Name, p.Path)
	}
	probe, err := os.CreateTemp(p.Path, ".probe-*")
	if err != nil {
		return fmt.Errorf("pool %q: %s is not writable: %w", p.Name, p.Path, err)
	}
	_ = probe.Close()
	return os.Remove(probe.Name())
}

// Usage reports the pool filesystem's size and free space.
func (p Pool) Usage() (Usage, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(p.Path, &st); err != nil {
		return Usage{}, fmt.Errorf("pool %q: statfs %s: %w", p.Name, p.Path, err)
	}
	bs := st.Bsize
	return Usage{Total: int64(st.Blocks) * bs, Free: int64(st.Bavail) * bs}, nil
}

// NewVolumePath names a fresh disk file for a VM in the pool. A random
// suffix keeps names unique: a file that was once frozen as a layer under
// one VM's name is never mistaken for a new VM's disk of the same name.
func (p Pool) NewVolumePath(vm, disk string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return filepath.Join(p.Path, vm+"-"+disk+"-"+hex.EncodeToString(b[:])+".qcow2")
}
