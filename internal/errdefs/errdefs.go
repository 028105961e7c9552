// Package errdefs holds the kinds of failure that callers branch on and
// that the API maps to stable codes. Services wrap these with the object
// and the reason; the daemon only asks which kind an error is.
package errdefs

import "errors"

// The kinds.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	ErrInvalid  = errors.New("invalid")
	ErrInUse    = errors.New("in use")
	ErrBusy     = errors.New("busy")
	ErrState    = errors.New("wrong state")
	ErrConflict = errors.New("conflict")
	ErrLimit    = errors.New("over the host limit")
	ErrQuota    = errors.New("over the project quota")
	ErrNoAgent  = errors.New("guest agent not answering")
	ErrNoSpace  = errors.New("not enough space")
)
