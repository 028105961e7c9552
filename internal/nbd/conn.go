package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Conn is a connection to one export.
//
// It is safe for concurrent use. Requests from every goroutine are
// pipelined on the one connection: their writes are serialised, and a
// single reader goroutine hands each reply to the request it answers, so
// several ReadAt or WriteAt calls overlap on the server.
//
// A connection that breaks (the server goes away or breaks the protocol)
// fails every pending and later request with an error saying why.
//
// Methods that take a context return ctx.Err() once it ends. If it ends
// while the request is being written, the half-written request leaves
// the connection broken; if it ends while waiting for the reply, the
// connection stays usable and the reply is dropped when it comes.
type Conn struct {
	nc         net.Conn
	ex         *export
	maxPayload int
	align      int64

	// wlock serialises request writes. It is a channel rather than a
	// mutex so that a caller whose context ends can stop waiting for it.
	wlock chan struct{}

	mu      sync.Mutex
	pending map[uint64]*call
	cookie  uint64
	// err is why the connection takes no more requests; nil while it does.
	err error
	// draining is set once the server said it is shutting down: the
	// client must then leave politely once the requests in flight end.
	draining bool
	discSent bool

	readerDone chan struct{}
	closeOnce  sync.Once
}

var (
	_ io.ReaderAt = (*Conn)(nil)
	_ io.WriterAt = (*Conn)(nil)
)

// errClosed is what requests get after Close.
var errClosed = fmt.Errorf("connection closed: %w", net.ErrClosed)

// aLongTimeAgo is a deadline in the past, to make blocked I/O return now.
var aLongTimeAgo = time.Unix(1, 0)

// Dial connects to an NBD server and negotiates the export and meta
// contexts in opts. ctx bounds the connection and the handshake only.
func Dial(ctx context.Context, network, addr string, opts Options) (*Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd dial %s: %w", addr, err)
	}
	c, err := newConn(ctx, nc, opts)
	if err != nil {
		_ = nc.Close()
		return nil, fmt.Errorf("nbd handshake with %s: %w", addr, err)
	}
	return c, nil
}

// newConn runs the handshake on nc and starts the reply reader.
func newConn(ctx context.Context, nc net.Conn, opts Options) (*Conn, error) {
	// The context's end cuts the handshake short through a deadline in
	// the past; AfterFunc runs only once ctx.Err() is set, so a failure it
	// causes is always reported as the context's.
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(aLongTimeAgo) })
	br := bufio.NewReaderSize(nc, 64<<10)
	ex, err := negotiate(br, nc, opts)
	if !stop() {
		// The context ended, and its deadline may have cut the
		// handshake short or may yet poison the connection.
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return nil, ctx.Err()
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return nil, err
	}
	_ = nc.SetDeadline(time.Time{})

	ids := make(map[uint32]bool, len(ex.contexts))
	for _, id := range ex.contexts {
		ids[id] = true
	}
	c := &Conn{
		nc:         nc,
		ex:         ex,
		maxPayload: int(ex.maxPayload()),
		align:      int64(ex.align()),
		wlock:      make(chan struct{}, 1),
		pending:    make(map[uint64]*call),
		readerDone: make(chan struct{}),
	}
	go c.readLoop(&replyReader{r: br, structured: ex.structured, contexts: ids})
	return c, nil
}

// Size is the export's size in bytes.
func (c *Conn) Size() int64 { return int64(c.ex.size) }

// ReadOnly reports whether the server refuses writes to the export.
func (c *Conn) ReadOnly() bool { return c.ex.flags&tfReadOnly != 0 }

// ReadAt reads len(p) bytes at off, splitting the range into requests no
// larger than the server takes and sending them all before waiting for
// any. Holes come back as zeroes. Reading past the end of the export
// returns io.EOF with the bytes before it, as io.ReaderAt requires. With
// a server that sets a minimum block size, off and len(p) must be
// multiples of it.
func (c *Conn) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("nbd read %d bytes at %d: negative offset", len(p), off)
	}
	size := c.Size()
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want, eof := p, error(nil)
	if int64(len(p)) > size-off {
		want, eof = p[:size-off], io.EOF
	}
	if err := c.checkRange(off, int64(len(want))); err != nil {
		return 0, fmt.Errorf("nbd read %d bytes at %d: %w", len(want), off, err)
	}
	n, err := c.transfer(cmdRead, want, off)
	if err != nil {
		return n, fmt.Errorf("nbd read %d bytes at %d: %w", len(want), off, err)
	}
	return n, eof
}

