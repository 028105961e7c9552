package vm

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/store"
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
	mem, maxMem, minMem, cpus, maxCPUs := r.Memory, r.MaxMemory, r.MinMemory, r.CPUs, r.MaxCPUs
	if req.MaxCPUs != 0 {
		maxCPUs = req.MaxCPUs
	}
	if req.MinMemory != nil {
		minMem = *req.MinMemory
	}
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
	case req.Memory < 0 || req.MaxMemory < 0 || minMem < 0:
		return api.VM{}, fmt.Errorf("set vm %q: %w: sizes must be positive", name, errdefs.ErrInvalid)
	case minMem > mem:
		return api.VM{}, fmt.Errorf("set vm %q: min_memory %s: %w: above its memory %s", name, units.FormatSize(minMem), errdefs.ErrInvalid, units.FormatSize(mem))
	case minMem != 0 && minMem < MinMemory:
		return api.VM{}, fmt.Errorf("set vm %q: min_memory %s: %w: must be at least %s, or 0 to keep the VM out of auto-ballooning", name, units.FormatSize(minMem), errdefs.ErrInvalid, units.FormatSize(MinMemory))
	case mem < MinMemory:
		return api.VM{}, fmt.Errorf("set vm %q: memory %s: %w: must be at least %s", name, units.FormatSize(mem), errdefs.ErrInvalid, units.FormatSize(MinMemory))
	case mem > maxMem:
		return api.VM{}, fmt.Errorf("set vm %q: memory %s: %w: above its max_memory %s", name, units.FormatSize(mem), errdefs.ErrInvalid, units.FormatSize(maxMem))
	case cpus < 1 || cpus > MaxCPUs:
		return api.VM{}, fmt.Errorf("set vm %q: cpus %d: %w: must be between 1 and %d", name, cpus, errdefs.ErrInvalid, MaxCPUs)
	case maxCPUs < 0 || maxCPUs > MaxCPUs:
		return api.VM{}, fmt.Errorf("set vm %q: max_cpus %d: %w: must be between 1 and %d", name, maxCPUs, errdefs.ErrInvalid, MaxCPUs)
	case maxCPUs != 0 && cpus > maxCPUs:
		return api.VM{}, fmt.Errorf("set vm %q: cpus %d: %w: above its max_cpus %d", name, cpus, errdefs.ErrInvalid, maxCPUs)
	}
	if total := s.hostMemory(); total > 0 && maxMem > total {
		return api.VM{}, fmt.Errorf("set vm %q: memory %s is more than the host has (%s): %w", name, units.FormatSize(maxMem), units.FormatSize(total), errdefs.ErrLimit)
	}
	if in != nil {
		if maxCPUs != r.MaxCPUs {
			return api.VM{}, fmt.Errorf("set vm %q: max_cpus: %w: it changes while the VM is stopped", name, errdefs.ErrState)
		}
		switch bootCPUs := max(r.BootCPUs, 1); {
		case cpus == r.CPUs:
		case r.BootMaxCPUs <= bootCPUs:
			return api.VM{}, fmt.Errorf("set vm %q: cpus: %w: they change while the VM is stopped, or while it runs if it booted with max_cpus above cpus", name, errdefs.ErrState)
		case cpus < bootCPUs:
			return api.VM{}, fmt.Errorf("set vm %q: cpus %d: %w: a running VM gives back only the CPUs plugged in since it booted with %d", name, cpus, errdefs.ErrState, bootCPUs)
		case cpus > r.BootMaxCPUs:
			return api.VM{}, fmt.Errorf("set vm %q: cpus %d: %w: it booted with room for %d", name, cpus, errdefs.ErrLimit, r.BootMaxCPUs)
		}
		if maxMem != r.MaxMemory {
			return api.VM{}, fmt.Errorf("set vm %q: max_memory: %w: it changes while the VM is stopped", name, errdefs.ErrState)
		}
		boot, ceiling := r.bootSizes()
		if mem > ceiling {
			why := fmt.Sprintf("a running VM grows only to the %s it booted with room for", units.FormatSize(ceiling))
			if ceiling == boot {
				why = fmt.Sprintf("it booted with %s and no room for hot-plug; stop it and raise max_memory first", units.FormatSize(boot))
			}
			return api.VM{}, fmt.Errorf("set vm %q: memory %s: %w: %s", name, units.FormatSize(mem), errdefs.ErrLimit, why)
		}
	}
	if mem > r.Memory && (in != nil || holdsMemory(r.State)) {
		if err := s.admitGrowth(ctx, r, mem-r.Memory); err != nil {
			return api.VM{}, err
		}
	}
	next := r
	next.Memory, next.MaxMemory, next.MinMemory, next.CPUs, next.MaxCPUs, next.Ballooned = mem, maxMem, minMem, cpus, maxCPUs, 0
	if req.Project != "" {
		next.Project = req.Project
	}
	// Checked here before the guest is touched, and again where the
	// change is stored, in case another VM took the room meanwhile.
	if err := s.cfg.Store.View(ctx, func(tx store.Tx) error { return checkQuota(tx, r, next) }); err != nil {
		return api.VM{}, fmt.Errorf("set vm %q: %w", name, err)
	}
	var resizeErr error
	dimms := r.Dimms
	// A set memory wins over what the auto-balloon held the VM at.
	if in != nil && (mem != r.Memory || r.Ballooned > 0) {
		var moved bool
		if moved, dimms, resizeErr = s.resize(ctx, in, r, mem); resizeErr != nil && !moved {
			return api.VM{}, resizeErr
		}
	}
	hotCPUs := r.HotCPUs
	if in != nil && cpus != r.CPUs && resizeErr == nil {
		if hotCPUs, resizeErr = s.setCPUs(ctx, in, r, cpus); hotCPUs == r.HotCPUs && resizeErr != nil && mem == r.Memory {
			return api.VM{}, resizeErr
		}
		// However far it got is what the guest has now.
		cpus = max(r.BootCPUs, 1) + hotCPUs
	}
	// A guest that moved but has not arrived keeps its new target: the
	// record says where the guest is going, and the error how far it got.
	if _, err := s.updateTx(ctx, name, func(tx store.Tx, x *record) error {
		if err := checkQuota(tx, *x, next); err != nil {
			return err
		}
		x.Memory, x.MaxMemory, x.MinMemory, x.CPUs, x.MaxCPUs, x.Ballooned, x.Project = mem, maxMem, minMem, cpus, maxCPUs, 0, next.Project
		x.Dimms, x.HotCPUs = dimms, hotCPUs
		return nil
	}); err != nil {
		if in != nil && mem != r.Memory {
			// Lost the room to another VM while the guest moved: put
			// the guest back where the record says it is.
			now := next
			now.Dimms = dimms
			_, _, _ = s.resize(context.WithoutCancel(ctx), in, now, r.Memory)
		}
		return api.VM{}, fmt.Errorf("set vm %q: %w", name, err)
	}
	if resizeErr != nil {
		return api.VM{}, resizeErr
	}
	s.publish(name, "vm-set", "", fmt.Sprintf("memory %s, max %s, min %s, cpus %d, max %d", units.FormatSize(mem), units.FormatSize(maxMem), units.FormatSize(minMem), cpus, maxCPUs))
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

