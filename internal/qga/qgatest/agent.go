package qgatest

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"github.com/lodge-vm/lodge/internal/qga"
)

// Agent is an in-memory qga.Agent with a small fake guest behind it: a
// filesystem, freeze state, host name and interfaces. Exec runs the
// function set with SetExec (by default: exit 0, stdin echoed to
// stdout). SetError makes a method fail; Calls records every method
// called. After Close, every method fails with qga.ErrClosed.
type Agent struct {
	mu        sync.Mutex
	files     map[string][]byte
	frozen    bool
	fsCount   int
	hostName  string
	osInfo    qga.OSInfo
	ifaces    []qga.Interface
	version   string
	exec      func(ctx context.Context, req qga.ExecRequest) (qga.ExecResult, error)
	errs      map[string]error
	calls     []string
	shutdowns []string
	closed    bool
	vcpus     []qga.VCPU
}

var _ qga.Agent = (*Agent)(nil)

// NewAgent returns an Agent of a running guest.
func NewAgent() *Agent {
	return &Agent{
		files:    make(map[string][]byte),
		fsCount:  2,
		hostName: "guest",
		version:  "7.2.22",
		ifaces: []qga.Interface{{Name: "eth0", HardwareAddress: "52:54:00:12:34:56",
			IPAddresses: []qga.IPAddress{{Type: "ipv4", Address: "10.0.2.15", Prefix: 24}}}},
		exec: func(_ context.Context, req qga.ExecRequest) (qga.ExecResult, error) {
			return qga.ExecResult{Stdout: slices.Clone(req.Stdin)}, nil
		},
		errs: make(map[string]error),
	}
}

// SetExec sets what Exec does.
func (a *Agent) SetExec(fn func(ctx context.Context, req qga.ExecRequest) (qga.ExecResult, error)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.exec = fn
}

// SetError makes the named method ("Exec", "Ping", ...) return err
// until it is reset with a nil err. Return a *qga.Error to model the
// agent refusing, or wrap qga.ErrUnresponsive to model it not answering.
func (a *Agent) SetError(method string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err == nil {
		delete(a.errs, method)
		return
	}
	a.errs[method] = err
}

// SetHostName sets what HostName returns.
func (a *Agent) SetHostName(name string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.hostName = name
}

// SetInterfaces sets what NetworkInterfaces returns.
func (a *Agent) SetInterfaces(ifaces []qga.Interface) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ifaces = ifaces
}

// PutFile stores a file in the fake guest.
func (a *Agent) PutFile(path string, data []byte) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.files[path] = slices.Clone(data)
}

// File returns a file from the fake guest.
func (a *Agent) File(path string) ([]byte, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	data, ok := a.files[path]
	return slices.Clone(data), ok
}

// Frozen reports whether the fake guest's filesystems are frozen.
func (a *Agent) Frozen() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.frozen
}

// Shutdowns returns the modes of the Shutdown calls that succeeded.
func (a *Agent) Shutdowns() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.shutdowns)
}

// Calls returns the names of the methods called so far, in order.
func (a *Agent) Calls() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.calls)
}

// beginLocked records a call and reports the error it must fail with,
// if any. The caller holds a.mu.
func (a *Agent) beginLocked(ctx context.Context, method string) error {
	a.calls = append(a.calls, method)
	if a.closed {
		return fmt.Errorf("qga %s: %w", method, qga.ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("qga %s: %w", method, err)
	}
	if err := a.errs[method]; err != nil {
		return fmt.Errorf("qga %s: %w", method, err)
	}
	return nil
}

func (a *Agent) frozenError(method string) error {
	return fmt.Errorf("qga %s: %w", method, &qga.Error{Class: "CommandNotFound", Desc: "Command has been disabled: the filesystems are frozen"})
}

// Ping implements qga.Agent.
func (a *Agent) Ping(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.beginLocked(ctx, "Ping")
}

// Exec implements qga.Agent. The exec function runs without the lock
// held, so it may block on ctx.
func (a *Agent) Exec(ctx context.Context, req qga.ExecRequest) (qga.ExecResult, error) {
	a.mu.Lock()
	err := a.beginLocked(ctx, "Exec")
	frozen, fn := a.frozen, a.exec
	a.mu.Unlock()
	if err != nil {
		return qga.ExecResult{}, err
	}
	if frozen {
		return qga.ExecResult{}, a.frozenError("Exec")
	}
	return fn(ctx, req)
}

// FileWrite implements qga.Agent.
func (a *Agent) FileWrite(ctx context.Context, path string, data []byte) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "FileWrite"); err != nil {
		return err
	}
	if a.frozen {
		return a.frozenError("FileWrite")
	}
	a.files[path] = slices.Clone(data)
	return nil
}

