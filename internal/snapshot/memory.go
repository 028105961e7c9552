package snapshot

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lodge-vm/lodge/internal/qmp"
)

// The monitor fd name under which QEMU gets the migration stream.
const fdName = "lodge-memstate"

// pipeSize is the default limit for unprivileged pipes
// (/proc/sys/fs/pipe-max-size).
const pipeSize = 1 << 20

// How often a running save or load is polled for progress.
var pollEvery = 50 * time.Millisecond

// writerScript copies the stream into $1. If the copy fails (a full
// disk), it still reads the stream to its end: a background snapshot
// that fails half-way leaves QEMU 7.2 stuck, its guest waiting on
// write-protected pages that no one will save (seen here: the guest and
// then QMP stop answering). So from QEMU's side the save always completes,
// and the writer's exit status says whether the file is whole.
const writerScript = `if cat >"$1"; then exit 0; fi; cat >/dev/null; exit 1`

// SaveStats describes one memory save.
type SaveStats struct {
	// Method is how the state was taken: MethodLive or MethodBackground.
	Method string
	// Fallback is set when a live save did not converge and the state
	// was taken again in the background.
	Fallback bool
	// Pause is how long the guest's CPUs were stopped, disk switch
	// included.
	Pause time.Duration
	// Bytes is the size of the state file.
	Bytes int64
	// Elapsed is the whole save, of which Sync is the flush to disk.
	Elapsed, Sync time.Duration
}

// The two ways Save takes a guest's memory.
const (
	// MethodLive copies memory while the guest runs, then copies again
	// what it changed meanwhile, and pauses the guest only for the last,
	// small pass (a live migration into a file). The state is that of the
	// end of the save.
	MethodLive = "live"
	// MethodBackground write-protects memory and saves each page before
	// the guest first changes it (QEMU's background-snapshot). The state
	// is that of the start of the save.
	MethodBackground = "background"
)

// errNoConvergence means the guest changed its memory faster than a live
// save could copy it.
var errNoConvergence = errors.New("the guest changes memory faster than it can be saved")

// A live save gives up, and Save falls back to a background one, after
// this many passes over guest memory.
const livePasses = 10

// liveDowntimeMS is the pause QEMU aims at for the last pass of a live
// save. The disk switch and the resume come on top.
const liveDowntimeMS = 40

