package daemon

import (
	"errors"
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
