package vm

import (
	"context"
	"errors"
	"os"

	"github.com/lodge-vm/lodge/internal/store"
)

// A layer is a disk file that was a VM's top and has been frozen so that
// clones could be layered on it. It is read-only from then on, and lives
// until no VM disk and no other layer names it as backing file.
const layerBucket = "layers"

type layer struct {
	Path    string `json:"path"`
	Backing string `json:"backing"`
	// Deleting marks a layer whose file is being removed; Recover finishes.
	Deleting bool `json:"deleting,omitempty"`
}

// putLayers records frozen tops inside a transaction.
func putLayers(tx store.Tx, ls []layer) error {
	for _, l := range ls {
		if err := store.PutJSON(tx, layerBucket, l.Path, l); err != nil {
			return err
		}
	}
	return nil
}

// collectLayers removes layers nothing refers to any more, repeating
// until the chain is clean. Records are marked first and deleted after the
// file is gone, so a crash in between is finished by Recover.
func (s *Service) collectLayers(ctx context.Context) {
	for {
		var doomed []layer
		err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
			layers, err := store.ListJSON[layer](tx, layerBucket)
			if err != nil {
				return err
			}
			vms, err := store.ListJSON[record](tx, bucket)
			if err != nil {
				return err
			}
			used := map[string]bool{}
			for _, r := range vms {
				for _, d := range r.Disks {
					used[d.Backing] = true
				}
			}
			for _, l := range layers {
				if !l.Deleting {
					used[l.Backing] = true
				}
			}
			snaps, err := store.ListJSON[snapRecord](tx, snapBucket)
			if err != nil {
				return err
			}
			for _, sn := range snaps {
				for _, d := range sn.Disks {
					used[d.Path] = true
				}
			}
			for _, l := range layers {
				if l.Deleting || !used[l.Path] {
					l.Deleting = true
					doomed = append(doomed, l)
					if err := store.PutJSON(tx, layerBucket, l.Path, l); err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			s.log.Error("collect layers", "err", err)
			return
		}
		if len(doomed) == 0 {
			return
		}
		for _, l := range doomed {
			if err := os.Remove(l.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
				s.log.Warn("remove layer", "path", l.Path, "err", err)
				return
			}
			if err := s.cfg.Store.Update(ctx, func(tx store.Tx) error { return tx.Delete(layerBucket, l.Path) }); err != nil {
				s.log.Error("remove layer record", "path", l.Path, "err", err)
				return
			}
			s.log.Info("removed layer", "path", l.Path)
		}
	}
}

// Layers lists the frozen layers, for tests and `host info`.
func (s *Service) Layers(ctx context.Context) ([]string, error) {
	var out []string
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		ls, err := store.ListJSON[layer](tx, layerBucket)
		for _, l := range ls {
			out = append(out, l.Path)
		}
		return err
	})
	return out, err
}
