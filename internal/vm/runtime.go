package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/snapshot"
)

// instance is a running QEMU the service supervises.
type instance struct {
	name   string
	runDir string
	pid    int
	mon    qmp.Monitor
	done   chan struct{}

	stopping      atomic.Bool
	guestShutdown atomic.Bool
	agentOpen     atomic.Bool
	consoleBusy   atomic.Bool
	settling      atomic.Bool
	// snapshotting hides the short pause of a memory snapshot, which
	// QEMU reports as STOP and RESUME, from the VM's recorded state.
	snapshotting atomic.Bool
	// groupFrozen is set while FreezeAll holds the guest's filesystems
	// frozen: points taken meanwhile neither freeze nor thaw on their own.
	groupFrozen atomic.Bool
	// noVirtioMem is set once the guest is seen not to drive virtio-mem:
	// memory hot-plug then uses pc-dimms.
	noVirtioMem atomic.Bool
	// ioError is why QEMU paused the guest on a disk error, if it did.
	ioError atomic.Pointer[string]

	agentMu sync.Mutex
	agent   qga.Agent

	ipMu sync.Mutex
	ips  map[string]string // MAC -> first IPv4 the agent reported
}

func (in *instance) ip(mac string) string {
	in.ipMu.Lock()
	defer in.ipMu.Unlock()
	return in.ips[mac]
}

func (in *instance) agentUp() bool { return in.agentOpen.Load() }

// The agent's virtio-serial port id, whose open/close QEMU reports in
// VSERPORT_CHANGE events when the guest agent starts or stops.
const agentPortID = "qga0port"

func (s *Service) alive(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.instances[name] != nil
}

func (s *Service) instance(name string) *instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.instances[name]
}

// attach starts supervising a QEMU whose monitor is connected.
func (s *Service) attach(ctx context.Context, name string, pid int, mon qmp.Monitor) *instance {
	in := &instance{name: name, runDir: s.runDir(name), pid: pid, mon: mon, done: make(chan struct{})}
	events, cancel := mon.Subscribe()
	s.mu.Lock()
	s.instances[name] = in
	s.mu.Unlock()
	// The guest may have opened the agent port before we connected.
	s.syncAgentOpen(ctx, in)
	// Guest memory use for show comes from the balloon driver's reports.
	if err := qmp.EnableBalloonStats(ctx, mon, balloonStatsInterval); err != nil {
		s.log.Debug("balloon stats", "vm", name, "err", err)
	}
	go s.supervise(in, events, cancel)
	if in.agentUp() {
		go s.settleIdentity(in)
	}
	return in
}

// How often, in seconds, the guest's balloon driver reports memory use.
const balloonStatsInterval = 2

// syncAgentOpen asks QEMU whether the guest has the agent's port open.
func (s *Service) syncAgentOpen(ctx context.Context, in *instance) {
	var chardevs []struct {
		Label        string `json:"label"`
		FrontendOpen bool   `json:"frontend-open"`
	}
	if err := in.mon.Execute(ctx, "query-chardev", nil, &chardevs); err == nil {
		for _, c := range chardevs {
			if c.Label == "qga0" {
				in.agentOpen.Store(c.FrontendOpen)
			}
		}
	}
}

// supervise follows a QEMU until it exits, then records why.
func (s *Service) supervise(in *instance, events <-chan qmp.Event, cancel func()) {
	defer cancel()
	ctx := context.Background()
loop:
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				events = nil // closed with the connection; Done follows
				continue
			}
			s.onEvent(ctx, in, ev)
		case <-in.mon.Done():
			break loop
		}
	}
	s.mu.Lock()
	closing := s.instances[in.name] != in
	s.mu.Unlock()
	if closing {
		// The daemon is shutting down and let go of this VM on purpose;
		// QEMU keeps running and the next daemon re-attaches.
		close(in.done)
		return
	}
	// QMP goes away a moment before the process does.
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := s.cfg.Driver.PID(in.runDir); err != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := s.cfg.Driver.PID(in.runDir); err == nil {
		s.log.Warn("monitor lost but qemu still runs; killing it", "vm", in.name)
		_ = s.cfg.Driver.Kill(ctx, in.runDir, 5*time.Second)
	}
	s.closeAgent(in)
	for _, f := range []string{qemu.QMPSocket, qemu.QGASocket, qemu.ConsoleSocket, qemu.PIDFile} {
		_ = os.Remove(filepath.Join(in.runDir, f))
	}
	s.mu.Lock()
	delete(s.instances, in.name)
	s.mu.Unlock()
	switch {
	case in.stopping.Load():
		s.setState(ctx, in.name, api.StateStopped, "stopped by request")
	case in.guestShutdown.Load():
		s.setState(ctx, in.name, api.StateStopped, "the guest powered off")
	default:
		s.setState(ctx, in.name, api.StateError, "QEMU exited unexpectedly (killed or crashed); see lodge console --log")
	}
	s.log.Info("qemu exited", "vm", in.name, "pid", in.pid)
	close(in.done)
}

