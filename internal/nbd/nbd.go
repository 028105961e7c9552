// Package nbd talks the Network Block Device protocol to a qemu-nbd that
// it starts itself. Lodge reads and writes qcow2 chains this way instead
// of parsing qcow2 in Go: QEMU's block layer already knows every detail
// of the format (backing files, compressed and zero clusters, dirty
// bitmaps) and, through NBD block status, says which ranges hold data, so
// an export can skip holes and an import can write a fresh image without
// Lodge keeping an image-format implementation of its own.
//
// The client is deliberately strict: a server that breaks the protocol
// drops the connection with an error wrapping ErrProtocol, and no reply
// can make the client allocate more than the request asked for plus a
// small header.
package nbd

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
	"unicode"
)

// Extent is one run of the export with the same status in a meta context.
type Extent struct {
	Offset, Length int64
	// Flags are the context's status bits; for base:allocation they are
	// StateHole and StateZero.
	Flags uint32
}

// Status bits of the base:allocation context.
const (
	// StateHole marks a range with no storage behind it.
	StateHole uint32 = 1
	// StateZero marks a range that reads as zeroes.
	StateZero uint32 = 2
)

// ContextAllocation is the standard meta context saying which ranges are
// allocated; DataExtents needs it.
const ContextAllocation = "base:allocation"

// ContextBitmap is the meta context in which QEMU serves dirty bitmap
// name: StateDirty marks the ranges written since it was added.
func ContextBitmap(name string) string { return "qemu:dirty-bitmap:" + name }

// StateDirty is the one status bit of a dirty-bitmap context.
const StateDirty uint32 = 1

// ContextAllocationDepth is QEMU's meta context that says, for each range,
// which layer of the export's backing chain holds it: 1 for the exported
// node, 2 for its backing file, and so on; 0 for none.
const ContextAllocationDepth = "qemu:allocation-depth"

// Options choose what Dial negotiates.
type Options struct {
	// Export is the export name; "" is the server's default export.
	Export string
	// MetaContexts are the contexts BlockStatus may later ask about, such
	// as ContextAllocation or "qemu:dirty-bitmap:NAME". Dial fails if the
	// server does not offer every one of them.
	MetaContexts []string
}

var (
	// ErrProtocol marks a server that broke the NBD protocol. The
	// connection is dropped: nothing it sends afterwards can be trusted.
	ErrProtocol = errors.New("server broke the NBD protocol")

	// ErrNoSpace is the server's ENOSPC: the disk (or the file system
	// under it) is full. Callers branch on it to report a full disk.
	ErrNoSpace = errors.New("no space left on device")
)

// NBD error numbers. The protocol fixes them; they happen to match Linux.
const (
	errPERM      uint32 = 1
	errIO        uint32 = 5
	errNOMEM     uint32 = 12
	errINVAL     uint32 = 22
	errNOSPC     uint32 = 28
	errOVERFLOW  uint32 = 75
	errNOTSUP    uint32 = 95
	errSHUTDOWN  uint32 = 108
	maxErrString        = 4096
)

var errnoNames = map[uint32]struct {
	name string
	text string
	sys  syscall.Errno
}{
	errPERM:     {"EPERM", "operation not permitted", syscall.EPERM},
	errIO:       {"EIO", "input/output error", syscall.EIO},
	errNOMEM:    {"ENOMEM", "server out of memory", syscall.ENOMEM},
	errINVAL:    {"EINVAL", "invalid argument", syscall.EINVAL},
	errNOSPC:    {"ENOSPC", "no space left on device", syscall.ENOSPC},
	errOVERFLOW: {"EOVERFLOW", "value too large", syscall.EOVERFLOW},
	errNOTSUP:   {"ENOTSUP", "operation not supported", syscall.ENOTSUP},
	errSHUTDOWN: {"ESHUTDOWN", "server is shutting down", syscall.ESHUTDOWN},
}

// serverError is an error the server reported for one request. The
// connection stays usable after it.
type serverError struct {
	errno  uint32
	msg    string // the server's own words, if it sent any
	offset int64  // where it happened, or -1
}

func (e *serverError) Error() string {
	var b strings.Builder
	if n, ok := errnoNames[e.errno]; ok {
		b.WriteString(n.text)
		b.WriteString(" (")
		b.WriteString(n.name)
		b.WriteString(")")
	} else {
		fmt.Fprintf(&b, "server error %d", e.errno)
	}
	if e.offset >= 0 {
		fmt.Fprintf(&b, " at offset %d", e.offset)
	}
	if e.msg != "" {
		b.WriteString(": ")
		b.WriteString(e.msg)
	}
	return b.String()
}

// Is lets callers match ErrNoSpace, or the matching syscall.Errno (for
// instance syscall.ENOTSUP to fall back from an unsupported command).
func (e *serverError) Is(target error) bool {
	if target == ErrNoSpace {
		return e.errno == errNOSPC
	}
	if errno, ok := target.(syscall.Errno); ok {
		n, known := errnoNames[e.errno]
		return known && n.sys == errno
	}
	return false
}

// protoErr builds an ErrProtocol with the detail of what went wrong.
func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// cleanString makes a server-supplied message safe to put in a log line:
// a hostile server must not be able to forge log entries or terminal
// escapes through an error message.
func cleanString(b []byte) string {
	s := strings.ToValidUTF8(string(b), "?")
	return strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return '?'
	}, s)
}
