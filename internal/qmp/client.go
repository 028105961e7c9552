package qmp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Defaults for the options.
const (
	DefaultTimeout     = 30 * time.Second
	DefaultEventBuffer = 256
)

// Option configures a Client.
type Option func(*config)

type config struct {
	log         *slog.Logger
	timeout     time.Duration
	eventBuffer int
}

// WithLogger sets the logger; a nil logger means slog.Default().
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.log = l }
}

// WithTimeout sets how long a call may take when its context has no
// deadline (DefaultTimeout if d <= 0). It also bounds the handshake.
func WithTimeout(d time.Duration) Option {
	return func(c *config) { c.timeout = d }
}

// WithEventBuffer sets how many events each subscription buffers before
// the oldest are dropped (DefaultEventBuffer if n <= 0).
func WithEventBuffer(n int) Option {
	return func(c *config) { c.eventBuffer = n }
}

func buildConfig(opts []Option) config {
	var c config
	for _, o := range opts {
		o(&c)
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	c.log = c.log.With("component", "qmp")
	if c.timeout <= 0 {
		c.timeout = DefaultTimeout
	}
	if c.eventBuffer <= 0 {
		c.eventBuffer = DefaultEventBuffer
	}
	return c
}

// Client is a QMP connection. It is safe for concurrent use.
type Client struct {
	conn    net.Conn
	dec     *json.Decoder
	log     *slog.Logger
	timeout time.Duration
	bufSize int
	version string

	nextID atomic.Uint64
	// wmu keeps concurrent requests from interleaving on the wire.
	wmu sync.Mutex

	mu       sync.Mutex
	pending  map[string]chan reply
	subs     map[*subscription]struct{}
	def      *subscription // backs Events(); made on first use
	closing  bool          // Close was called
	closed   bool          // the reader has stopped; closeErr is set
	closeErr error

	done       chan struct{}
	readerDone chan struct{}
}

var _ Monitor = (*Client)(nil)

type reply struct {
	ret json.RawMessage
	err error
}

type subscription struct {
	ch chan Event
	// dropped counts events lost in the current overflow streak, so
	// that a stalled consumer is reported once rather than per event.
	dropped int
}

// Dial connects to QEMU's QMP unix socket, reads the greeting and
// negotiates capabilities.
func Dial(ctx context.Context, socketPath string, opts ...Option) (*Client, error) {
	cfg := buildConfig(opts)
	cfg.log = cfg.log.With("socket", socketPath)
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.timeout)
		defer cancel()
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("qmp dial %s: %w", socketPath, err)
	}
	c, err := newClient(ctx, conn, cfg)
	if err != nil {
		return nil, fmt.Errorf("qmp handshake with %s: %w", socketPath, err)
	}
	return c, nil
}

// NewClient runs the QMP handshake over conn, which the client then
// owns: it is closed by Close, or at once if the handshake fails.
func NewClient(ctx context.Context, conn net.Conn, opts ...Option) (*Client, error) {
	c, err := newClient(ctx, conn, buildConfig(opts))
	if err != nil {
		return nil, fmt.Errorf("qmp handshake: %w", err)
	}
	return c, nil
}

func newClient(ctx context.Context, conn net.Conn, cfg config) (*Client, error) {
	c := &Client{
		conn:       conn,
		dec:        json.NewDecoder(conn),
		log:        cfg.log,
		timeout:    cfg.timeout,
		bufSize:    cfg.eventBuffer,
		pending:    make(map[string]chan reply),
		subs:       make(map[*subscription]struct{}),
		done:       make(chan struct{}),
		readerDone: make(chan struct{}),
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	if err := c.readGreeting(ctx); err != nil {
		_ = conn.Close()
		return nil, err
	}
	go c.readLoop()
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		_ = c.Close()
		return nil, err
	}
	c.log.Debug("qmp connected", "qemu", c.version)
	return c, nil
}

type greeting struct {
	QMP *struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
			Package string `json:"package"`
		} `json:"version"`
		Capabilities []string `json:"capabilities"`
	} `json:"QMP"`
}

func (c *Client) readGreeting(ctx context.Context) error {
	deadline, _ := ctx.Deadline()
	if err := c.conn.SetReadDeadline(deadline); err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	stop := interruptOnCancel(ctx, func() { _ = c.conn.SetReadDeadline(time.Now()) })
	var g greeting
	err := c.dec.Decode(&g)
	stop()
	if err != nil {
		return fmt.Errorf("read greeting: %w", ctxError(ctx, err))
	}
	if g.QMP == nil {
		return errors.New("read greeting: peer did not send a QMP greeting (wrong socket?)")
	}
	v := g.QMP.Version.QEMU
	c.version = fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
	// The reader goroutine must block for as long as QEMU stays silent.
	if err := c.conn.SetReadDeadline(time.Time{}); err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	return nil
}

