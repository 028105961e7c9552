package vm

import (
	"testing"
	"time"
)

// fakeGate is a yieldGate on a clock the test moves; readers' sleeps move
// it too.
func fakeGate() (*yieldGate, *time.Time) {
	now := time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)
	g := newYieldGate()
	g.now = func() time.Time { return now }
	g.sleep = func(d time.Duration) { now = now.Add(d) }
	return g, &now
}

// TestYieldGate feeds the gate a guest's writes, as the fleecing files'
// growth every 50 ms, and checks how long readers are told to pause.
func TestYieldGate(t *testing.T) {
	const tick = 50 * time.Millisecond
	const room = 64 << 30 // a minute of the fastest writes fills a quarter
	tests := []struct {
		name       string
		growth     int64 // per tick
		ticks      int
		startUsed  int64
		minPaused  time.Duration
		maxPaused  time.Duration
		pausedLast bool // readers pause after the last tick
	}{
		{name: "quiet guest", growth: 1 << 20, ticks: 100, maxPaused: 0},
		// A 1 s burst: paused throughout, and for the hold after it.
		{name: "burst", growth: 10 << 20, ticks: 20, minPaused: time.Second + yieldHold - tick, maxPaused: time.Second + yieldHold, pausedLast: true},
		// A minute of writes: the burst, then half the time.
		{name: "never stops", growth: 10 << 20, ticks: 1200, minPaused: 30 * time.Second, maxPaused: yieldBurst + 30*time.Second + yieldHold, pausedLast: true},
		// The fleecing files pass half their room after 5 ticks: from then
		// on, finishing the read sooner is what counts.
		{name: "files half full", growth: 10 << 20, ticks: 20, startUsed: room/2 - 50<<20, minPaused: 4*tick + yieldHold, maxPaused: 4*tick + yieldHold},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, now := fakeGate()
			used := tt.startUsed
			g.measured(used, room)
			for range tt.ticks {
				*now = now.Add(tick)
				used += tt.growth
				g.measured(used, room)
			}
			got := g.scheduled
			if got < tt.minPaused || got > tt.maxPaused {
				t.Fatalf("pauses of %v in all, want %v to %v", got, tt.minPaused, tt.maxPaused)
			}
			before := *now
			g.wait()
			slept := now.Sub(before)
			if tt.pausedLast != (slept > 0) || slept > yieldHold {
				t.Fatalf("a read after the last measurement waited %v, want a pause: %v, at most %v", slept, tt.pausedLast, yieldHold)
			}
		})
	}
}

// TestYieldGateWaitsOnlyWhilePaused: a read waits for the rest of the
// pause, not the whole of it, and not at all once it is over; the time
// counted as paused is the time readers waited, once.
func TestYieldGateWaitsOnlyWhilePaused(t *testing.T) {
	g, now := fakeGate()
	g.sleep = func(time.Duration) {} // two readers wait side by side
	g.measured(0, 1<<30)
	*now = now.Add(50 * time.Millisecond)
	g.measured(10<<20, 1<<30)
	*now = now.Add(150 * time.Millisecond)
	g.wait()
	*now = now.Add(20 * time.Millisecond)
	g.wait()
	if got, want := g.total(), yieldHold-150*time.Millisecond; got != want {
		t.Fatalf("two readers 150 and 170 ms into a pause: paused %v in all, want %v", got, want)
	}
	*now = now.Add(time.Second)
	g.wait()
	if got, want := g.total(), yieldHold-150*time.Millisecond; got != want {
		t.Fatalf("a read after the pause: paused %v in all, want %v", got, want)
	}

	g, now = fakeGate()
	g.measured(0, 1<<30)
	*now = now.Add(50 * time.Millisecond)
	g.measured(10<<20, 1<<30)
	*now = now.Add(150 * time.Millisecond)
	before := *now
	g.wait()
	if got := now.Sub(before); got != yieldHold-150*time.Millisecond {
		t.Fatalf("a read 150 ms into the pause waited %v, want %v", got, yieldHold-150*time.Millisecond)
	}
	before = *now
	g.wait()
	if got := now.Sub(before); got != 0 {
		t.Fatalf("a read after the pause waited %v, want none", got)
	}
}
