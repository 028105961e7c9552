package nbd

import (
	"bufio"
	"errors"
	"io"
)

// call is one request in flight and what its reply has said so far. The
// reply reader alone writes to it until done is closed.
type call struct {
	cookie uint64
	cmd    uint16
	off    uint64
	length uint32
	// buf receives a read's data; len(buf) == length.
	buf []byte
	// want is the context id whose extents a block status keeps.
	want    uint32
	extents []Extent
	seen    []uint32 // context ids answered so far
	cover   coverage
	// err is the first error the server reported, or why the connection
	// dropped.
	err  error
	done chan struct{}
}

// setErr keeps the first error the server reports for the request: a
// later one is usually a consequence.
func (c *call) setErr(err error) {
	if c.err == nil {
		c.err = err
	}
}

// replyReader parses the transmission phase's replies. It holds no
// connection, only a reader, so it can be fuzzed on its own.
type replyReader struct {
	r          *bufio.Reader
	structured bool
	// contexts are the meta context ids negotiated.
	contexts map[uint32]bool
	hdr      [structuredHdrLen]byte
}

// next reads one reply message (a simple reply or one structured chunk)
// and applies it to the call lookup finds for its cookie. It returns that
// call and whether its reply is complete. An error means the stream can
// no longer be followed and the connection must be dropped.
func (p *replyReader) next(lookup func(cookie uint64) *call) (*call, bool, error) {
	if _, err := io.ReadFull(p.r, p.hdr[:4]); err != nil {
		return nil, false, err
	}
	switch m := be.Uint32(p.hdr[:4]); m {
	case magicSimple:
		return p.simple(lookup)
	case magicStructure:
		if !p.structured {
			return nil, false, protoErr("structured reply that was not negotiated")
		}
		return p.chunk(lookup)
	default:
		return nil, false, protoErr("reply magic %#x", m)
	}
}

func (p *replyReader) simple(lookup func(uint64) *call) (*call, bool, error) {
	h := p.hdr[4:simpleReplyLen]
	if _, err := io.ReadFull(p.r, h); err != nil {
		return nil, false, unexpected(err)
	}
	errno, cookie := be.Uint32(h[0:]), be.Uint64(h[4:])
	c := lookup(cookie)
	if c == nil {
		return nil, false, protoErr("reply for unknown cookie %d", cookie)
	}
	if errno != 0 {
		// No payload follows an error, even for a read.
		c.setErr(&serverError{errno: errno, offset: -1})
		return c, true, nil
	}
	switch c.cmd {
	case cmdRead:
		if p.structured {
			// Its length is unknowable: the data may or may not follow.
			return nil, false, protoErr("simple reply to a read after structured replies were negotiated")
		}
		if _, err := io.ReadFull(p.r, c.buf); err != nil {
			return nil, false, unexpected(err)
		}
		c.cover.total = uint64(c.length)
	case cmdBlockStatus:
		return nil, false, protoErr("block status answered without extents")
	}
	return c, true, nil
}

func (p *replyReader) chunk(lookup func(uint64) *call) (*call, bool, error) {
	h := p.hdr[4:structuredHdrLen]
	if _, err := io.ReadFull(p.r, h); err != nil {
		return nil, false, unexpected(err)
	}
	flags, typ, cookie, length := be.Uint16(h[0:]), be.Uint16(h[2:]), be.Uint64(h[4:]), be.Uint32(h[12:])
	c := lookup(cookie)
	if c == nil {
		return nil, false, protoErr("reply chunk for unknown cookie %d", cookie)
	}
	done := flags&replyFlagDone != 0
	var err error
	switch typ {
	case chunkNone:
		if length != 0 || !done {
			return nil, false, protoErr("empty chunk with %d bytes, final %v", length, done)
		}
	case chunkOffsetData:
		err = p.data(c, length)
	case chunkOffsetHole:
		err = p.hole(c, length)
	case chunkBlockStatus:
		err = p.blockStatus(c, length)
	default:
		if typ&chunkErrBit == 0 {
			return nil, false, protoErr("reply chunk of unknown type %d", typ)
		}
		err = p.errorChunk(c, typ, length)
	}
	if err != nil {
		return nil, false, err
	}
	if done {
		if err := finish(c); err != nil {
			return nil, false, err
		}
	}
	return c, done, nil
}

// finish checks that a successful reply said everything it had to
// before it ended. (A failed one owes nothing more.)
func finish(c *call) error {
	if c.err != nil {
		return nil //nolint:nilerr // the request's error is the server's answer, not a fault in the stream
	}
	switch c.cmd {
	case cmdRead:
		if c.cover.total != uint64(c.length) {
			return protoErr("read reply ended with %d of %d bytes", c.cover.total, c.length)
		}
	case cmdBlockStatus:
		for _, id := range c.seen {
			if id == c.want {
				return nil
			}
		}
		return protoErr("block status reply ended without the requested context")
	}
	return nil
}

// span checks that [off, off+n) lies inside the request and returns its
// position relative to the request's start.
func (c *call) span(what string, off uint64, n uint64) (uint64, error) {
	if off < c.off || off-c.off > uint64(c.length) || n > uint64(c.length)-(off-c.off) {
		return 0, protoErr("%s [%d, +%d) outside the request [%d, +%d)", what, off, n, c.off, c.length)
	}
	return off - c.off, nil
}

