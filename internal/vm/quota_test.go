package vm

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/project"
)

// Create, clone and set are held to a project's limits; what is refused
// leaves nothing behind.
func TestProjectQuota(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	reg := project.New(f.store)
	reg.Usage = f.svc.ProjectUsage
	if _, err := reg.Create(ctx, api.Project{Name: "team", Limits: api.ProjectLimits{Memory: 1 << 30, CPUs: 3, VMs: 3}}); err != nil {
		t.Fatal(err)
	}
	mk := func(name string, mem int64, cpus int) error {
		_, err := f.svc.Create(ctx, api.CreateVM{Name: name, Image: "tiny", Memory: mem, CPUs: cpus, Project: "team"})
		return err
	}
	if err := mk("a", 512<<20, 1); err != nil {
		t.Fatal(err)
	}
	if err := mk("b", 256<<20, 2); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		do   func() error
		want string
	}{
		{"create past memory", func() error { return mk("c", 512<<20, 0) }, "memory quota 1G, used 768M, requested 512M more"},
		{"clone past memory", func() error {
			_, err := f.svc.Clone(ctx, "a", api.CloneVM{Name: "a2"}, nil)
			return err
		}, "memory quota 1G"},
		{"set past cpus", func() error { _, err := f.svc.Set(ctx, "a", api.SetVM{CPUs: 2}); return err }, "cpus quota 3, used 3, requested 1 more"},
		{"set past memory", func() error {
			_, err := f.svc.Set(ctx, "b", api.SetVM{Memory: 768 << 20, MaxMemory: 768 << 20})
			return err
		}, "memory quota 1G, used 768M, requested 512M more"},
		{"move in past memory", func() error {
			if _, err := f.svc.Create(ctx, api.CreateVM{Name: "big", Image: "tiny", Memory: 512 << 20}); err != nil {
				return err
			}
			_, err := f.svc.Set(ctx, "big", api.SetVM{Project: "team"})
			return err
		}, "memory quota 1G, used 768M, requested 512M more"},
	}
	for _, tt := range tests {
		err := tt.do()
		if !errors.Is(err, errdefs.ErrQuota) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want a quota error with %q", tt.name, err, tt.want)
		}
	}
	for _, gone := range []string{"c", "a2"} {
		if _, err := f.svc.load(ctx, gone); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("refused vm %s exists: %v", gone, err)
		}
	}
	if r, _ := f.svc.load(ctx, "big"); r.Project != project.Default {
		t.Errorf("refused move left big in project %q", r.Project)
	}
	p, err := reg.Get(ctx, "team")
	if err != nil || p.Usage != (api.ProjectLimits{Memory: 768 << 20, CPUs: 3, VMs: 2, Disk: 2 * (8 << 30)}) {
		t.Fatalf("team usage %+v, %v", p.Usage, err)
	}
	// Shrinking is always allowed, and makes room.
	if _, err := f.svc.Set(ctx, "a", api.SetVM{Memory: 256 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.Set(ctx, "b", api.SetVM{CPUs: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.Set(ctx, "big", api.SetVM{Memory: 512 << 20, Project: "team"}); err != nil {
		t.Fatalf("move into the room made: %v", err)
	}
	if _, err := f.svc.Create(ctx, api.CreateVM{Name: "x", Image: "tiny", Memory: 64 << 20, Project: "nope"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("create in a missing project: %v", err)
	}
}

// Reverting gives a VM the memory it had when the snapshot was taken; that
// must still fit its project.
func TestRevertHeldToQuota(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	reg := project.New(f.store)
	if _, err := reg.Create(ctx, api.Project{Name: "team", Limits: api.ProjectLimits{Memory: 768 << 20}}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b"} {
		if _, err := f.svc.Create(ctx, api.CreateVM{Name: name, Image: "tiny", Memory: 512 << 20, Project: "team"}); err != nil && name == "a" {
			t.Fatal(err)
		}
		if name == "a" {
			if _, err := f.svc.CreateSnapshot(ctx, "a", api.CreateSnapshot{Name: "big"}, nil); err != nil {
				t.Fatal(err)
			}
			if _, err := f.svc.Set(ctx, "a", api.SetVM{Memory: 256 << 20}); err != nil {
				t.Fatal(err)
			}
		}
	}
	_, err := f.svc.RevertSnapshot(ctx, "a", "big", api.RevertSnapshot{})
	if !errors.Is(err, errdefs.ErrQuota) || !strings.Contains(err.Error(), "memory quota 768M, used 768M, requested 256M more") {
		t.Fatalf("revert past the quota: %v", err)
	}
	if r, _ := f.svc.load(ctx, "a"); r.Memory != 256<<20 || r.Intent != "" {
		t.Fatalf("refused revert left memory %d, intent %q", r.Memory, r.Intent)
	}
}
