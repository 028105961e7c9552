package vm

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/units"
)

// Pressure is the host's memory as the auto-balloon sees it: below Low
// available, idle VMs give memory back until High is available again;
// above High, they get it back. The gap between them keeps VMs from
// swinging back and forth.
type Pressure struct {
	Available, Low, High int64
}

// What an idle guest keeps beyond the memory it uses, so that taking
// memory from it does not push it into reclaiming its own working set;
// and the smallest change worth making.
const (
	autoHeadroom = 64 << 20
	autoMinStep  = 16 << 20
)

// balloonee is a running VM that takes part in auto-ballooning.
type balloonee struct {
	r  record
	in *instance
	// now is the memory the VM is held at: its auto-balloon target, or
	// its memory setting when it is not held.
	now int64
	// spare is what it can give back: down to its floor, and never into
	// the memory its guest uses.
	spare int64
}

// Rebalance moves the balloons of the VMs that take part in
// auto-ballooning (a min_memory below their memory). Under pressure it
// takes memory from the VMs with the most to spare, down to their floors,
// until High would be available; once pressure has passed it gives the
// memory back. It does not wait for the guests: the next round sees where
// they got to. A VM busy with another operation is left for a later round.
func (s *Service) Rebalance(ctx context.Context, p Pressure) error {
	recs, err := s.all(ctx)
	if err != nil {
		return fmt.Errorf("auto-balloon: %w", err)
	}
	var vms []balloonee
	for _, r := range recs {
		in := s.instance(r.Name)
		if in == nil || r.State != api.StateRunning || r.MinMemory == 0 || r.MinMemory >= r.Memory {
			continue
		}
		b := balloonee{r: r, in: in, now: r.Memory}
		if r.Ballooned > 0 {
			b.now = r.Ballooned
		}
		vms = append(vms, b)
	}
	var errs []error
	switch {
	case p.Available < p.Low:
		need := p.High - p.Available
		for i, b := range vms {
			if used, ok := guestUsed(ctx, b.in.mon); ok {
				vms[i].spare = max(b.now-max(b.r.MinMemory, used+autoHeadroom), 0)
			}
		}
		slices.SortFunc(vms, func(a, b balloonee) int { return cmp.Compare(b.spare, a.spare) })
		for _, b := range vms {
			take := min(b.spare, need) &^ (1<<20 - 1)
			if need <= 0 || take < autoMinStep {
				break
			}
			why := fmt.Sprintf("host has %s available, below %s", units.FormatSize(p.Available), units.FormatSize(p.Low))
			if err := s.autoBalloon(ctx, b, b.now-take, why); err != nil {
				errs = append(errs, err)
				continue
			}
			need -= take
		}
	case p.Available > p.High:
		give := p.Available - p.High
		slices.SortFunc(vms, func(a, b balloonee) int { return cmp.Compare(b.r.Memory-b.now, a.r.Memory-a.now) })
		for _, b := range vms {
			back := min(b.r.Memory-b.now, give)
			if give <= 0 || back <= 0 {
				break
			}
			why := fmt.Sprintf("host has %s available again", units.FormatSize(p.Available))
			if err := s.autoBalloon(ctx, b, b.now+back, why); err != nil {
				errs = append(errs, err)
				continue
			}
			give -= back
		}
	}
	return errors.Join(errs...)
}

// autoBalloon sets a VM's balloon so that it holds target, and records
// and announces the change.
func (s *Service) autoBalloon(ctx context.Context, b balloonee, target int64, why string) error {
	unlock, err := s.lock(b.r.Name, "auto-balloon")
	if err != nil {
		return nil // busy: a later round will see it
	}
	defer unlock()
	boot, ceiling := b.r.bootSizes()
	var plugged hotMemory
	if ceiling > boot {
		if plugged, err = pluggedMemory(ctx, b.in.mon); err != nil {
			return fmt.Errorf("auto-balloon vm %q: %w", b.r.Name, err)
		}
	}
	// What was plugged stays: only an explicit set unplugs.
	if err := qmp.Balloon(ctx, b.in.mon, max(plugged.balloonTarget(target, boot), MinMemory)); err != nil {
		return fmt.Errorf("auto-balloon vm %q: %w", b.r.Name, err)
	}
	held := target
	if held >= b.r.Memory {
		held = 0
	}
	if _, err := s.update(ctx, b.r.Name, func(x *record) error { x.Ballooned = held; return nil }); err != nil {
		return err
	}
	msg := fmt.Sprintf("auto-balloon %s -> %s: %s", units.FormatSize(b.now), units.FormatSize(target), why)
	s.log.Info("auto-balloon", "vm", b.r.Name, "from", b.now, "to", target, "why", why)
	s.publish(b.r.Name, "vm-balloon", "", msg)
	return nil
}

// guestUsed is the memory a guest uses, from its balloon driver's last
// report: its total less what it could free (page cache counts as free).
func guestUsed(ctx context.Context, mon qmp.Monitor) (int64, bool) {
	qctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	st, err := qmp.QueryBalloonStats(qctx, mon)
	if err != nil || st.LastUpdate == 0 || st.Stats.Total <= 0 {
		return 0, false
	}
	// Older kernels report only free memory, not available.
	spare := st.Stats.Available
	if spare < 0 {
		spare = st.Stats.Free
	}
	if spare < 0 {
		return 0, false
	}
	return st.Stats.Total - spare, true
}

// agentUsed is guestUsed for a guest whose balloon driver does not report:
// its /proc/meminfo, read through the agent if the agent is free.
func (s *Service) agentUsed(ctx context.Context, in *instance) (int64, bool) {
	if !in.agentUp() || !in.agentMu.TryLock() {
		return 0, false
	}
	defer in.agentMu.Unlock()
	if in.agent == nil {
		return 0, false
	}
	raw, err := in.agent.FileRead(ctx, "/proc/meminfo")
	if err != nil {
		return 0, false
	}
	total, err := units.MeminfoField(raw, "MemTotal")
	if err != nil {
		return 0, false
	}
	avail, err := units.MeminfoField(raw, "MemAvailable")
	if err != nil {
		return 0, false
	}
	return total - avail, true
}