// interruptOnCancel calls interrupt when ctx is cancelled, so that a
// blocked read returns at once rather than at the deadline. Once stop
// has returned, interrupt is not running and will not run, so the
// caller may safely reset the connection's deadlines.
func interruptOnCancel(ctx context.Context, interrupt func()) (stop func()) {
	var mu sync.Mutex
	live := true
	stopAfter := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if live {
			interrupt()
		}
	})
	return func() {
		stopAfter()
		mu.Lock()
		live = false
		mu.Unlock()
	}
}

// ctxError reports a socket timeout as the context's error: the socket
// deadline is the context's deadline, but its timer may fire first.
func ctxError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return context.DeadlineExceeded
	}
	return err
}

// Version is QEMU's version as announced in the greeting, e.g. "7.2.22".
func (c *Client) Version() string { return c.version }

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close ends the connection and waits for the reader to stop, so that
// when it returns every pending call has failed and every event channel
// is closed. It is safe to call more than once.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	err := c.conn.Close()
	<-c.readerDone
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("qmp close: %w", err)
	}
	return nil
}

// Execute implements Monitor.
func (c *Client) Execute(ctx context.Context, cmd string, args any, result any) error {
	return c.execute(ctx, cmd, args, result, nil)
}

// PassFD implements FDPasser: QMP getfd with f's descriptor attached to
// the command's bytes on the socket.
func (c *Client) PassFD(ctx context.Context, name string, f *os.File) error {
	if _, ok := c.conn.(*net.UnixConn); !ok {
		return fmt.Errorf("qmp getfd %s: %w", name, ErrNoFDPassing)
	}
	return c.execute(ctx, "getfd", map[string]string{"fdname": name}, nil, syscall.UnixRights(int(f.Fd())))
}