// WriteAt writes p at off, split and pipelined like ReadAt. The range
// must lie inside the export. Like any write it may sit in the server's
// cache until Flush.
func (c *Conn) WriteAt(p []byte, off int64) (int, error) {
	if err := c.checkWrite(off, int64(len(p))); err != nil {
		return 0, fmt.Errorf("nbd write %d bytes at %d: %w", len(p), off, err)
	}
	n, err := c.transfer(cmdWrite, p, off)
	if err != nil {
		return n, fmt.Errorf("nbd write %d bytes at %d: %w", len(p), off, err)
	}
	return n, nil
}

// WriteZeroes makes [off, off+length) read as zeroes. With mayTrim the
// server may free the storage (leaving a hole); without it the range
// stays allocated. A server without the command gets plain writes of
// zeroes.
func (c *Conn) WriteZeroes(ctx context.Context, off, length int64, mayTrim bool) error {
	if err := c.checkWrite(off, length); err != nil {
		return fmt.Errorf("nbd write zeroes %d bytes at %d: %w", length, off, err)
	}
	var err error
	if c.ex.flags&tfSendWriteZeroes == 0 {
		err = c.writeZeroesByWrite(ctx, off, length)
	} else {
		var flags uint16
		if !mayTrim {
			flags = cmdFlagNoHole
		}
		_, err = c.issue(ctx, rangeCalls(cmdWriteZeroes, off, length), flags)
	}
	if err != nil {
		return fmt.Errorf("nbd write zeroes %d bytes at %d: %w", length, off, err)
	}
	return nil
}

// writeZeroesByWrite writes zeroes the slow way, a batch of requests at
// a time so that one zero buffer serves them all.
func (c *Conn) writeZeroesByWrite(ctx context.Context, off, length int64) error {
	zeros := make([]byte, min(length, int64(c.maxPayload)))
	const batch = 8
	for length > 0 {
		calls := make([]*call, 0, batch)
		for len(calls) < batch && length > 0 {
			n := min(length, int64(len(zeros)))
			calls = append(calls, &call{cmd: cmdWrite, off: uint64(off), length: uint32(n), buf: zeros[:n]})
			off, length = off+n, length-n
		}
		if _, err := c.issue(ctx, calls, 0); err != nil {
			return err
		}
	}
	return nil
}

// Trim tells the server [off, off+length) is no longer needed, so it may
// free the storage. Afterwards the range's contents are undefined until
// written again. A server that does not take trims ignores the hint.
func (c *Conn) Trim(ctx context.Context, off, length int64) error {
	if err := c.checkWrite(off, length); err != nil {
		return fmt.Errorf("nbd trim %d bytes at %d: %w", length, off, err)
	}
	if c.ex.flags&tfSendTrim == 0 {
		return nil
	}
	if _, err := c.issue(ctx, rangeCalls(cmdTrim, off, length), 0); err != nil {
		return fmt.Errorf("nbd trim %d bytes at %d: %w", length, off, err)
	}
	return nil
}

// Flush makes every write the server has answered durable. A server that
// does not take flushes has no cache to flush.
func (c *Conn) Flush(ctx context.Context) error {
	if c.ex.flags&tfSendFlush == 0 {
		return nil
	}
	if _, err := c.issue(ctx, []*call{{cmd: cmdFlush}}, 0); err != nil {
		return fmt.Errorf("nbd flush: %w", err)
	}
	return nil
}

// BlockStatus asks, in one request, for the status of [off, off+length)
// in metaContext, which Dial must have negotiated. The server may answer
// for less than the whole range (and this client asks for at most 2 GiB
// at a time); the extents returned are contiguous from off, clipped to
// the range, and never empty.
func (c *Conn) BlockStatus(ctx context.Context, metaContext string, off, length int64) ([]Extent, error) {
	id, ok := c.ex.contexts[metaContext]
	if !ok {
		return nil, fmt.Errorf("nbd block status %s: meta context was not negotiated", metaContext)
	}
	size := c.Size()
	if off < 0 || length <= 0 || off >= size {
		return nil, fmt.Errorf("nbd block status %s %d bytes at %d: outside the export (size %d)", metaContext, length, off, size)
	}
	length = min(length, size-off, maxRangeLen)
	cl := &call{cmd: cmdBlockStatus, off: uint64(off), length: uint32(length), want: id}
	if _, err := c.issue(ctx, []*call{cl}, 0); err != nil {
		return nil, fmt.Errorf("nbd block status %s %d bytes at %d: %w", metaContext, length, off, err)
	}
	return cl.extents, nil
}

// DataExtents lists the ranges in [off, off+length) that hold data:
// neither holes nor known zeroes in base:allocation, which Dial must have
// negotiated. Adjacent ranges are merged. It asks as many times as it
// takes to cover the range.
func (c *Conn) DataExtents(ctx context.Context, off, length int64) ([]Extent, error) {
	return c.extentsWhere(ctx, ContextAllocation, off, length, func(flags uint32) bool { return flags&(StateHole|StateZero) == 0 })
}

