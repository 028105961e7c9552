// Package qmp is a client for the QEMU Machine Protocol (QMP), the JSON
// control socket through which Lodge drives a running QEMU.
//
// A Client multiplexes any number of concurrent commands over one
// connection: each command carries a unique id and a single reader
// goroutine hands every reply to the caller waiting for that id, so
// replies may arrive in any order and a slow command never holds up the
// others. Asynchronous events (SHUTDOWN, STOP, BALLOON_CHANGE, ...) are
// fanned out to every subscriber.
//
// Higher layers should depend on the Monitor interface and use the
// command helpers (QueryStatus, Stop, ...) so that they can be tested
// against the in-memory fake in package qmptest.
package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"time"
)

// ErrClosed is wrapped by every error caused by the connection ending,
// whether Close was called or QEMU went away.
var ErrClosed = errors.New("qmp: connection closed")

// ErrNoFDPassing means the monitor cannot send file descriptors (it is
// not a unix socket).
var ErrNoFDPassing = errors.New("qmp: monitor cannot pass file descriptors")

// Error classes QEMU puts in error replies. Most failures are
// GenericError; the others exist so that callers can react to them.
const (
	ClassGenericError    = "GenericError"
	ClassCommandNotFound = "CommandNotFound"
	ClassDeviceNotActive = "DeviceNotActive"
	ClassDeviceNotFound  = "DeviceNotFound"
	ClassKVMMissingCap   = "KVMMissingCap"
)

// Error is an error reply from QEMU: the command reached QEMU and QEMU
// refused it. Anything else (timeouts, a lost connection) is not an
// *Error, which lets callers tell "QEMU said no" from "QEMU is not
// there".
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Error reports the class and description as QEMU sent them.
func (e *Error) Error() string {
	return "qmp: " + e.Class + ": " + e.Desc
}

// Event is an asynchronous notification from QEMU.
type Event struct {
	Name string
	// Data is the event's "data" member, nil if it has none. Each
	// subscriber gets its own copy.
	Data json.RawMessage
	// Time is when QEMU emitted the event, not when it was received.
	Time time.Time
}

// Monitor is what Lodge needs from a QMP connection. *Client implements
// it over a socket; qmptest.Monitor implements it in memory.
type Monitor interface {
	// Execute sends cmd with args (nil or anything JSON-marshalable to
	// an object) and decodes the reply's "return" member into result,
	// which may be nil. A refusal by QEMU is returned as an *Error.
	// Without a deadline on ctx, a default timeout applies.
	Execute(ctx context.Context, cmd string, args any, result any) error
	// Events returns a channel carrying every asynchronous event
	// received after its first call; it is closed when the connection
	// ends. Every call returns the same channel.
	Events() <-chan Event
	// Subscribe returns a new channel that receives every event from
	// now on, independently of other subscribers, and a function that
	// ends the subscription and closes the channel. The channel is also
	// closed when the connection ends.
	Subscribe() (<-chan Event, func())
	// Done is closed when the connection is lost or closed (for
	// example because QEMU exited).
	Done() <-chan struct{}
	// Close ends the connection. Pending calls fail with ErrClosed.
	Close() error
}

// FDPasser is a monitor that can hand QEMU an open file, which later
// commands name as "fd:NAME".
type FDPasser interface {
	PassFD(ctx context.Context, name string, f *os.File) error
}

var _ FDPasser = (*Client)(nil)
