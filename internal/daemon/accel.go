package daemon

import (
	"context"
	"path/filepath"
	"time"

	"github.com/lodge-vm/lodge/internal/config"
	"github.com/lodge-vm/lodge/internal/qemu"
)

// initAccel settles the accelerator: from the configuration, from the
// host-wide cache of an earlier probe, or by probing in the background.
func (d *Daemon) initAccel(ctx context.Context) {
	d.accelReady = make(chan struct{})
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

// reprobe runs the probe in the background if the verdict is unverified.
// It runs at start and again after an image import, since the probe needs
// an image to boot.
func (d *Daemon) reprobe(ctx context.Context) {
	d.accelMu.Lock()
	if d.probing || d.accel.Verified || d.cfg.Accel != config.AccelAuto {
		d.accelMu.Unlock()
		return
	}
	d.probing = true
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
		d.accelMu.Lock()
		d.probing = false
		d.accelMu.Unlock()
		d.setAccel(a)
	}()
}

func (d *Daemon) setAccel(a qemu.Accel) {
	d.accelMu.Lock()
	defer d.accelMu.Unlock()
	d.accel = a
	select {
	case <-d.accelReady:
	default:
		close(d.accelReady)
	}
}

// waitAccel returns the verdict, waiting for a probe that is under way.
func (d *Daemon) waitAccel(ctx context.Context) (qemu.Accel, error) {
	d.accelMu.Lock()
	probing, ready := d.probing, d.accelReady
	d.accelMu.Unlock()
	if probing {
		// A probe started after an import: wait for it instead of using
		// the provisional verdict.
		for {
			d.accelMu.Lock()
			probing = d.probing
			d.accelMu.Unlock()
			if !probing {
				break
			}
			select {
			case <-ctx.Done():
				return qemu.Accel{}, ctx.Err()
			case <-timeAfter():
			}
		}
	}
	select {
	case <-ready:
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
	if d.probing {
		a.Reason = "probing KVM now; until it answers: " + a.Reason
	}
	return a
}

func timeAfter() <-chan time.Time { return time.After(100 * time.Millisecond) }
