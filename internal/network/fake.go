package network

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// Fake is a Host for unit tests: it records what is up and hands out
// taps that are plain temporary files.
type Fake struct {
	mu sync.Mutex
	// UsedPrefixes is what Used reports.
	UsedPrefixes []Used
	// FailUp makes Up fail.
	FailUp  bool
	IsUp    map[string]Wiring
	Reloads int
	Taps    []string
	// Denied makes Check fail, as for an unprivileged daemon.
	Denied bool
}

var _ Host = (*Fake)(nil)

// Check implements Host.
func (f *Fake) Check() error {
	if f.Denied {
		return fmt.Errorf("%w: %w", errdefs.ErrInvalid, ErrPrivilege)
	}
	return nil
}

// Used implements Host.
func (f *Fake) Used() ([]Used, error) { return f.UsedPrefixes, nil }

// Up implements Host.
func (f *Fake) Up(_ context.Context, w Wiring) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.FailUp {
		return errors.New("fake: bridge refused")
	}
	if f.IsUp == nil {
		f.IsUp = map[string]Wiring{}
	}
	f.IsUp[w.Bridge] = w
	return nil
}

// Reload implements Host.
func (f *Fake) Reload(context.Context, Wiring) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Reloads++
	return nil
}

// Down implements Host.
func (f *Fake) Down(_ context.Context, w Wiring) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.IsUp, w.Bridge)
	return nil
}

// OpenTap implements Host.
func (f *Fake) OpenTap(_ context.Context, _, name string) (*os.File, error) {
	f.mu.Lock()
	f.Taps = append(f.Taps, name)
	f.mu.Unlock()
	return os.CreateTemp("", "tap-"+name)
}