// DirtyExtents lists the ranges in [off, off+length) that dirty bitmap
// name marks as written; Dial must have negotiated ContextBitmap(name).
func (c *Conn) DirtyExtents(ctx context.Context, name string, off, length int64) ([]Extent, error) {
	return c.extentsWhere(ctx, ContextBitmap(name), off, length, func(flags uint32) bool { return flags&StateDirty != 0 })
}

// AllocatedAbove lists the ranges in [off, off+length) that the top depth
// layers of the export's chain hold; Dial must have negotiated
// ContextAllocationDepth.
func (c *Conn) AllocatedAbove(ctx context.Context, depth uint32, off, length int64) ([]Extent, error) {
	return c.extentsWhere(ctx, ContextAllocationDepth, off, length, func(d uint32) bool { return d >= 1 && d <= depth })
}

func (c *Conn) extentsWhere(ctx context.Context, metaContext string, off, length int64, keep func(uint32) bool) ([]Extent, error) {
	size := c.Size()
	if off < 0 || length < 0 || off > size {
		return nil, fmt.Errorf("nbd %s extents %d bytes at %d: outside the export (size %d)", metaContext, length, off, size)
	}
	end := off + min(length, size-off)
	var out []Extent
	for pos := off; pos < end; {
		ext, err := c.BlockStatus(ctx, metaContext, pos, end-pos)
		if err != nil {
			return nil, err
		}
		for _, e := range ext {
			if keep(e.Flags) {
				if n := len(out); n > 0 && out[n-1].Offset+out[n-1].Length == e.Offset {
					out[n-1].Length += e.Length
				} else {
					out = append(out, Extent{Offset: e.Offset, Length: e.Length})
				}
			}
			pos = e.Offset + e.Length
		}
	}
	return out, nil
}

// Close says goodbye to the server and closes the connection. Requests
// still in flight fail.
func (c *Conn) Close() error {
	var err error
	c.closeOnce.Do(func() {
		c.mu.Lock()
		polite := (c.err == nil || c.draining) && !c.discSent
		c.discSent = true
		if c.err == nil {
			c.err = errClosed
		}
		c.mu.Unlock()
		if polite {
			c.sendDisc()
		}
		err = c.nc.Close()
		<-c.readerDone
	})
	if errors.Is(err, net.ErrClosed) {
		err = nil // already dropped after an error
	}
	return err
}

// sendDisc sends NBD_CMD_DISC, best effort and briefly: the connection is
// going away either way.
func (c *Conn) sendDisc() {
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case c.wlock <- struct{}{}:
	case <-t.C:
		return
	}
	defer func() { <-c.wlock }()
	var hdr [requestLen]byte
	putRequest(hdr[:], 0, cmdDisc, 0, 0, 0)
	_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.nc.Write(hdr[:])
}

// checkRange refuses a range outside the export or off the server's
// block alignment.
func (c *Conn) checkRange(off, length int64) error {
	size := c.Size()
	switch {
	case off < 0 || length < 0:
		return errors.New("negative offset or length")
	case off > size || length > size-off:
		return fmt.Errorf("range ends past the export's end at %d", size)
	case off%c.align != 0 || length%c.align != 0:
		return fmt.Errorf("range not aligned to the server's %d-byte blocks", c.align)
	}
	return nil
}

func (c *Conn) checkWrite(off, length int64) error {
	if c.ReadOnly() {
		return errors.New("export is read-only")
	}
	return c.checkRange(off, length)
}

// transfer reads into or writes from buf at off in requests of at most
// maxPayload bytes, and returns how many bytes at the start succeeded.
func (c *Conn) transfer(cmd uint16, buf []byte, off int64) (int, error) {
	if len(buf) == 0 {
		return 0, nil
	}
	calls := make([]*call, 0, (len(buf)+c.maxPayload-1)/c.maxPayload)
	for pos := 0; pos < len(buf); pos += c.maxPayload {
		n := min(c.maxPayload, len(buf)-pos)
		calls = append(calls, &call{cmd: cmd, off: uint64(off) + uint64(pos), length: uint32(n), buf: buf[pos : pos+n]})
	}
	// No context: a read's reply lands in buf, so the caller must not get
	// buf back while any of these requests is still in flight.
	n, err := c.issue(context.Background(), calls, 0)
	return int(n), err
}

// rangeCalls splits a payload-free range command into requests the
// 32-bit length field can carry.
func rangeCalls(cmd uint16, off, length int64) []*call {
	var calls []*call
	for length > 0 {
		n := min(length, maxRangeLen)
		calls = append(calls, &call{cmd: cmd, off: uint64(off), length: uint32(n)})
		off, length = off+n, length-n
	}
	return calls
}

