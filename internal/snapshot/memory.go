package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	// Pause is how long the guest's CPUs were stopped, from Lodge's stop
	// to QEMU's resume, disk switch included.
	Pause time.Duration
	// Bytes is the size of the state file.
	Bytes int64
	// Elapsed is the whole save, of which Sync is the flush to disk.
	Elapsed, Sync time.Duration
}

// Save writes the guest's memory and device state to path while the guest
// keeps running. It uses QEMU's background-snapshot migration: QEMU
// write-protects guest memory (userfaultfd) and saves each page before
// the guest first changes it, so the file holds the memory as it was at
// the start, and the guest pauses only while the device state is taken.
//
// atPause runs while the guest's CPUs are stopped, just before the state
// is taken: whatever it does to the disks (switching them to new tops)
// happens at the same instant as the memory state. A guest that was
// paused stays paused.
//
// QEMU 7.2 hangs the guest if a background snapshot fails half-way, so
// the stream must never meet a full disk. Save reserves reserve bytes for
// the file first (fallocate) and hands QEMU the file itself: a disk too
// full for that is refused before anything starts, and nothing can take
// the room while QEMU writes. Where the filesystem cannot reserve space,
// the stream goes through a pipe to a writer process instead, which
// drains it to the end whatever happens (see writerScript). Either way
// the file is written to path+".part" and renamed once synced; on any
// failure nothing is left at either name. Once QEMU has started, the save
// is not cancelled: it runs to its end (a second or so), and a cancelled
// ctx then discards the result.
func Save(ctx context.Context, mon qmp.Monitor, path string, reserve int64, atPause func(context.Context) error, progress func(done, total int64)) (SaveStats, error) {
	var stats SaveStats
	passer, ok := mon.(qmp.FDPasser)
	if !ok {
		return stats, fmt.Errorf("save memory state: %w", qmp.ErrNoFDPassing)
	}
	start := time.Now()
	part := path + ".part"
	if err := waitIdle(ctx, mon); err != nil {
		return stats, fmt.Errorf("save memory state: %w", err)
	}
	if err := qmp.SetMigrationCapabilities(ctx, mon, map[string]bool{"background-snapshot": true}); err != nil {
		return stats, fmt.Errorf("save memory state: enable background snapshot: %w", err)
	}
	// QEMU caps migration at 128 MiB/s by default; a local file takes
	// whatever the disk gives.
	if err := qmp.SetMigrationParameters(ctx, mon, map[string]any{"max-bandwidth": int64(1) << 40}); err != nil {
		return stats, fmt.Errorf("save memory state: %w", err)
	}
	var werr bytes.Buffer
	written := make(chan error, 1)
	pw, direct, err := reserveFile(part, reserve)
	switch {
	case err != nil:
		_ = os.Remove(part)
		return stats, fmt.Errorf("save memory state: %w", err)
	case direct:
		written <- nil // QEMU writes the file itself
	default:
		if pw, err = startWriter(ctx, part, &werr, written); err != nil {
			return stats, fmt.Errorf("save memory state: %w", err)
		}
	}
	fail := func(err error) (SaveStats, error) {
		_ = os.Remove(part)
		return stats, err
	}
	err = passer.PassFD(ctx, fdName, pw)
	_ = pw.Close() // QEMU holds its own copy now
	if err != nil {
		<-written
		return fail(fmt.Errorf("save memory state: pass pipe to qemu: %w", err))
	}
	// Until the migration starts, a failure must make QEMU drop its end of
	// the pipe, so the writer ends, and resume a guest Lodge paused.
	stopped := false
	abort := func(err error) (SaveStats, error) {
		bg := context.WithoutCancel(ctx)
		_ = mon.Execute(bg, "closefd", map[string]string{"fdname": fdName}, nil)
		if stopped {
			_ = qmp.Cont(bg, mon)
		}
		<-written
		return fail(err)
	}
	st, err := qmp.QueryStatus(ctx, mon)
	if err != nil {
		return abort(fmt.Errorf("save memory state: %w", err))
	}
	paused := time.Now()
	if st.Running {
		if err := qmp.Stop(ctx, mon); err != nil {
			return abort(fmt.Errorf("save memory state: pause guest: %w", err))
		}
		stopped = true
	}
	if err := atPause(ctx); err != nil {
		return abort(err)
	}
	if err := qmp.Migrate(ctx, mon, "fd:"+fdName); err != nil {
		return abort(fmt.Errorf("save memory state: start: %w", err))
	}
	// QEMU resumes the guest itself once write tracking is on, whatever
	// its state before: wait for that, and pause again a guest the user
	// had paused.
	bg := context.WithoutCancel(ctx)
	stats.Pause = waitRunning(bg, mon, paused)
	if !st.Running {
		_ = qmp.Stop(bg, mon)
	}
	// Writeback starts while the state streams in, so that the flush at
	// the end waits only for the last of it.
	var flushed int64
	ferr := follow(bg, mon, pollEvery, func(ms qmp.MigrationStatus) {
		flushed = startWriteback(part, flushed)
		if progress != nil && ms.RAM != nil {
			progress(ms.RAM.Transferred, ms.RAM.Total)
		}
	})
	wErr := <-written
	switch {
	case ferr != nil:
		return fail(fmt.Errorf("save memory state: %w", ferr))
	case wErr != nil:
		msg := strings.TrimSpace(werr.String())
		if msg == "" {
			msg = wErr.Error()
		}
		err := fmt.Errorf("save memory state: write %s: %s", part, msg)
		if strings.Contains(msg, "No space left") {
			err = fmt.Errorf("%w: %w", err, syscall.ENOSPC)
		}
		return fail(err)
	case ctx.Err() != nil:
		return fail(fmt.Errorf("save memory state: %w", ctx.Err()))
	}
	synced := time.Now()
	if direct {
		releaseTail(part, reserve)
	}
	if err := syncFile(part); err != nil {
		return fail(fmt.Errorf("save memory state: %w", err))
	}
	stats.Sync = time.Since(synced)
	if err := os.Rename(part, path); err != nil {
		return fail(fmt.Errorf("save memory state: %w", err))
	}
	syncDir(filepath.Dir(path))
	if fi, err := os.Stat(path); err == nil {
		stats.Bytes = fi.Size()
	}
	stats.Elapsed = time.Since(start)
	return stats, nil
}

