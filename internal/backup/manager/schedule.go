package manager

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/backup"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/store"
)

// SetSchedule makes the daemon back VM s.VM up on s.Schedule, pruning by
// s.Keep after each backup. A VM has at most one schedule; setting one
// replaces it.
func (m *Manager) SetSchedule(ctx context.Context, s api.BackupSchedule) (api.BackupSchedule, error) {
	sched, err := backup.ParseSchedule(s.Schedule)
	if err != nil {
		return api.BackupSchedule{}, fmt.Errorf("backup schedule of vm %q: %w", s.VM, err)
	}
	if _, err := m.vms.Get(ctx, s.VM); err != nil {
		return api.BackupSchedule{}, fmt.Errorf("backup schedule: %w", err)
	}
	if s.Repo == "" {
		s.Repo = DefaultRepo
	}
	if _, _, err := m.open(ctx, s.Repo); err != nil {
		return api.BackupSchedule{}, fmt.Errorf("backup schedule of vm %q: %w", s.VM, err)
	}
	for _, n := range []int{s.Keep.Last, s.Keep.Hourly, s.Keep.Daily, s.Keep.Weekly, s.Keep.Monthly} {
		if n < 0 {
			return api.BackupSchedule{}, fmt.Errorf("backup schedule of vm %q: %w: a --keep-* count is negative", s.VM, errdefs.ErrInvalid)
		}
	}
	s.Schedule = sched.String()
	s.LastRun, s.LastError = nil, ""
	next := sched.Next(time.Time{}, time.Now()).UTC()
	s.NextRun = &next
	err = m.store.Update(ctx, func(tx store.Tx) error {
		var old api.BackupSchedule
		if err := store.GetJSON(tx, scheduleBucket, s.VM, &old); err == nil {
			s.LastRun, s.LastError = old.LastRun, old.LastError
			if old.LastRun != nil {
				n := sched.Next(*old.LastRun, time.Now()).UTC()
				s.NextRun = &n
			}
		}
		return store.PutJSON(tx, scheduleBucket, s.VM, s)
	})
	if err != nil {
		return api.BackupSchedule{}, err
	}
	m.log.Info("backup scheduled", "vm", s.VM, "schedule", s.Schedule, "repo", s.Repo, "next", s.NextRun)
	return s, nil
}

// DeleteSchedule stops scheduled backups of a VM.
func (m *Manager) DeleteSchedule(ctx context.Context, vmName string) error {
	return m.store.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(scheduleBucket, vmName); err != nil {
			return fmt.Errorf("backup schedule of vm %q: %w", vmName, errdefs.ErrNotFound)
		}
		return tx.Delete(scheduleBucket, vmName)
	})
}

// Schedules lists every schedule.
func (m *Manager) Schedules(ctx context.Context) ([]api.BackupSchedule, error) {
	var out []api.BackupSchedule
	err := m.store.View(ctx, func(tx store.Tx) error {
		var err error
		out, err = store.ListJSON[api.BackupSchedule](tx, scheduleBucket)
		return err
	})
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
	return out, err
}

// Due lists the schedules whose time has come.
func (m *Manager) Due(ctx context.Context, now time.Time) ([]api.BackupSchedule, error) {
	all, err := m.Schedules(ctx)
	if err != nil {
		return nil, err
	}
	var out []api.BackupSchedule
	for _, s := range all {
		if s.NextRun != nil && !now.Before(*s.NextRun) {
			out = append(out, s)
		}
	}
	return out, nil
}

// RunScheduled makes one scheduled backup and prunes after it, then
// records when it ran and when it runs next. A backup that fails is
// tried again at the next time, not at once.
func (m *Manager) RunScheduled(ctx context.Context, s api.BackupSchedule, progress Progress) (api.Backup, error) {
	b, err := m.Create(ctx, s.VM, s.Repo, progress)
	if err == nil && !keepOf(s.Keep).IsZero() {
		if _, perr := m.Prune(ctx, api.PruneBackups{VM: s.VM, Repo: s.Repo, Keep: s.Keep}); perr != nil {
			err = perr
		}
	}
	now := time.Now().UTC()
	uerr := m.store.Update(context.WithoutCancel(ctx), func(tx store.Tx) error {
		var cur api.BackupSchedule
		if err := store.GetJSON(tx, scheduleBucket, s.VM, &cur); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return nil // removed meanwhile
			}
			return err
		}
		sched, perr := backup.ParseSchedule(cur.Schedule)
		if perr != nil {
			return perr
		}
		cur.LastRun, cur.LastError = &now, ""
		if err != nil {
			cur.LastError = err.Error()
		}
		next := sched.Next(now, now).UTC()
		cur.NextRun = &next
		return store.PutJSON(tx, scheduleBucket, s.VM, cur)
	})
	if err == nil {
		err = uerr
	}
	return b, err
}