// Save writes the guest's memory and device state to path while the guest
// keeps running.
//
// A running guest is saved live (MethodLive): QEMU copies memory while the
// guest runs, pass after pass over what it changed, and stops the guest
// for the last pass; atPause runs then, before the device state is taken,
// so that what it does to the disks (switching them to new tops) happens
// at the same instant as the memory state; then the guest resumes. This
// is the fastest way: a background snapshot costs QEMU a page-table
// change for every page it saves, and took twice as long here. A guest
// that changes its memory too fast for the passes to converge would never
// get there, so after livePasses passes, or once the file has grown to
// reserve, the live save is cancelled (the guest runs on) and the state
// is taken in the background instead.
//
// A paused guest, and the fallback, use QEMU's background-snapshot
// migration (MethodBackground): QEMU write-protects guest memory
// (userfaultfd) and saves each page before the guest first changes it, so
// the file holds the memory as it was at the start, and the guest pauses
// only while the device state is taken. atPause runs while the guest's
// CPUs are stopped, just before that. A guest that was paused stays
// paused.
//
// QEMU 7.2 hangs the guest if a background snapshot fails half-way, so
// the stream must never meet a full disk. Save reserves reserve bytes for
// the file first (fallocate) and hands QEMU the file itself: a disk too
// full for that is refused before anything starts, and nothing can take
// the room while QEMU writes. Where the filesystem cannot reserve space,
// the stream goes through a pipe to a writer process instead, which
// drains it to the end whatever happens (see writerScript). Either way
// the file is written to path+".part" and renamed once synced; on any
// failure nothing is left at either name. A cancelled ctx stops a live
// save at once; a background one is not stopped once QEMU has started it
// (it runs to its end, a second or so) and the result is thrown away.
func Save(ctx context.Context, mon qmp.Monitor, path string, reserve int64, atPause func(context.Context) error, progress func(done, total int64)) (SaveStats, error) {
	var stats SaveStats
	passer, ok := mon.(qmp.FDPasser)
	if !ok {
		return stats, fmt.Errorf("save memory state: %w", qmp.ErrNoFDPassing)
	}
	start := time.Now()
	if err := waitIdle(ctx, mon); err != nil {
		return stats, fmt.Errorf("save memory state: %w", err)
	}
	// QEMU caps migration at 128 MiB/s by default; a local file takes
	// whatever the disk gives.
	if err := qmp.SetMigrationParameters(ctx, mon, map[string]any{"max-bandwidth": int64(1) << 40, "downtime-limit": liveDowntimeMS}); err != nil {
		return stats, fmt.Errorf("save memory state: %w", err)
	}
	st, err := qmp.QueryStatus(ctx, mon)
	if err != nil {
		return stats, fmt.Errorf("save memory state: %w", err)
	}
	// A live save's later passes write pages again: it wants room for a
	// quarter more than one save, and gives up at one.
	room := reserve
	if st.Running {
		room += reserve / 4
	}
	out, err := createState(path+".part", room, reserve)
	if err != nil {
		return stats, fmt.Errorf("save memory state: %w", err)
	}
	err = errNoConvergence
	if st.Running && out.room >= room {
		stats.Method = MethodLive
		err = out.take(ctx, mon, passer, &stats, live(atPause, progress, reserve))
	}
	if errors.Is(err, errNoConvergence) {
		stats.Fallback = stats.Method == MethodLive
		stats.Method = MethodBackground
		err = out.take(ctx, mon, passer, &stats, background(atPause, progress))
	}
	if err == nil {
		err = out.commit(ctx, path, &stats)
	}
	if err != nil {
		out.discard()
		return stats, fmt.Errorf("save memory state: %w", err)
	}
	stats.Elapsed = time.Since(start)
	return stats, nil
}

// A method drives QEMU's side of a save into part, the stream's
// descriptor being in QEMU under fdName. It returns once QEMU has written
// all it will.
type method func(ctx context.Context, mon qmp.Monitor, part string, stats *SaveStats) error

// stateFile is the file a save writes, path+".part" until it is whole.
type stateFile struct {
	part string
	// f is the file with its room set aside, which QEMU writes through
	// a copy of the descriptor: the two share the file offset, so f
	// learns where the stream ended. nil where the filesystem cannot set
	// room aside; a writer process then fills the file from a pipe.
	f    *os.File
	room int64
}

// createState creates part with room bytes set aside past its end, or
// at least least bytes if the disk lacks room; a disk without that fails
// with ENOSPC.
func createState(part string, room, least int64) (*stateFile, error) {
	out := &stateFile{part: part}
	f, direct, got, err := reserveFile(part, room, least)
	if err != nil {
		_ = os.Remove(part)
		return nil, err
	}
	// Without room set aside, the writer takes what the disk gives.
	out.f, out.room = f, got
	if !direct {
		out.room = room
	}
	return out, nil
}

// take runs one save into the file. A later one overwrites an earlier
// one from the start, keeping its room.
func (o *stateFile) take(ctx context.Context, mon qmp.Monitor, passer qmp.FDPasser, stats *SaveStats, run method) error {
	var werr bytes.Buffer
	written := make(chan error, 1)
	w := o.f
	if w != nil {
		if _, err := w.Seek(0, io.SeekStart); err != nil {
			return err
		}
		written <- nil // QEMU writes the file itself
	} else {
		var err error
		if w, err = startWriter(ctx, o.part, &werr, written); err != nil {
			return err
		}
	}
	err := passer.PassFD(ctx, fdName, w)
	if o.f == nil {
		_ = w.Close() // QEMU holds its own copy now
	}
	if err != nil {
		<-written
		return fmt.Errorf("pass %s to qemu: %w", o.part, err)
	}
	if err := run(ctx, mon, o.part, stats); err != nil {
		// A migration that never started leaves the descriptor with the
		// monitor: dropping it ends the writer. One that did has taken
		// it, and QEMU closes it when the migration ends.
		_ = mon.Execute(context.WithoutCancel(ctx), "closefd", map[string]string{"fdname": fdName}, nil)
		<-written
		return err
	}
	if wErr := <-written; wErr != nil {
		msg := strings.TrimSpace(werr.String())
		if msg == "" {
			msg = wErr.Error()
		}
		err := fmt.Errorf("write %s: %s", o.part, msg)
		if strings.Contains(msg, "No space left") {
			err = fmt.Errorf("%w: %w", err, syscall.ENOSPC)
		}
		return err
	}
	return ctx.Err()
}

