package daemon

import (
	"sync"

	"github.com/lodge-vm/lodge/api"
)

// bus fans events out to every subscriber. A slow subscriber loses events
// rather than holding up the daemon.
type bus struct {
	mu   sync.Mutex
	subs map[chan api.Event]struct{}
}

func newBus() *bus { return &bus{subs: map[chan api.Event]struct{}{}} }

func (b *bus) Publish(ev api.Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for ch := range b.subs {
		select {
		case ch <- ev:
		default:
		}
	}
}

func (b *bus) subscribe() (<-chan api.Event, func()) {
	ch := make(chan api.Event, 256)
	b.mu.Lock()
	b.subs[ch] = struct{}{}
	b.mu.Unlock()
	return ch, func() {
		b.mu.Lock()
		delete(b.subs, ch)
		b.mu.Unlock()
	}
}
