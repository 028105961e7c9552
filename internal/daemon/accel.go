package daemon

import (
	"context"
	"path/filepath"

	"github.com/lodge-vm/lodge/internal/config"
	"github.com/lodge-vm/lodge/internal/qemu"
)

// initAccel settles the accelerator: from the configuration, from the
// host-wide cache of an earlier probe, or by probing in the background.
func (d *Daemon) initAccel(ctx context.Context) {
	d.accelSettled = make(chan struct{})
	if d.cfg.Accel != config.AccelAuto {
		d.setAccel(d.driver.ProbeAccel(ctx, qemu.ProbeInput{Mode: d.cfg.Accel}))
		return
	}
	if a, ok := qemu.LoadAccelCache(qemu.DefaultAccelCache(), d.driver.CacheKey(ctx)); ok {
		a.Reason += " (cached from " + a.ProbedAt.Format("2006-01-02 15:04") + ")"
		d.setAccel(a)
		return
	}
	d.reprobe(ctx)
}

// probingLocked reports whether a probe is under way: its verdict is not
// settled yet.
func (d *Daemon) probingLocked() bool {
	select {
	case <-d.accelSettled:
		return false
	default:
		return true
	}
}

// reprobe runs the probe in the background if the verdict is unverified.
// It runs at start and again after an image import, since the probe needs
// an image to boot. Starts wait for it rather than use the provisional
// verdict.
func (d *Daemon) reprobe(ctx context.Context) {
	d.accelMu.Lock()
	if d.accel.Verified || d.cfg.Accel != config.AccelAuto || d.probeRunning {
		d.accelMu.Unlock()
		return
	}
	d.probeRunning = true
	if !d.probingLocked() {
		d.accelSettled = make(chan struct{})
	}
	d.accelMu.Unlock()
	go func() {
		img := d.images.First(ctx)
		d.log.Info("probing accelerator", "image", img)
		a := d.driver.ProbeAccel(ctx, qemu.ProbeInput{
			Mode: config.AccelAuto, Image: img, Timeout: d.cfg.ProbeTimeout,
			WorkDir: filepath.Join(d.cfg.Home, "run", ".probe"),
		})
		if ctx.Err() != nil {
			return
		}
		d.log.Info("accelerator", "accel", a.Accel, "reason", a.Reason, "verified", a.Verified)
		if err := qemu.SaveAccelCache(qemu.DefaultAccelCache(), a); err != nil {
			d.log.Warn("cache accelerator verdict", "err", err)
		}
		d.setAccel(a)
	}()
}

// setAccel records a verdict and wakes whoever waits for one.
func (d *Daemon) setAccel(a qemu.Accel) {
	d.accelMu.Lock()
	defer d.accelMu.Unlock()
	d.accel, d.probeRunning = a, false
	if d.probingLocked() {
		close(d.accelSettled)
	}
}

// waitAccel returns the verdict, waiting for a probe that is under way.
func (d *Daemon) waitAccel(ctx context.Context) (qemu.Accel, error) {
	d.accelMu.Lock()
	settled := d.accelSettled
	d.accelMu.Unlock()
	select {
	case <-settled:
	case <-ctx.Done():
		return qemu.Accel{}, ctx.Err()
	}
	d.accelMu.Lock()
	defer d.accelMu.Unlock()
	return d.accel, nil
}

func (d *Daemon) currentAccel() qemu.Accel {
	d.accelMu.Lock()
	defer d.accelMu.Unlock()
	a := d.accel
	if d.probingLocked() {
		a.Reason = "probing KVM now; until it answers: " + a.Reason
	}
	return a
}
