package backup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// SyncStats is what Sync copied.
type SyncStats struct {
	Backups int   `json:"backups"`
	Chunks  int   `json:"chunks"`
	Bytes   int64 `json:"bytes"` // compressed, as stored
}

// Sync copies to dst every backup of src that dst lacks, oldest first,
// such as to keep a copy off-site. Only chunks dst lacks travel, as
// stored, and each is checked before it is put in place. A backup shows
// in dst only once all its chunks are there; one with a bad chunk in src
// is left out (the error wraps ErrCorrupt) and the others still go.
// progress gets compressed bytes done out of the total to copy.
func Sync(ctx context.Context, src, dst *Repo, progress func(done, total int64)) (SyncStats, error) {
	wrap := func(err error) error {
		return fmt.Errorf("sync backups from %q to %q: %w", src.path, dst.path, err)
	}
	fail := func(err error) (SyncStats, error) { return SyncStats{}, wrap(err) }
	switch {
	case src.id == dst.id:
		return fail(fmt.Errorf("%w: both are the same repository (id %s)", errdefs.ErrInvalid, src.id))
	case src.chunkSize != dst.chunkSize:
		return fail(fmt.Errorf("%w: chunk sizes differ (%d and %d)", errdefs.ErrInvalid, src.chunkSize, dst.chunkSize))
	}
	all, srcErr := src.Backups()
	if srcErr != nil && !errors.Is(srcErr, ErrCorrupt) {
		return fail(srcErr)
	}
	have, err := dst.backupIDs()
	if err != nil && !errors.Is(err, ErrCorrupt) {
		return fail(err)
	}
	present := make(map[string]bool, len(have))
	for _, id := range have {
		present[id] = true
	}
	var todo []Manifest
	for _, m := range all {
		if !present[m.ID] {
			todo = append(todo, m)
		}
	}
	if len(todo) == 0 {
		if srcErr != nil {
			return fail(srcErr)
		}
		return SyncStats{}, nil
	}

	// Plan first, so that progress has a total: every chunk some backup
	// to copy names and dst lacks, with its stored size in src.
	size := make(map[Digest]int64)
	var total int64
	for _, m := range todo {
		for _, disk := range m.Disks {
			for _, d := range disk.Chunks {
				if _, seen := size[d]; seen || d.IsZero() {
					continue
				}
				if err := ctx.Err(); err != nil {
					return fail(err)
				}
				size[d] = 0
				if _, err := os.Stat(dst.chunkPath(d)); err == nil {
					continue
				}
				if fi, err := os.Stat(src.chunkPath(d)); err == nil {
					size[d] = fi.Size()
					total += fi.Size()
				}
			}
		}
	}

	w, err := dst.BeginWrite(ctx)
	if err != nil {
		return fail(err)
	}
	defer func() { _ = w.Close() }()

	var (
		st   SyncStats
		mu   sync.Mutex
		done int64
		errs = []error{srcErr}
		// settled holds the chunks already dealt with, for the backups
		// that share them: nil error copied or found, or why not.
		settled = make(map[Digest]error)
	)
	for _, m := range todo {
		var need []Digest
		for _, disk := range m.Disks {
			for _, d := range disk.Chunks {
				if d.IsZero() {
					continue
				}
				if _, ok := settled[d]; !ok {
					settled[d] = nil
					need = append(need, d)
				}
			}
		}
		err := forEach(ctx, need, func(scratch *verifyScratch, d Digest) {
			copied, n, err := w.copyChunk(src, d, scratch)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				settled[d] = fmt.Errorf("chunk %s: %w", d, err)
			}
			if copied {
				st.Chunks++
				st.Bytes += n
			}
			done += size[d]
			if progress != nil {
				progress(done, total)
			}
		}, func() *verifyScratch {
			return &verifyScratch{raw: make([]byte, 0, src.chunkSize), stored: make([]byte, 0, storedBound(src.chunkSize))}
		})
		if err != nil {
			return st, wrap(err)
		}
		if err := firstBad(m, settled); err != nil {
			errs = append(errs, fmt.Errorf("backup %s not copied: %w", m.ID, err))
			continue
		}
		err = w.Commit(ctx, &m)
		if errors.Is(err, errdefs.ErrExists) {
			continue // another sync got there first
		}
		if err != nil {
			return st, wrap(err)
		}
		st.Backups++
	}
	if err := joinErrors(errs...); err != nil {
		return st, wrap(err)
	}
	return st, nil
}

// firstBad is the error of the first of m's chunks that could not be
// copied, if any.
func firstBad(m Manifest, settled map[Digest]error) error {
	for _, disk := range m.Disks {
		for _, d := range disk.Chunks {
			if err := settled[d]; err != nil {
				return err
			}
		}
	}
	return nil
}

// copyChunk copies chunk d from src unless the writer's repository has
// it, checking it on the way. It reports whether it copied and how many
// bytes.
func (w *Writer) copyChunk(src *Repo, d Digest, scratch *verifyScratch) (bool, int64, error) {
	path := w.r.chunkPath(d)
	ok, err := touch(path)
	if err != nil {
		return false, 0, err
	}
	if ok {
		return false, 0, nil
	}
	stored, err := readChunkFile(src.chunkPath(d), storedBound(src.chunkSize), scratch.stored)
	if err != nil {
		return false, 0, fmt.Errorf("in %q: %w", src.path, err)
	}
	scratch.stored = stored[:0]
	if _, err := src.decodeChunk(d, stored, scratch.raw[:0]); err != nil {
		return false, 0, fmt.Errorf("in %q: %w", src.path, err)
	}
	if err := w.stage(d, stored); err != nil {
		return false, 0, err
	}
	return true, int64(len(stored)), nil
}
