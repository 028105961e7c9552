package daemon

import (
	"context"
	"math"
	"time"

	"github.com/lodge-vm/lodge/internal/vm"
)

// autoBalloonSettings are the auto-balloon's switch and threshold: the
// config, overridden by host set; the threshold defaults to a tenth of
// the host's RAM.
func (d *Daemon) autoBalloonSettings() (on bool, threshold int64) {
	d.limitsMu.Lock()
	l := d.limits
	d.limitsMu.Unlock()
	on, threshold = d.cfg.AutoBalloon.Enabled, int64(d.cfg.AutoBalloon.Threshold)
	if l.AutoBalloon != nil {
		on = *l.AutoBalloon
	}
	if l.AutoBalloonThreshold > 0 {
		threshold = l.AutoBalloonThreshold
	}
	if threshold == 0 {
		threshold = d.memTot / 10
	}
	return on, threshold
}

// pressure is what the auto-balloon judges by. Memory comes back only
// once a quarter more than the threshold is available, so that VMs do
// not swing back and forth around it.
func pressure(available, threshold int64) vm.Pressure {
	return vm.Pressure{Available: available, Low: threshold, High: threshold + threshold/4}
}

// autoBalloonLoop looks at the host's available memory every interval
// and lets the VMs rebalance. Switched off, it gives back whatever it
// still holds.
func (d *Daemon) autoBalloonLoop(ctx context.Context) {
	t := time.NewTicker(d.cfg.AutoBalloon.Interval)
	defer t.Stop()
	var lastErr string
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		on, threshold := d.autoBalloonSettings()
		p := vm.Pressure{Available: math.MaxInt64}
		if on {
			avail, err := meminfo(d.cfg.AutoBalloon.MemInfo, "MemAvailable")
			if err != nil {
				if err.Error() != lastErr {
					d.log.Warn("auto-balloon cannot see the host's memory", "err", err)
					lastErr = err.Error()
				}
				continue
			}
			p = pressure(avail, threshold)
		}
		if err := d.vms.Rebalance(ctx, p); err != nil && ctx.Err() == nil {
			d.log.Warn("auto-balloon", "err", err)
		}
	}
}
