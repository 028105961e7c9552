package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qmp"
)

// ErrNotRunning means no live QEMU belongs to the run directory.
var ErrNotRunning = errors.New("qemu is not running")

// Driver is the seam between the VM service and the hypervisor.
type Driver interface {
	// Launch starts QEMU detached from the caller and returns once QEMU
	// has initialised (its QMP socket exists).
	Launch(ctx context.Context, m Machine) (pid int, err error)
	// Monitor connects to a running VM's QMP socket.
	Monitor(ctx context.Context, runDir string) (qmp.Monitor, error)
	// Agent connects to a running VM's guest agent.
	Agent(ctx context.Context, runDir string) (qga.Agent, error)
	// PID returns the VM's QEMU pid if that process is alive and is the
	// QEMU of this run directory (pids get reused).
	PID(runDir string) (int, error)
	// Kill ends QEMU: SIGTERM, then SIGKILL after grace.
	Kill(ctx context.Context, runDir string, grace time.Duration) error
}

// QEMU is the real driver.
type QEMU struct {
	Binary string
	Log    *slog.Logger

	versionOnce sync.Once
	version     string
	versionErr  error
}

var _ Driver = (*QEMU)(nil)

// New returns a driver for the given qemu-system binary.
func New(binary string, log *slog.Logger) *QEMU {
	if binary == "" {
		binary = "qemu-system-x86_64"
	}
	if log == nil {
		log = slog.Default()
	}
	return &QEMU{Binary: binary, Log: log.With("component", "qemu")}
}

// Launch runs QEMU with -daemonize: the parent returns after the child
// has set everything up, so configuration errors come back here with
// QEMU's own message, while the running VM lives in its own session.
func (q *QEMU) Launch(ctx context.Context, m Machine) (int, error) {
	args, err := m.Args()
	if err != nil {
		return 0, err
	}
	if err := os.MkdirAll(m.RunDir, 0o700); err != nil {
		return 0, fmt.Errorf("launch vm %q: %w", m.Name, err)
	}
	for _, f := range []string{QMPSocket, QGASocket, ConsoleSocket, PIDFile} {
		_ = os.Remove(m.Path(f))
	}
	cmd := exec.CommandContext(ctx, q.Binary, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.ExtraFiles = m.Files()
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	q.Log.Debug("launch", "vm", m.Name, "args", strings.Join(args, " "))
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		msg = strings.TrimPrefix(msg, q.Binary+": ")
		if msg == "" {
			msg = err.Error()
		}
		return 0, fmt.Errorf("launch vm %q: qemu: %s", m.Name, firstLine(msg))
	}
	pid, err := q.PID(m.RunDir)
	if err != nil {
		return 0, fmt.Errorf("launch vm %q: qemu started but %w", m.Name, err)
	}
	return pid, nil
}

// Version is the first line of `qemu-system-x86_64 --version`. It is asked
// once: both host info and the accelerator cache key need it.
func (q *QEMU) Version(ctx context.Context) (string, error) {
	q.versionOnce.Do(func() {
		out, err := exec.CommandContext(ctx, q.Binary, "--version").Output()
		if err != nil {
			q.versionErr = fmt.Errorf("%s --version: %w", q.Binary, err)
			return
		}
		q.version = firstLine(strings.TrimSpace(string(out)))
	})
	return q.version, q.versionErr
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// PID reads the pidfile and checks that the process is this VM's QEMU.
func (q *QEMU) PID(runDir string) (int, error) {
	raw, err := os.ReadFile(filepath.Join(runDir, PIDFile))
	if err != nil {
		return 0, fmt.Errorf("%w: no pidfile in %s", ErrNotRunning, runDir)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || pid <= 1 {
		return 0, fmt.Errorf("%w: bad pidfile in %s", ErrNotRunning, runDir)
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return 0, fmt.Errorf("%w: pid %d is gone", ErrNotRunning, pid)
	}
	// The QMP socket path is unique to this VM, so it tells our QEMU from
	// an unrelated process that inherited the pid.
	if !bytes.Contains(cmdline, []byte(filepath.Join(runDir, QMPSocket))) {
		return 0, fmt.Errorf("%w: pid %d belongs to another process", ErrNotRunning, pid)
	}
	if isZombie(pid) {
		return 0, fmt.Errorf("%w: pid %d has exited", ErrNotRunning, pid)
	}
	return pid, nil
}

func isZombie(pid int) bool {
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return true
	}
	// The state follows the command name in parentheses, which may itself
	// contain spaces or parentheses.
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z' || s[i+2] == 'X'
}

// Monitor dials the VM's QMP socket.
func (q *QEMU) Monitor(ctx context.Context, runDir string) (qmp.Monitor, error) {
	return qmp.Dial(ctx, filepath.Join(runDir, QMPSocket), qmp.WithLogger(q.Log))
}

// Agent dials the VM's guest agent socket and synchronises with it.
func (q *QEMU) Agent(ctx context.Context, runDir string) (qga.Agent, error) {
	return qga.Dial(ctx, filepath.Join(runDir, QGASocket))
}

// Kill stops QEMU with SIGTERM (QEMU then closes its images cleanly) and
// SIGKILL if it is still there after grace.
func (q *QEMU) Kill(ctx context.Context, runDir string, grace time.Duration) error {
	pid, err := q.PID(runDir)
	if errors.Is(err, ErrNotRunning) {
		return nil // nothing left to kill
	}
	if err != nil {
		return err
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	if waitGone(ctx, q, runDir, grace) {
		return nil
	}
	q.Log.Warn("qemu ignored SIGTERM; killing", "pid", pid, "run_dir", runDir)
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if waitGone(ctx, q, runDir, 5*time.Second) {
		return nil
	}
	return fmt.Errorf("kill qemu pid %d: still running", pid)
}

func waitGone(ctx context.Context, q *QEMU, runDir string, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := q.PID(runDir); err != nil {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
	return false
}
