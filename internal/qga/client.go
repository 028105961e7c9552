package qga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for the options.
const (
	DefaultTimeout      = 10 * time.Second
	DefaultSyncTimeout  = 3 * time.Second
	DefaultShutdownWait = time.Second
	DefaultMaxFileSize  = 64 << 20
)

// Option configures a Client.
type Option func(*config)

type config struct {
	log          *slog.Logger
	timeout      time.Duration
	syncTimeout  time.Duration
	shutdownWait time.Duration
	maxFileSize  int
}

// WithLogger sets the logger; a nil logger means slog.Default().
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.log = l }
}

// WithTimeout sets how long one exchange with the agent may take when
// the context has no deadline (DefaultTimeout if d <= 0). Exec and the
// file operations make many exchanges; each gets this long.
func WithTimeout(d time.Duration) Option {
	return func(c *config) { c.timeout = d }
}

// WithSyncTimeout sets how long one synchronisation attempt waits for
// the agent (DefaultSyncTimeout if d <= 0). Attempts repeat until the
// context ends.
func WithSyncTimeout(d time.Duration) Option {
	return func(c *config) { c.syncTimeout = d }
}

// WithShutdownWait sets how long Shutdown waits for a refusal before
// taking silence for success (DefaultShutdownWait if d <= 0).
func WithShutdownWait(d time.Duration) Option {
	return func(c *config) { c.shutdownWait = d }
}

// WithMaxFileSize sets the largest file FileRead accepts
// (DefaultMaxFileSize if n <= 0).
func WithMaxFileSize(n int) Option {
	return func(c *config) { c.maxFileSize = n }
}

func buildConfig(opts []Option) config {
	var c config
	for _, o := range opts {
		o(&c)
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	c.log = c.log.With("component", "qga")
	if c.timeout <= 0 {
		c.timeout = DefaultTimeout
	}
	if c.syncTimeout <= 0 {
		c.syncTimeout = DefaultSyncTimeout
	}
	if c.shutdownWait <= 0 {
		c.shutdownWait = DefaultShutdownWait
	}
	if c.maxFileSize <= 0 {
		c.maxFileSize = DefaultMaxFileSize
	}
	return c
}

// Client is a guest agent connection. It is safe for concurrent use:
// exchanges take turns.
type Client struct {
	conn net.Conn
	r    *bufio.Reader
	log  *slog.Logger
	cfg  config

	// turn serialises exchanges, since without ids a reply can only be
	// attributed to the one request in flight. It is a channel rather
	// than a mutex so that waiting for a turn honours the context.
	turn chan struct{}
	// needSync and broken are guarded by turn.
	needSync bool
	broken   error // once set, every call fails with it

	closed    atomic.Bool
	newSyncID func() int64
}

var _ Agent = (*Client)(nil)

// Dial connects to the agent's socket and synchronises with the agent.
// If nothing answers, the error wraps ErrUnresponsive: QEMU accepts the
// connection even while no agent runs in the guest.
func Dial(ctx context.Context, socketPath string, opts ...Option) (*Client, error) {
	cfg := buildConfig(opts)
	cfg.log = cfg.log.With("socket", socketPath)
	ctx, cancel := withDefaultTimeout(ctx, cfg.timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("qga dial %s: %w", socketPath, err)
	}
	c, err := newClient(ctx, conn, cfg)
	if err != nil {
		return nil, fmt.Errorf("qga connect %s: %w", socketPath, err)
	}
	return c, nil
}

// NewClient synchronises with the agent over conn, which the client
// then owns: it is closed by Close, or at once if synchronisation fails.
func NewClient(ctx context.Context, conn net.Conn, opts ...Option) (*Client, error) {
	cfg := buildConfig(opts)
	ctx, cancel := withDefaultTimeout(ctx, cfg.timeout)
	defer cancel()
	c, err := newClient(ctx, conn, cfg)
	if err != nil {
		return nil, fmt.Errorf("qga connect: %w", err)
	}
	return c, nil
}

func newClient(ctx context.Context, conn net.Conn, cfg config) (*Client, error) {
	c := &Client{
		conn:      conn,
		r:         bufio.NewReader(conn),
		log:       cfg.log,
		cfg:       cfg,
		turn:      make(chan struct{}, 1),
		needSync:  true,
		newSyncID: func() int64 { return rand.Int64N(1 << 53) },
	}
	if err := c.sync(ctx); err != nil {
		_ = conn.Close()
		return nil, err
	}
	return c, nil
}

// Close ends the connection, interrupting any exchange in progress. It
// is safe to call more than once.
func (c *Client) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	if err := c.conn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("qga close: %w", err)
	}
	return nil
}

func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