// bootSizes are the memory a running VM's QEMU booted with and the most
// it can reach by hot-plug (equal when it has no virtio-mem device).
func (r record) bootSizes() (boot, ceiling int64) {
	boot = r.BootMemory
	if boot == 0 {
		boot = r.Memory
	}
	return boot, max(r.BootMaxMemory, boot)
}

// resize moves a running guest's memory to target: virtio-mem plugs or
// unplugs what lies above the boot memory, then the balloon takes or
// gives back what lies below it. Unplugging goes first, so that the
// balloon never holds memory that is about to go anyway. A guest may
// fail to unplug some blocks (kernel data landed in them); the balloon
// then takes that much more from the boot memory. A guest without a
// virtio-mem driver gets pc-dimms instead. It returns the pc-dimms the
// guest has afterwards.
func (s *Service) resize(ctx context.Context, in *instance, r record, target int64) (moved bool, dimms []int64, err error) {
	boot, ceiling := r.bootSizes()
	dimms = r.Dimms
	// A guest still booting has no drivers to move anything yet: give it
	// the time to come up rather than judge its drivers missing.
	waitGuestUp(ctx, in, balloonTimeout)
	var plugged hotMemory
	if ceiling > boot {
		want := int64(0)
		if target > boot {
			want = (target - boot + qemu.HotplugBlock - 1) &^ (qemu.HotplugBlock - 1)
		}
		var plugErr error
		if len(dimms) == 0 && !in.noVirtioMem.Load() {
			g := virtioMem(in, boot)
			before, err := g.get(ctx)
			if err != nil {
				return false, dimms, fmt.Errorf("set vm %q: memory: %w", in.name, err)
			}
			moved, plugErr = s.approach(ctx, in, g, want)
			if plugErr != nil && !moved && want > before && ctx.Err() == nil {
				// The guest never took a block. If it is up (its agent
				// or balloon driver answers), it has no virtio-mem
				// driver; if not, it may still be booting, and dimms
				// now would be a wrong guess.
				if !guestUp(ctx, in) {
					return false, dimms, fmt.Errorf("set vm %q: memory: %w: the guest took no memory and shows no sign of running yet (no agent, no balloon reports); try again once it has booted", in.name, errdefs.ErrState)
				}
				s.log.Warn("guest does not drive virtio-mem; plugging pc-dimms instead", "vm", in.name)
				in.noVirtioMem.Store(true)
				plugErr = nil
			}
			if plugErr != nil && (!moved || want > before) {
				return moved, dimms, plugErr
			}
		}
		if in.noVirtioMem.Load() || len(dimms) > 0 {
			var dmoved bool
			had := len(dimms)
			dimms, dmoved, plugErr = s.resizeDimms(ctx, in, dimms, want, ceiling-boot)
			// Only a shrink that stopped short is made up for.
			if moved = moved || dmoved; plugErr != nil && (!dmoved || len(dimms) > had) {
				return moved, dimms, plugErr
			}
		}
		if plugged, err = pluggedMemory(ctx, in.mon); err != nil {
			return moved, dimms, fmt.Errorf("set vm %q: memory: %w", in.name, err)
		}
		if plugErr != nil {
			if target-plugged.total() < MinMemory {
				return moved, dimms, plugErr
			}
			s.log.Warn("guest could not unplug all its hot-plugged memory; the balloon takes the rest", "vm", in.name, "plugged", plugged.total(), "err", plugErr)
		}
	}
	bmoved, err := s.approach(ctx, in, balloon(in), plugged.balloonTarget(target, boot))
	return moved || bmoved, dimms, err
}