// idleWait bounds how long Save waits for an earlier save to end.
var idleWait = 2 * time.Minute

// waitIdle waits for a migration still running in QEMU, such as a save
// whose daemon died, to end: QEMU runs one at a time.
func waitIdle(ctx context.Context, mon qmp.Monitor) error {
	deadline := time.Now().Add(idleWait)
	for {
		ms, err := qmp.QueryMigrate(ctx, mon)
		if err != nil {
			return err
		}
		switch ms.Status {
		case "", "none", "completed", "failed", "cancelled":
			return nil
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

// waitRunning waits (briefly) for QEMU to resume the guest after the
// state was taken, and returns how long it was paused.
func waitRunning(ctx context.Context, mon qmp.Monitor, since time.Time) time.Duration {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		st, err := qmp.QueryStatus(ctx, mon)
		if err != nil || st.Running {
			break
		}
		time.Sleep(time.Millisecond)
	}
	return time.Since(since)
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

// reserveFile creates path with reserve bytes set aside past its end.
// direct is false, with the file removed, where the filesystem cannot
// reserve space; a disk without the room fails with ENOSPC.
func reserveFile(path string, reserve int64) (f *os.File, direct bool, err error) {
	f, err = os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, false, err
	}
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = unix.EOPNOTSUPP
	}
	if err == nil && reserve > 0 {
		err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, 0, reserve)
	}
	switch {
	case err == nil:
		return f, true, nil
	case errors.Is(err, unix.ENOSPC):
		_ = f.Close()
		return nil, false, fmt.Errorf("reserve %d bytes for %s: %w", reserve, path, syscall.ENOSPC)
	}
	_ = f.Close()
	if fi != nil && fi.Mode().IsRegular() {
		_ = os.Remove(path)
	}
	return nil, false, nil
}

// releaseTail gives back what reserveFile set aside beyond what QEMU
// wrote.
func releaseTail(path string, reserve int64) {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return
	}
	defer func() { _ = f.Close() }()
	// Filesystems free the blocks past the end when a file shrinks (a
	// hole punched past the end is ignored by ext4), so grow it by a byte
	// and shrink it back.
	if fi, err := f.Stat(); err == nil && fi.Size() < reserve {
		if f.Truncate(fi.Size()+1) == nil {
			_ = f.Truncate(fi.Size())
		}
	}
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
