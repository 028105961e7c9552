package vm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/network"
	"github.com/lodge-vm/lodge/internal/qcow2"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/units"
)

// Start boots a stopped VM.
func (s *Service) Start(ctx context.Context, name string) (api.VM, error) {
	unlock, err := s.lock(name, "start")
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	return s.startLocked(ctx, name)
}

func (s *Service) startLocked(ctx context.Context, name string) (api.VM, error) {
	return s.boot(ctx, name, nil)
}

// boot launches a VM's QEMU. With from set, QEMU does not boot the guest
// but loads that snapshot's memory state and resumes it. extra disks are
// attached after the VM's own for this boot only.
func (s *Service) boot(ctx context.Context, name string, from *snapRecord, extra ...qemu.Disk) (api.VM, error) {
	r, err := s.load(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	if s.alive(name) {
		return api.VM{}, fmt.Errorf("vm %q is already %s: %w", name, r.State, errdefs.ErrState)
	}
	if err := s.checkConflicts(ctx, r); err != nil {
		return api.VM{}, err
	}
	if err := s.admit(ctx, r); err != nil {
		return api.VM{}, err
	}
	accel, err := s.cfg.Accel(ctx)
	if err != nil {
		return api.VM{}, fmt.Errorf("start vm %q: %w", name, err)
	}
	if _, err := os.Stat(s.seedPath(name)); err != nil {
		if err := s.writeSeed(ctx, r); err != nil {
			return api.VM{}, err
		}
	}
	m := s.machine(r, accel)
	m.Disks = append(m.Disks, extra...)
	if from != nil {
		// The saved state fits only a QEMU of the size it came from.
		m.Incoming, m.Memory, m.MaxMemory, m.Dimms = true, from.MemorySize, from.MaxMemorySize, from.Dimms
		if from.BootCPUs > 0 {
			m.CPUs, m.MaxCPUs, m.HotCPUs = from.BootCPUs, from.BootMaxCPUs, from.HotCPUs
		}
	}
	ips, closeTaps, err := s.attachNICs(ctx, r, &m)
	if err != nil {
		return api.VM{}, fmt.Errorf("start vm %q: %w", name, err)
	}
	// QEMU holds its own copies of the taps; ours go once it has started
	// (or failed to), and a tap goes with the last holder.
	defer closeTaps()
	if _, err := s.update(ctx, name, func(x *record) error {
		for i, ip := range ips {
			if i < len(x.NICs) {
				x.NICs[i].IP = ip
			}
		}
		x.State, x.StateReason, x.Wanted, x.StartedAt = api.StateStarting, "", api.StateRunning, nil
		x.BootMemory, x.BootMaxMemory = m.Memory, m.Memory+m.HotplugSize()
		x.Ballooned, x.Dimms = 0, m.Dimms
		x.BootCPUs, x.BootMaxCPUs, x.HotCPUs = m.CPUs, max(m.MaxCPUs, m.CPUs), m.HotCPUs
		return nil
	}); err != nil {
		return api.VM{}, err
	}
	s.publish(name, "vm-state", api.StateStarting, "accel "+accel.Accel)
	// Truncate the previous boot's console log: --log shows this boot. A
	// restored guest goes on from its snapshot, so its log does too.
	if from == nil {
		_ = os.Truncate(m.Path(qemu.SerialLog), 0)
	}
	pid, err := s.cfg.Driver.Launch(ctx, m)
	if err != nil {
		s.setState(context.WithoutCancel(ctx), name, api.StateStopped, "start failed: "+err.Error())
		return api.VM{}, err
	}
	mctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	mon, err := s.cfg.Driver.Monitor(mctx, m.RunDir)
	if err != nil {
		_ = s.cfg.Driver.Kill(context.WithoutCancel(ctx), m.RunDir, 5*time.Second)
		s.setState(context.WithoutCancel(ctx), name, api.StateError, "QEMU started but its monitor does not answer: "+err.Error())
		return api.VM{}, fmt.Errorf("start vm %q: connect to QMP: %w", name, err)
	}
	in := s.attach(ctx, name, pid, mon)
	state := api.StateRunning
	if from != nil {
		if state, err = s.resumeState(ctx, in, from); err != nil {
			return api.VM{}, err
		}
	}
	s.markRunning(ctx, name, pid, state)
	s.log.Info("started", "vm", name, "pid", pid, "accel", accel.Accel, "from_snapshot", from != nil)
	return s.Get(ctx, name)
}

func (s *Service) machine(r record, accel qemu.Accel) qemu.Machine {
	m := qemu.Machine{
		Name: r.Name, UUID: r.UUID, CPUs: r.CPUs, MaxCPUs: r.MaxCPUs, Memory: r.Memory, MaxMemory: r.MaxMemory,
		RunDir: s.runDir(r.Name), SeedISO: s.seedPath(r.Name),
		Accel: accel.Accel, CPUModel: accel.CPUModel, TCGCache: s.cfg.TCGCache,
	}
	if accel.Accel == "tcg" {
		// "max" gives TCG guests the newer instruction sets that current
		// distributions require (x86-64-v2).
		m.CPUModel = "max"
	}
	for _, d := range r.Disks {
		md := qemu.Disk{Name: d.Name, Path: d.Path, Bus: d.Bus, Format: "qcow2"}
		if chain, err := qcow2.Chain(d.Path); err == nil {
			for _, b := range chain {
				md.Backing = append(md.Backing, qemu.BackingFile{Path: b.Path, Format: b.Format})
			}
		} else {
			// QEMU follows the chain itself, with its own options.
			s.log.Warn("read backing chain", "vm", r.Name, "disk", d.Name, "err", err)
		}
		m.Disks = append(m.Disks, md)
	}
	for _, n := range r.NICs {
		m.NICs = append(m.NICs, qemu.NIC{MAC: n.MAC})
	}
	if s.cfg.Vsock {
		m.VsockCID = r.CID
	}
	return m
}

// attachNICs opens the taps of r's NICs on private networks into m and
// returns the address each such NIC leased, by index.
func (s *Service) attachNICs(ctx context.Context, r record, m *qemu.Machine) (map[int]string, func(), error) {
	ips := map[int]string{}
	var taps []*os.File
	closeTaps := func() {
		for _, t := range taps {
			_ = t.Close()
		}
	}
	names := []string{r.Hostname}
	if !strings.EqualFold(r.Name, r.Hostname) {
		names = append(names, r.Name)
	}
	// A stack's members answer to their member name (db, app-2) too, as
	// other members know them by it.
	if r.Stack != "" && strings.HasPrefix(r.Name, r.Stack+"-") {
		names = append(names, strings.TrimPrefix(r.Name, r.Stack+"-"))
	}
	for i, n := range r.NICs {
		if n.Network == network.Builtin {
			continue
		}
		if s.cfg.Networks == nil {
			closeTaps()
			return nil, nil, fmt.Errorf("network %q: %w", n.Network, errdefs.ErrNotFound)
		}
		port := filepath.Join(m.RunDir, "net"+strconv.Itoa(i)+".sock")
		// QEMU binds the port; one left by a QEMU that died would stop it.
		_ = os.Remove(port)
		if err := os.MkdirAll(m.RunDir, 0o700); err != nil {
			closeTaps()
			return nil, nil, err
		}
		a, err := s.cfg.Networks.Attach(ctx, r.Name, names, network.NIC{Network: n.Network, MAC: n.MAC, Index: i, Port: port})
		if err != nil {
			closeTaps()
			return nil, nil, err
		}
		if a.Tap != nil {
			taps = append(taps, a.Tap)
			m.NICs[i].Tap = a.Tap
		} else {
			m.NICs[i].Switch, m.NICs[i].Port = a.Switch, port
		}
		ips[i] = a.IP
	}
	return ips, closeTaps, nil
}

// checkConflicts refuses to run two VMs with one identity at once.
func (s *Service) checkConflicts(ctx context.Context, r record) error {
	recs, err := s.all(ctx)
	if err != nil {
		return err
	}
	for _, o := range recs {
		if o.Name == r.Name || !s.alive(o.Name) {
			continue
		}
		if o.UUID == r.UUID {
			return fmt.Errorf("vm %q: %w: its UUID %s is in use by running vm %q", r.Name, errdefs.ErrConflict, r.UUID, o.Name)
		}
		if r.CID != 0 && o.CID == r.CID {
			return fmt.Errorf("vm %q: %w: its vsock CID %d is in use by running vm %q", r.Name, errdefs.ErrConflict, r.CID, o.Name)
		}
		for _, n := range r.NICs {
			for _, on := range o.NICs {
				if n.MAC == on.MAC {
					return fmt.Errorf("vm %q: %w: its MAC %s is in use by running vm %q", r.Name, errdefs.ErrConflict, n.MAC, o.Name)
				}
				// Two machines of one name on one network confuse DHCP,
				// DNS and directory servers alike.
				if n.Network == on.Network && strings.EqualFold(r.Hostname, o.Hostname) {
					return fmt.Errorf("vm %q: %w: its hostname %q is in use on network %q by running vm %q", r.Name, errdefs.ErrConflict, r.Hostname, n.Network, o.Name)
				}
			}
		}
	}
	return nil
}

// admit refuses a start that would take the host past its memory limit.
func (s *Service) admit(ctx context.Context, r record) error {
	overhead := s.vmOverhead()
	limit, allocated, ok, err := s.headroom(ctx, r.Memory+overhead)
	if err != nil || ok {
		return err
	}
	return fmt.Errorf("vm %q: %w: memory limit %s, allocated %s, requested %s (%s and %s for QEMU itself)", r.Name, errdefs.ErrLimit,
		units.FormatSize(limit), units.FormatSize(allocated), units.FormatSize(r.Memory+overhead), units.FormatSize(r.Memory), units.FormatSize(overhead))
}

// hostMemory is the host's RAM, 0 when unknown.
func (s *Service) hostMemory() int64 {
	if s.cfg.Host == nil {
		return 0
	}
	return s.cfg.Host().MemoryTotal
}

func (s *Service) vmOverhead() int64 {
	if s.cfg.Host == nil {
		return 0
	}
	return s.cfg.Host().VMOverhead
}

// headroom reports whether VMs may be given more bytes on top of what is
// allocated now, and the limit and allocation it judged by.
func (s *Service) headroom(ctx context.Context, more int64) (limit, allocated int64, ok bool, err error) {
	if s.cfg.Host == nil {
		return 0, 0, true, nil
	}
	h := s.cfg.Host()
	if h.MemoryLimit <= 0 {
		return 0, 0, true, nil
	}
	allocated, _, _, err = s.MemoryAllocated(ctx)
	if err != nil {
		return 0, 0, false, err
	}
	limit = int64(float64(h.MemoryLimit) * h.Overcommit)
	return limit, allocated, allocated+more <= limit, nil
}

// Stop powers a VM off: ACPI power button first, then forced after
// timeout. force skips the graceful step.
func (s *Service) Stop(ctx context.Context, name string, force bool, timeout time.Duration) (api.VM, error) {
	unlock, err := s.lock(name, "stop")
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	if err := s.stopLocked(ctx, name, force, timeout); err != nil {
		return api.VM{}, err
	}
	return s.Get(ctx, name)
}

func (s *Service) stopLocked(ctx context.Context, name string, force bool, timeout time.Duration) error {
	r, err := s.load(ctx, name)
	if err != nil {
		return err
	}
	in := s.instance(name)
	if in == nil {
		return fmt.Errorf("vm %q is %s: %w", name, r.State, errdefs.ErrState)
	}
	if timeout <= 0 {
		timeout = s.cfg.StopTimeout
	}
	in.stopping.Store(true)
	if _, err := s.update(ctx, name, func(x *record) error {
		x.State, x.Wanted = api.StateStopping, api.StateStopped
		return nil
	}); err != nil {
		return err
	}
	s.publish(name, "vm-state", api.StateStopping, "")
	if !force && s.powerdown(ctx, in, timeout) {
		return nil
	}
	qctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	_ = qmp.Quit(qctx, in.mon)
	cancel()
	select {
	case <-in.done:
		return nil
	case <-time.After(5 * time.Second):
	}
	if err := s.cfg.Driver.Kill(ctx, in.runDir, 5*time.Second); err != nil {
		return fmt.Errorf("stop vm %q: %w", name, err)
	}
	select {
	case <-in.done:
		return nil
	case <-time.After(15 * time.Second):
		return fmt.Errorf("stop vm %q: QEMU is gone but its monitor did not close", name)
	}
}

// Restart is a full stop and start, so that changed settings apply.
func (s *Service) Restart(ctx context.Context, name string, timeout time.Duration) (api.VM, error) {
	unlock, err := s.lock(name, "restart")
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	if s.alive(name) {
		if err := s.stopLocked(ctx, name, false, timeout); err != nil {
			return api.VM{}, err
		}
	}
	return s.startLocked(ctx, name)
}

// Pause freezes the guest's CPUs.
func (s *Service) Pause(ctx context.Context, name string) (api.VM, error) {
	return s.runState(ctx, name, "pause", api.StatePaused, func(ctx context.Context, m qmp.Monitor) error { return qmp.Stop(ctx, m) })
}

// Resume continues a paused guest.
func (s *Service) Resume(ctx context.Context, name string) (api.VM, error) {
	return s.runState(ctx, name, "resume", api.StateRunning, func(ctx context.Context, m qmp.Monitor) error { return qmp.Cont(ctx, m) })
}

func (s *Service) runState(ctx context.Context, name, op, want string, fn func(context.Context, qmp.Monitor) error) (api.VM, error) {
	unlock, err := s.lock(name, op)
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	in := s.instance(name)
	if in == nil {
		r, err := s.load(ctx, name)
		if err != nil {
			return api.VM{}, err
		}
		return api.VM{}, fmt.Errorf("vm %q is %s: %w", name, r.State, errdefs.ErrState)
	}
	before, err := qmp.QueryStatus(ctx, in.mon)
	if err != nil {
		return api.VM{}, fmt.Errorf("%s vm %q: %w", op, name, err)
	}
	if before.Running == (want == api.StateRunning) {
		return api.VM{}, fmt.Errorf("vm %q is already %s: %w", name, want, errdefs.ErrState)
	}
	if err := fn(ctx, in.mon); err != nil {
		return api.VM{}, fmt.Errorf("%s vm %q: %w", op, name, err)
	}
	st, err := qmp.QueryStatus(ctx, in.mon)
	if err != nil {
		return api.VM{}, fmt.Errorf("%s vm %q: %w", op, name, err)
	}
	state := api.StateRunning
	if !st.Running {
		state = api.StatePaused
	}
	if state != want {
		return api.VM{}, fmt.Errorf("%s vm %q: QEMU reports %q", op, name, st.Status)
	}
	s.setState(ctx, name, state, "")
	return s.Get(ctx, name)
}

// powerdown presses the ACPI power button and waits up to timeout for the
// guest to power off. A press that comes before the guest listens for it
// (early boot) is lost, so the button is pressed again every few seconds.
func (s *Service) powerdown(ctx context.Context, in *instance, timeout time.Duration) bool {
	deadline := time.After(timeout)
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := qmp.SystemPowerdown(qctx, in.mon)
		cancel()
		if err != nil {
			return false
		}
		select {
		case <-in.done:
			return true
		case <-deadline:
			s.log.Warn("guest ignored the power button; forcing", "vm", in.name, "timeout", timeout)
			return false
		case <-ctx.Done():
			return false
		case <-time.After(5 * time.Second):
		}
	}
}
