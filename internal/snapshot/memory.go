package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/lodge-vm/lodge/internal/qmp"
)

// The monitor fd name under which QEMU gets the migration pipe.
const fdName = "lodge-memstate"

// How often a running save or load is polled for progress.
var pollEvery = 50 * time.Millisecond

// SaveStats describes one memory save.
type SaveStats struct {
	// Pause is how long the guest's CPUs were stopped, from Lodge's stop
	// to QEMU's resume, disk switch included.
	Pause time.Duration
	// Bytes is the size of the state file.
	Bytes int64
	// Elapsed is the whole save.
	Elapsed time.Duration
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
// The state goes through a pipe that Lodge reads, so the file is complete
// exactly when QEMU closes its end; it is written to path+".part" and
// renamed once synced. On any failure nothing is left at either name.
func Save(ctx context.Context, mon qmp.Monitor, path string, atPause func(context.Context) error, progress func(done, total int64)) (SaveStats, error) {
	var stats SaveStats
	passer, ok := mon.(qmp.FDPasser)
	if !ok {
		return stats, fmt.Errorf("save memory state: %w", qmp.ErrNoFDPassing)
	}
	start := time.Now()
	part := path + ".part"
	f, err := os.OpenFile(part, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return stats, fmt.Errorf("save memory state: %w", err)
	}
	fail := func(err error) (SaveStats, error) {
		_ = f.Close()
		_ = os.Remove(part)
		return stats, err
	}
	if err := qmp.SetMigrationCapabilities(ctx, mon, map[string]bool{"background-snapshot": true}); err != nil {
		return fail(fmt.Errorf("save memory state: enable background snapshot: %w", err))
	}
	// QEMU caps migration at 128 MiB/s by default; a local file takes
	// whatever the disk gives.
	if err := qmp.SetMigrationParameters(ctx, mon, map[string]any{"max-bandwidth": int64(1) << 40}); err != nil {
		return fail(fmt.Errorf("save memory state: %w", err))
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return fail(fmt.Errorf("save memory state: %w", err))
	}
	err = passer.PassFD(ctx, fdName, pw)
	_ = pw.Close() // QEMU holds its own copy now
	if err != nil {
		_ = pr.Close()
		return fail(fmt.Errorf("save memory state: pass pipe to qemu: %w", err))
	}
	var written atomic.Int64
	copied := make(chan error, 1)
	go func() {
		n, err := io.Copy(countWriter{f, &written}, pr)
		_ = pr.Close()
		if err == nil && n == 0 {
			err = errors.New("qemu wrote nothing")
		}
		copied <- err
	}()
	// From here on the reader goroutine owns pr. Before the migration
	// starts, a failure must make QEMU drop its end so the copy ends, and
	// resume a guest that Lodge paused.
	wasRunning, stopped := false, false
	abort := func(err error) (SaveStats, error) {
		bg := context.WithoutCancel(ctx)
		_ = mon.Execute(bg, "closefd", map[string]string{"fdname": fdName}, nil)
		if stopped {
			_ = qmp.Cont(bg, mon)
		}
		<-copied
		return fail(err)
	}
	st, err := qmp.QueryStatus(ctx, mon)
	if err != nil {
		return abort(fmt.Errorf("save memory state: %w", err))
	}
	wasRunning = st.Running
	paused := time.Now()
	if wasRunning {
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
	stats.Pause = waitRunning(ctx, mon, paused)
	if !wasRunning {
		_ = qmp.Stop(context.WithoutCancel(ctx), mon)
	}
	if err := follow(ctx, mon, func(ms qmp.MigrationStatus) {
		if progress != nil && ms.RAM != nil {
			progress(ms.RAM.Transferred, ms.RAM.Total)
		}
	}); err != nil {
		if ctx.Err() != nil {
			_ = qmp.MigrateCancel(context.WithoutCancel(ctx), mon)
			_ = waitMigration(context.WithoutCancel(ctx), mon)
		}
		<-copied
		return fail(fmt.Errorf("save memory state: %w", err))
	}
	if err := <-copied; err != nil {
		return fail(fmt.Errorf("save memory state: write %s: %w", part, err))
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("save memory state: sync %s: %w", part, err))
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(part)
		return stats, fmt.Errorf("save memory state: close %s: %w", part, err)
	}
	if err := os.Rename(part, path); err != nil {
		_ = os.Remove(part)
		return stats, fmt.Errorf("save memory state: %w", err)
	}
	syncDir(filepath.Dir(path))
	stats.Bytes, stats.Elapsed = written.Load(), time.Since(start)
	return stats, nil
}

// waitRunning waits (briefly) for QEMU to resume the guest after the
// state was taken, and returns how long it was paused.
func waitRunning(ctx context.Context, mon qmp.Monitor, since time.Time) time.Duration {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		st, err := qmp.QueryStatus(ctx, mon)
		if err != nil || st.Running {
			break
		}
		time.Sleep(time.Millisecond)
	}
	return time.Since(since)
}

// follow polls an outgoing migration until it ends.
func follow(ctx context.Context, mon qmp.Monitor, progress func(qmp.MigrationStatus)) error {
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
		case <-time.After(pollEvery):
		}
	}
}

// waitMigration waits for a cancelled migration to settle.
func waitMigration(ctx context.Context, mon qmp.Monitor) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	err := follow(ctx, mon, func(qmp.MigrationStatus) {})
	if err != nil && ctx.Err() != nil {
		return err
	}
	return nil
}

// Load feeds the state file at path into a QEMU started with -incoming
// defer and waits until QEMU has taken all of it. The guest is left
// paused; the caller resumes it.
func Load(ctx context.Context, mon qmp.Monitor, path string, progress func(done, total int64)) error {
	passer, ok := mon.(qmp.FDPasser)
	if !ok {
		return fmt.Errorf("load memory state: %w", qmp.ErrNoFDPassing)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("load memory state: %w", err)
	}
	defer func() { _ = f.Close() }()
	info, err := f.Stat()
	if err != nil {
		return fmt.Errorf("load memory state: %w", err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("load memory state: %w", err)
	}
	err = passer.PassFD(ctx, fdName, pr)
	_ = pr.Close()
	if err != nil {
		_ = pw.Close()
		return fmt.Errorf("load memory state: pass pipe to qemu: %w", err)
	}
	var read atomic.Int64
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(pw, countReader{f, &read})
		_ = pw.Close()
		copied <- err
	}()
	if err := qmp.MigrateIncoming(ctx, mon, "fd:"+fdName); err != nil {
		_ = mon.Execute(context.WithoutCancel(ctx), "closefd", map[string]string{"fdname": fdName}, nil)
		return fmt.Errorf("load memory state: %w", err)
	}
	for {
		ms, err := qmp.QueryMigrate(ctx, mon)
		if err != nil {
			return fmt.Errorf("load memory state: %w", err)
		}
		if progress != nil {
			progress(read.Load(), info.Size())
		}
		switch ms.Status {
		case "completed":
			if err := <-copied; err != nil {
				return fmt.Errorf("load memory state: read %s: %w", path, err)
			}
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("load memory state from %s: qemu: migration %s %s", path, ms.Status, ms.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("load memory state: %w", ctx.Err())
		case <-time.After(pollEvery / 5):
		}
	}
}

type countWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

type countReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}
