package stack

import (
	"fmt"
	"strings"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// Error is a refusal of a stack file, pointing at where the problem is
// written. It unwraps to an errdefs kind, so that the daemon maps it to
// the right code without reading the text.
type Error struct {
	Path string
	// Line and Column are 1-based; 0 when the place is unknown (YAML
	// syntax errors carry a line only, and a File built by hand none).
	Line   int
	Column int
	// Msg names the object first: `vm "db": ...`.
	Msg  string
	kind error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Path)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
		if e.Column > 0 {
			fmt.Fprintf(&b, ":%d", e.Column)
		}
	}
	b.WriteString(": ")
	b.WriteString(e.Msg)
	return b.String()
}

// Unwrap gives the errdefs kind: ErrInvalid for the file itself,
// ErrNotFound for an unknown image, ErrLimit for memory over the limit.
func (e *Error) Unwrap() error { return e.kind }

// pos is where something was written.
type pos struct{ line, col int }

func (p pos) before(q pos) bool {
	if p.line != q.line {
		return p.line < q.line
	}
	return p.col < q.col
}

// errs keeps only the error written first in the file. The CLI prints one
// line, and the first in file order is where a reader starts; the stages
// of checking (see Parse) make sure it is a cause, not a consequence.
// Keeping one error, not a list, also bounds memory on hostile input.
type errs struct {
	path  string
	first *Error
	where pos
}

func (c *errs) add(at pos, kind error, format string, args ...any) {
	if c.first != nil && !at.before(c.where) {
		return
	}
	c.where = at
	c.first = &Error{Path: c.path, Line: at.line, Column: at.col, Msg: fmt.Sprintf(format, args...), kind: kind}
}

func (c *errs) invalid(at pos, format string, args ...any) {
	c.add(at, errdefs.ErrInvalid, format, args...)
}

// err returns the kept error as an error, avoiding a non-nil interface
// around a nil pointer.
func (c *errs) err() error {
	if c.first == nil {
		return nil
	}
	return c.first
}