// guestUp reports whether a guest shows it is running its drivers: its
// agent answers or its balloon driver has sent a report.
func guestUp(ctx context.Context, in *instance) bool {
	if in.agentUp() {
		return true
	}
	_, ok := guestUsed(ctx, in.mon)
	return ok
}

// waitGuestUp waits, at most limit, for the guest to show it is running.
func waitGuestUp(ctx context.Context, in *instance, limit time.Duration) {
	_ = waitFor(ctx, in, 200*time.Millisecond, limit, func() (bool, error) { return guestUp(ctx, in), nil })
}

// resizeDimms plugs or unplugs pc-dimms until want is plugged, or as near
// as whole 128 MiB dimms and the guest allow: growing rounds up (the
// balloon takes back the excess), shrinking removes only whole dimms the
// guest gives up.
func (s *Service) resizeDimms(ctx context.Context, in *instance, dimms []int64, want, room int64) (_ []int64, moved bool, err error) {
	var cur int64
	for _, d := range dimms {
		cur += d
	}
	if want > cur {
		size := (want - cur + qemu.DimmBlock - 1) &^ (qemu.DimmBlock - 1)
		switch {
		case len(dimms) >= qemu.DimmSlots:
			return dimms, false, fmt.Errorf("set vm %q: memory: %w: all %d pc-dimm slots are in use; stop the VM to boot with more", in.name, errdefs.ErrLimit, qemu.DimmSlots)
		case cur+size > (room+qemu.DimmBlock-1)&^(qemu.DimmBlock-1):
			return dimms, false, fmt.Errorf("set vm %q: memory: %w: no room for another %s pc-dimm", in.name, errdefs.ErrLimit, units.FormatSize(size))
		}
		if err := qmp.PlugDimm(ctx, in.mon, qemu.DimmID(len(dimms)), size); err != nil {
			return dimms, false, fmt.Errorf("set vm %q: memory: plug a %s pc-dimm: %w", in.name, units.FormatSize(size), err)
		}
		dimms = append(dimms, size)
		if err := s.waitDimmTaken(ctx, in, qemu.DimmID(len(dimms)-1)); err != nil {
			return dimms, true, err
		}
		s.log.Info("pc-dimm plugged", "vm", in.name, "size", size)
		return dimms, true, nil
	}
	for len(dimms) > 0 && cur-dimms[len(dimms)-1] >= want {
		id := qemu.DimmID(len(dimms) - 1)
		if err := s.unplugDimm(ctx, in, id); err != nil {
			return dimms, moved, err
		}
		cur -= dimms[len(dimms)-1]
		dimms, moved = dimms[:len(dimms)-1], true
	}
	return dimms, moved, nil
}

