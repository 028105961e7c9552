package qmptest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/lodge-vm/lodge/internal/qmp"
)

// Call is one command a Monitor received.
type Call struct {
	Command string
	Args    json.RawMessage // nil if the command had no arguments
}

// MonitorHandler answers one command on a Monitor. Its first result is
// marshaled and decoded into the caller's result, as it would be over
// the wire; a non-nil error is returned to the caller wrapped the way
// qmp.Client wraps errors (return a *qmp.Error for a QEMU refusal).
type MonitorHandler func(args json.RawMessage) (any, error)

// Monitor is an in-memory qmp.Monitor. Out of the box it models the
// commands Lodge uses on a running VM:
//
//   - query-status reports the current run state (initially "running");
//   - stop and cont change it and emit STOP and RESUME;
//   - system_powerdown emits POWERDOWN (what the guest makes of it is up
//     to the test: Emit SHUTDOWN to model a guest that obeys);
//   - system_reset emits RESET;
//   - getfd (through PassFD) keeps a copy of the file, and closefd
//     closes it;
//   - quit emits SHUTDOWN and then ends the connection, like QEMU
//     exiting.
//
// Handle replaces any of these or adds others; any other command fails
// with CommandNotFound. Calls records every command.
type Monitor struct {
	mu       sync.Mutex
	handlers map[string]MonitorHandler
	calls    []Call
	status   string
	subs     map[chan qmp.Event]struct{}
	events   chan qmp.Event // backs Events(); made on first use
	done     chan struct{}
	closed   bool
	fds      map[string]*os.File
}

var (
	_ qmp.Monitor  = (*Monitor)(nil)
	_ qmp.FDPasser = (*Monitor)(nil)
)

// NewMonitor returns a Monitor of a running VM.
func NewMonitor() *Monitor {
	m := &Monitor{
		handlers: make(map[string]MonitorHandler),
		status:   "running",
		subs:     make(map[chan qmp.Event]struct{}),
		done:     make(chan struct{}),
	}
	m.handlers["qmp_capabilities"] = func(json.RawMessage) (any, error) { return nil, nil }
	m.handlers["getfd"] = func(json.RawMessage) (any, error) { return nil, nil }
	m.handlers["closefd"] = func(raw json.RawMessage) (any, error) {
		var a struct {
			FDName string `json:"fdname"`
		}
		_ = json.Unmarshal(raw, &a)
		m.mu.Lock()
		f := m.fds[a.FDName]
		delete(m.fds, a.FDName)
		m.mu.Unlock()
		if f == nil {
			return nil, &qmp.Error{Class: qmp.ClassGenericError, Desc: "File descriptor named '" + a.FDName + "' not found"}
		}
		return nil, f.Close()
	}
	m.handlers["query-status"] = func(json.RawMessage) (any, error) {
		st := m.Status()
		return qmp.Status{Status: st, Running: st == "running"}, nil
	}
	m.handlers["stop"] = func(json.RawMessage) (any, error) {
		m.SetStatus("paused")
		m.Emit("STOP", nil)
		return nil, nil
	}
	m.handlers["cont"] = func(json.RawMessage) (any, error) {
		m.SetStatus("running")
		m.Emit("RESUME", nil)
		return nil, nil
	}
	m.handlers["system_powerdown"] = func(json.RawMessage) (any, error) {
		m.Emit("POWERDOWN", nil)
		return nil, nil
	}
	m.handlers["system_reset"] = func(json.RawMessage) (any, error) {
		m.Emit("RESET", map[string]any{"guest": false, "reason": "host-qmp-system-reset"})
		return nil, nil
	}
	m.handlers["quit"] = func(json.RawMessage) (any, error) {
		m.Emit("SHUTDOWN", map[string]any{"guest": false, "reason": "host-qmp-quit"})
		_ = m.Close()
		return nil, nil
	}
	return m
}

// Handle sets the handler for cmd, replacing any built-in one.
func (m *Monitor) Handle(cmd string, fn MonitorHandler) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.handlers[cmd] = fn
}

// Status is the run state query-status reports.
func (m *Monitor) Status() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.status
}

// SetStatus sets the run state query-status reports ("running",
// "paused", "shutdown", ...) without emitting anything.
func (m *Monitor) SetStatus(status string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.status = status
}

