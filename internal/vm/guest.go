package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qga"
)

// Exec runs a command in the guest through the agent and returns what it
// printed and its exit code.
func (s *Service) Exec(ctx context.Context, name string, req api.ExecRequest) (api.ExecResult, error) {
	if len(req.Command) == 0 || req.Command[0] == "" {
		return api.ExecResult{}, fmt.Errorf("exec in vm %q: %w: no command given", name, errdefs.ErrInvalid)
	}
	r, err := s.load(ctx, name)
	if err != nil {
		return api.ExecResult{}, err
	}
	if req.TimeoutSeconds > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(req.TimeoutSeconds)*time.Second)
		defer cancel()
	}
	if r.IdentityPending {
		s.waitIdentity(ctx, name, time.Duration(req.WaitSeconds)*time.Second)
	}
	var res qga.ExecResult
	run := func() error {
		return s.withAgent(ctx, name, time.Duration(req.WaitSeconds)*time.Second, func(a qga.Agent) error {
			var err error
			res, err = a.Exec(ctx, qga.ExecRequest{Path: req.Command[0], Args: req.Command[1:], Env: req.Env, Stdin: req.Stdin})
			return err
		})
	}
	err = run()
	// A backup or snapshot may have the guest's filesystems frozen for an
	// instant; the agent then refuses to start anything. Nothing ran, so
	// trying again once they are thawed is safe.
	for deadline := time.Now().Add(freezeTimeout + 5*time.Second); frozen(err) && time.Now().Before(deadline); err = run() {
		select {
		case <-ctx.Done():
			return api.ExecResult{}, fmt.Errorf("exec %q in vm %q: %w", req.Command[0], name, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err != nil {
		var qerr *qga.Error
		if errors.As(err, &qerr) {
			return api.ExecResult{}, fmt.Errorf("exec %q in vm %q: %w: %s", req.Command[0], name, errdefs.ErrInvalid, qerr.Desc)
		}
		return api.ExecResult{}, fmt.Errorf("exec %q in vm %q: %w", req.Command[0], name, err)
	}
	return api.ExecResult{ExitCode: res.ExitCode, Signal: res.Signal, Stdout: res.Stdout, Stderr: res.Stderr}, nil
}

// ConsoleLog returns what the guest has printed on its serial console
// since it last booted.
func (s *Service) ConsoleLog(ctx context.Context, name string) ([]byte, error) {
	if _, err := s.load(ctx, name); err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(filepath.Join(s.runDir(name), qemu.SerialLog))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return raw, err
}

// Console connects to the VM's serial console. QEMU serves one client at
// a time, so a second session is refused rather than left hanging. The
// returned release must be called when the session ends.
func (s *Service) Console(ctx context.Context, name string) (net.Conn, func(), error) {
	r, err := s.load(ctx, name)
	if err != nil {
		return nil, nil, err
	}
	in := s.instance(name)
	if in == nil {
		return nil, nil, fmt.Errorf("vm %q is %s: %w", name, r.State, errdefs.ErrState)
	}
	if !in.consoleBusy.CompareAndSwap(false, true) {
		return nil, nil, fmt.Errorf("console of vm %q: %w: another session is attached", name, errdefs.ErrBusy)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", filepath.Join(in.runDir, qemu.ConsoleSocket))
	if err != nil {
		in.consoleBusy.Store(false)
		return nil, nil, fmt.Errorf("console of vm %q: %w", name, err)
	}
	return conn, func() { _ = conn.Close(); in.consoleBusy.Store(false) }, nil
}

// frozen says whether the agent refused a command because the guest's
// filesystems are frozen.
func frozen(err error) bool {
	var qerr *qga.Error
	return errors.As(err, &qerr) && strings.Contains(qerr.Desc, "frozen state")
}

// WriteGuestFile writes data to path in the guest through the agent.
func (s *Service) WriteGuestFile(ctx context.Context, name, path string, data []byte) error {
	// A VM started a moment ago may take a few minutes under TCG on a
	// busy host to bring its agent up.
	err := s.withAgent(ctx, name, 3*time.Minute, func(a qga.Agent) error { return a.FileWrite(ctx, path, data) })
	if err != nil {
		return fmt.Errorf("write %s in vm %q: %w", path, name, err)
	}
	return nil
}