// waitDimmTaken waits until the guest has reported, through ACPI _OST,
// that it took a new pc-dimm: the memory is then online in the guest.
func (s *Service) waitDimmTaken(ctx context.Context, in *instance, id string) error {
	err := waitFor(ctx, in, 50*time.Millisecond, balloonStall, func() (bool, error) {
		sts, err := qmp.ACPIOSPMStatus(ctx, in.mon)
		if err != nil {
			return false, err
		}
		for _, st := range sts {
			switch {
			case st.Device != id || st.Source == 0:
			case st.Status == 0:
				return true, nil
			default:
				return false, fmt.Errorf("%w: the guest refused pc-dimm %s (ACPI status %d)", errdefs.ErrState, id, st.Status)
			}
		}
		return false, nil
	})
	if errors.Is(err, errWaitedOut) {
		err = fmt.Errorf("%w: the guest has not taken pc-dimm %s in %s (does it support ACPI memory hot-plug?)", errdefs.ErrState, id, balloonStall)
	}
	if err != nil {
		return fmt.Errorf("set vm %q: memory: %w", in.name, err)
	}
	return nil
}

// unplugDimm asks the guest to eject a pc-dimm and waits until it has.
func (s *Service) unplugDimm(ctx context.Context, in *instance, id string) error {
	// The guest may take its time or refuse; the dimm is gone once QEMU
	// no longer lists it, and only then is its RAM freed.
	if err := qmp.DeviceDel(ctx, in.mon, id); err != nil {
		return fmt.Errorf("set vm %q: memory: unplug %s: %w", in.name, id, err)
	}
	err := waitFor(ctx, in, 100*time.Millisecond, balloonStall, func() (bool, error) {
		devs, err := qmp.MemoryDevices(ctx, in.mon)
		return !slices.ContainsFunc(devs, func(d qmp.MemoryDevice) bool { return d.Data.ID == id }), err
	})
	if errors.Is(err, errWaitedOut) {
		err = fmt.Errorf("%w: the guest did not give up %s in %s", errdefs.ErrState, id, balloonStall)
	}
	if err != nil {
		return fmt.Errorf("set vm %q: memory: unplug %s: %w", in.name, id, err)
	}
	if err := qmp.DropDimmBackend(ctx, in.mon, id); err != nil {
		s.log.Warn("free an unplugged pc-dimm's memory", "vm", in.name, "dimm", id, "err", err)
	}
	return nil
}