func (p *replyReader) data(c *call, length uint32) error {
	if c.cmd != cmdRead {
		return protoErr("data chunk in the reply to command %d", c.cmd)
	}
	if length < 9 || length-8 > c.length {
		// Checked before reading anything: a hostile length is never
		// used to size a buffer.
		return protoErr("data chunk of %d bytes for a read of %d", length, c.length)
	}
	var b [8]byte
	if _, err := io.ReadFull(p.r, b[:]); err != nil {
		return unexpected(err)
	}
	n := uint64(length - 8)
	rel, err := c.span("data chunk", be.Uint64(b[:]), n)
	if err != nil {
		return err
	}
	if err := c.cover.add(rel, rel+n); err != nil {
		return err
	}
	if _, err := io.ReadFull(p.r, c.buf[rel:rel+n]); err != nil {
		return unexpected(err)
	}
	return nil
}

func (p *replyReader) hole(c *call, length uint32) error {
	if c.cmd != cmdRead {
		return protoErr("hole chunk in the reply to command %d", c.cmd)
	}
	if length != 12 {
		return protoErr("hole chunk of %d bytes", length)
	}
	var b [12]byte
	if _, err := io.ReadFull(p.r, b[:]); err != nil {
		return unexpected(err)
	}
	n := uint64(be.Uint32(b[8:]))
	if n == 0 {
		return protoErr("empty hole")
	}
	rel, err := c.span("hole", be.Uint64(b[:]), n)
	if err != nil {
		return err
	}
	if err := c.cover.add(rel, rel+n); err != nil {
		return err
	}
	clear(c.buf[rel : rel+n])
	return nil
}

func (p *replyReader) blockStatus(c *call, length uint32) error {
	if c.cmd != cmdBlockStatus {
		return protoErr("block status chunk in the reply to command %d", c.cmd)
	}
	if length < 12 || (length-4)%8 != 0 {
		return protoErr("block status chunk of %d bytes", length)
	}
	count := (length - 4) / 8
	// Every descriptor but the last lies wholly inside the request and
	// is at least a byte long, which bounds how many there can be.
	if count > maxExtentsPerChunk || count > c.length {
		return protoErr("block status chunk with %d extents for %d bytes", count, c.length)
	}
	var b [8]byte
	if _, err := io.ReadFull(p.r, b[:4]); err != nil {
		return unexpected(err)
	}
	id := be.Uint32(b[:4])
	if !p.contexts[id] {
		return protoErr("block status for unknown meta context id %d", id)
	}
	for _, s := range c.seen {
		if s == id {
			return protoErr("block status for meta context id %d given twice", id)
		}
	}
	c.seen = append(c.seen, id)
	keep := id == c.want
	if keep {
		c.extents = make([]Extent, 0, min(count, 1024))
	}
	pos, end := c.off, c.off+uint64(c.length)
	for i := range count {
		if _, err := io.ReadFull(p.r, b[:]); err != nil {
			return unexpected(err)
		}
		n, flags := uint64(be.Uint32(b[0:])), be.Uint32(b[4:])
		if n == 0 {
			return protoErr("empty extent in block status")
		}
		if pos >= end {
			return protoErr("block status extent at %d, past the request's end %d", pos, end)
		}
		e := pos + n
		if e > end {
			// Only the last descriptor may reach past the request;
			// what lies beyond is not ours to report.
			if i != count-1 {
				return protoErr("block status extent [%d, +%d) past the request's end %d", pos, n, end)
			}
			e = end
		}
		if keep {
			c.extents = append(c.extents, Extent{Offset: int64(pos), Length: int64(e - pos), Flags: flags})
		}
		pos = e
	}
	return nil
}

func (p *replyReader) errorChunk(c *call, typ uint16, length uint32) error {
	if length < 6 || length > maxErrorChunk {
		return protoErr("error chunk of %d bytes", length)
	}
	var b [8]byte
	if _, err := io.ReadFull(p.r, b[:6]); err != nil {
		return unexpected(err)
	}
	errno, mlen := be.Uint32(b[0:]), uint32(be.Uint16(b[4:]))
	if errno == 0 {
		return protoErr("error chunk without an error number")
	}
	if mlen > length-6 {
		return protoErr("error message of %d bytes in a chunk of %d", mlen, length)
	}
	msg, err := readMessage(p.r, mlen)
	if err != nil {
		return unexpected(err)
	}
	se := &serverError{errno: errno, msg: msg, offset: -1}
	rest := length - 6 - mlen
	switch typ {
	case chunkError:
		if rest != 0 {
			return protoErr("error chunk with %d bytes after its message", rest)
		}
	case chunkErrorOffset:
		if rest != 8 {
			return protoErr("error offset chunk with %d bytes after its message", rest)
		}
		if _, err := io.ReadFull(p.r, b[:]); err != nil {
			return unexpected(err)
		}
		off := be.Uint64(b[:])
		if _, err := c.span("error offset", off, 1); err != nil {
			return err
		}
		se.offset = int64(off)
	default:
		// An error type from a later extension: it still fails the
		// request, and its extra fields are skipped.
		if err := discard(p.r, int64(rest)); err != nil {
			return unexpected(err)
		}
	}
	c.setErr(se)
	return nil
}

// unexpected turns an EOF in the middle of a message into the error it
// is: the server went away half-way.
func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
