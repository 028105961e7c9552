package vm

import (
	"context"
	"slices"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/project"
	"github.com/lodge-vm/lodge/internal/store"
)

// usage is what a VM counts against its project's limits: its memory
// setting, CPUs and the virtual size of its disks.
func (r record) usage() api.ProjectLimits {
	u := api.ProjectLimits{VMs: 1, Memory: r.Memory, CPUs: int64(r.CPUs)}
	for _, d := range r.Disks {
		u.Disk += d.Size
	}
	return u
}

func add(a, b api.ProjectLimits) api.ProjectLimits {
	return api.ProjectLimits{Memory: a.Memory + b.Memory, CPUs: a.CPUs + b.CPUs, Disk: a.Disk + b.Disk, VMs: a.VMs + b.VMs}
}

func sub(a, b api.ProjectLimits) api.ProjectLimits {
	return api.ProjectLimits{Memory: a.Memory - b.Memory, CPUs: a.CPUs - b.CPUs, Disk: a.Disk - b.Disk, VMs: a.VMs - b.VMs}
}

// projectUsage sums what the VMs of a project take.
func projectUsage(recs []record, name string) api.ProjectLimits {
	var u api.ProjectLimits
	for _, r := range recs {
		if project.Name(r.Project) == project.Name(name) {
			u = add(u, r.usage())
		}
	}
	return u
}

// checkQuota refuses to store next, a new or changed VM whose stored
// record is prev (zero for a new one), when that takes its project past a
// limit. It runs inside the transaction that stores next, before next is
// written; a VM that stays in its project counts only its growth.
func checkQuota(tx store.Tx, prev, next record) error {
	limits, err := project.LimitsTx(tx, next.Project)
	if err != nil {
		return err
	}
	if limits == (api.ProjectLimits{}) {
		return nil
	}
	recs, err := store.ListJSON[record](tx, bucket)
	if err != nil {
		return err
	}
	more := next.usage()
	if prev.Name != "" && project.Name(prev.Project) == project.Name(next.Project) {
		more = sub(more, prev.usage())
	}
	return project.Check(next.Project, limits, projectUsage(recs, next.Project), more)
}

// ProjectUsage is what the VMs of a project take.
func (s *Service) ProjectUsage(ctx context.Context, name string) (api.ProjectLimits, error) {
	recs, err := s.all(ctx)
	return projectUsage(recs, name), err
}

// ProjectMembersTx lists the VMs of a project inside a transaction.
func ProjectMembersTx(tx store.Tx, name string) ([]string, error) {
	recs, err := store.ListJSON[record](tx, bucket)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, r := range recs {
		if project.Name(r.Project) == name {
			out = append(out, r.Name)
		}
	}
	slices.Sort(out)
	return out, nil
}
