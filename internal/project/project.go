// Package project keeps projects: named groups of VMs with limits on what
// they may take together (memory, CPUs, disk, number of VMs), as Incus's
// project limits do. The VM service counts usage and calls Check inside
// the transaction that adds or grows a VM, so two requests can never both
// squeeze under one limit.
package project

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/store"
	"github.com/lodge-vm/lodge/internal/units"
)

// Default is the project of VMs created without one. It always exists.
const Default = "default"

const bucket = "projects"

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)

// Registry stores projects.
type Registry struct {
	store store.Store
	// Usage counts what a project's VMs take.
	Usage func(ctx context.Context, name string) (api.ProjectLimits, error)
	// Members lists a project's VMs inside a transaction; deletion is
	// refused while there are any.
	Members func(tx store.Tx, name string) ([]string, error)
}

// New returns a registry.
func New(st store.Store) *Registry { return &Registry{store: st} }

// Name returns the project a VM belongs to: Default when unset.
func Name(p string) string {
	if p == "" {
		return Default
	}
	return p
}

// LimitsTx reads a project's limits inside a transaction. The default
// project exists without a record until it is given limits.
func LimitsTx(tx store.Tx, name string) (api.ProjectLimits, error) {
	var p api.Project
	err := get(tx, Name(name), &p)
	return p.Limits, err
}

// Check refuses to add more to what a project uses when that would take
// it past one of its limits. The error gives the numbers.
func Check(name string, limits, used, more api.ProjectLimits) error {
	for _, r := range []struct {
		what              string
		limit, used, more int64
		size              bool
	}{
		{"vms", limits.VMs, used.VMs, more.VMs, false},
		{"memory", limits.Memory, used.Memory, more.Memory, true},
		{"cpus", limits.CPUs, used.CPUs, more.CPUs, false},
		{"disk", limits.Disk, used.Disk, more.Disk, true},
	} {
		if r.limit == 0 || r.more <= 0 || r.used+r.more <= r.limit {
			continue
		}
		f := func(n int64) string { return fmt.Sprint(n) }
		if r.size {
			f = units.FormatSize
		}
		return fmt.Errorf("project %q: %w: %s quota %s, used %s, requested %s more", Name(name), errdefs.ErrQuota, r.what, f(r.limit), f(r.used), f(r.more))
	}
	return nil
}

// Validate refuses a project's limits that make no sense.
func validate(name string, l api.ProjectLimits) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("project name %q: %w: use letters, digits, '-' and '_'", name, errdefs.ErrInvalid)
	}
	switch {
	case l.Memory < 0 || l.CPUs < 0 || l.Disk < 0 || l.VMs < 0:
		return fmt.Errorf("project %q: %w: limits must not be negative", name, errdefs.ErrInvalid)
	case l.Memory > 0 && l.Memory < 64<<20:
		return fmt.Errorf("project %q: memory quota %s: %w: must be at least 64M, or 0 for none", name, units.FormatSize(l.Memory), errdefs.ErrInvalid)
	case l.Disk > 0 && l.Disk < 1<<20:
		return fmt.Errorf("project %q: disk quota %s: %w: must be at least 1M, or 0 for none", name, units.FormatSize(l.Disk), errdefs.ErrInvalid)
	}
	return nil
}

// Create adds a project.
func (r *Registry) Create(ctx context.Context, p api.Project) (api.Project, error) {
	if err := validate(p.Name, p.Limits); err != nil {
		return api.Project{}, err
	}
	p.CreatedAt, p.Usage = time.Now().UTC(), api.ProjectLimits{}
	err := r.store.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(bucket, p.Name); err == nil || p.Name == Default {
			return fmt.Errorf("project %q: %w", p.Name, errdefs.ErrExists)
		}
		return store.PutJSON(tx, bucket, p.Name, p)
	})
	if err != nil {
		return api.Project{}, err
	}
	return r.Get(ctx, p.Name)
}

// Get returns a project with its usage.
func (r *Registry) Get(ctx context.Context, name string) (api.Project, error) {
	var p api.Project
	err := r.store.View(ctx, func(tx store.Tx) error { return get(tx, name, &p) })
	if err != nil {
		return api.Project{}, err
	}
	return r.withUsage(ctx, p)
}

func get(tx store.Tx, name string, p *api.Project) error {
	err := store.GetJSON(tx, bucket, name, p)
	switch {
	case errors.Is(err, store.ErrNotFound) && name == Default:
		*p = api.Project{Name: Default}
		return nil
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("project %q: %w (see lodge project list)", name, errdefs.ErrNotFound)
	}
	return err
}

func (r *Registry) withUsage(ctx context.Context, p api.Project) (api.Project, error) {
	if r.Usage == nil {
		return p, nil
	}
	u, err := r.Usage(ctx, p.Name)
	p.Usage = u
	return p, err
}

// List returns every project, the default one first.
func (r *Registry) List(ctx context.Context) ([]api.Project, error) {
	var stored []api.Project
	err := r.store.View(ctx, func(tx store.Tx) error {
		var err error
		stored, err = store.ListJSON[api.Project](tx, bucket)
		return err
	})
	if err != nil {
		return nil, err
	}
	out := []api.Project{{Name: Default}}
	for _, p := range stored {
		if p.Name == Default {
			out[0] = p
		} else {
			out = append(out, p)
		}
	}
	for i := range out {
		if out[i], err = r.withUsage(ctx, out[i]); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Set changes a project's limits. A limit below what the project uses
// now is allowed: it stops growth, and takes nothing away.
func (r *Registry) Set(ctx context.Context, name string, req api.SetProject) (api.Project, error) {
	err := r.store.Update(ctx, func(tx store.Tx) error {
		var p api.Project
		if err := get(tx, name, &p); err != nil {
			return err
		}
		req.ApplyTo(&p)
		if err := validate(name, p.Limits); err != nil {
			return err
		}
		return store.PutJSON(tx, bucket, name, p)
	})
	if err != nil {
		return api.Project{}, err
	}
	return r.Get(ctx, name)
}

// Delete removes a project that holds no VMs. The default project stays.
func (r *Registry) Delete(ctx context.Context, name string) error {
	if name == Default {
		return fmt.Errorf("project %q: %w: the default project cannot be removed", name, errdefs.ErrInvalid)
	}
	return r.store.Update(ctx, func(tx store.Tx) error {
		var p api.Project
		if err := get(tx, name, &p); err != nil {
			return err
		}
		if r.Members != nil {
			vms, err := r.Members(tx, name)
			if err != nil {
				return err
			}
			if len(vms) > 0 {
				return fmt.Errorf("project %q: %w by vm %v", name, errdefs.ErrInUse, vms)
			}
		}
		return tx.Delete(bucket, name)
	})
}
