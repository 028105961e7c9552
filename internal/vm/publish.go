package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/identity"
	"github.com/lodge-vm/lodge/internal/image"
	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qmp"
)

// Publish turns a stopped VM's disk into a new image layered on the
// image the VM was made from. With Generalize, the new image is booted
// once on its own to clear the guest's identity inside it.
func (s *Service) Publish(ctx context.Context, req api.PublishImage) (api.Image, error) {
	if err := image.ValidateName(req.Name); err != nil {
		return api.Image{}, err
	}
	unlock, err := s.lock(req.VM, "publish")
	if err != nil {
		return api.Image{}, err
	}
	defer unlock()
	r, err := s.load(ctx, req.VM)
	if err != nil {
		return api.Image{}, err
	}
	if s.alive(req.VM) || r.Intent != "" {
		return api.Image{}, fmt.Errorf("publish vm %q: %w: it is %s; stop it first, so the image is a clean, settled disk", req.VM, errdefs.ErrState, r.State)
	}
	root := r.Disks[0]
	spec := image.PublishSpec{Name: req.Name, Parent: r.Image, Top: root.Path, TopBacking: root.Backing, VM: r.Name}
	if req.Generalize {
		spec.Prepare = func(ctx context.Context, path string) error { return s.generalize(ctx, path, root.Bus) }
	}
	img, err := s.cfg.Images.Publish(ctx, spec)
	if err != nil {
		return api.Image{}, err
	}
	s.publish(img.Name, "image-published", "", "from vm "+r.Name)
	return img, nil
}

// How long a Linux guest may take to boot to its agent, and to power off.
const (
	generalizeBoot     = 3 * time.Minute
	generalizePowerOff = 2 * time.Minute
)

// generalize boots the disk at path in a throwaway machine without a
// network or seed, clears the guest's identity through its agent, and
// waits for the guest to power off, so the disk is left clean.
func (s *Service) generalize(ctx context.Context, path, bus string) error {
	accel, err := s.cfg.Accel(ctx)
	if err != nil {
		return fmt.Errorf("generalize: %w", err)
	}
	tmp := record{VM: api.VM{
		Name: "lodge-generalize", UUID: identity.NewUUID(), CPUs: 1, Memory: DefaultMemory,
		Disks: []api.Disk{{Name: "root", Path: path, Bus: bus}},
	}}
	m := s.machine(tmp, accel)
	m.SeedISO, m.RunDir = "", filepath.Join(s.cfg.Home, "run", ".generalize-"+randomHex(4))
	defer s.removeAll(m.RunDir)
	if _, err := s.cfg.Driver.Launch(ctx, m); err != nil {
		return fmt.Errorf("generalize: %w", err)
	}
	defer func() { _ = s.cfg.Driver.Kill(context.WithoutCancel(ctx), m.RunDir, 10*time.Second) }()
	mctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	mon, err := s.cfg.Driver.Monitor(mctx, m.RunDir)
	cancel()
	if err != nil {
		return fmt.Errorf("generalize: %w", err)
	}
	defer func() { _ = mon.Close() }()
	events, unsubscribe := mon.Subscribe()
	defer unsubscribe()

	a, err := s.waitAgent(ctx, m.RunDir, generalizeBoot, mon.Done())
	if err != nil {
		return fmt.Errorf("generalize: the guest did not start its agent within %s: %w", generalizeBoot, err)
	}
	defer func() { _ = a.Close() }()
	windows, err := identity.Generalize(ctx, a)
	if err != nil {
		return err
	}
	wait := identity.SysprepTimeout
	if !windows {
		wait = generalizePowerOff
		if err := a.Shutdown(ctx, qga.ShutdownPowerdown); err != nil {
			s.log.Debug("generalize: agent shutdown", "err", err)
		}
	}
	if err := waitShutdown(ctx, events, wait); err != nil {
		return fmt.Errorf("generalize: %w", err)
	}
	s.log.Info("generalized", "disk", path, "windows", windows)
	return nil
}

// waitAgent connects to a machine's agent, retrying while the guest
// boots, until wait has passed or gone is closed (QEMU went away).
func (s *Service) waitAgent(ctx context.Context, runDir string, wait time.Duration, gone <-chan struct{}) (qga.Agent, error) {
	deadline := time.Now().Add(wait)
	for {
		actx, cancel := context.WithTimeout(ctx, 3*time.Second)
		a, err := s.cfg.Driver.Agent(actx, runDir)
		cancel()
		if err == nil {
			return a, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, err
		}
		select {
		case <-ctx.Done():
		case <-gone:
			return nil, fmt.Errorf("QEMU exited: %w", errdefs.ErrState)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// waitShutdown waits for the guest to power itself off. QEMU runs with
// -no-shutdown, so it reports SHUTDOWN and stays, keeping the disk closed
// cleanly.
func waitShutdown(ctx context.Context, events <-chan qmp.Event, wait time.Duration) error {
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return fmt.Errorf("QEMU went away before the guest powered off")
			}
			if ev.Name == "SHUTDOWN" {
				var d struct {
					Guest bool `json:"guest"`
				}
				_ = json.Unmarshal(ev.Data, &d)
				if d.Guest {
					return nil
				}
			}
		case <-timer.C:
			return fmt.Errorf("the guest did not power off within %s", wait)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
