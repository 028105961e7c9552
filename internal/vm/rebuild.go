package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qcow2"
)

// DiskFiller writes the content of a rebuilt disk (a backup's, say) into
// w, which reads as zeros where nothing is written.
type DiskFiller func(ctx context.Context, disk string, w io.WriterAt) error

// Rebuild gives a stopped VM new disks and keeps everything else: its
// identity (UUID, MACs, hostname, instance-id), its NICs and so its
// network addresses, its settings and labels. With fill nil the root disk
// becomes a fresh overlay on image, or on the VM's own image if image is
// empty, and any other disk an empty one; otherwise fill writes each
// disk. The old disks are removed only once the record points at the new
// ones, so a crash leaves either.
func (s *Service) Rebuild(ctx context.Context, name, image string, fill DiskFiller) (api.VM, error) {
	unlock, err := s.lock(name, "rebuild")
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	r, err := s.load(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	if s.alive(name) {
		return api.VM{}, fmt.Errorf("rebuild vm %q: it is %s: %w: stop it first", name, r.State, errdefs.ErrState)
	}
	if snaps := s.snapshotNames(ctx, name); len(snaps) > 0 {
		return api.VM{}, fmt.Errorf("rebuild vm %q: %w: it has snapshots (%s), which its new disks could not go back to; delete them first", name, errdefs.ErrState, strings.Join(snaps, ", "))
	}
	backing := ""
	if fill == nil {
		if image == "" {
			image = r.Image
		}
		if image == "" {
			return api.VM{}, fmt.Errorf("rebuild vm %q: %w: it was not created from an image (it was imported); rebuild it from a backup", name, errdefs.ErrInvalid)
		}
		img, err := s.cfg.Images.Resolve(ctx, image)
		if err != nil {
			return api.VM{}, fmt.Errorf("rebuild vm %q from image %q: %w", name, image, err)
		}
		backing = img.Path
	}
	fresh := make([]string, len(r.Disks))
	ok := false
	defer func() {
		if !ok {
			for _, p := range fresh {
				if p != "" {
					_ = os.Remove(p)
				}
			}
		}
	}()
	for i, d := range r.Disks {
		pool, err := s.cfg.Pools.Get(ctx, d.Pool)
		if err != nil {
			return api.VM{}, fmt.Errorf("rebuild vm %q: disk %q: %w", name, d.Name, err)
		}
		fresh[i] = pool.NewVolumePath(name, d.Name)
		if err := s.newDisk(ctx, fresh[i], d, backing, fill); err != nil {
			return api.VM{}, fmt.Errorf("rebuild vm %q: disk %q: %w", name, d.Name, err)
		}
	}
	if _, err := s.update(ctx, name, func(x *record) error {
		if len(x.Disks) != len(fresh) {
			return fmt.Errorf("rebuild vm %q: %w: its disks changed meanwhile", name, errdefs.ErrConflict)
		}
		for i := range x.Disks {
			x.Disks[i].Path, x.Disks[i].Backing = fresh[i], ""
			if x.Disks[i].Name == "root" && backing != "" {
				x.Disks[i].Backing = backing
			}
		}
		if backing != "" {
			x.Image, x.ImagePath = image, backing
		}
		x.State, x.StateReason = api.StateStopped, ""
		return nil
	}); err != nil {
		return api.VM{}, err
	}
	ok = true
	for _, d := range r.Disks {
		if err := os.Remove(d.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("remove the disk a rebuild replaced", "vm", name, "path", d.Path, "err", err)
		}
	}
	s.collectLayers(ctx)
	from := "its image"
	if fill != nil {
		from = "a backup"
	}
	s.publish(name, "vm-rebuilt", "", "from "+from)
	s.log.Info("rebuilt", "vm", name, "from", from)
	return s.Get(ctx, name)
}

// newDisk makes one rebuilt disk at path.
func (s *Service) newDisk(ctx context.Context, path string, d api.Disk, backing string, fill DiskFiller) error {
	if fill == nil && d.Name == "root" {
		return s.cfg.Volumes.CreateOverlay(ctx, backing, path, d.Size)
	}
	w, err := qcow2.Create(path, d.Size)
	if err != nil {
		return err
	}
	if fill != nil {
		if err := fill(ctx, d.Name, w); err != nil {
			w.Abort()
			return err
		}
	}
	return w.Close()
}