func (c *Client) execute(ctx context.Context, cmd string, args any, result any, oob []byte) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	id := strconv.FormatUint(c.nextID.Add(1), 10)
	req, err := encodeRequest(cmd, args, id)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}

	ch := make(chan reply, 1)
	c.mu.Lock()
	if c.closed {
		err := c.closeErr
		c.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	c.pending[id] = ch
	c.mu.Unlock()

	c.log.Debug("qmp command", "cmd", cmd, "id", id)
	if err := c.send(ctx, req, oob); err != nil {
		c.forget(id)
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}

	select {
	case r := <-ch:
		if r.err != nil {
			return fmt.Errorf("qmp %s: %w", cmd, r.err)
		}
		if result != nil {
			if err := json.Unmarshal(r.ret, result); err != nil {
				return fmt.Errorf("qmp %s: decode reply: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		// A reply arriving from now on finds no waiter and is dropped.
		c.forget(id)
		return fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

func encodeRequest(cmd string, args any, id string) ([]byte, error) {
	req := struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments,omitempty"`
		ID        string          `json:"id"`
	}{Execute: cmd, ID: id}
	if args != nil {
		raw, err := json.Marshal(args)
		if err != nil {
			return nil, fmt.Errorf("encode arguments: %w", err)
		}
		// QEMU rejects "arguments": null; a typed nil means no arguments.
		if !bytes.Equal(raw, []byte("null")) {
			req.Arguments = raw
		}
	}
	raw, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode request: %w", err)
	}
	return append(raw, '\r', '\n'), nil
}

func (c *Client) send(ctx context.Context, req, oob []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	deadline, _ := ctx.Deadline()
	_ = c.conn.SetWriteDeadline(deadline)
	var n int
	var err error
	if oob != nil {
		// The descriptor travels with the command's first byte; QEMU
		// keeps it until the command is parsed.
		n, _, err = c.conn.(*net.UnixConn).WriteMsgUnix(req, oob, nil)
	} else {
		n, err = c.conn.Write(req)
	}
	if err == nil {
		return nil
	}
	if errors.Is(err, os.ErrDeadlineExceeded) && n == 0 {
		// Nothing reached QEMU, so the stream is intact.
		return ctxError(ctx, err)
	}
	// Any other failure, or half a command on the wire (which QEMU's
	// parser would glue to the next one), leaves a connection that can
	// no longer be trusted. Closing it makes the reader fail everything
	// else that is pending too.
	c.log.Warn("qmp write failed; dropping connection", "err", err, "written", n)
	_ = c.conn.Close()
	return fmt.Errorf("%w: %w", ErrClosed, err)
}

func (c *Client) forget(id string) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

func (c *Client) readLoop() {
	defer close(c.readerDone)
	for {
		var raw json.RawMessage
		if err := c.dec.Decode(&raw); err != nil {
			c.shutdown(err)
			return
		}
		c.dispatch(raw)
	}
}

// shutdown fails every pending call, closes every event channel and
// Done. It runs once, on the reader goroutine.
func (c *Client) shutdown(cause error) {
	_ = c.conn.Close()
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closing:
		c.closeErr = ErrClosed
		c.log.Debug("qmp connection closed")
	case errors.Is(cause, io.EOF):
		c.closeErr = fmt.Errorf("%w: %w", ErrClosed, cause)
		c.log.Info("qmp connection ended by QEMU")
	default:
		// A syntax error leaves json.Decoder unable to find the next
		// message, so it ends the connection as surely as EOF does.
		c.closeErr = fmt.Errorf("%w: %w", ErrClosed, cause)
		c.log.Warn("qmp connection lost", "err", cause)
	}
	c.closed = true
	// Done first, so that whoever learns of the loss from a failed call
	// or a closed channel also finds Done closed.
	close(c.done)
	for id, ch := range c.pending {
		ch <- reply{err: c.closeErr}
		delete(c.pending, id)
	}
	for s := range c.subs {
		close(s.ch)
		delete(c.subs, s)
	}
}

// wireMessage is any message QEMU sends. Members stay raw until we know
// what kind of message it is, so that a malformed member of a reply
// still reaches its caller as an error instead of being dropped.
type wireMessage struct {
	ID        json.RawMessage `json:"id"`
	Return    json.RawMessage `json:"return"`
	Error     json.RawMessage `json:"error"`
	Event     json.RawMessage `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp json.RawMessage `json:"timestamp"`
}

func (c *Client) dispatch(raw []byte) {
	var m wireMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		c.log.Warn("qmp: ignoring message that is not an object", "msg", truncate(raw))
		return
	}
	if m.Event != nil {
		c.dispatchEvent(m, raw)
		return
	}
	if m.Return == nil && m.Error == nil {
		c.log.Warn("qmp: ignoring message that is neither reply nor event", "msg", truncate(raw))
		return
	}
	var id string
	if m.ID == nil || json.Unmarshal(m.ID, &id) != nil {
		// QEMU omits the id only when it could not parse the request,
		// so there is no caller to tell.
		c.log.Warn("qmp: dropping reply without a usable id", "msg", truncate(raw))
		return
	}
	c.mu.Lock()
	ch, ok := c.pending[id]
	delete(c.pending, id)
	c.mu.Unlock()
	if !ok {
		c.log.Warn("qmp: dropping reply nobody waits for (late reply to a timed-out call?)", "id", id)
		return
	}
	ch <- decodeReply(m)
}

func decodeReply(m wireMessage) reply {
	if m.Error != nil {
		var e Error
		if err := json.Unmarshal(m.Error, &e); err != nil {
			return reply{err: fmt.Errorf("malformed error reply: %w", err)}
		}
		return reply{err: &e}
	}
	return reply{ret: m.Return}
}

func (c *Client) dispatchEvent(m wireMessage, raw []byte) {
	var name string
	if err := json.Unmarshal(m.Event, &name); err != nil || name == "" {
		c.log.Warn("qmp: ignoring event without a name", "msg", truncate(raw))
		return
	}
	var ts struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	}
	var when time.Time
	if m.Timestamp != nil && json.Unmarshal(m.Timestamp, &ts) == nil {
		when = time.Unix(ts.Seconds, ts.Microseconds*int64(time.Microsecond))
	}
	c.log.Debug("qmp event", "event", name)
	c.mu.Lock()
	defer c.mu.Unlock()
	for s := range c.subs {
		// Copies, so that no subscriber can alter what another sees.
		c.deliver(s, Event{Name: name, Data: bytes.Clone(m.Data), Time: when})
	}
}

// deliver must be called with c.mu held: that keeps the channel from
// being closed under us, and makes the reader its only sender.
func (c *Client) deliver(s *subscription, ev Event) {
	select {
	case s.ch <- ev:
		if s.dropped > 0 {
			c.log.Info("qmp event subscriber caught up", "dropped", s.dropped)
			s.dropped = 0
		}
		return
	default:
	}
	// Blocking here would stall the reader and with it every command
	// reply, so a consumer that falls behind loses its oldest events:
	// the newest say most about the VM's current state.
	var lost Event
	select {
	case lost = <-s.ch:
	default:
	}
	select {
	case s.ch <- ev:
	default:
	}
	if s.dropped == 0 {
		c.log.Warn("qmp event subscriber is not keeping up; dropping oldest events", "dropped_event", lost.Name)
	}
	s.dropped++
}

func (c *Client) newSubscriptionLocked() *subscription {
	s := &subscription{ch: make(chan Event, c.bufSize)}
	if c.closed {
		close(s.ch)
		return s
	}
	c.subs[s] = struct{}{}
	return s
}

// Subscribe implements Monitor.
func (c *Client) Subscribe() (<-chan Event, func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.newSubscriptionLocked()
	return s.ch, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := c.subs[s]; ok {
			delete(c.subs, s)
			close(s.ch)
		}
	}
}

// Events implements Monitor. The channel is created on the first call:
// a connection whose owner only uses Subscribe would otherwise fill it
// and log drops nobody cares about.
func (c *Client) Events() <-chan Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.def == nil {
		c.def = c.newSubscriptionLocked()
	}
	return c.def.ch
}

func truncate(raw []byte) string {
	const limit = 200
	if len(raw) > limit {
		return string(raw[:limit]) + "..."
	}
	return string(raw)
}
