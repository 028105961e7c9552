package project

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/store"
)

func TestCheck(t *testing.T) {
	limits := api.ProjectLimits{Memory: 1 << 30, CPUs: 4, Disk: 20 << 30, VMs: 3}
	tests := []struct {
		name       string
		used, more api.ProjectLimits
		want       string
	}{
		{"fits", api.ProjectLimits{Memory: 512 << 20, VMs: 1}, api.ProjectLimits{Memory: 512 << 20, VMs: 1}, ""},
		{"memory", api.ProjectLimits{Memory: 768 << 20}, api.ProjectLimits{Memory: 512 << 20}, "memory quota 1G, used 768M, requested 512M more"},
		{"cpus", api.ProjectLimits{CPUs: 4}, api.ProjectLimits{CPUs: 1}, "cpus quota 4, used 4, requested 1 more"},
		{"disk", api.ProjectLimits{Disk: 16 << 30}, api.ProjectLimits{Disk: 8 << 30}, "disk quota 20G, used 16G, requested 8G more"},
		{"count", api.ProjectLimits{VMs: 3}, api.ProjectLimits{VMs: 1}, "vms quota 3, used 3, requested 1 more"},
		// Over a limit already (it was lowered): shrinking or standing
		// still is fine, growing is not.
		{"shrink while over", api.ProjectLimits{Memory: 2 << 30}, api.ProjectLimits{Memory: -256 << 20}, ""},
		{"other growth while over", api.ProjectLimits{Memory: 2 << 30, CPUs: 1}, api.ProjectLimits{CPUs: 1}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Check("team", limits, tt.used, tt.more)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Check = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, errdefs.ErrQuota) || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), `project "team"`) {
				t.Fatalf("Check = %v, want a quota error with %q", err, tt.want)
			}
		})
	}
	if err := Check("free", api.ProjectLimits{}, api.ProjectLimits{Memory: 1 << 40}, api.ProjectLimits{Memory: 1 << 40}); err != nil {
		t.Fatalf("a project without limits refused growth: %v", err)
	}
}

func TestRegistry(t *testing.T) {
	ctx := context.Background()
	st := store.NewMemory()
	r := New(st)
	members := map[string][]string{}
	r.Members = func(_ store.Tx, name string) ([]string, error) { return members[name], nil }
	r.Usage = func(_ context.Context, name string) (api.ProjectLimits, error) {
		return api.ProjectLimits{VMs: int64(len(members[name]))}, nil
	}

	p, err := r.Create(ctx, api.Project{Name: "team", Limits: api.ProjectLimits{Memory: 1 << 30}})
	if err != nil || p.Limits.Memory != 1<<30 || p.CreatedAt.IsZero() {
		t.Fatalf("Create = %+v, %v", p, err)
	}
	bad := []struct {
		p    api.Project
		want error
	}{
		{api.Project{Name: "team"}, errdefs.ErrExists},
		{api.Project{Name: Default}, errdefs.ErrExists},
		{api.Project{Name: "no/slash"}, errdefs.ErrInvalid},
		{api.Project{Name: "tiny", Limits: api.ProjectLimits{Memory: 1 << 20}}, errdefs.ErrInvalid},
		{api.Project{Name: "neg", Limits: api.ProjectLimits{CPUs: -1}}, errdefs.ErrInvalid},
	}
	for _, tt := range bad {
		if _, err := r.Create(ctx, tt.p); !errors.Is(err, tt.want) {
			t.Errorf("Create(%+v) = %v, want %v", tt.p, err, tt.want)
		}
	}
	zero, two := int64(0), int64(2)
	if p, err = r.Set(ctx, "team", api.SetProject{Memory: &zero, VMs: &two}); err != nil || p.Limits.Memory != 0 || p.Limits.VMs != 2 {
		t.Fatalf("Set = %+v, %v", p, err)
	}
	if _, err := r.Set(ctx, "nope", api.SetProject{VMs: &two}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Set on a missing project: %v", err)
	}
	// The default project exists without a record and takes limits.
	if p, err = r.Set(ctx, Default, api.SetProject{VMs: &two}); err != nil || p.Limits.VMs != 2 {
		t.Fatalf("Set default = %+v, %v", p, err)
	}
	ps, err := r.List(ctx)
	if err != nil || len(ps) != 2 || ps[0].Name != Default || ps[0].Limits.VMs != 2 || ps[1].Name != "team" {
		t.Fatalf("List = %+v, %v", ps, err)
	}

	members["team"] = []string{"a"}
	if err := r.Delete(ctx, "team"); !errors.Is(err, errdefs.ErrInUse) || !strings.Contains(err.Error(), "[a]") {
		t.Fatalf("Delete of a project with a VM: %v", err)
	}
	if err := r.Delete(ctx, Default); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("Delete of the default project: %v", err)
	}
	delete(members, "team")
	if err := r.Delete(ctx, "team"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Get(ctx, "team"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Get after delete: %v", err)
	}
	err = st.View(ctx, func(tx store.Tx) error { _, err := LimitsTx(tx, "team"); return err })
	if !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("LimitsTx of a deleted project: %v", err)
	}
}
