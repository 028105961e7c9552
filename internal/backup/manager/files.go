package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/backup"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/extfs"
	"github.com/lodge-vm/lodge/internal/partition"
)

// Single files come out of a backup without restoring the VM: the
// partition that holds the filesystem is written, sparse, to a temporary
// file from the backup's chunks (each checked), and read with debugfs.
// Only ext2/3/4 filesystems can be read this way.

// diskReader reads a backup's disk at any offset, a chunk at a time.
type diskReader struct {
	ctx  context.Context
	repo *backup.Repo
	disk backup.DiskManifest
	size int64 // the repository's chunk size
}

// chunk returns chunk i, or nil for one of zeros.
func (r diskReader) chunk(i int64) ([]byte, error) {
	d := r.disk.Chunks[i]
	if d.IsZero() {
		return nil, nil
	}
	data, err := r.repo.Chunk(r.ctx, d)
	if err != nil {
		return nil, fmt.Errorf("disk %q at offset %d: %w", r.disk.Name, i*r.size, err)
	}
	return data, nil
}

// readAt fills p from offset off; zero chunks read as zeros.
func (r diskReader) readAt(p []byte, off int64) error {
	for len(p) > 0 {
		i := off / r.size
		if i >= int64(len(r.disk.Chunks)) {
			return fmt.Errorf("disk %q: offset %d: %w", r.disk.Name, off, io.ErrUnexpectedEOF)
		}
		data, err := r.chunk(i)
		if err != nil {
			return err
		}
		in := off - i*r.size
		n := min(int64(len(p)), r.size-in)
		if data == nil {
			clear(p[:n])
		} else {
			if in+n > int64(len(data)) {
				return fmt.Errorf("disk %q: offset %d: %w", r.disk.Name, off, io.ErrUnexpectedEOF)
			}
			copy(p[:n], data[in:in+n])
		}
		p, off = p[n:], off+n
	}
	return nil
}

// extract writes the bytes [start, start+n) of the disk to a new sparse
// file at dst.
func (r diskReader) extract(dst string, start, n int64) error {
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	if err := f.Truncate(n); err != nil {
		return err
	}
	for i := start / r.size; i*r.size < start+n && i < int64(len(r.disk.Chunks)); i++ {
		if err := r.ctx.Err(); err != nil {
			return err
		}
		data, err := r.chunk(i)
		if err != nil {
			return err
		}
		if data == nil {
			continue
		}
		lo, hi := max(start, i*r.size), min(start+n, i*r.size+int64(len(data)))
		if lo >= hi {
			continue
		}
		if _, err := f.WriteAt(data[lo-i*r.size:hi-i*r.size], lo-start); err != nil {
			return err
		}
	}
	return f.Close()
}

// filesystems lists the partitions of a backup's disk that hold an ext
// filesystem, or the one asked for.
func (r diskReader) filesystems(want int) ([]partition.Partition, error) {
	head := make([]byte, min(r.disk.Size, 64<<10))
	if err := r.readAt(head, 0); err != nil {
		return nil, err
	}
	parts, err := partition.Parse(head, r.disk.Size)
	if errors.Is(err, partition.ErrNoTable) {
		parts, err = []partition.Partition{{Number: 0, Start: 0, Size: r.disk.Size, Type: "whole disk"}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("disk %q: partition table: %w", r.disk.Name, err)
	}
	var out []partition.Partition
	var numbers []string
	for _, p := range parts {
		numbers = append(numbers, strconv.Itoa(p.Number))
		if want > 0 && p.Number != want {
			continue
		}
		sb := make([]byte, min(p.Size, 2048))
		if err := r.readAt(sb, p.Start); err != nil {
			return nil, err
		}
		if partition.IsExt(sb) {
			out = append(out, p)
		} else if want > 0 {
			return nil, fmt.Errorf("disk %q partition %d: %w: only ext2/3/4 filesystems can be read from a backup", r.disk.Name, want, extfs.ErrNotExt)
		}
	}
	switch {
	case want > 0 && len(out) == 0:
		return nil, fmt.Errorf("disk %q: partition %d: %w (it has %s)", r.disk.Name, want, errdefs.ErrNotFound, strings.Join(numbers, ", "))
	case len(out) == 0:
		return nil, fmt.Errorf("disk %q: %w on any partition: only ext2/3/4 filesystems can be read from a backup", r.disk.Name, extfs.ErrNotExt)
	}
	return out, nil
}

// inGuestFS finds the filesystem of backup id that holds q.Path and calls
// fn with it.
func (m *Manager) inGuestFS(ctx context.Context, id string, q api.BackupFileQuery, fn func(extfs.Image, extfs.File) error) error {
	if err := extfs.CheckPath(q.Path); err != nil {
		return err
	}
	q.Path = path.Clean(q.Path)
	_, repo, b, err := m.find(ctx, id, q.Repo)
	if err != nil {
		return err
	}
	if len(b.Disks) == 0 {
		return fmt.Errorf("backup %s: %w: it holds no disk", id, errdefs.ErrNotFound)
	}
	disk := b.Disks[0]
	if q.Disk != "" {
		found := false
		for _, d := range b.Disks {
			if d.Name == q.Disk {
				disk, found = d, true
			}
		}
		if !found {
			return fmt.Errorf("backup %s: disk %q: %w", id, q.Disk, errdefs.ErrNotFound)
		}
	}
	r := diskReader{ctx: ctx, repo: repo, disk: disk, size: int64(repo.ChunkSize())}
	parts, err := r.filesystems(q.Partition)
	if err != nil {
		return fmt.Errorf("backup %s: %w", id, err)
	}
	tmp, err := os.MkdirTemp(filepath.Join(m.home, "run"), "backup-fs-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	var last error
	for _, p := range parts {
		img := filepath.Join(tmp, "part"+strconv.Itoa(p.Number))
		if err := r.extract(img, p.Start, p.Size); err != nil {
			return fmt.Errorf("backup %s: %w", id, err)
		}
		im := extfs.Image{Path: img}
		st, err := im.Stat(ctx, q.Path)
		if err == nil {
			return fn(im, st)
		}
		_ = os.Remove(img)
		last = err
		if !errors.Is(err, errdefs.ErrNotFound) {
			break
		}
	}
	return fmt.Errorf("backup %s: disk %q: %w", id, disk.Name, last)
}

// ListFiles lists a directory inside a backup (or the one file a path
// names).
func (m *Manager) ListFiles(ctx context.Context, id string, q api.BackupFileQuery) ([]api.BackupFile, error) {
	var out []api.BackupFile
	err := m.inGuestFS(ctx, id, q, func(im extfs.Image, st extfs.File) error {
		if st.Type != "dir" {
			st.Name = path.Base(q.Path)
			out = []api.BackupFile{api.BackupFile(st)}
			return nil
		}
		fs, err := im.List(ctx, path.Clean(q.Path))
		for _, f := range fs {
			out = append(out, api.BackupFile(f))
		}
		return err
	})
	return out, err
}

// CatFile writes a regular file inside a backup to w.
func (m *Manager) CatFile(ctx context.Context, id string, q api.BackupFileQuery, w io.Writer) error {
	return m.inGuestFS(ctx, id, q, func(im extfs.Image, _ extfs.File) error {
		if err := im.Cat(ctx, path.Clean(q.Path), w); err != nil {
			return fmt.Errorf("backup %s: %w", id, err)
		}
		return nil
	})
}