// Calls returns every command executed so far, in order, including
// those that failed.
func (m *Monitor) Calls() []Call {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Call(nil), m.calls...)
}

// Commands returns the names of the commands executed so far.
func (m *Monitor) Commands() []string {
	calls := m.Calls()
	out := make([]string, len(calls))
	for i, c := range calls {
		out[i] = c.Command
	}
	return out
}

// Execute implements qmp.Monitor.
func (m *Monitor) Execute(ctx context.Context, cmd string, args any, result any) error {
	var rawArgs json.RawMessage
	if args != nil {
		raw, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("qmp %s: encode arguments: %w", cmd, err)
		}
		rawArgs = raw
	}
	m.mu.Lock()
	m.calls = append(m.calls, Call{Command: cmd, Args: rawArgs})
	closed, fn := m.closed, m.handlers[cmd]
	m.mu.Unlock()
	if closed {
		return fmt.Errorf("qmp %s: %w", cmd, qmp.ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}

	if fn == nil {
		return fmt.Errorf("qmp %s: %w", cmd, &qmp.Error{Class: qmp.ClassCommandNotFound, Desc: "The command " + cmd + " has not been found"})
	}
	// Called without the lock held so that handlers may Emit, Close or
	// call SetStatus.
	ret, err := fn(rawArgs)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	if result == nil {
		return nil
	}
	if ret == nil {
		ret = struct{}{}
	}
	raw, err := json.Marshal(ret)
	if err != nil {
		return fmt.Errorf("qmp %s: encode fake reply: %w", cmd, err)
	}
	if err := json.Unmarshal(raw, result); err != nil {
		return fmt.Errorf("qmp %s: decode reply: %w", cmd, err)
	}
	return nil
}

// PassFD implements qmp.FDPasser. It runs as the command "getfd" (so a
// handler may refuse it) and keeps f under name for FD.
func (m *Monitor) PassFD(ctx context.Context, name string, f *os.File) error {
	if err := m.Execute(ctx, "getfd", map[string]string{"fdname": name}, nil); err != nil {
		return err
	}
	// QEMU gets its own descriptor; the caller may close its copy.
	fd, err := syscall.Dup(int(f.Fd()))
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fds == nil {
		m.fds = map[string]*os.File{}
	}
	m.fds[name] = os.NewFile(uintptr(fd), name)
	return nil
}

// FD returns QEMU's copy of the file last passed under name, or nil.
func (m *Monitor) FD(name string) *os.File {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.fds[name]
}

// Emit sends an event to every subscriber. Like qmp.Client it never
// blocks: a full subscriber loses its oldest event.
func (m *Monitor) Emit(name string, data any) {
	var raw json.RawMessage
	if data != nil {
		var err error
		if raw, err = json.Marshal(data); err != nil {
			panic(fmt.Sprintf("qmptest: encode event %s: %v", name, err))
		}
	}
	ev := qmp.Event{Name: name, Data: raw, Time: time.Now()}
	m.mu.Lock()
	defer m.mu.Unlock()
	for ch := range m.subs {
		select {
		case ch <- ev:
			continue
		default:
		}
		select {
		case <-ch:
		default:
		}
		select {
		case ch <- ev:
		default:
		}
	}
}

func (m *Monitor) subscribeLocked() chan qmp.Event {
	ch := make(chan qmp.Event, qmp.DefaultEventBuffer)
	if m.closed {
		close(ch)
	} else {
		m.subs[ch] = struct{}{}
	}
	return ch
}

// Subscribe implements qmp.Monitor.
func (m *Monitor) Subscribe() (<-chan qmp.Event, func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ch := m.subscribeLocked()
	return ch, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if _, ok := m.subs[ch]; ok {
			delete(m.subs, ch)
			close(ch)
		}
	}
}

// Events implements qmp.Monitor.
func (m *Monitor) Events() <-chan qmp.Event {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.events == nil {
		m.events = m.subscribeLocked()
	}
	return m.events
}

// Done implements qmp.Monitor.
func (m *Monitor) Done() <-chan struct{} { return m.done }

// Close implements qmp.Monitor; it also models QEMU going away, so a
// test can call it to simulate a crash. It is safe to call twice.
func (m *Monitor) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	for ch := range m.subs {
		close(ch)
		delete(m.subs, ch)
	}
	close(m.done)
	return nil
}
