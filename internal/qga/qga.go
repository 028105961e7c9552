// Package qga is a client for the QEMU guest agent (qemu-guest-agent),
// which runs inside a guest and which QEMU exposes on the host as a unix
// socket joined to the guest's virtio-serial port.
//
// The protocol has no request ids: the agent answers one command at a
// time, in order. Anything left in the channel — by an earlier client,
// or a reply that came after its caller gave up — would be taken for
// the answer to the next command, so the client resynchronises with
// guest-sync-delimited when it connects and after any timeout or
// garbled reply. The guest is untrusted, so everything it sends is
// parsed defensively and bounded in size.
//
// Higher layers should depend on the Agent interface so that they can be
// tested against the in-memory fake in package qgatest.
package qga

import (
	"context"
	"errors"
)

var (
	// ErrClosed is wrapped by every error caused by the connection
	// ending, whether Close was called or QEMU went away.
	ErrClosed = errors.New("qga: connection closed")
	// ErrUnresponsive means nothing answered the synchronisation
	// handshake in time: the socket is there but no agent listens
	// behind it (the guest is still booting, or has no agent). It is
	// worth retrying later, unlike an *Error.
	ErrUnresponsive = errors.New("qga: guest agent not responding")
	// ErrTooLarge means the guest sent more than the client accepts.
	ErrTooLarge = errors.New("qga: guest sent too much data")
)

// Error is an error reply from the agent: the command reached the guest
// and failed there (bad path, unknown command, ...). Anything else
// (timeouts, a lost connection) is not an *Error.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Error reports the class and description as the agent sent them.
func (e *Error) Error() string {
	return "qga: " + e.Class + ": " + e.Desc
}

// Shutdown modes for Agent.Shutdown.
const (
	ShutdownPowerdown = "powerdown"
	ShutdownHalt      = "halt"
	ShutdownReboot    = "reboot"
)

// ExecRequest is a program to run in the guest. The program is run
// directly, not through a shell.
type ExecRequest struct {
	Path  string
	Args  []string
	Env   []string // "NAME=value"; the agent's environment if empty
	Stdin []byte   // nil for none
}

// ExecResult is how a guest program ended.
type ExecResult struct {
	// ExitCode is the program's exit status, or -1 if a signal killed
	// it, so that a killed program never looks successful.
	ExitCode int
	// Signal is the signal that killed the program, or 0.
	Signal int
	Stdout []byte
	Stderr []byte
	// Truncated is set when the agent cut the output short (it keeps at
	// most 16 MiB of each stream).
	Truncated bool
}

// Interface is a guest network interface.
type Interface struct {
	Name            string      `json:"name"`
	HardwareAddress string      `json:"hardware-address,omitempty"`
	IPAddresses     []IPAddress `json:"ip-addresses,omitempty"`
}

// IPAddress is an address of a guest network interface.
type IPAddress struct {
	Type    string `json:"ip-address-type"` // "ipv4" or "ipv6"
	Address string `json:"ip-address"`
	Prefix  int    `json:"prefix"`
}

// Info describes the agent.
type Info struct {
	Version  string        `json:"version"`
	Commands []CommandInfo `json:"supported_commands"`
}

// CommandInfo says whether the agent supports a command.
type CommandInfo struct {
	Name            string `json:"name"`
	Enabled         bool   `json:"enabled"`
	SuccessResponse bool   `json:"success-response"`
}

// OSInfo is what guest-get-osinfo reports. ID is "mswindows" on Windows
// and the os-release ID (debian, ubuntu, ...) elsewhere.
type OSInfo struct {
	ID            string `json:"id"`
	Name          string `json:"name"`
	PrettyName    string `json:"pretty-name"`
	Version       string `json:"version"`
	KernelRelease string `json:"kernel-release"`
	Machine       string `json:"machine"`
}

// Agent is what Lodge needs from a guest agent. *Client implements it
// over QEMU's socket; qgatest.Agent implements it in memory.
type Agent interface {
	// Ping checks that the agent answers.
	Ping(ctx context.Context) error
	// Exec runs a program in the guest and waits for it to end. If ctx
	// ends first, Exec returns ctx's error and the program keeps
	// running: the agent has no way to kill it.
	Exec(ctx context.Context, req ExecRequest) (ExecResult, error)
	// FileWrite creates or truncates path in the guest and writes data.
	FileWrite(ctx context.Context, path string, data []byte) error
	// FileRead returns the contents of path in the guest.
	FileRead(ctx context.Context, path string) ([]byte, error)
	// FSFreeze freezes the guest's filesystems and reports how many.
	// While they are frozen the agent refuses most commands.
	FSFreeze(ctx context.Context) (int, error)
	// FSThaw thaws them and reports how many were thawed.
	FSThaw(ctx context.Context) (int, error)
	// FSFreezeStatus is "thawed" or "frozen".
	FSFreezeStatus(ctx context.Context) (string, error)
	// Shutdown asks the guest to power down, halt or reboot (mode is
	// one of the Shutdown constants; "" means powerdown). Success only
	// means that the agent did not refuse.
	Shutdown(ctx context.Context, mode string) error
	// NetworkInterfaces lists the guest's interfaces and addresses.
	NetworkInterfaces(ctx context.Context) ([]Interface, error)
	// HostName is the guest's host name.
	HostName(ctx context.Context) (string, error)
	// Info describes the agent.
	Info(ctx context.Context) (Info, error)
	// OSInfo describes the guest's operating system.
	OSInfo(ctx context.Context) (OSInfo, error)
	// VCPUs lists the guest's logical CPUs and whether each is online.
	VCPUs(ctx context.Context) ([]VCPU, error)
	// SetVCPUs brings CPUs online or offline and reports how many of
	// the changes it made; it stops at the first it cannot make.
	SetVCPUs(ctx context.Context, cpus []VCPU) (int, error)
	// Close ends the connection.
	Close() error
}

// VCPU is one logical CPU of the guest.
type VCPU struct {
	ID     int  `json:"logical-id"`
	Online bool `json:"online"`
	// CanOffline is false for a CPU the guest cannot take offline (the
	// boot CPU, on Linux).
	CanOffline bool `json:"can-offline,omitempty"`
}
