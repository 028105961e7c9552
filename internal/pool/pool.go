// Package pool keeps the registry of storage pools: named directories,
// possibly on other drives, that hold VM disks. The default pool lives in
// $LODGE_HOME/pools/default and always exists.
package pool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"

	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/storage"
	"github.com/lodge-vm/lodge/internal/store"
)

const bucket = "pools"

// Registry stores pools.
type Registry struct {
	home  string
	store store.Store
	// Users lists what uses a pool; deletion is refused while it is used.
	Users func(ctx context.Context, pool string) ([]string, error)
}

// New returns a registry and makes sure the default pool exists.
func New(ctx context.Context, home string, st store.Store) (*Registry, error) {
	r := &Registry{home: home, store: st}
	def := storage.Pool{Name: "default", Path: filepath.Join(home, "pools", "default")}
	if err := os.MkdirAll(def.Path, 0o750); err != nil {
		return nil, fmt.Errorf("default pool: %w", err)
	}
	err := st.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(bucket, def.Name); err == nil {
			return nil
		}
		return store.PutJSON(tx, bucket, def.Name, def)
	})
	return r, err
}

// Get returns one pool.
func (r *Registry) Get(ctx context.Context, name string) (storage.Pool, error) {
	var p storage.Pool
	err := r.store.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, bucket, name, &p) })
	if errors.Is(err, store.ErrNotFound) {
		return p, fmt.Errorf("pool %q: %w (see lodge pool list)", name, errdefs.ErrNotFound)
	}
	return p, err
}

// List returns every pool.
func (r *Registry) List(ctx context.Context) ([]storage.Pool, error) {
	var out []storage.Pool
	err := r.store.View(ctx, func(tx store.Tx) error {
		var err error
		out, err = store.ListJSON[storage.Pool](tx, bucket)
		return err
	})
	return out, err
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)

// Create registers a directory as a pool. The directory must exist and be
// writable: a pool on an unmounted drive must fail now, not at create.
func (r *Registry) Create(ctx context.Context, name, path string) (storage.Pool, error) {
	if !nameRE.MatchString(name) {
		return storage.Pool{}, fmt.Errorf("pool name %q: %w: use letters, digits, '-' and '_'", name, errdefs.ErrInvalid)
	}
	if !filepath.IsAbs(path) {
		return storage.Pool{}, fmt.Errorf("pool %q: path %q: %w: must be absolute", name, path, errdefs.ErrInvalid)
	}
	p := storage.Pool{Name: name, Path: filepath.Clean(path)}
	if err := p.Check(); err != nil {
		return storage.Pool{}, fmt.Errorf("%w: %w", errdefs.ErrInvalid, err)
	}
	err := r.store.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(bucket, name); err == nil {
			return fmt.Errorf("pool %q: %w", name, errdefs.ErrExists)
		}
		return store.PutJSON(tx, bucket, name, p)
	})
	return p, err
}

// Delete unregisters a pool that no VM uses. Its directory stays.
func (r *Registry) Delete(ctx context.Context, name string) error {
	if name == "default" {
		return fmt.Errorf("pool %q: %w: the default pool cannot be removed", name, errdefs.ErrInvalid)
	}
	if _, err := r.Get(ctx, name); err != nil {
		return err
	}
	if r.Users != nil {
		users, err := r.Users(ctx, name)
		if err != nil {
			return err
		}
		if len(users) > 0 {
			return fmt.Errorf("pool %q: %w by vm %v", name, errdefs.ErrInUse, users)
		}
	}
	return r.store.Update(ctx, func(tx store.Tx) error { return tx.Delete(bucket, name) })
}