// commit cuts the file where the stream ended, which also gives back the
// room it did not use, syncs it and renames it to path.
func (o *stateFile) commit(ctx context.Context, path string, stats *SaveStats) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	synced := time.Now()
	if o.f != nil {
		end, err := o.f.Seek(0, io.SeekCurrent)
		if err != nil {
			return err
		}
		// Filesystems free the blocks past the end when a file shrinks
		// (a hole punched past the end is ignored by ext4), so grow it
		// by a byte and shrink it back.
		if err := o.f.Truncate(end + 1); err != nil {
			return err
		}
		if err := o.f.Truncate(end); err != nil {
			return err
		}
		if err := o.f.Sync(); err != nil {
			return err
		}
		if err := o.f.Close(); err != nil {
			return err
		}
		o.f = nil
	} else if err := syncFile(o.part); err != nil {
		return err
	}
	stats.Sync = time.Since(synced)
	if err := os.Rename(o.part, path); err != nil {
		return err
	}
	syncDir(filepath.Dir(path))
	if fi, err := os.Stat(path); err == nil {
		stats.Bytes = fi.Size()
	}
	return nil
}

// discard removes what a failed save wrote.
func (o *stateFile) discard() {
	if o.f != nil {
		_ = o.f.Close()
	}
	_ = os.Remove(o.part)
}

// live is MethodLive: a precopy migration that QEMU pauses before its
// switchover, where atPause runs with the guest stopped. It gives up
// with errNoConvergence after livePasses passes or once more than budget
// bytes are written, cancelling the migration so the guest runs on.
func live(atPause func(context.Context) error, progress func(done, total int64), budget int64) method {
	return func(ctx context.Context, mon qmp.Monitor, part string, stats *SaveStats) error {
		events, unsubscribe := mon.Subscribe()
		defer unsubscribe()
		if err := qmp.SetMigrationCapabilities(ctx, mon, map[string]bool{
			"background-snapshot": false, "pause-before-switchover": true, "events": true,
		}); err != nil {
			return fmt.Errorf("enable live save: %w", err)
		}
		if err := qmp.Migrate(ctx, mon, "fd:"+fdName); err != nil {
			return fmt.Errorf("start: %w", err)
		}
		bg := context.WithoutCancel(ctx)
		cancel := func(cause error) error {
			_ = qmp.MigrateCancel(bg, mon)
			_ = follow(bg, mon, pollEvery/5, func(qmp.MigrationStatus) {})
			return cause
		}
		tick := time.NewTicker(pollEvery)
		defer tick.Stop()
		fl := startFlusher(part)
		defer fl.stop()
		done := ctx.Done()
		switching := false
		for {
			select {
			case <-done:
				return cancel(ctx.Err())
			case <-tick.C:
				ms, err := qmp.QueryMigrate(bg, mon)
				if err != nil {
					return cancel(err)
				}
				if ms.RAM == nil || switching {
					continue
				}
				if progress != nil {
					// Later passes copy pages again: never past 100%.
					progress(min(ms.RAM.Transferred, ms.RAM.Total), ms.RAM.Total)
				}
				// QEMU's stop at the end flushes the guest's disks, which
				// would wait behind the writeback: it ends half-way
				// through the first pass, and the final sync writes the
				// rest.
				if ms.RAM.DirtySyncCount > 1 || ms.RAM.Remaining < ms.RAM.Total/2 {
					fl.pause()
				}
				if ms.Status == "active" && (ms.RAM.DirtySyncCount > livePasses || ms.RAM.Transferred > budget) {
					return cancel(errNoConvergence)
				}
			case ev, ok := <-events:
				if !ok {
					return fmt.Errorf("live save: %w", qmp.ErrClosed)
				}
				if ev.Name != "MIGRATION" {
					continue
				}
				var data struct {
					Status string `json:"status"`
				}
				_ = json.Unmarshal(ev.Data, &data)
				switch data.Status {
				case "pre-switchover":
					// The guest is stopped. From here the save is not
					// cancelled: the disks may have been switched.
					switching, done = true, nil
					fl.pause()
					if err := atPause(ctx); err != nil {
						return cancel(err)
					}
					if err := qmp.MigrateContinue(bg, mon, "pre-switchover"); err != nil {
						return cancel(fmt.Errorf("continue: %w", err))
					}
				case "completed":
					// QEMU leaves the guest stopped, its disks handed
					// over; cont takes them back and resumes it. QEMU
					// refuses it until the guest's state has moved on
					// to postmigrate, a moment after this event.
					waitStatus(bg, mon, func(st qmp.Status) bool { return st.Status != "finish-migrate" })
					err := qmp.Cont(bg, mon)
					stats.Pause = time.Since(ev.Time)
					if ms, qerr := qmp.QueryMigrate(bg, mon); qerr == nil {
						// QEMU's downtime runs from its stop to the end
						// of the device state.
						stats.Pause += time.Duration(ms.Downtime) * time.Millisecond
					}
					if err != nil {
						return fmt.Errorf("resume the guest: %w", err)
					}
					return nil
				case "failed", "cancelled":
					// QEMU resumes the guest itself.
					ms, _ := qmp.QueryMigrate(bg, mon)
					if ms.ErrorDesc != "" {
						return fmt.Errorf("qemu: %s", ms.ErrorDesc)
					}
					return fmt.Errorf("qemu: migration %s", data.Status)
				}
			}
		}
	}
}

