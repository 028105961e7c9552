package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/config"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/store"
	"github.com/lodge-vm/lodge/internal/units"
	"github.com/lodge-vm/lodge/internal/vm"
)

// Limits set with `lodge host set` live in the store and win over the
// config file, so that they survive restarts without editing it.
const (
	settingsBucket = "settings"
	limitsKey      = "host-limits"
)

// Bounds for the overcommit ratio, as the config file has them.
const (
	minOvercommit = 1.0
	maxOvercommit = 100
)

type hostLimits struct {
	MemoryLimit          int64   `json:"memory_limit,omitempty"`
	Overcommit           float64 `json:"overcommit,omitempty"`
	AutoBalloon          *bool   `json:"auto_balloon,omitempty"`
	AutoBalloonThreshold int64   `json:"auto_balloon_threshold,omitempty"`
}

func (d *Daemon) loadLimits(ctx context.Context) error {
	var l hostLimits
	err := d.store.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, settingsBucket, limitsKey, &l) })
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("host limits: %w", err)
	}
	d.limitsMu.Lock()
	d.limits = l
	d.limitsMu.Unlock()
	return nil
}

// host is what VMs may draw on now: the config, overridden by host set.
func (d *Daemon) host() vm.Host {
	d.limitsMu.Lock()
	l := d.limits
	d.limitsMu.Unlock()
	limit := int64(d.cfg.MemoryLimit)
	if l.MemoryLimit > 0 {
		limit = l.MemoryLimit
	}
	if limit == 0 {
		limit = max(d.memTot-int64(d.cfg.MemoryReserve), 0)
	}
	over := d.cfg.Overcommit
	if l.Overcommit > 0 {
		over = l.Overcommit
	}
	return vm.Host{MemoryTotal: d.memTot, MemoryLimit: limit, Overcommit: over, VMOverhead: d.vmOverhead()}
}

// vmOverhead is what each running VM is counted for beyond its guest's
// memory: the config's figure, or QEMU's own plus, under TCG, its code
// cache.
func (d *Daemon) vmOverhead() int64 {
	if d.cfg.VMOverhead > 0 {
		return int64(d.cfg.VMOverhead)
	}
	o := int64(config.QEMUOverhead)
	d.accelMu.Lock()
	tcg := d.accel.Accel != "kvm"
	d.accelMu.Unlock()
	if tcg {
		o += int64(d.cfg.TCGCache)
	}
	return o
}

// validateLimits refuses limits that make no sense on this host.
func (d *Daemon) validateLimits(req api.SetHost) error {
	switch {
	case req.MemoryLimit < 0:
		return fmt.Errorf("host memory_limit %d: %w: must be positive", req.MemoryLimit, errdefs.ErrInvalid)
	case req.MemoryLimit > 0 && req.MemoryLimit < 64<<20:
		return fmt.Errorf("host memory_limit %s: %w: must be at least 64M", units.FormatSize(req.MemoryLimit), errdefs.ErrInvalid)
	case d.memTot > 0 && req.MemoryLimit > d.memTot:
		return fmt.Errorf("host memory_limit %s: %w: the host has %s (use overcommit to promise more)", units.FormatSize(req.MemoryLimit), errdefs.ErrLimit, units.FormatSize(d.memTot))
	case req.Overcommit != 0 && (req.Overcommit < minOvercommit || req.Overcommit > maxOvercommit):
		return fmt.Errorf("host overcommit %g: %w: must be between %g and %g", req.Overcommit, errdefs.ErrInvalid, float64(minOvercommit), float64(maxOvercommit))
	case req.AutoBalloonThreshold < 0:
		return fmt.Errorf("host auto_balloon_threshold %d: %w: must be positive", req.AutoBalloonThreshold, errdefs.ErrInvalid)
	case d.memTot > 0 && req.AutoBalloonThreshold >= d.memTot:
		return fmt.Errorf("host auto_balloon_threshold %s: %w: the host has only %s", units.FormatSize(req.AutoBalloonThreshold), errdefs.ErrInvalid, units.FormatSize(d.memTot))
	case req == api.SetHost{}:
		return fmt.Errorf("host set: %w: nothing to change", errdefs.ErrInvalid)
	}
	return nil
}

func (d *Daemon) setHost(w http.ResponseWriter, r *http.Request) {
	var req api.SetHost
	if !decode(w, r, &req) {
		return
	}
	if err := d.validateLimits(req); err != nil {
		writeErr(w, err)
		return
	}
	d.limitsMu.Lock()
	l := d.limits
	if req.MemoryLimit > 0 {
		l.MemoryLimit = req.MemoryLimit
	}
	if req.Overcommit > 0 {
		l.Overcommit = req.Overcommit
	}
	if req.AutoBalloon != nil {
		l.AutoBalloon = req.AutoBalloon
	}
	if req.AutoBalloonThreshold > 0 {
		l.AutoBalloonThreshold = req.AutoBalloonThreshold
	}
	err := d.store.Update(r.Context(), func(tx store.Tx) error { return store.PutJSON(tx, settingsBucket, limitsKey, l) })
	if err == nil {
		d.limits = l
	}
	d.limitsMu.Unlock()
	if err != nil {
		writeErr(w, fmt.Errorf("host set: %w", err))
		return
	}
	on, threshold := d.autoBalloonSettings()
	d.log.Info("host limits set", "memory_limit", l.MemoryLimit, "overcommit", l.Overcommit, "auto_balloon", on, "auto_balloon_threshold", threshold)
	d.hostInfo(w, r)
}
