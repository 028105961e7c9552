package vm

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qmp"
)

// cpuAgentWait bounds the wait for the agent that brings plugged CPUs
// online and takes them offline before they go.
var cpuAgentWait = 5 * time.Second

// setCPUs plugs CPUs into a running guest, one socket each, or unplugs
// those plugged since boot, until it has target, and returns how many are
// plugged beyond the boot CPUs. The guest agent brings new CPUs online
// (Linux leaves hot-added CPUs offline without a udev rule) and takes
// them offline before they are unplugged.
func (s *Service) setCPUs(ctx context.Context, in *instance, r record, target int) (hot int, err error) {
	hot = r.HotCPUs
	cur := r.BootCPUs + hot
	slots, err := qmp.HotpluggableCPUs(ctx, in.mon)
	if err != nil {
		return hot, fmt.Errorf("set vm %q: cpus: %w", r.Name, err)
	}
	bySocket := map[int]qmp.HotpluggableCPU{}
	for _, sl := range slots {
		bySocket[sl.Props.SocketID] = sl
	}
	if err := s.withAgent(ctx, r.Name, cpuAgentWait, func(a qga.Agent) error { _, err := a.VCPUs(ctx); return err }); err != nil {
		return hot, fmt.Errorf("set vm %q: cpus: the guest agent brings CPUs online and offline: %w", r.Name, err)
	}
	for ; cur < target; cur++ {
		slot, ok := bySocket[cur]
		if !ok {
			return hot, fmt.Errorf("set vm %q: cpus: %w: no CPU slot %d", r.Name, errdefs.ErrLimit, cur)
		}
		if slot.QOMPath == "" {
			if err := qmp.PlugCPU(ctx, in.mon, slot, qemu.CPUID(cur)); err != nil {
				return hot, fmt.Errorf("set vm %q: cpus: plug CPU %d: %w", r.Name, cur, err)
			}
		}
		hot++
	}
	for ; cur > target; cur-- {
		id := cur - 1
		err := s.withAgent(ctx, r.Name, cpuAgentWait, func(a qga.Agent) error {
			_, err := a.SetVCPUs(ctx, []qga.VCPU{{ID: id, Online: false}})
			return err
		})
		if err != nil {
			return hot, fmt.Errorf("set vm %q: cpus: take CPU %d offline: %w", r.Name, id, err)
		}
		if err := s.unplugCPU(ctx, in, id); err != nil {
			return hot, err
		}
		hot--
	}
	return hot, s.onlineCPUs(ctx, in, target)
}

// onlineCPUs brings the guest's offline CPUs below n online; the kernel
// sees a plugged CPU a moment after QEMU does, so it tries for a while.
func (s *Service) onlineCPUs(ctx context.Context, in *instance, n int) error {
	var last error
	err := waitFor(ctx, in, 100*time.Millisecond, balloonStall, func() (bool, error) {
		online := 0
		last = s.withAgent(ctx, in.name, cpuAgentWait, func(a qga.Agent) error {
			cpus, err := a.VCPUs(ctx)
			if err != nil {
				return err
			}
			var offline []qga.VCPU
			for _, c := range cpus {
				switch {
				case c.ID >= n:
				case c.Online:
					online++
				default:
					offline = append(offline, qga.VCPU{ID: c.ID, Online: true})
				}
			}
			if len(offline) == 0 {
				return nil
			}
			k, err := a.SetVCPUs(ctx, offline)
			online += k
			return err
		})
		// The agent may fail while the guest is busy taking the CPU:
		// try again until the time is up.
		return last == nil && online >= n, nil
	})
	if errors.Is(err, errWaitedOut) {
		err = last
		if err == nil {
			err = fmt.Errorf("%w: the guest has not seen all %d CPUs", errdefs.ErrState, n)
		}
	}
	if err != nil {
		return fmt.Errorf("set vm %q: cpus: bring them online: %w", in.name, err)
	}
	return nil
}

// unplugCPU asks the guest to eject the CPU in socket i and waits until
// QEMU reports the slot empty.
func (s *Service) unplugCPU(ctx context.Context, in *instance, i int) error {
	if err := qmp.DeviceDel(ctx, in.mon, qemu.CPUID(i)); err != nil {
		return fmt.Errorf("set vm %q: cpus: unplug CPU %d: %w", in.name, i, err)
	}
	err := waitFor(ctx, in, 100*time.Millisecond, balloonStall, func() (bool, error) {
		slots, err := qmp.HotpluggableCPUs(ctx, in.mon)
		gone := !slices.ContainsFunc(slots, func(sl qmp.HotpluggableCPU) bool { return sl.Props.SocketID == i && sl.QOMPath != "" })
		return gone, err
	})
	if errors.Is(err, errWaitedOut) {
		err = fmt.Errorf("%w: the guest did not give up CPU %d in %s", errdefs.ErrState, i, balloonStall)
	}
	if err != nil {
		return fmt.Errorf("set vm %q: cpus: unplug CPU %d: %w", in.name, i, err)
	}
	return nil
}
