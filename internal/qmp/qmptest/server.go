// Package qmptest provides fakes of QEMU's monitor: Server speaks QMP on
// a unix socket, for testing the qmp client itself; Monitor implements
// qmp.Monitor in memory, for testing the layers above it.
package qmptest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/qmp"
)

// HandlerFunc answers one command. Its first result becomes the reply's
// "return" member (nil means {}); a non-nil *qmp.Error makes it an error
// reply instead. Returning NoReply sends nothing at all.
type HandlerFunc func(args json.RawMessage) (any, *qmp.Error)

type noReply struct{}

// NoReply is a HandlerFunc result that makes the server never answer,
// like a hung QEMU.
var NoReply any = noReply{}

// DefaultGreeting is what QEMU 7.2 sends on connect.
const DefaultGreeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}`

// Request is a command as the server received it.
type Request struct {
	ID      json.RawMessage
	Command string
	Args    json.RawMessage
}

// ServerOption configures a Server.
type ServerOption func(*Server)

// WithGreeting replaces the greeting sent on connect; it is sent as is,
// so it may be malformed on purpose.
func WithGreeting(raw string) ServerOption {
	return func(s *Server) { s.greeting = raw }
}

// WithReplyDelay delays every reply (except to qmp_capabilities) by d.
func WithReplyDelay(d time.Duration) ServerOption {
	return func(s *Server) { s.delay = d }
}

// WithReversedReplies holds replies back until n of them are ready and
// then sends them in reverse order, to prove that replies are matched
// by id rather than by order. Replies to qmp_capabilities are exempt.
func WithReversedReplies(n int) ServerOption {
	return func(s *Server) { s.batch = n }
}

// Server is a fake QMP server. Unlike QEMU it runs each command in its
// own goroutine, so that replies can overtake each other.
type Server struct {
	t        testing.TB
	path     string
	ln       net.Listener
	greeting string
	delay    time.Duration
	batch    int

	mu       sync.Mutex
	handlers map[string]HandlerFunc
	conns    map[*serverConn]struct{}
	requests []Request
	closed   bool

	wg sync.WaitGroup
}

type serverConn struct {
	conn       net.Conn
	wmu        sync.Mutex
	negotiated bool     // guarded by wmu
	held       [][]byte // guarded by wmu
}

// NewServer starts a fake QMP server on a fresh unix socket; it is shut
// down when the test ends.
func NewServer(t testing.TB, opts ...ServerOption) *Server {
	t.Helper()
	// t.TempDir() paths embed the test name and can exceed the 108-byte
	// limit on unix socket paths.
	dir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatalf("qmptest: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	s := &Server{
		t:        t,
		path:     filepath.Join(dir, "qmp.sock"),
		greeting: DefaultGreeting,
		handlers: make(map[string]HandlerFunc),
		conns:    make(map[*serverConn]struct{}),
	}
	for _, o := range opts {
		o(s)
	}
	var lc net.ListenConfig
	s.ln, err = lc.Listen(context.Background(), "unix", s.path)
	if err != nil {
		t.Fatalf("qmptest: listen: %v", err)
	}
	t.Cleanup(s.Close)
	s.wg.Add(1)
	go s.accept()
	return s
}

// Path is the socket to dial.
func (s *Server) Path() string { return s.path }

// Handle sets the handler for cmd. Commands without one get a
// CommandNotFound error, as from QEMU. A handler for qmp_capabilities
// replaces the built-in acceptance.
func (s *Server) Handle(cmd string, fn HandlerFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers[cmd] = fn
}

// Requests returns every command received so far, in arrival order.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...)
}

// Emit sends an event to every client that has negotiated capabilities.
func (s *Server) Emit(name string, data any) {
	now := time.Now()
	ev := map[string]any{
		"event":     name,
		"timestamp": map[string]int64{"seconds": now.Unix(), "microseconds": int64(now.Nanosecond() / 1000)},
	}
	if data != nil {
		ev["data"] = data
	}
	raw, err := json.Marshal(ev)
	if err != nil {
		s.t.Errorf("qmptest: encode event %s: %v", name, err)
		return
	}
	for _, c := range s.connections() {
		c.wmu.Lock()
		if c.negotiated {
			_, _ = c.conn.Write(append(raw, '\r', '\n'))
		}
		c.wmu.Unlock()
	}
}

// WriteRaw sends b verbatim to every connected client.
func (s *Server) WriteRaw(b []byte) {
	for _, c := range s.connections() {
		c.wmu.Lock()
		_, _ = c.conn.Write(b)
		c.wmu.Unlock()
	}
}

// Disconnect drops every client connection, as QEMU exiting would. The
// server keeps accepting new ones.
func (s *Server) Disconnect() {
	for _, c := range s.connections() {
		_ = c.conn.Close()
	}
}

// Close stops the server and waits for its goroutines. Handlers that
// block must return by then.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.mu.Unlock()
	_ = s.ln.Close()
	s.Disconnect()
	s.wg.Wait()
}

func (s *Server) connections() []*serverConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		out = append(out, c)
	}
	return out
}

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		conn, err := s.ln.Accept()
		if err != nil {
			return
		}
		c := &serverConn{conn: conn}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			_ = conn.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serve(c)
	}
}

func (s *Server) serve(c *serverConn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		_ = c.conn.Close()
	}()
	c.wmu.Lock()
	_, err := c.conn.Write([]byte(s.greeting + "\r\n"))
	c.wmu.Unlock()
	if err != nil {
		return
	}
	dec := json.NewDecoder(c.conn)
	for {
		var req struct {
			Execute   string          `json:"execute"`
			Arguments json.RawMessage `json:"arguments"`
			ID        json.RawMessage `json:"id"`
		}
		if err := dec.Decode(&req); err != nil {
			return
		}
		s.mu.Lock()
		s.requests = append(s.requests, Request{ID: req.ID, Command: req.Execute, Args: req.Arguments})
		fn := s.handlers[req.Execute]
		s.mu.Unlock()

		c.wmu.Lock()
		negotiated := c.negotiated
		c.wmu.Unlock()
		switch {
		case req.Execute == "qmp_capabilities":
			// Answered inline so that nothing can overtake it: the
			// client sends nothing else before it has the reply.
			var ret any
			var qerr *qmp.Error
			switch {
			case negotiated:
				qerr = &qmp.Error{Class: qmp.ClassCommandNotFound, Desc: "Capabilities negotiation is already complete, command ignored"}
			case fn != nil:
				ret, qerr = fn(req.Arguments)
			}
			if isNoReply(ret) {
				continue
			}
			c.wmu.Lock()
			if qerr == nil {
				c.negotiated = true
			}
			s.write(c, encodeReply(req.ID, ret, qerr))
			c.wmu.Unlock()
		case !negotiated:
			s.reply(c, req.ID, nil, &qmp.Error{Class: qmp.ClassCommandNotFound, Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"})
		case fn == nil:
			s.reply(c, req.ID, nil, &qmp.Error{Class: qmp.ClassCommandNotFound, Desc: fmt.Sprintf("The command %s has not been found", req.Execute)})
		default:
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				if s.delay > 0 {
					time.Sleep(s.delay)
				}
				ret, qerr := fn(req.Arguments)
				if isNoReply(ret) {
					return
				}
				s.reply(c, req.ID, ret, qerr)
			}()
		}
	}
}

func (s *Server) reply(c *serverConn, id json.RawMessage, ret any, qerr *qmp.Error) {
	msg := encodeReply(id, ret, qerr)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if s.batch <= 1 {
		s.write(c, msg)
		return
	}
	c.held = append(c.held, msg)
	if len(c.held) < s.batch {
		return
	}
	for i := len(c.held) - 1; i >= 0; i-- {
		s.write(c, c.held[i])
	}
	c.held = nil
}

// write must be called with c.wmu held.
func (s *Server) write(c *serverConn, msg []byte) {
	if msg != nil {
		_, _ = c.conn.Write(msg)
	}
}

func isNoReply(v any) bool {
	_, ok := v.(noReply)
	return ok
}

func encodeReply(id json.RawMessage, ret any, qerr *qmp.Error) []byte {
	msg := map[string]any{}
	if id != nil {
		msg["id"] = id
	}
	switch {
	case qerr != nil:
		msg["error"] = qerr
	case ret == nil:
		msg["return"] = struct{}{}
	default:
		msg["return"] = ret
	}
	raw, err := json.Marshal(msg)
	if err != nil {
		// A handler returned something unmarshalable; tell the client,
		// as QEMU would for an internal failure.
		raw, _ = json.Marshal(map[string]any{"id": id, "error": qmp.Error{Class: qmp.ClassGenericError, Desc: err.Error()}})
	}
	return append(raw, '\r', '\n')
}
