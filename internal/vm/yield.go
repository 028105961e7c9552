package vm

import (
	"sync"
	"time"

	"github.com/lodge-vm/lodge/internal/nbd"
)

// A running VM's export reads its disks through QEMU, whose main loop
// also serves the guest's own disk requests, and a backup behind it
// hashes and compresses on the host's CPUs. While the guest writes hard,
// both take from it: on a two-CPU host a guest's writes ran at 0.6 of
// their speed during a backup, against 0.8 with copy-before-write alone.
// The fleecing files say when the guest writes: they grow with every
// block it overwrites for the first time since the point. So while they
// grow fast, the export's readers pause. A budget keeps a guest that never
// stops writing from holding the read back for good, and there is no
// pause once the files fill half their room: then finishing the read
// sooner is what keeps the export alive.
const (
	// yieldRate is the growth, in bytes per second, that counts as the
	// guest writing hard.
	yieldRate = 40 << 20
	// yieldHold is how long readers pause after growth was last seen.
	yieldHold = 200 * time.Millisecond
	// At most yieldBurst of pauses at once, and over a long time at most
	// yieldShare of the time: a backup of a guest that writes all the
	// time still reads at half speed or more.
	yieldBurst = 2 * time.Second
	yieldShare = 0.5
)

// yieldGate tells an export's readers when to pause. The fleecing
// watcher feeds it each measurement.
type yieldGate struct {
	mu     sync.Mutex
	last   time.Time // of the last measurement
	used   int64     // bytes in the fleecing files then
	until  time.Time // readers pause until then
	budget time.Duration
	// scheduled is the pause time measurements called for; waited is the
	// time readers did pause, counted once however many waited together.
	scheduled, waited time.Duration
	heldTo            time.Time // the end of the pauses counted in waited
	now               func() time.Time
	sleep             func(time.Duration)
}

func newYieldGate() *yieldGate {
	return &yieldGate{budget: yieldBurst, now: time.Now, sleep: time.Sleep}
}

// measured takes one measurement: the fleecing files hold used bytes of
// their room.
func (g *yieldGate) measured(used, room int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	if g.last.IsZero() {
		g.last, g.used = now, used
		return
	}
	dt, grew := now.Sub(g.last), used-g.used
	g.last, g.used = now, used
	if dt <= 0 {
		return
	}
	g.budget = min(yieldBurst, g.budget+time.Duration(yieldShare*float64(dt)))
	if float64(grew)/dt.Seconds() < yieldRate || used > room/2 {
		return
	}
	start := now
	if g.until.After(now) {
		start = g.until // only what extends the pause is new
	}
	pause := min(now.Add(yieldHold).Sub(start), g.budget)
	if pause <= 0 {
		return
	}
	g.until = start.Add(pause)
	g.budget -= pause
	g.scheduled += pause
}

// wait returns once readers may go on.
func (g *yieldGate) wait() {
	g.mu.Lock()
	now, end := g.now(), g.until
	if !end.After(now) {
		g.mu.Unlock()
		return
	}
	from := now
	if g.heldTo.After(from) {
		from = g.heldTo
	}
	if end.After(from) {
		g.waited += end.Sub(from)
		g.heldTo = end
	}
	g.mu.Unlock()
	g.sleep(end.Sub(now))
}

// total is how long readers paused in all.
func (g *yieldGate) total() time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waited
}

// yieldingConn reads an export's disk through NBD, pausing first while
// the guest writes hard. Everything but reading is the Conn's own.
type yieldingConn struct {
	*nbd.Conn
	gate *yieldGate
}

func (c yieldingConn) ReadAt(p []byte, off int64) (int, error) {
	c.gate.wait()
	return c.Conn.ReadAt(p, off)
}