func (s *Service) onEvent(ctx context.Context, in *instance, ev qmp.Event) {
	s.log.Debug("qmp event", "vm", in.name, "event", ev.Name)
	switch ev.Name {
	case "SHUTDOWN":
		var d struct {
			Guest  bool   `json:"guest"`
			Reason string `json:"reason"`
		}
		_ = json.Unmarshal(ev.Data, &d)
		if d.Guest {
			in.guestShutdown.Store(true)
		}
		// QEMU runs with -no-shutdown so that a guest power-off while the
		// daemon is away stays visible; here we are, so let QEMU go.
		go func() {
			qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			_ = qmp.Quit(qctx, in.mon)
		}()
	case "BLOCK_IO_ERROR":
		// With QEMU's default werror=enospc a full pool pauses the guest
		// instead of failing its writes; nothing is lost, and the guest
		// continues from the same write once there is room again.
		var d struct {
			Device   string `json:"device"`
			NodeName string `json:"node-name"`
			Action   string `json:"action"`
			NoSpace  bool   `json:"nospace"`
			Reason   string `json:"reason"`
		}
		if json.Unmarshal(ev.Data, &d) == nil && d.Action == "stop" {
			why := "disk " + d.NodeName + ": " + d.Reason
			if d.NoSpace {
				why = "disk " + d.NodeName + ": no space left in its pool; free space, then lodge resume"
			}
			in.ioError.Store(&why)
			s.log.Warn("guest paused on a disk error", "vm", in.name, "reason", why)
		}
	case "STOP":
		if !in.guestShutdown.Load() && !in.stopping.Load() && !in.snapshotting.Load() {
			reason := ""
			if why := in.ioError.Load(); why != nil {
				reason = *why
			}
			s.setState(ctx, in.name, api.StatePaused, reason)
		}
	case "RESUME":
		if in.snapshotting.Load() {
			return
		}
		in.ioError.Store(nil)
		s.setState(ctx, in.name, api.StateRunning, "")
	case "VSERPORT_CHANGE":
		var d struct {
			ID   string `json:"id"`
			Open bool   `json:"open"`
		}
		if json.Unmarshal(ev.Data, &d) == nil && d.ID == agentPortID {
			in.agentOpen.Store(d.Open)
			if !d.Open {
				s.closeAgent(in)
			} else {
				go s.settleIdentity(in)
			}
			s.publish(in.name, "agent", "", map[bool]string{true: "guest agent connected", false: "guest agent disconnected"}[d.Open])
		}
	}
}

// Recover is run once at daemon start: it finishes or undoes interrupted
// changes and re-attaches to the VMs whose QEMU still runs.
func (s *Service) Recover(ctx context.Context) error {
	recs, err := s.all(ctx)
	if err != nil {
		return err
	}
	for _, r := range recs {
		switch r.Intent {
		case intentCreating:
			s.log.Warn("undoing interrupted create", "vm", r.Name)
			s.discard(ctx, r)
			continue
		case intentDeleting:
			s.log.Warn("finishing interrupted delete", "vm", r.Name)
			_ = s.cfg.Driver.Kill(ctx, s.runDir(r.Name), 5*time.Second)
			s.discard(ctx, r)
			continue
		case intentCloning:
			if err := s.recoverTops(ctx, r); err != nil {
				return err
			}
		}
		pausedBySnapshot, err := s.recoverSnapshots(ctx, r)
		if err != nil {
			return err
		}
		if r, err = s.load(ctx, r.Name); err != nil {
			return err
		}
		s.reattach(ctx, r)
		if pausedBySnapshot && r.State == api.StateRunning {
			s.resumeAfterSnapshot(ctx, r.Name)
		}
	}
	s.collectLayers(ctx)
	sweepSocketDirs(os.TempDir())
	// A generalize boot whose daemon died has no one to finish it; the
	// publish it served is undone by the image library.
	leftovers, _ := filepath.Glob(filepath.Join(s.cfg.Home, "run", ".generalize-*"))
	for _, dir := range leftovers {
		s.log.Warn("stopping an interrupted generalize boot", "run_dir", dir)
		_ = s.cfg.Driver.Kill(ctx, dir, 5*time.Second)
		s.removeAll(dir)
	}
	return nil
}

// resumeAfterSnapshot resumes a guest that a dead daemon left paused in
// the middle of a memory snapshot.
func (s *Service) resumeAfterSnapshot(ctx context.Context, name string) {
	in := s.instance(name)
	if in == nil {
		return
	}
	if err := snapshot.Settle(ctx, in.mon); err != nil {
		s.log.Error("end an interrupted memory save", "vm", name, "err", err)
	}
	// "postmigrate": a live save completed, and QEMU holds the guest
	// until it is resumed.
	if st, err := qmp.QueryStatus(ctx, in.mon); err == nil && (st.Status == "paused" || st.Status == "postmigrate" || st.Status == "finish-migrate") {
		s.log.Warn("resuming a guest paused by an interrupted snapshot", "vm", name)
		if err := qmp.Cont(ctx, in.mon); err != nil {
			s.log.Error("resume", "vm", name, "err", err)
		}
	}
}