// FileRead implements qga.Agent.
func (a *Agent) FileRead(ctx context.Context, path string) ([]byte, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "FileRead"); err != nil {
		return nil, err
	}
	if a.frozen {
		return nil, a.frozenError("FileRead")
	}
	data, ok := a.files[path]
	if !ok {
		return nil, fmt.Errorf("qga read %s: %w", path, &qga.Error{Class: "GenericError", Desc: "failed to open file '" + path + "' (mode: 'r'): No such file or directory"})
	}
	return slices.Clone(data), nil
}

// FSFreeze implements qga.Agent.
func (a *Agent) FSFreeze(ctx context.Context) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "FSFreeze"); err != nil {
		return 0, err
	}
	if a.frozen {
		return 0, a.frozenError("FSFreeze")
	}
	a.frozen = true
	return a.fsCount, nil
}

// FSThaw implements qga.Agent.
func (a *Agent) FSThaw(ctx context.Context) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "FSThaw"); err != nil {
		return 0, err
	}
	if !a.frozen {
		return 0, nil
	}
	a.frozen = false
	return a.fsCount, nil
}

// FSFreezeStatus implements qga.Agent.
func (a *Agent) FSFreezeStatus(ctx context.Context) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "FSFreezeStatus"); err != nil {
		return "", err
	}
	if a.frozen {
		return "frozen", nil
	}
	return "thawed", nil
}

// Shutdown implements qga.Agent.
func (a *Agent) Shutdown(ctx context.Context, mode string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "Shutdown"); err != nil {
		return err
	}
	if mode == "" {
		mode = qga.ShutdownPowerdown
	}
	switch mode {
	case qga.ShutdownPowerdown, qga.ShutdownHalt, qga.ShutdownReboot:
	default:
		return fmt.Errorf("qga guest-shutdown: %w", &qga.Error{Class: "GenericError", Desc: "Parameter 'mode' does not accept value '" + mode + "'"})
	}
	a.shutdowns = append(a.shutdowns, mode)
	return nil
}

// NetworkInterfaces implements qga.Agent.
func (a *Agent) NetworkInterfaces(ctx context.Context) ([]qga.Interface, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "NetworkInterfaces"); err != nil {
		return nil, err
	}
	return slices.Clone(a.ifaces), nil
}

// SetCPUs gives the fake guest n logical CPUs, the first online.
func (a *Agent) SetCPUs(n int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.vcpus = a.vcpus[:0]
	for i := range n {
		a.vcpus = append(a.vcpus, qga.VCPU{ID: i, Online: i == 0, CanOffline: i > 0})
	}
}

// VCPUs implements qga.Agent.
func (a *Agent) VCPUs(ctx context.Context) ([]qga.VCPU, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "VCPUs"); err != nil {
		return nil, err
	}
	return slices.Clone(a.vcpus), nil
}

// SetVCPUs implements qga.Agent.
func (a *Agent) SetVCPUs(ctx context.Context, cpus []qga.VCPU) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "SetVCPUs"); err != nil {
		return 0, err
	}
	for n, c := range cpus {
		i := slices.IndexFunc(a.vcpus, func(v qga.VCPU) bool { return v.ID == c.ID })
		if i < 0 || (!c.Online && !a.vcpus[i].CanOffline) {
			return n, fmt.Errorf("vcpu %d: cannot change", c.ID)
		}
		a.vcpus[i].Online = c.Online
	}
	return len(cpus), nil
}

// HostName implements qga.Agent.
func (a *Agent) HostName(ctx context.Context) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "HostName"); err != nil {
		return "", err
	}
	return a.hostName, nil
}

// OSInfo implements qga.Agent: a Linux guest unless SetOSInfo says
// otherwise.
func (a *Agent) OSInfo(ctx context.Context) (qga.OSInfo, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "OSInfo"); err != nil {
		return qga.OSInfo{}, err
	}
	if a.osInfo.ID == "" {
		return qga.OSInfo{ID: "debian", Name: "Debian GNU/Linux", KernelRelease: "6.1.0"}, nil
	}
	return a.osInfo, nil
}

// SetOSInfo sets what OSInfo returns.
func (a *Agent) SetOSInfo(info qga.OSInfo) {
	a.mu.Lock()
	a.osInfo = info
	a.mu.Unlock()
}

// Info implements qga.Agent.
func (a *Agent) Info(ctx context.Context) (qga.Info, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.beginLocked(ctx, "Info"); err != nil {
		return qga.Info{}, err
	}
	return qga.Info{Version: a.version}, nil
}

// Close implements qga.Agent; later calls fail with qga.ErrClosed.
func (a *Agent) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closed = true
	return nil
}
