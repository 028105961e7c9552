package image

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/store"
)

// PublishSpec says what to publish: a VM's top disk file and the image
// its chain ends in, which becomes the new image's parent.
type PublishSpec struct {
	Name   string
	Parent string
	// Top is the VM's writable disk; TopBacking is its backing file, an
	// image or a frozen clone layer.
	Top        string
	TopBacking string
	VM         string
	// Prepare, if set, runs on the new image's file before it is made
	// read-only: it generalizes the guest inside.
	Prepare func(ctx context.Context, path string) error
}

// Publish makes a new image layered on spec.Parent that holds what the
// VM's disk holds. Only the clusters that differ from the parent are
// stored: the VM's own top, plus whatever clone layers lie between it
// and the parent, folded in.
func (l *Library) Publish(ctx context.Context, spec PublishSpec) (api.Image, error) {
	if err := ValidateName(spec.Name); err != nil {
		return api.Image{}, err
	}
	// The parent must not go away while its child is not yet listed.
	unlock, err := l.lock(spec.Parent, "publish "+spec.Name)
	if err != nil {
		return api.Image{}, err
	}
	defer unlock()
	parent, err := l.Get(ctx, spec.Parent)
	if err != nil {
		return api.Image{}, fmt.Errorf("publish image %q from vm %q: base %w", spec.Name, spec.VM, err)
	}
	img := api.Image{
		Name: spec.Name, Parent: parent.Name, SourceFormat: "qcow2", PublishedFrom: spec.VM,
		Generalized: spec.Prepare != nil, CPUs: parent.CPUs, Memory: parent.Memory,
	}
	return l.add(ctx, img, "publish", func(ctx context.Context, tmp string) error {
		if err := l.img.CopyTop(ctx, spec.Top, spec.TopBacking, tmp); err != nil {
			return err
		}
		if spec.TopBacking != parent.Path {
			if err := l.img.Rebase(ctx, tmp, parent.Path); err != nil {
				return err
			}
		}
		if spec.Prepare != nil {
			return spec.Prepare(ctx, tmp)
		}
		return nil
	})
}

// Flatten makes an image standalone: its parents' data is copied into it
// and it no longer depends on them. Its content does not change, so VMs
// and images layered on it are unaffected; a VM running on it keeps the
// old file open until it stops.
func (l *Library) Flatten(ctx context.Context, name string, progress func(float64)) (api.Image, error) {
	unlock, err := l.lock(name, "flatten")
	if err != nil {
		return api.Image{}, err
	}
	defer unlock()
	img, err := l.Get(ctx, name)
	if err != nil {
		return api.Image{}, err
	}
	if img.Parent == "" {
		return api.Image{}, fmt.Errorf("flatten image %q: %w: it has no parent", name, errdefs.ErrInvalid)
	}
	tmp := filepath.Join(filepath.Dir(img.Path), ".flat.qcow2.tmp")
	if err := l.img.ConvertProgress(ctx, img.Path, "qcow2", tmp, progress); err != nil {
		_ = os.Remove(tmp)
		return api.Image{}, fmt.Errorf("flatten image %q: %w", name, err)
	}
	err = os.Chmod(tmp, 0o444)
	if err == nil {
		err = os.Rename(tmp, img.Path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return api.Image{}, fmt.Errorf("flatten image %q: %w", name, err)
	}
	if err := l.markStandalone(ctx, name); err != nil {
		return api.Image{}, err
	}
	l.log.Info("flattened", "image", name, "former parent", img.Parent)
	return l.Get(ctx, name)
}

func (l *Library) markStandalone(ctx context.Context, name string) error {
	info, err := l.img.Info(ctx, filepath.Join(l.dir, name, "disk.qcow2"))
	if err != nil {
		return fmt.Errorf("image %q: %w", name, err)
	}
	return l.store.Update(ctx, func(tx store.Tx) error {
		var r record
		if err := store.GetJSON(tx, bucket, name, &r); err != nil {
			return err
		}
		r.Parent, r.ActualSize = "", info.ActualSize
		return store.PutJSON(tx, bucket, name, r)
	})
}

// recoverFlatten finishes a flatten a crash cut short: a leftover copy is
// removed, and an image whose file no longer has a backing file is
// recorded as standalone.
func (l *Library) recoverFlatten(ctx context.Context, r record) error {
	dir := filepath.Join(l.dir, r.Name)
	_ = os.Remove(filepath.Join(dir, ".flat.qcow2.tmp"))
	if r.Parent == "" {
		return nil
	}
	// An unreadable file is left for `image show` and the VMs to report.
	if info, err := l.img.Info(ctx, r.Path); err != nil || info.BackingFilename != "" {
		return nil //nolint:nilerr // nothing to finish
	}
	l.log.Warn("finishing interrupted flatten", "image", r.Name)
	return l.markStandalone(ctx, r.Name)
}
