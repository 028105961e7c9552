package backup

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
)

// VerifyReport is what Verify checked and what it found wrong.
type VerifyReport struct {
	Backups int        `json:"backups"`
	Chunks  int        `json:"chunks"` // distinct chunks read
	Bytes   int64      `json:"bytes"`  // their uncompressed size
	Bad     []BadChunk `json:"bad,omitempty"`
}

// BadChunk is one place in one backup that a bad chunk spoils.
type BadChunk struct {
	Backup string `json:"backup"`
	Disk   string `json:"disk"`
	Offset int64  `json:"offset"`
	Digest Digest `json:"digest"`
	Err    string `json:"err"`
}

// Verify reads and checks every chunk the given backups name (all
// backups for nil ids), each distinct chunk once, and reports every place
// a bad one spoils. progress gets uncompressed bytes checked out of the
// total. The error wraps ErrCorrupt if anything is bad.
func (r *Repo) Verify(ctx context.Context, ids []string, progress func(done, total int64)) (VerifyReport, error) {
	var ms []Manifest
	var manifestErr error
	if ids == nil {
		ms, manifestErr = r.Backups()
		if manifestErr != nil && !errors.Is(manifestErr, ErrCorrupt) {
			return VerifyReport{}, fmt.Errorf("verify: %w", manifestErr)
		}
	} else {
		for _, id := range ids {
			m, err := r.Backup(id)
			if err != nil {
				return VerifyReport{}, fmt.Errorf("verify: %w", err)
			}
			ms = append(ms, m)
		}
	}

	// want is the length each chunk must have. One digest is one content
	// and so one length; a manifest that expects another length at some
	// place is wrong there, which only reading the chunk tells.
	type entry struct {
		length   int
		conflict bool
	}
	want := make(map[Digest]*entry)
	var list []Digest
	var total int64
	for _, m := range ms {
		for _, disk := range m.Disks {
			for i, d := range disk.Chunks {
				if d.IsZero() {
					continue
				}
				l := chunkLen(disk.Size, r.chunkSize, int64(i))
				e := want[d]
				if e == nil {
					want[d] = &entry{length: l}
					list = append(list, d)
					total += int64(l)
					continue
				}
				if e.length != l {
					e.conflict = true
				}
			}
		}
	}

	type result struct {
		length int
		err    error
	}
	var (
		mu      sync.Mutex
		bad     = make(map[Digest]result)
		lengths = make(map[Digest]int) // actual lengths, kept only for conflicts
		done    int64
	)
	err := forEach(ctx, list, func(scratch *verifyScratch, d Digest) {
		out, err := r.loadChunk(d, scratch.raw[:0], scratch.stored)
		e := want[d]
		mu.Lock()
		defer mu.Unlock()
		switch {
		case err != nil:
			bad[d] = result{err: err}
		case e.conflict:
			lengths[d] = len(out)
		case len(out) != e.length:
			bad[d] = result{length: len(out), err: fmt.Errorf("%w: the chunk holds %d bytes, the disk needs %d", ErrCorrupt, len(out), e.length)}
		}
		done += int64(e.length)
		if progress != nil {
			progress(done, total)
		}
	}, func() *verifyScratch {
		return &verifyScratch{raw: make([]byte, 0, r.chunkSize), stored: make([]byte, 0, storedBound(r.chunkSize))}
	})
	if err != nil {
		return VerifyReport{}, fmt.Errorf("verify: %w", err)
	}

	rep := VerifyReport{Backups: len(ms), Chunks: len(list), Bytes: total}
	if len(bad) > 0 || len(lengths) > 0 {
		for _, m := range ms {
			for _, disk := range m.Disks {
				for i, d := range disk.Chunks {
					if d.IsZero() {
						continue
					}
					off := int64(i) * int64(r.chunkSize)
					if b, ok := bad[d]; ok {
						rep.Bad = append(rep.Bad, BadChunk{Backup: m.ID, Disk: disk.Name, Offset: off, Digest: d, Err: b.err.Error()})
						continue
					}
					if got, ok := lengths[d]; ok {
						if need := chunkLen(disk.Size, r.chunkSize, int64(i)); got != need {
							msg := fmt.Sprintf("%v: the chunk holds %d bytes, the disk needs %d", ErrCorrupt, got, need)
							rep.Bad = append(rep.Bad, BadChunk{Backup: m.ID, Disk: disk.Name, Offset: off, Digest: d, Err: msg})
						}
					}
				}
			}
		}
	}
	sort.SliceStable(rep.Bad, func(i, j int) bool {
		a, b := rep.Bad[i], rep.Bad[j]
		if a.Backup != b.Backup {
			return a.Backup < b.Backup
		}
		if a.Disk != b.Disk {
			return a.Disk < b.Disk
		}
		return a.Offset < b.Offset
	})

	var errs []error
	if manifestErr != nil {
		errs = append(errs, manifestErr)
	}
	if len(rep.Bad) > 0 {
		b := rep.Bad[0]
		errs = append(errs, fmt.Errorf("%w: %d bad places in %d backups; first: backup %s disk %q at offset %d, chunk %s: %s",
			ErrCorrupt, len(rep.Bad), len(ms), b.Backup, b.Disk, b.Offset, b.Digest, b.Err))
	}
	if len(errs) > 0 {
		return rep, fmt.Errorf("verify: %w", joinErrors(errs...))
	}
	return rep, nil
}

type verifyScratch struct {
	raw, stored []byte
}

// forEach runs fn over items on every core, each worker with its own
// state from newState. It stops early only when ctx ends.
func forEach[T, S any](ctx context.Context, items []T, fn func(state S, item T), newState func() S) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan T)
	var wg sync.WaitGroup
	for range min(workers(), max(1, len(items))) {
		wg.Go(func() {
			st := newState()
			for it := range ch {
				fn(st, it)
			}
		})
	}
	var err error
feed:
	for _, it := range items {
		select {
		case ch <- it:
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(ch)
	wg.Wait()
	if err == nil {
		err = ctx.Err()
	}
	return err
}