// hotMemory is what virtio-mem and the pc-dimms have added to a guest.
// QEMU's balloon counts the dimms as part of the guest's RAM, and not
// what virtio-mem plugged: the balloon works within boot+dimms.
type hotMemory struct{ virtioMem, dimms int64 }

func (h hotMemory) total() int64 { return h.virtioMem + h.dimms }

// balloonTarget is the balloon setting that leaves the guest target
// bytes in all.
func (h hotMemory) balloonTarget(target, boot int64) int64 {
	return min(target-h.virtioMem, boot+h.dimms)
}

func pluggedMemory(ctx context.Context, mon qmp.Monitor) (hotMemory, error) {
	devs, err := qmp.MemoryDevices(ctx, mon)
	var h hotMemory
	for _, d := range devs {
		if d.Type == "dimm" {
			h.dimms += d.Data.Size
		} else {
			h.virtioMem += d.Data.Size
		}
	}
	return h, err
}

// A gauge is a quantity in the guest that a driver there moves toward a
// target the host sets: the balloon, or the memory virtio-mem has plugged.
type gauge struct {
	device, driver string
	set            func(context.Context, int64) error
	get            func(context.Context) (int64, error)
	// base is added to the gauge's reading to tell the guest's memory.
	base int64
}

func balloon(in *instance) gauge {
	return gauge{device: "balloon", driver: "virtio_balloon",
		set: func(ctx context.Context, v int64) error { return qmp.Balloon(ctx, in.mon, v) },
		get: func(ctx context.Context) (int64, error) { return qmp.QueryBalloon(ctx, in.mon) }}
}

func virtioMem(in *instance, boot int64) gauge {
	return gauge{device: "virtio-mem device", driver: "virtio_mem", base: boot,
		set: func(ctx context.Context, v int64) error {
			return qmp.SetVirtioMemRequested(ctx, in.mon, qemu.HotplugDevice, v)
		},
		get: func(ctx context.Context) (int64, error) {
			h, err := pluggedMemory(ctx, in.mon)
			return h.virtioMem, err
		}}
}

// approach sets a gauge to target and waits until the guest is there. A
// gauge that never moves means a guest without the driver: the setting
// is put back where the gauge stands and the error says so. moved
// reports whether the guest's memory changed at all.
func (s *Service) approach(ctx context.Context, in *instance, g gauge, target int64) (moved bool, err error) {
	start, err := g.get(ctx)
	if err != nil {
		return false, fmt.Errorf("set vm %q: memory: %w", in.name, err)
	}
	if err := g.set(ctx, target); err != nil {
		return false, fmt.Errorf("set vm %q: memory: %w", in.name, err)
	}
	began := time.Now()
	last, lastMove := start, began
	deadline := began.Add(balloonTimeout)
	for {
		now, err := g.get(ctx)
		if err != nil {
			return last != start, fmt.Errorf("set vm %q: memory: %w", in.name, err)
		}
		if abs(now-target) <= balloonSlack {
			s.log.Info("memory reached target", "vm", in.name, "device", g.device, "target", target+g.base, "actual", now+g.base, "took", time.Since(began))
			return now != start, nil
		}
		if now != last {
			last, lastMove = now, time.Now()
		}
		stalled := time.Since(lastMove) > balloonStall
		if stalled || time.Now().After(deadline) || ctx.Err() != nil {
			bg := context.WithoutCancel(ctx)
			why := fmt.Sprintf("the guest got to %s of %s in %s and goes on", units.FormatSize(now+g.base), units.FormatSize(target+g.base), time.Since(began).Round(time.Second))
			if now == start {
				// Nothing moved at all: put the old setting back, so
				// that nothing is left half-set.
				_ = g.set(bg, start)
				why = fmt.Sprintf("the guest's %s did not move in %s (no %s driver?); memory stays %s", g.device, balloonStall, g.driver, units.FormatSize(start+g.base))
			}
			if ctx.Err() != nil {
				return now != start, fmt.Errorf("set vm %q: memory: %s: %w", in.name, why, ctx.Err())
			}
			return now != start, fmt.Errorf("set vm %q: memory: %w: %s", in.name, errdefs.ErrState, why)
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
