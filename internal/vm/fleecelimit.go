package vm

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/units"
)

// The fleecing files of a running VM's export hold a copy of each block
// the guest overwrites before the export has read it. A slow reader (a
// repository on a slow disk, a send over a slow link) therefore never
// slows the guest, but the files grow with what the guest writes. They are
// bounded: by the fleece_limit setting, and by the free space beside the
// disks less a margin left for the guest's own writes. An export that
// reaches the bound is stopped, never the guest: it is the guest's writes
// that would fail once the disk is full (QEMU fails a guest write whose
// old data cannot be copied).

// fleeceMargin is the free space an export leaves beside the disks for
// the guest's own writes.
const fleeceMargin = 256 << 20

// minFleece is the least room an export of a running VM starts with.
const minFleece = 64 << 20

// How often the fleecing files are measured: often enough that readers
// pause soon after the guest starts writing hard (see yieldGate).
var fleeceEvery = 50 * time.Millisecond

// fleeceRoom is the most the fleecing files beside r's disks may hold.
func (s *Service) fleeceRoom(r record) (int64, error) {
	room := s.cfg.FleeceLimit
	seen := map[string]bool{}
	for _, d := range r.Disks {
		dir := filepath.Dir(d.Path)
		if seen[dir] {
			continue
		}
		seen[dir] = true
		free, err := freeBytes(dir)
		if err != nil {
			return 0, fmt.Errorf("disk %q: %w", d.Name, err)
		}
		if free-fleeceMargin < minFleece {
			return 0, fmt.Errorf("disk %q: %w: %s free in %s; while it is read, a running VM's disk needs room beside it for copies of what the guest overwrites (at least %s, and %s left for the guest)",
				d.Name, errdefs.ErrNoSpace, units.FormatSize(free), dir, units.FormatSize(minFleece), units.FormatSize(fleeceMargin))
		}
		room = min(room, free-fleeceMargin)
	}
	return room, nil
}

// watchFleece measures the fleecing files at paths until the returned
// stop is called, and tells the export's yieldGate each measurement. Once they hold more
// than room, it stops the export: the readers get the reason from then
// on, and trip ends the copying. A read that has returned was served while
// the point in time held.
func (s *Service) watchFleece(e *Export, vm string, paths []string, room int64, trip func()) (stop func()) {
	gate := e.gate
	done := make(chan struct{})
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		t := time.NewTicker(fleeceEvery)
		defer t.Stop()
		defer func() {
			if p := gate.total(); p > 0 {
				s.log.Info("export paused while the guest wrote", "vm", vm, "paused", p.Round(time.Millisecond))
			}
		}()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			var used int64
			for _, p := range paths {
				used += allocated(p)
			}
			gate.measured(used, room)
			if used <= room {
				continue
			}
			err := fmt.Errorf("%w: while its disks were read, the guest overwrote %s of them that had not been read yet, more than the room for copies of it (%s: config fleece_limit, or the free space beside the disks); the read was stopped, the guest was not slowed",
				errdefs.ErrNoSpace, units.FormatSize(used), units.FormatSize(room))
			s.log.Warn("stopping an export: its fleecing files are full", "vm", vm, "used", used, "room", room)
			e.fail(err)
			trip()
			return
		}
	}()
	return func() {
		close(done)
		<-ended
	}
}

// fail ends every read of the export with err.
func (e *Export) fail(err error) {
	e.mu.Lock()
	if e.err == nil {
		e.err = err
	}
	e.mu.Unlock()
	for _, d := range e.Disks {
		if d.Conn != nil {
			d.Conn.Abort(err)
		}
	}
}

// Err says why the export was stopped while it was read, if it was.
func (e *Export) Err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// Cause is the reason the export was stopped while it was read, if it
// was and err says a read failed; otherwise err.
func (e *Export) Cause(err error) error {
	if stopped := e.Err(); stopped != nil && err != nil {
		return stopped
	}
	return err
}
