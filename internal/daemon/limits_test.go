package daemon

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/config"
	"github.com/lodge-vm/lodge/internal/errdefs"
)

func TestValidateLimits(t *testing.T) {
	d := &Daemon{memTot: 8 << 30}
	tests := []struct {
		req  api.SetHost
		want error
	}{
		{api.SetHost{MemoryLimit: 4 << 30}, nil},
		{api.SetHost{Overcommit: 1.5}, nil},
		{api.SetHost{MemoryLimit: 8 << 30, Overcommit: 2}, nil},
		{api.SetHost{}, errdefs.ErrInvalid},
		{api.SetHost{MemoryLimit: -1}, errdefs.ErrInvalid},
		{api.SetHost{MemoryLimit: 1 << 20}, errdefs.ErrInvalid},
		{api.SetHost{MemoryLimit: 9 << 30}, errdefs.ErrLimit},
		{api.SetHost{Overcommit: 0.5}, errdefs.ErrInvalid},
		{api.SetHost{Overcommit: 101}, errdefs.ErrInvalid},
		{api.SetHost{AutoBalloon: new(bool)}, nil},
		{api.SetHost{AutoBalloonThreshold: 2 << 30}, nil},
		{api.SetHost{AutoBalloonThreshold: -1}, errdefs.ErrInvalid},
		{api.SetHost{AutoBalloonThreshold: 8 << 30}, errdefs.ErrInvalid},
	}
	for _, tt := range tests {
		err := d.validateLimits(tt.req)
		if (tt.want == nil) != (err == nil) || (tt.want != nil && !errors.Is(err, tt.want)) {
			t.Errorf("validateLimits(%+v) = %v, want %v", tt.req, err, tt.want)
		}
	}
}

// Limits set at run time win over the config; unset ones fall back to it.
func TestHostLimitsOverrideConfig(t *testing.T) {
	d := &Daemon{memTot: 8 << 30, cfg: config.Config{MemoryReserve: 1 << 30, Overcommit: 1}}
	if h := d.host(); h.MemoryLimit != 7<<30 || h.Overcommit != 1 {
		t.Fatalf("default: %+v, want total less the reserve", h)
	}
	d.limits = hostLimits{MemoryLimit: 2 << 30}
	if h := d.host(); h.MemoryLimit != 2<<30 || h.Overcommit != 1 {
		t.Fatalf("with a set limit: %+v", h)
	}
	d.limits.Overcommit = 1.5
	if h := d.host(); h.Overcommit != 1.5 {
		t.Fatalf("with a set overcommit: %+v", h)
	}
}

// The auto-balloon's settings: the config, overridden by host set, with
// the threshold a tenth of the host's RAM unless given.
func TestAutoBalloonSettings(t *testing.T) {
	d := &Daemon{memTot: 8 << 30}
	if on, th := d.autoBalloonSettings(); on || th != 8<<30/10 {
		t.Fatalf("default: on %v, threshold %d", on, th)
	}
	d.cfg.AutoBalloon = config.AutoBalloon{Enabled: true, Threshold: 1 << 30}
	if on, th := d.autoBalloonSettings(); !on || th != 1<<30 {
		t.Fatalf("from the config: on %v, threshold %d", on, th)
	}
	off := false
	d.limits = hostLimits{AutoBalloon: &off, AutoBalloonThreshold: 3 << 30}
	if on, th := d.autoBalloonSettings(); on || th != 3<<30 {
		t.Fatalf("set with host set: on %v, threshold %d", on, th)
	}
	if p := pressure(1<<30, 2<<30); p.Low != 2<<30 || p.High != 5<<29 {
		t.Fatalf("pressure marks %+v: want low at the threshold and high a quarter above", p)
	}
}

func TestMeminfo(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meminfo")
	if err := os.WriteFile(path, []byte("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:    1048576 kB\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if n, err := meminfo(path, "MemAvailable"); err != nil || n != 1<<30 {
		t.Fatalf("MemAvailable = %d, %v; want 1 GiB", n, err)
	}
	if _, err := meminfo(path, "SwapTotal"); err == nil {
		t.Fatal("a missing field reads without an error")
	}
	if _, err := meminfo(filepath.Join(t.TempDir(), "none"), "MemTotal"); err == nil {
		t.Fatal("a missing file reads without an error")
	}
}

// Each running VM counts for QEMU's own memory and, under TCG, its code
// cache, unless the config names a figure.
func TestVMOverhead(t *testing.T) {
	d := &Daemon{cfg: config.Config{TCGCache: 64 << 20}}
	d.accel.Accel = "tcg"
	if got := d.vmOverhead(); got != config.QEMUOverhead+64<<20 {
		t.Errorf("tcg: %d", got)
	}
	d.accel.Accel = "kvm"
	if got := d.vmOverhead(); got != config.QEMUOverhead {
		t.Errorf("kvm: %d", got)
	}
	d.cfg.VMOverhead = 10 << 20
	if got := d.host().VMOverhead; got != 10<<20 {
		t.Errorf("from the config: %d", got)
	}
}