// background is MethodBackground.
func background(atPause func(context.Context) error, progress func(done, total int64)) method {
	return func(ctx context.Context, mon qmp.Monitor, part string, stats *SaveStats) error {
		if err := qmp.SetMigrationCapabilities(ctx, mon, map[string]bool{
			"background-snapshot": true, "pause-before-switchover": false,
		}); err != nil {
			return fmt.Errorf("enable background snapshot: %w", err)
		}
		st, err := qmp.QueryStatus(ctx, mon)
		if err != nil {
			return err
		}
		// Until the migration starts, a failure must resume a guest Lodge
		// paused.
		bg := context.WithoutCancel(ctx)
		paused := time.Now()
		if st.Running {
			if err := qmp.Stop(ctx, mon); err != nil {
				return fmt.Errorf("pause guest: %w", err)
			}
		}
		abort := func(err error) error {
			if st.Running {
				_ = qmp.Cont(bg, mon)
			}
			return err
		}
		if err := atPause(ctx); err != nil {
			return abort(err)
		}
		if err := qmp.Migrate(ctx, mon, "fd:"+fdName); err != nil {
			return abort(fmt.Errorf("start: %w", err))
		}
		// QEMU resumes the guest itself once write tracking is on,
		// whatever its state before: wait for that, and pause again a
		// guest the user had paused.
		stats.Pause = waitRunning(bg, mon, paused)
		if !st.Running {
			_ = qmp.Stop(bg, mon)
		}
		// Writeback starts while the state streams in, so that the flush
		// at the end waits only for the last of it. Once started, the
		// save runs to its end whatever ctx says.
		var flushed int64
		return follow(bg, mon, pollEvery, func(ms qmp.MigrationStatus) {
			flushed = startWriteback(part, flushed)
			if progress != nil && ms.RAM != nil {
				progress(ms.RAM.Transferred, ms.RAM.Total)
			}
		})
	}
}

// ended says whether a migration in status is over, or never began.
func ended(status string) bool {
	switch status {
	case "", "none", "completed", "failed", "cancelled":
		return true
	}
	return false
}