func (c *Client) acquire(ctx context.Context) error {
	select {
	case c.turn <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *Client) release() { <-c.turn }

// do runs one command and decodes its "return" into result (if not nil).
func (c *Client) do(ctx context.Context, cmd string, args, result any) error {
	if err := c.exchange(ctx, cmd, args, result); err != nil {
		return fmt.Errorf("qga %s: %w", cmd, err)
	}
	return nil
}

// exchange is do without the error prefix, for operations made of
// several commands.
func (c *Client) exchange(ctx context.Context, cmd string, args, result any) error {
	ctx, cancel := withDefaultTimeout(ctx, c.cfg.timeout)
	defer cancel()
	msg, err := encodeRequest(cmd, args)
	if err != nil {
		return err
	}
	if err := c.acquire(ctx); err != nil {
		return err
	}
	defer c.release()
	if err := c.prepare(ctx); err != nil {
		return err
	}
	disarm := c.arm(ctx)
	defer disarm()
	if _, err := c.conn.Write(msg); err != nil {
		return c.transportError(ctx, err)
	}
	frame, err := readFrame(c.r, maxFrame)
	if err != nil {
		return c.transportError(ctx, err)
	}
	ret, err := decodeReply(frame)
	if err != nil {
		if errors.Is(err, errMalformed) {
			c.needSync = true
		}
		return err
	}
	if result != nil {
		// The reply was a well-formed object, so the stream is still in
		// step even if its contents do not fit.
		if err := json.Unmarshal(ret, result); err != nil {
			return fmt.Errorf("decode reply: %w", err)
		}
	}
	return nil
}

func encodeRequest(cmd string, args any) ([]byte, error) {
	req := struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments,omitempty"`
	}{Execute: cmd}
	if args != nil {
		raw, err := json.Marshal(args)
		if err != nil {
			return nil, fmt.Errorf("encode arguments: %w", err)
		}
		if !bytes.Equal(raw, []byte("null")) {
			req.Arguments = raw
		}
	}
	raw, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode request: %w", err)
	}
	return append(raw, '\n'), nil
}

// prepare makes the connection ready for an exchange. The caller holds
// the turn.
func (c *Client) prepare(ctx context.Context) error {
	if c.closed.Load() {
		return ErrClosed
	}
	if c.broken != nil {
		return c.broken
	}
	if c.needSync {
		return c.sync(ctx)
	}
	return nil
}

// arm applies ctx to the connection's I/O. The caller holds the turn.
func (c *Client) arm(ctx context.Context) (disarm func()) {
	deadline, _ := ctx.Deadline()
	_ = c.conn.SetDeadline(deadline)
	return interruptOnCancel(ctx, func() { _ = c.conn.SetDeadline(time.Now()) })
}

// interruptOnCancel calls interrupt when ctx is cancelled, so that
// blocked I/O returns at once rather than at the deadline. Once stop has
// returned, interrupt is not running and will not run, so the next
// exchange can set its own deadlines without them being clobbered.
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

// transportError classifies an I/O failure. Every one of them leaves the
// stream out of step: a reply may be half read, or still to come.
func (c *Client) transportError(ctx context.Context, err error) error {
	c.needSync = true
	switch {
	case c.closed.Load() || errors.Is(err, net.ErrClosed):
		c.broken = ErrClosed
	case errors.Is(err, os.ErrDeadlineExceeded):
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// The socket deadline is the context's, but may fire first.
		return context.DeadlineExceeded
	case errors.Is(err, errFrameTooLarge):
		c.log.Warn("guest agent sent an oversized reply", "limit", maxFrame)
		return fmt.Errorf("%w: reply over %d bytes", ErrTooLarge, maxFrame)
	default:
		// EOF: QEMU closed the socket because it exited. Anything else
		// is as final.
		c.broken = fmt.Errorf("%w: %w", ErrClosed, err)
		c.log.Info("guest agent connection lost", "err", err)
	}
	return c.broken
}

// errNoSyncReply means one sync attempt timed out.
var errNoSyncReply = errors.New("no reply to guest-sync-delimited")

// sync brings the stream back in step with the agent, trying again
// every syncTimeout until ctx ends. The caller holds the turn.
func (c *Client) sync(ctx context.Context) error {
	c.needSync = true
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, c.cfg.syncTimeout)
		err := c.syncOnce(actx)
		cancel()
		if err == nil {
			c.needSync = false
			c.log.Debug("synchronised with guest agent", "attempts", attempt)
			return nil
		}
		if !errors.Is(err, errNoSyncReply) {
			return fmt.Errorf("sync: %w", err)
		}
		if err := expired(ctx); err != nil {
			if errors.Is(err, context.Canceled) {
				return fmt.Errorf("sync: %w", err)
			}
			return fmt.Errorf("sync: %w after %d attempts: %w", ErrUnresponsive, attempt, err)
		}
		c.log.Debug("guest agent sync attempt timed out; retrying", "attempt", attempt)
	}
}

// expired is ctx.Err(), except that it also reports a deadline that has
// passed but whose timer has not fired yet.
func expired(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}

func (c *Client) syncOnce(ctx context.Context) error {
	id := c.newSyncID()
	msg, err := encodeRequest("guest-sync-delimited", map[string]int64{"id": id})
	if err != nil {
		return err
	}
	// The leading delimiter makes the agent drop any half-received
	// command, which would otherwise swallow this one.
	msg = append([]byte{delimiter}, msg...)
	disarm := c.arm(ctx)
	defer disarm()
	if _, err := c.conn.Write(msg); err != nil {
		return c.syncError(ctx, err)
	}
	// The agent sends a delimiter ahead of its reply; whatever comes
	// before the first one is stale.
	for {
		b, err := c.r.ReadByte()
		if err != nil {
			return c.syncError(ctx, err)
		}
		if b == delimiter {
			break
		}
	}
	// Stale replies may still follow, e.g. to an earlier client's sync.
	for {
		frame, err := readFrame(c.r, maxFrame)
		if errors.Is(err, errFrameTooLarge) {
			continue
		}
		if err != nil {
			return c.syncError(ctx, err)
		}
		if isSyncReply(frame, id) {
			return nil
		}
		c.log.Debug("discarding stale guest agent output", "bytes", len(frame))
	}
}

func (c *Client) syncError(ctx context.Context, err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return errNoSyncReply
	}
	return c.transportError(ctx, err)
}