func (s *Service) reattach(ctx context.Context, r record) {
	runDir := s.runDir(r.Name)
	pid, err := s.cfg.Driver.PID(runDir)
	if err != nil {
		if holdsMemory(r.State) {
			if r.State == api.StateStopping {
				s.setState(ctx, r.Name, api.StateStopped, "stopped while the daemon was not running")
			} else {
				s.setState(ctx, r.Name, api.StateError, "QEMU exited while the daemon was not running (killed or crashed)")
			}
		}
		return
	}
	mctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	mon, err := s.cfg.Driver.Monitor(mctx, runDir)
	if err != nil {
		s.log.Error("re-attach: qmp", "vm", r.Name, "pid", pid, "err", err)
		s.setState(ctx, r.Name, api.StateError, "QEMU runs (pid "+fmt.Sprint(pid)+") but its monitor does not answer: "+err.Error())
		return
	}
	st, err := qmp.QueryStatus(mctx, mon)
	if err != nil {
		_ = mon.Close()
		s.setState(ctx, r.Name, api.StateError, "re-attach: "+err.Error())
		return
	}
	in := s.attach(ctx, r.Name, pid, mon)
	s.log.Info("re-attached", "vm", r.Name, "pid", pid, "status", st.Status)
	switch st.Status {
	case "shutdown":
		// The guest powered off while we were away; finish the job.
		in.guestShutdown.Store(true)
		_ = qmp.Quit(mctx, mon)
	case "paused":
		s.markRunning(ctx, r.Name, pid, api.StatePaused)
	default:
		s.markRunning(ctx, r.Name, pid, api.StateRunning)
	}
}

func (s *Service) markRunning(ctx context.Context, name string, pid int, state string) {
	_, err := s.update(ctx, name, func(x *record) error {
		x.State, x.StateReason, x.PID, x.Wanted = state, "", pid, api.StateRunning
		if x.StartedAt == nil {
			now := time.Now().UTC()
			x.StartedAt = &now
		}
		return nil
	})
	if err != nil {
		s.log.Error("record state", "vm", name, "err", err)
		return
	}
	s.publish(name, "vm-state", state, "")
}

// Close lets go of every VM without stopping it.
func (s *Service) Close() {
	s.mu.Lock()
	ins := make([]*instance, 0, len(s.instances))
	for name, in := range s.instances {
		ins = append(ins, in)
		delete(s.instances, name)
	}
	s.mu.Unlock()
	for _, in := range ins {
		s.closeAgent(in)
		_ = in.mon.Close()
		<-in.done
	}
}

func (s *Service) closeAgent(in *instance) {
	in.agentMu.Lock()
	defer in.agentMu.Unlock()
	if in.agent != nil {
		_ = in.agent.Close()
		in.agent = nil
	}
}

// withAgent runs fn with the VM's agent, connecting (and waiting up to
// wait for the guest to start its agent) if needed. A transport failure
// drops the connection so the next call starts afresh.
func (s *Service) withAgent(ctx context.Context, name string, wait time.Duration, fn func(qga.Agent) error) error {
	in := s.instance(name)
	if in == nil {
		return fmt.Errorf("vm %q is not running: %w", name, errdefs.ErrState)
	}
	in.agentMu.Lock()
	defer in.agentMu.Unlock()
	if in.agent == nil {
		a, err := s.waitAgent(ctx, in.runDir, wait, in.done)
		if errors.Is(err, errdefs.ErrState) {
			return fmt.Errorf("vm %q stopped: %w", name, errdefs.ErrState)
		}
		if err != nil {
			return fmt.Errorf("vm %q: %w after %s (is qemu-guest-agent running in the guest?): %w", name, errdefs.ErrNoAgent, wait.Round(time.Second), err)
		}
		in.agent = a
	}
	err := fn(in.agent)
	var qerr *qga.Error
	if err != nil && !errors.As(err, &qerr) {
		_ = in.agent.Close()
		in.agent = nil
	}
	if errors.Is(err, qga.ErrUnresponsive) {
		// Callers tell "the agent did not answer" from "the command
		// failed" by this sentinel, whether the connection was new or not.
		err = fmt.Errorf("vm %q: %w: %w", name, errdefs.ErrNoAgent, err)
	}
	return err
}

// errWaitedOut is what waitFor returns when its limit passes first.
var errWaitedOut = errors.New("waited out")

// waitFor asks done every interval until it reports true or fails, the
// limit passes (errWaitedOut), ctx ends, or the VM's QEMU exits.
func waitFor(ctx context.Context, in *instance, every, limit time.Duration, done func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	for {
		ok, err := done()
		if err != nil || ok {
			return err
		}
		if time.Now().After(deadline) {
			return errWaitedOut
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-in.done:
			return fmt.Errorf("it stopped: %w", errdefs.ErrState)
		case <-time.After(every):
		}
	}
}
