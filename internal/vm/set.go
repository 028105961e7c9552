package vm

import (
	"context"
	"fmt"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/units"
)

// The balloon counts as there when it is this close to its target: the
// guest driver works in pages and may keep a few back.
const balloonSlack = 4 << 20

// How long a balloon may stand still before the guest is judged to have
// no balloon driver, and how long a change may take in all.
var (
	balloonStall   = 10 * time.Second
	balloonTimeout = 60 * time.Second
)

// Set changes a VM's settings. Memory changes while the VM runs, through
// the virtio balloon, down from and back up to the memory it booted with;
// the call returns once the guest has got there, or says how far it got.
// CPUs and max memory change while it is stopped.
func (s *Service) Set(ctx context.Context, name string, req api.SetVM) (api.VM, error) {
	unlock, err := s.lock(name, "set")
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	r, err := s.load(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	in := s.instance(name)
	mem, maxMem, cpus := r.Memory, r.MaxMemory, r.CPUs
	if req.Memory != 0 {
		mem = req.Memory
	}
	if req.MaxMemory != 0 {
		maxMem = req.MaxMemory
	}
	if req.CPUs != 0 {
		cpus = req.CPUs
	}
	switch {
	case req.Memory < 0 || req.MaxMemory < 0:
		return api.VM{}, fmt.Errorf("set vm %q: %w: sizes must be positive", name, errdefs.ErrInvalid)
	case mem < MinMemory:
		return api.VM{}, fmt.Errorf("set vm %q: memory %s: %w: must be at least %s", name, units.FormatSize(mem), errdefs.ErrInvalid, units.FormatSize(MinMemory))
	case mem > maxMem:
		return api.VM{}, fmt.Errorf("set vm %q: memory %s: %w: above its max_memory %s", name, units.FormatSize(mem), errdefs.ErrInvalid, units.FormatSize(maxMem))
	case cpus < 1 || cpus > MaxCPUs:
		return api.VM{}, fmt.Errorf("set vm %q: cpus %d: %w: must be between 1 and %d", name, cpus, errdefs.ErrInvalid, MaxCPUs)
	}
	if total := s.hostMemory(); total > 0 && maxMem > total {
		return api.VM{}, fmt.Errorf("set vm %q: memory %s is more than the host has (%s): %w", name, units.FormatSize(maxMem), units.FormatSize(total), errdefs.ErrLimit)
	}
	if in != nil {
		if cpus != r.CPUs {
			return api.VM{}, fmt.Errorf("set vm %q: cpus: %w: they change while the VM is stopped", name, errdefs.ErrState)
		}
		if maxMem != r.MaxMemory {
			return api.VM{}, fmt.Errorf("set vm %q: max_memory: %w: it changes while the VM is stopped", name, errdefs.ErrState)
		}
		boot := r.BootMemory
		if boot == 0 {
			boot = r.Memory
		}
		if mem > boot {
			return api.VM{}, fmt.Errorf("set vm %q: memory %s: %w: a running VM grows only back to the %s it booted with (memory hot-plug is not there yet); stop it to boot with more",
				name, units.FormatSize(mem), errdefs.ErrLimit, units.FormatSize(boot))
		}
	}
	if mem > r.Memory && (in != nil || holdsMemory(r.State)) {
		if err := s.admitGrowth(ctx, r, mem-r.Memory); err != nil {
			return api.VM{}, err
		}
	}
	var balloonErr error
	if in != nil && mem != r.Memory {
		var moved bool
		if moved, balloonErr = s.balloon(ctx, in, r.Memory, mem); balloonErr != nil && !moved {
			return api.VM{}, balloonErr
		}
	}
	// A balloon that moved but has not arrived keeps its new target: the
	// record says where the guest is going, and the error how far it got.
	if _, err := s.update(ctx, name, func(x *record) error {
		x.Memory, x.MaxMemory, x.CPUs = mem, maxMem, cpus
		return nil
	}); err != nil {
		return api.VM{}, err
	}
	if balloonErr != nil {
		return api.VM{}, balloonErr
	}
	s.publish(name, "vm-set", "", fmt.Sprintf("memory %s, max %s, cpus %d", units.FormatSize(mem), units.FormatSize(maxMem), cpus))
	return s.Get(ctx, name)
}

// admitGrowth refuses to give a running VM more memory than the host
// limit allows.
func (s *Service) admitGrowth(ctx context.Context, r record, more int64) error {
	limit, allocated, ok, err := s.headroom(ctx, more)
	if err != nil || ok {
		return err
	}
	return fmt.Errorf("set vm %q: %w: memory limit %s, allocated %s, requested %s more", r.Name, errdefs.ErrLimit,
		units.FormatSize(limit), units.FormatSize(allocated), units.FormatSize(more))
}

// balloon moves a running guest's memory to target and waits until the
// guest is there. A balloon that never moves means a guest without the
// driver: the target is put back and the error says so. moved reports
// whether the guest's memory changed at all.
func (s *Service) balloon(ctx context.Context, in *instance, from, target int64) (moved bool, err error) {
	start, err := qmp.QueryBalloon(ctx, in.mon)
	if err != nil {
		return false, fmt.Errorf("set vm %q: memory: %w", in.name, err)
	}
	if err := qmp.Balloon(ctx, in.mon, target); err != nil {
		return false, fmt.Errorf("set vm %q: memory: %w", in.name, err)
	}
	began := time.Now()
	last, lastMove := start, began
	deadline := began.Add(balloonTimeout)
	for {
		actual, err := qmp.QueryBalloon(ctx, in.mon)
		if err != nil {
			return last != start, fmt.Errorf("set vm %q: memory: %w", in.name, err)
		}
		if abs(actual-target) <= balloonSlack {
			s.log.Info("balloon reached target", "vm", in.name, "target", target, "actual", actual, "took", time.Since(began))
			return true, nil
		}
		if actual != last {
			last, lastMove = actual, time.Now()
		}
		stalled := time.Since(lastMove) > balloonStall
		if stalled || time.Now().After(deadline) || ctx.Err() != nil {
			bg := context.WithoutCancel(ctx)
			why := fmt.Sprintf("the guest got to %s of %s in %s and goes on", units.FormatSize(actual), units.FormatSize(target), time.Since(began).Round(time.Second))
			if actual == start {
				// Nothing moved at all: put the target back, so that
				// nothing is left half-set.
				_ = qmp.Balloon(bg, in.mon, from)
				why = fmt.Sprintf("the guest's balloon did not move in %s (no virtio_balloon driver?); memory stays %s", balloonStall, units.FormatSize(from))
			}
			if ctx.Err() != nil {
				return actual != start, fmt.Errorf("set vm %q: memory: %s: %w", in.name, why, ctx.Err())
			}
			return actual != start, fmt.Errorf("set vm %q: memory: %w: %s", in.name, errdefs.ErrState, why)
		}
		select {
		case <-ctx.Done():
		case <-in.done:
			return last != start, fmt.Errorf("set vm %q: memory: it stopped: %w", in.name, errdefs.ErrState)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func abs(n int64) int64 {
	if n < 0 {
		return -n
	}
	return n
}