// idleWait bounds how long Save waits for an earlier save to end.
var idleWait = 2 * time.Minute

// waitIdle waits for a migration still running in QEMU, such as a save
// whose daemon died, to end: QEMU runs one at a time.
func waitIdle(ctx context.Context, mon qmp.Monitor) error {
	deadline := time.Now().Add(idleWait)
	for {
		ms, err := qmp.QueryMigrate(ctx, mon)
		if err != nil || ended(ms.Status) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("an earlier memory save is still %s in QEMU", ms.Status)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(pollEvery):
		}
	}
}

// Settle ends what a dead daemon's live save left in QEMU: a migration
// still going, or one waiting before its switchover with the guest
// stopped, is cancelled (QEMU resumes the guest); a background snapshot
// is left to end by itself, since stopping one half-way hangs the guest.
// The caller resumes a guest left stopped (QEMU's "postmigrate" state,
// after a completed save).
func Settle(ctx context.Context, mon qmp.Monitor) error {
	ms, err := qmp.QueryMigrate(ctx, mon)
	if err != nil || ended(ms.Status) {
		return err
	}
	var caps []struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	if err := mon.Execute(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
		return err
	}
	for _, c := range caps {
		if c.Capability == "background-snapshot" && c.State {
			return nil
		}
	}
	if err := qmp.MigrateCancel(ctx, mon); err != nil {
		return err
	}
	_ = follow(ctx, mon, pollEvery/5, func(qmp.MigrationStatus) {})
	return nil
}

// waitRunning waits (briefly) for QEMU to resume the guest after the
// state was taken, and returns how long it was paused.
func waitRunning(ctx context.Context, mon qmp.Monitor, since time.Time) time.Duration {
	waitStatus(ctx, mon, func(st qmp.Status) bool { return st.Running })
	return time.Since(since)
}

