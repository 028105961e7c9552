package backup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// gcMargin is how much older than the oldest live writer a chunk must be
// to go. It absorbs the coarse clock filesystems stamp files with, and
// clocks of other hosts sharing the repository over the network.
const gcMargin = time.Minute

// asidePrefix marks a chunk GC has moved out of chunks/ while it decides.
const asidePrefix = "gc-"

// GCStats is what a GC found and freed.
type GCStats struct {
	Chunks  int   `json:"chunks"`  // chunk files left
	Removed int   `json:"removed"` // chunk files removed
	Freed   int64 `json:"freed"`   // bytes removed
	Kept    int64 `json:"kept"`    // bytes left
}

// GC removes the chunks no backup names, except those recent enough that
// a writer may be about to name them, and temporaries left by crashes.
// Only one GC runs at a time in a repository; another gets ErrBusy.
func (r *Repo) GC(ctx context.Context) (GCStats, error) {
	fail := func(err error) (GCStats, error) {
		return GCStats{}, fmt.Errorf("backup repository %q: gc: %w", r.path, err)
	}
	if err := r.scratchDirs(); err != nil {
		return fail(err)
	}
	lock, err := os.OpenFile(filepath.Join(r.path, gcLockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fail(err)
	}
	defer func() { _ = lock.Close() }()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fail(fmt.Errorf("%w: another gc is running", errdefs.ErrBusy))
		}
		return fail(fmt.Errorf("lock %s: %w", gcLockName, err))
	}
	if err := r.restoreAside(); err != nil {
		return fail(err)
	}

	// The writers are read before the manifests: a writer that commits
	// and leaves between the two is then either seen as live or its
	// manifest is read. The other order could miss both.
	start := time.Now()
	oldest, err := r.oldestWriter(start)
	if err != nil {
		return fail(err)
	}
	cutoff := oldest.Add(-gcMargin)

	ms, err := r.Backups()
	if err != nil {
		return fail(fmt.Errorf("a manifest could not be read, so which chunks it needs is unknown; nothing removed: %w", err))
	}
	used := make(map[Digest]struct{})
	for _, m := range ms {
		for _, d := range m.Disks {
			for _, c := range d.Chunks {
				if !c.IsZero() {
					used[c] = struct{}{}
				}
			}
		}
	}

	if err := r.sweepTmp(cutoff); err != nil {
		return fail(err)
	}

	var st GCStats
	n := 0
	err = r.walkChunks(func(d Digest, path string, fi fs.FileInfo) error {
		if n++; n%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		if _, ok := used[d]; ok || !fi.ModTime().Before(cutoff) {
			st.Chunks++
			st.Kept += fi.Size()
			return nil
		}
		freed, removed, err := r.removeChunk(path, cutoff)
		if err != nil {
			return err
		}
		if removed {
			st.Removed++
			st.Freed += freed
		} else if freed >= 0 {
			st.Chunks++
			st.Kept += fi.Size()
		}
		return nil
	})
	if err != nil {
		return fail(err)
	}
	return st, nil
}

// removeChunk removes an old unreferenced chunk unless a writer touches
// it meanwhile. The chunk is first renamed aside: a writer's touch after
// that fails (and the writer stores the chunk anew), and a touch before
// it shows in the file's time, so GC puts the chunk back. Either way no
// writer is left relying on a chunk that is gone. freed is -1 if the file
// had already gone.
func (r *Repo) removeChunk(path string, cutoff time.Time) (freed int64, removed bool, err error) {
	aside := filepath.Join(r.tmpDir(), asidePrefix+filepath.Base(path))
	if err := os.Rename(path, aside); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return -1, false, nil
		}
		return 0, false, err
	}
	fi, err := os.Stat(aside)
	if err != nil {
		return 0, false, err
	}
	if !fi.ModTime().Before(cutoff) {
		if err := os.Rename(aside, path); err != nil {
			return 0, false, err
		}
		// Durable now: a writer may have committed a backup naming it.
		return 0, false, syncDir(filepath.Dir(path))
	}
	if err := os.Remove(aside); err != nil {
		return 0, false, err
	}
	return fi.Size(), true, nil
}

// restoreAside puts back chunks a GC that crashed had moved aside, so
// that they are judged again rather than lost.
func (r *Repo) restoreAside() error {
	entries, err := os.ReadDir(r.tmpDir())
	if err != nil {
		return err
	}
	for _, e := range entries {
		name, ok := strings.CutPrefix(e.Name(), asidePrefix)
		var d Digest
		if !ok || d.UnmarshalText([]byte(name)) != nil || d.IsZero() {
			continue
		}
		dst := r.chunkPath(d)
		if err := renameNoReplace(filepath.Join(r.tmpDir(), e.Name()), dst); err != nil {
			if !errors.Is(err, fs.ErrExist) {
				return err
			}
			_ = os.Remove(filepath.Join(r.tmpDir(), e.Name()))
			continue
		}
		if err := syncDir(filepath.Dir(dst)); err != nil {
			return err
		}
	}
	return nil
}

// oldestWriter is the start time of the oldest live writer, or now if
// there is none; dead writers' files are removed on the way. A writer is
// live while something holds its file locked.
func (r *Repo) oldestWriter(now time.Time) (time.Time, error) {
	dir := filepath.Join(r.path, dirWriters)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return time.Time{}, err
	}
	oldest := now
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		start, live, err := probeWriter(path)
		if err != nil {
			return time.Time{}, err
		}
		if live && start.Before(oldest) {
			oldest = start
		}
	}
	return oldest, nil
}

// probeWriter tells whether the writer registered at path is live and
// when it started. A live writer whose record cannot be read counts as
// started at the beginning of time, which keeps every chunk: safe.
func probeWriter(path string) (time.Time, bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, err
	}
	defer func() { _ = f.Close() }()
	err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if err == nil {
		// Nobody holds it: the writer died without unregistering.
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return time.Time{}, false, err
		}
		return time.Time{}, false, nil
	}
	if !errors.Is(err, unix.EWOULDBLOCK) {
		return time.Time{}, false, fmt.Errorf("lock %s: %w", path, err)
	}
	var rec writerRecord
	b := make([]byte, 4096)
	n, _ := f.Read(b)
	if json.Unmarshal(b[:n], &rec) != nil || rec.StartedAt.IsZero() {
		return time.Time{}, true, nil
	}
	return rec.StartedAt, true, nil
}

// sweepTmp removes temporaries older than cutoff: anything younger may
// belong to a writer still at work.
func (r *Repo) sweepTmp(cutoff time.Time) error {
	entries, err := os.ReadDir(r.tmpDir())
	if err != nil {
		return err
	}
	for _, e := range entries {
		fi, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if fi.ModTime().Before(cutoff) {
			if err := os.RemoveAll(filepath.Join(r.tmpDir(), e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}
