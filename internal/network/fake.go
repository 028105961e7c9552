package network

import (
	"context"
	"errors"
	"os"
	"sync"
)

// Fake is a Host for unit tests: it records what is up and hands out
// taps that are plain temporary files.
type Fake struct {
	mu sync.Mutex
	// UsedPrefixes is what Used reports.
	UsedPrefixes []Used
	// FailUp makes Up fail.
	FailUp  bool
	IsUp     map[string]Wiring
	Reloads int
	Taps    []string
	// Denied makes Check fail, as for an unprivileged daemon.
	Denied bool
}

var _ Host = (*Fake)(nil)

func (f *Fake) Check() error {
	if f.Denied {
		return ErrPrivilege
	}
	return nil
}

func (f *Fake) Used() ([]Used, error) { return f.UsedPrefixes, nil }

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

func (f *Fake) Reload(context.Context, Wiring) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Reloads++
	return nil
}

func (f *Fake) Down(_ context.Context, w Wiring) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.IsUp, w.Bridge)
	return nil
}

func (f *Fake) OpenTap(_ context.Context, _, name string) (*os.File, error) {
	f.mu.Lock()
	f.Taps = append(f.Taps, name)
	f.mu.Unlock()
	return os.CreateTemp("", "tap-"+name)
}
