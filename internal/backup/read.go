package backup

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// Backups reads every manifest, oldest first (by CreatedAt, then ID). A
// manifest that cannot be read is not skipped in silence: the others are
// returned with an error, wrapping ErrCorrupt, that names each bad file.
func (r *Repo) Backups() ([]Manifest, error) {
	ids, err := r.backupIDs()
	if err != nil && !errors.Is(err, ErrCorrupt) {
		return nil, err
	}
	out := make([]Manifest, 0, len(ids))
	errs := []error{err}
	for _, id := range ids {
		m, err := r.readManifest(id)
		if errors.Is(err, errdefs.ErrNotFound) {
			continue // deleted since the listing
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, m)
	}
	sortManifests(out)
	return out, joinErrors(errs...)
}

func sortManifests(ms []Manifest) {
	sort.Slice(ms, func(i, j int) bool {
		if !ms[i].CreatedAt.Equal(ms[j].CreatedAt) {
			return ms[i].CreatedAt.Before(ms[j].CreatedAt)
		}
		return ms[i].ID < ms[j].ID
	})
}

// backupIDs lists the ids that have a manifest file. A .json file whose
// name is not an id is reported rather than ignored: it is in the place
// of a backup, and may be one renamed by hand.
func (r *Repo) backupIDs() ([]string, error) {
	dir := filepath.Join(r.path, dirBackups)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("backup repository %q: list backups: %w", r.path, err)
	}
	var ids []string
	var errs []error
	for _, e := range entries {
		name := e.Name()
		id, ok := strings.CutSuffix(name, ".json")
		if !ok {
			continue
		}
		if !ValidID(id) {
			errs = append(errs, fmt.Errorf("backup manifest %s: %w: the name is not a backup id", filepath.Join(dir, name), ErrCorrupt))
			continue
		}
		ids = append(ids, id)
	}
	return ids, joinErrors(errs...)
}

// Backup reads one backup's manifest.
func (r *Repo) Backup(id string) (Manifest, error) {
	if !ValidID(id) {
		return Manifest{}, fmt.Errorf("backup %q: %w: not a backup id", id, errdefs.ErrInvalid)
	}
	return r.readManifest(id)
}

func (r *Repo) readManifest(id string) (Manifest, error) {
	path := r.manifestPath(id)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Manifest{}, fmt.Errorf("backup %q: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return Manifest{}, fmt.Errorf("backup %q: %w", id, err)
	}
	// A stored manifest that fails its checks is damage, not bad input:
	// ErrCorrupt, not ErrInvalid.
	m, err := decodeManifest(b, r.chunkSize)
	if err != nil {
		return Manifest{}, fmt.Errorf("backup manifest %s: %w: %w", path, ErrCorrupt, err)
	}
	if m.ID != id {
		return Manifest{}, fmt.Errorf("backup manifest %s: %w: it holds backup %q", path, ErrCorrupt, m.ID)
	}
	return m, nil
}

// Delete removes a backup's manifest. Its chunks stay until GC finds no
// other backup names them.
func (r *Repo) Delete(ctx context.Context, id string) error {
	if !ValidID(id) {
		return fmt.Errorf("delete backup %q: %w: not a backup id", id, errdefs.ErrInvalid)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete backup %q: %w", id, err)
	}
	err := os.Remove(r.manifestPath(id))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete backup %q: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("delete backup %q: %w", id, err)
	}
	if err := syncDir(filepath.Join(r.path, dirBackups)); err != nil {
		return fmt.Errorf("delete backup %q: %w", id, err)
	}
	return nil
}

// ReadDisk hands a disk's non-zero chunks to fn in ascending offset
// order, from the calling goroutine, after checking each. Chunks are read
// and decompressed ahead on every core. data is only valid during the
// call. An error of fn ends the read and is returned as is.
func (r *Repo) ReadDisk(ctx context.Context, d DiskManifest, fn func(off int64, data []byte) error) error {
	if d.Size < 0 || int64(len(d.Chunks)) != r.chunkCount(d.Size) {
		return fmt.Errorf("read disk %q: %w: %d chunks for %d bytes", d.Name, errdefs.ErrInvalid, len(d.Chunks), d.Size)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	nw := workers()

	type job struct {
		idx  int64
		data []byte
		err  error
		done chan struct{}
	}
	jobs := make(chan *job, nw)
	order := make(chan *job, 2*nw)
	go func() {
		defer close(jobs)
		defer close(order)
		for i, dg := range d.Chunks {
			if dg.IsZero() {
				continue
			}
			j := &job{idx: int64(i), done: make(chan struct{})}
			select {
			case order <- j:
			case <-ctx.Done():
				return
			}
			select {
			case jobs <- j:
			case <-ctx.Done():
				// order already holds j; it must finish for the
				// consumer to move on.
				j.err = ctx.Err()
				close(j.done)
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for range nw {
		wg.Go(func() {
			var scratch []byte
			for j := range jobs {
				if err := ctx.Err(); err != nil {
					j.err = err
					close(j.done)
					continue
				}
				if scratch == nil {
					scratch = make([]byte, 0, storedBound(r.chunkSize))
				}
				j.data, j.err = r.loadChunk(d.Chunks[j.idx], r.getRaw(), scratch)
				if j.err == nil {
					if want := chunkLen(d.Size, r.chunkSize, j.idx); len(j.data) != want {
						j.err = fmt.Errorf("%w: the chunk holds %d bytes, the disk needs %d here", ErrCorrupt, len(j.data), want)
					}
				}
				close(j.done)
			}
		})
	}

	var err error
	for j := range order {
		if err != nil {
			// Drain so the feeder can end; its jobs finish on their own.
			<-j.done
			r.putRaw(j.data)
			continue
		}
		select {
		case <-j.done:
		case <-ctx.Done():
			<-j.done
		}
		switch {
		case j.err != nil && ctx.Err() != nil && !errors.Is(j.err, ErrCorrupt):
			err = fmt.Errorf("read disk %q: %w", d.Name, ctx.Err())
		case j.err != nil:
			err = fmt.Errorf("read disk %q: chunk %d at offset %d (%s): %w", d.Name, j.idx, j.idx*int64(r.chunkSize), d.Chunks[j.idx], j.err)
		default:
			err = fn(j.idx*int64(r.chunkSize), j.data)
		}
		r.putRaw(j.data)
		if err != nil {
			cancel()
		}
	}
	wg.Wait()
	if err == nil {
		if cerr := ctx.Err(); cerr != nil {
			err = fmt.Errorf("read disk %q: %w", d.Name, cerr)
		}
	}
	return err
}