// issue sends every call before waiting for any, so a large operation
// keeps the server busy instead of paying a round trip per piece. It
// returns the length of the leading calls that succeeded and the first
// error in call order.
func (c *Conn) issue(ctx context.Context, calls []*call, flags uint16) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	sent := make([]*call, 0, len(calls))
	var sendErr error
	for _, cl := range calls {
		if sendErr = c.register(cl); sendErr != nil {
			break
		}
		wrote, err := c.send(ctx, cl, flags)
		if !wrote {
			c.unregister(cl)
			sendErr = err
			break
		}
		// A request that began to go out stays pending even if its write
		// failed: the broken connection's reader fails it, and until
		// then it might still be answered into its buffer.
		sent = append(sent, cl)
		if err != nil {
			sendErr = err
			break
		}
	}
	var done int64
	var first error
	for _, cl := range sent {
		select {
		case <-cl.done:
		case <-ctx.Done():
			return done, ctx.Err()
		}
		if first == nil {
			if cl.err != nil {
				first = cl.err
			} else {
				done += int64(cl.length)
			}
		}
	}
	if first == nil {
		first = sendErr
	}
	return done, first
}

// register gives cl a cookie and makes it pending, before it is sent: the
// reply can arrive before the write returns.
func (c *Conn) register(cl *call) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	c.cookie++
	cl.cookie = c.cookie
	cl.done = make(chan struct{})
	c.pending[cl.cookie] = cl
	return nil
}

// unregister drops a call that never went out.
func (c *Conn) unregister(cl *call) {
	c.mu.Lock()
	if c.pending[cl.cookie] == cl {
		delete(c.pending, cl.cookie)
	}
	c.mu.Unlock()
}

// send writes cl's request, and its payload for a write. It reports
// whether any of it may have reached the connection: when ctx ends while
// waiting for the write lock nothing was sent and the connection is fine;
// when it ends during the write the connection is broken, since the
// server would take whatever follows for the rest of the request.
func (c *Conn) send(ctx context.Context, cl *call, flags uint16) (bool, error) {
	var hdr [requestLen]byte
	putRequest(hdr[:], flags, cl.cmd, cl.cookie, cl.off, cl.length)
	select {
	case c.wlock <- struct{}{}:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	defer func() { <-c.wlock }()

	var stop func() bool
	var cut chan struct{}
	if ctx.Done() != nil {
		cut = make(chan struct{})
		stop = context.AfterFunc(ctx, func() {
			_ = c.nc.SetWriteDeadline(aLongTimeAgo)
			close(cut)
		})
	}
	bufs := net.Buffers{hdr[:]}
	if cl.cmd == cmdWrite {
		bufs = append(bufs, cl.buf)
	}
	_, err := bufs.WriteTo(c.nc)
	if stop != nil && !stop() {
		<-cut
		if err == nil {
			// The write was done before the deadline could bite.
			_ = c.nc.SetWriteDeadline(time.Time{})
		}
	}
	if err != nil {
		c.fail(fmt.Errorf("connection lost: sending request: %w", err))
		if ctx.Err() != nil {
			return true, ctx.Err()
		}
		return true, c.brokenErr()
	}
	return true, nil
}

// Abort ends the connection at once: requests in flight and any made
// later fail with err. Close still releases it.
func (c *Conn) Abort(err error) { c.fail(err) }

// fail stops the connection taking requests and closes it; the reader
// then fails whatever is pending.
func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	_ = c.nc.Close()
}

func (c *Conn) brokenErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Conn) lookup(cookie uint64) *call {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending[cookie]
}

// readLoop hands each reply to its request until the connection ends.
// It alone completes requests, so a request's fields need no lock.
func (c *Conn) readLoop(rr *replyReader) {
	defer close(c.readerDone)
	for {
		cl, done, err := rr.next(c.lookup)
		if err != nil {
			c.drop(err)
			return
		}
		if done {
			c.complete(cl)
		}
	}
}

func (c *Conn) complete(cl *call) {
	c.mu.Lock()
	delete(c.pending, cl.cookie)
	var se *serverError
	if errors.As(cl.err, &se) && se.errno == errSHUTDOWN && !c.draining {
		c.draining = true
		if c.err == nil {
			c.err = fmt.Errorf("server is shutting down: %w", se)
		}
	}
	disc := c.draining && len(c.pending) == 0 && !c.discSent
	if disc {
		c.discSent = true
	}
	c.mu.Unlock()
	close(cl.done)
	if disc {
		// The spec's soft disconnect, off the reader goroutine so that
		// it never waits on a writer.
		go c.sendDisc()
	}
}

// drop ends the connection once the reader can follow it no further, and
// fails every pending request with the reason.
func (c *Conn) drop(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = fmt.Errorf("connection lost: %w", err)
	}
	cause := c.err
	failed := c.pending
	c.pending = nil
	c.mu.Unlock()
	_ = c.nc.Close()
	for _, cl := range failed {
		cl.err = cause
		close(cl.done)
	}
}