// waitStatus polls the guest's run state until done says so, for 10 s at
// most.
func waitStatus(ctx context.Context, mon qmp.Monitor, done func(qmp.Status) bool) {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		st, err := qmp.QueryStatus(ctx, mon)
		if err != nil || done(st) {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// follow polls a migration every interval until it ends.
func follow(ctx context.Context, mon qmp.Monitor, interval time.Duration, progress func(qmp.MigrationStatus)) error {
	for {
		ms, err := qmp.QueryMigrate(ctx, mon)
		if err != nil {
			return err
		}
		progress(ms)
		switch ms.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			if ms.ErrorDesc != "" {
				return fmt.Errorf("qemu: %s", ms.ErrorDesc)
			}
			return fmt.Errorf("qemu: migration %s", ms.Status)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// Load feeds the state file at path into a QEMU started with -incoming
// defer and waits until QEMU has taken all of it. QEMU reads the file
// itself, through a descriptor Lodge passes it, so the load does not
// depend on the daemon staying alive. The guest is left paused; the
// caller resumes it.
func Load(ctx context.Context, mon qmp.Monitor, path string) error {
	passer, ok := mon.(qmp.FDPasser)
	if !ok {
		return fmt.Errorf("load memory state: %w", qmp.ErrNoFDPassing)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("load memory state: %w", err)
	}
	err = passer.PassFD(ctx, fdName, f)
	_ = f.Close()
	if err != nil {
		return fmt.Errorf("load memory state: pass %s to qemu: %w", path, err)
	}
	if err := qmp.MigrateIncoming(ctx, mon, "fd:"+fdName); err != nil {
		_ = mon.Execute(context.WithoutCancel(ctx), "closefd", map[string]string{"fdname": fdName}, nil)
		return fmt.Errorf("load memory state: %w", err)
	}
	// A revert waits on this, so it is polled more often than a save.
	if err := follow(ctx, mon, pollEvery/5, func(qmp.MigrationStatus) {}); err != nil {
		return fmt.Errorf("load memory state from %s: %w", path, err)
	}
	return nil
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// reserveFile creates path with room bytes set aside past its end, or
// at least least bytes if the disk lacks room, and returns how much it
// set aside. direct is false, with the file removed, where the filesystem
// cannot reserve space; a disk without the room fails with ENOSPC.
func reserveFile(path string, room, least int64) (f *os.File, direct bool, got int64, err error) {
	f, err = os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, false, 0, err
	}
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = unix.EOPNOTSUPP
	}
	// The least first, then the rest: a failed attempt at the whole
	// would hold, until it gave up, room that another writer (or the
	// smaller attempt) then could not have.
	got = least
	if err == nil && least > 0 {
		err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, 0, least)
	}
	if err == nil && room > least {
		if unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, least, room-least) == nil {
			got = room
		}
	}
	switch {
	case err == nil:
		return f, true, got, nil
	case errors.Is(err, unix.ENOSPC):
		_ = f.Close()
		return nil, false, 0, fmt.Errorf("reserve %d bytes for %s: %w", got, path, syscall.ENOSPC)
	}
	_ = f.Close()
	if fi != nil && fi.Mode().IsRegular() {
		_ = os.Remove(path)
	}
	return nil, false, 0, nil
}

// startWriter starts the writer process that drains a pipe into path and
// returns the pipe's write end for QEMU; written receives the writer's
// end.
func startWriter(ctx context.Context, path string, werr *bytes.Buffer, written chan<- error) (*os.File, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	// While QEMU waits on a full pipe it does not serve the guest's
	// faults on write-protected pages; a larger pipe keeps it writing.
	_, _ = unix.FcntlInt(pw.Fd(), unix.F_SETPIPE_SZ, pipeSize)
	// Not tied to ctx: killing the writer mid-stream is what must not
	// happen.
	writer := exec.CommandContext(context.WithoutCancel(ctx), "/bin/sh", "-c", writerScript, "lodge-memstate", path)
	writer.Stdin = pr
	writer.Stderr = werr
	writer.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = writer.Start()
	_ = pr.Close()
	if err != nil {
		_ = pw.Close()
		return nil, fmt.Errorf("start writer: %w", err)
	}
	go func() { written <- writer.Wait() }()
	return pw, nil
}

// flushChunk is how much a flusher writes back at a time.
const flushChunk = 8 << 20

// A flusher writes a growing file back to disk behind its writer, one
// chunk at a time: the final sync then has little left to do, yet little
// is ever in flight, since anything that syncs meanwhile (a disk switch
// while the guest is paused) waits behind what is.
type flusher struct {
	halt, done chan struct{}
	once       sync.Once
}

func startFlusher(path string) *flusher {
	fl := &flusher{halt: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(fl.done)
		f, err := os.Open(path)
		if err != nil {
			return
		}
		defer func() { _ = f.Close() }()
		var from int64
		for {
			fi, err := f.Stat()
			if err != nil {
				return
			}
			if fi.Size()-from < flushChunk {
				select {
				case <-fl.halt:
					return
				case <-time.After(pollEvery / 5):
				}
				continue
			}
			select {
			case <-fl.halt:
				return
			default:
			}
			if unix.SyncFileRange(int(f.Fd()), from, flushChunk, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER) != nil {
				return
			}
			from += flushChunk
		}
	}()
	return fl
}

// pause stops the flusher after its chunk in flight, without waiting.
func (fl *flusher) pause() { fl.once.Do(func() { close(fl.halt) }) }

// stop stops the flusher and waits for it.
func (fl *flusher) stop() {
	fl.pause()
	<-fl.done
}

// startWriteback asks the kernel to start writing out what the writer
// has put in path beyond from, without waiting, and returns how far that
// reaches. Failures only mean the final flush has more to do.
func startWriteback(path string, from int64) int64 {
	f, err := os.Open(path)
	if err != nil {
		return from
	}
	defer func() { _ = f.Close() }()
	fi, err := f.Stat()
	if err != nil || fi.Size() <= from {
		return from
	}
	if unix.SyncFileRange(int(f.Fd()), from, fi.Size()-from, unix.SYNC_FILE_RANGE_WRITE) != nil {
		return from
	}
	return fi.Size()
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}
