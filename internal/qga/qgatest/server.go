// Package qgatest provides fakes of the QEMU guest agent: Server speaks
// the agent's protocol on a unix socket, for testing the qga client
// itself; Agent implements qga.Agent in memory, for testing the layers
// above it.
package qgatest

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/qga"
)

// HandlerFunc answers one command. Its first result becomes the reply's
// "return" member (nil means {}); a non-nil *qga.Error makes it an error
// reply. Returning NoReply sends nothing.
type HandlerFunc func(args json.RawMessage) (any, *qga.Error)

type noReply struct{}

// NoReply is a HandlerFunc result that makes the server send no reply.
var NoReply any = noReply{}

// ExecCall is a guest-exec request as the server received it.
type ExecCall struct {
	Path  string
	Args  []string
	Env   []string
	Stdin []byte
}

// ExecOutcome scripts how a guest-exec'd program ends.
type ExecOutcome struct {
	ExitCode  int
	Signal    int // if non-zero, the program "was killed" and reports no exit code
	Stdout    []byte
	Stderr    []byte
	Truncated bool          // reported for both streams
	Runtime   time.Duration // how long guest-exec-status reports it still running
}

// The commands a frozen agent still runs; QGA refuses the others so that
// nothing writes to the frozen filesystems.
var frozenAllowed = []string{
	"guest-ping", "guest-sync", "guest-sync-delimited", "guest-info",
	"guest-fsfreeze-status", "guest-fsfreeze-thaw",
}

// Server is a fake guest agent on a unix socket. Like the real agent it
// handles one command at a time per connection, resets its parser on a
// 0xFF byte, and precedes its guest-sync-delimited reply with 0xFF.
//
// Built in: guest-ping, guest-sync(-delimited), guest-info,
// guest-get-host-name, guest-network-get-interfaces, guest-exec and
// guest-exec-status (scripted by SetExec), guest-file-open/read/write/
// close on an in-memory filesystem, guest-fsfreeze-*, and guest-shutdown
// (which, as in QGA, sends no reply on success).
type Server struct {
	t    testing.TB
	path string
	ln   net.Listener

	mu         sync.Mutex
	handlers   map[string]HandlerFunc
	commands   []string
	stale      []byte
	mute       bool
	maxWrite   int
	files      map[string][]byte
	handles    map[int64]*openFile
	nextHandle int64
	frozen     bool
	fsCount    int
	hostName   string
	ifaces     []qga.Interface
	exec       func(ExecCall) ExecOutcome
	execs      []ExecCall
	procs      map[int64]*process
	nextPID    int64
	shutdowns  []string
	conns      map[net.Conn]struct{}
	closed     bool

	wg sync.WaitGroup
}

type openFile struct {
	path   string
	pos    int
	append bool
}

type process struct {
	out   ExecOutcome
	endAt time.Time
}

// NewServer starts a fake agent on a fresh unix socket; it is shut down
// when the test ends.
func NewServer(t testing.TB) *Server {
	t.Helper()
	// t.TempDir() paths embed the test name and can exceed the 108-byte
	// limit on unix socket paths.
	dir, err := os.MkdirTemp("", "qga")
	if err != nil {
		t.Fatalf("qgatest: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	s := &Server{
		t:          t,
		path:       filepath.Join(dir, "qga.sock"),
		handlers:   make(map[string]HandlerFunc),
		files:      make(map[string][]byte),
		handles:    make(map[int64]*openFile),
		nextHandle: 1000,
		fsCount:    2,
		hostName:   "guest",
		ifaces: []qga.Interface{
			{Name: "lo", HardwareAddress: "00:00:00:00:00:00", IPAddresses: []qga.IPAddress{
				{Type: "ipv4", Address: "127.0.0.1", Prefix: 8},
				{Type: "ipv6", Address: "::1", Prefix: 128},
			}},
			{Name: "eth0", HardwareAddress: "52:54:00:12:34:56", IPAddresses: []qga.IPAddress{
				{Type: "ipv4", Address: "10.0.2.15", Prefix: 24},
			}},
		},
		exec: func(c ExecCall) ExecOutcome {
			return ExecOutcome{Stdout: c.Stdin}
		},
		procs:   make(map[int64]*process),
		nextPID: 4000,
		conns:   make(map[net.Conn]struct{}),
	}
	var lc net.ListenConfig
	s.ln, err = lc.Listen(context.Background(), "unix", s.path)
	if err != nil {
		t.Fatalf("qgatest: listen: %v", err)
	}
	t.Cleanup(s.Close)
	s.wg.Add(1)
	go s.accept()
	return s
}

// Path is the socket to dial.
func (s *Server) Path() string { return s.path }

// Handle sets the handler for cmd, replacing any built-in one.
func (s *Server) Handle(cmd string, fn HandlerFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers[cmd] = fn
}

// Commands returns the names of the commands received so far, in order.
func (s *Server) Commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.commands)
}

// InjectStale queues junk to be sent just before the reply to the next
// guest-sync-delimited, as left over by an earlier client or a late
// reply. It may contain 0xFF bytes and partial JSON.
func (s *Server) InjectStale(junk []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stale = append(s.stale, junk...)
}

// SetMute makes the server read commands but answer none, like the
// socket of a guest whose agent is not running.
func (s *Server) SetMute(mute bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mute = mute
}

// SetMaxWrite makes guest-file-write accept at most n bytes per call
// (0: no limit), to exercise short writes.
func (s *Server) SetMaxWrite(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.maxWrite = n
}

// SetExec scripts guest-exec. By default programs exit 0 and echo their
// stdin to stdout.
func (s *Server) SetExec(fn func(ExecCall) ExecOutcome) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.exec = fn
}

// Execs returns the guest-exec requests received so far.
func (s *Server) Execs() []ExecCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.execs)
}

// SetHostName sets what guest-get-host-name reports.
func (s *Server) SetHostName(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hostName = name
}

// SetInterfaces sets what guest-network-get-interfaces reports.
func (s *Server) SetInterfaces(ifaces []qga.Interface) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ifaces = ifaces
}

// PutFile stores a file in the fake guest filesystem.
func (s *Server) PutFile(path string, data []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.files[path] = slices.Clone(data)
}

// File returns a file from the fake guest filesystem.
func (s *Server) File(path string) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	data, ok := s.files[path]
	return slices.Clone(data), ok
}

// OpenHandles is the number of files opened and not closed.
func (s *Server) OpenHandles() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.handles)
}

// Frozen reports whether the guest filesystems are frozen.
func (s *Server) Frozen() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.frozen
}

// Shutdowns returns the modes of the guest-shutdown commands obeyed.
func (s *Server) Shutdowns() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.shutdowns)
}

// Disconnect drops every client connection, as QEMU exiting would.
func (s *Server) Disconnect() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		_ = c.Close()
	}
}

// Close stops the server and waits for its goroutines.
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

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		conn, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			_ = conn.Close()
			return
		}
		s.conns[conn] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serve(conn)
	}
}

func (s *Server) serve(conn net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, conn)
		s.mu.Unlock()
		_ = conn.Close()
	}()
	r := bufio.NewReader(conn)
	for {
		frame, err := readCommand(r)
		if err != nil {
			return
		}
		var req struct {
			Execute   string          `json:"execute"`
			Arguments json.RawMessage `json:"arguments"`
		}
		if err := json.Unmarshal(frame, &req); err != nil {
			s.write(conn, nil, encode(nil, &qga.Error{Class: "GenericError", Desc: "JSON parse error, " + err.Error()}))
			continue
		}
		out := s.handle(req.Execute, req.Arguments)
		if out.msg == nil {
			continue
		}
		s.write(conn, out.prefix, out.msg)
	}
}

func (s *Server) write(conn net.Conn, prefix, msg []byte) {
	_, _ = conn.Write(append(prefix, msg...))
}

// readCommand returns the next JSON object, starting over after a 0xFF
// byte as the agent's parser does.
func readCommand(r *bufio.Reader) ([]byte, error) {
	var buf []byte
	depth := 0
	inString, escaped := false, false
	for {
		b, err := r.ReadByte()
		if err != nil {
			return nil, err
		}
		if b == 0xFF {
			buf, depth, inString, escaped = nil, 0, false, false
			continue
		}
		if depth == 0 && b != '{' {
			continue
		}
		buf = append(buf, b)
		switch {
		case inString && escaped:
			escaped = false
		case inString && b == '\\':
			escaped = true
		case inString && b == '"':
			inString = false
		case inString:
		case b == '"':
			inString = true
		case b == '{' || b == '[':
			depth++
		case b == '}' || b == ']':
			if depth--; depth == 0 {
				return buf, nil
			}
		}
	}
}

type output struct {
	prefix []byte // sent before msg
	msg    []byte // nil: no reply
}

func encode(ret any, qerr *qga.Error) []byte {
	var msg any
	switch {
	case qerr != nil:
		msg = map[string]any{"error": qerr}
	case ret == nil:
		msg = map[string]any{"return": struct{}{}}
	default:
		msg = map[string]any{"return": ret}
	}
	raw, err := json.Marshal(msg)
	if err != nil {
		raw, _ = json.Marshal(map[string]any{"error": qga.Error{Class: "GenericError", Desc: err.Error()}})
	}
	return append(raw, '\n')
}

func genericError(format string, args ...any) *qga.Error {
	return &qga.Error{Class: "GenericError", Desc: fmt.Sprintf(format, args...)}
}

func (s *Server) handle(cmd string, args json.RawMessage) output {
	s.mu.Lock()
	s.commands = append(s.commands, cmd)
	if s.mute {
		s.mu.Unlock()
		return output{}
	}
	fn := s.handlers[cmd]
	s.mu.Unlock()
	if fn != nil {
		// Outside the lock: a handler may sleep to play a slow agent.
		ret, qerr := fn(args)
		if _, ok := ret.(noReply); ok {
			return output{}
		}
		return output{msg: encode(ret, qerr)}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.frozen && !slices.Contains(frozenAllowed, cmd) {
		return output{msg: encode(nil, &qga.Error{Class: "CommandNotFound", Desc: "Command " + cmd + " has been disabled: the command is not allowed"})}
	}
	switch cmd {
	case "guest-sync-delimited":
		var a struct {
			ID *int64 `json:"id"`
		}
		if json.Unmarshal(args, &a) != nil || a.ID == nil {
			return output{msg: encode(nil, genericError("Parameter 'id' is missing"))}
		}
		prefix := append(s.stale, 0xFF)
		s.stale = nil
		return output{prefix: prefix, msg: encode(*a.ID, nil)}
	case "guest-shutdown":
		var a struct {
			Mode string `json:"mode"`
		}
		_ = json.Unmarshal(args, &a)
		if a.Mode == "" {
			a.Mode = qga.ShutdownPowerdown
		}
		if a.Mode != qga.ShutdownPowerdown && a.Mode != qga.ShutdownHalt && a.Mode != qga.ShutdownReboot {
			return output{msg: encode(nil, genericError("Parameter 'mode' does not accept value '%s'", a.Mode))}
		}
		s.shutdowns = append(s.shutdowns, a.Mode)
		return output{} // QGA replies to guest-shutdown only on failure
	}
	ret, qerr := s.builtin(cmd, args)
	return output{msg: encode(ret, qerr)}
}

// builtin runs the stateful commands; s.mu is held.
func (s *Server) builtin(cmd string, args json.RawMessage) (any, *qga.Error) {
	switch cmd {
	case "guest-ping":
		return nil, nil
	case "guest-sync":
		var a struct {
			ID int64 `json:"id"`
		}
		_ = json.Unmarshal(args, &a)
		return a.ID, nil
	case "guest-info":
		names := []string{"guest-ping", "guest-sync", "guest-sync-delimited", "guest-info", "guest-get-host-name",
			"guest-network-get-interfaces", "guest-exec", "guest-exec-status", "guest-file-open", "guest-file-read",
			"guest-file-write", "guest-file-close", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw",
			"guest-fsfreeze-status", "guest-shutdown"}
		sort.Strings(names)
		cmds := make([]qga.CommandInfo, len(names))
		for i, n := range names {
			cmds[i] = qga.CommandInfo{Name: n, Enabled: true, SuccessResponse: n != "guest-shutdown"}
		}
		return qga.Info{Version: "7.2.22", Commands: cmds}, nil
	case "guest-get-host-name":
		return map[string]string{"host-name": s.hostName}, nil
	case "guest-network-get-interfaces":
		return s.ifaces, nil
	case "guest-fsfreeze-status":
		if s.frozen {
			return "frozen", nil
		}
		return "thawed", nil
	case "guest-fsfreeze-freeze":
		if s.frozen {
			return nil, genericError("The command guest-fsfreeze-freeze has been disabled for this instance")
		}
		s.frozen = true
		return s.fsCount, nil
	case "guest-fsfreeze-thaw":
		if !s.frozen {
			return 0, nil
		}
		s.frozen = false
		return s.fsCount, nil
	case "guest-exec":
		return s.guestExec(args)
	case "guest-exec-status":
		return s.guestExecStatus(args)
	case "guest-file-open":
		return s.fileOpen(args)
	case "guest-file-read":
		return s.fileRead(args)
	case "guest-file-write":
		return s.fileWrite(args)
	case "guest-file-close":
		var a struct {
			Handle int64 `json:"handle"`
		}
		_ = json.Unmarshal(args, &a)
		if _, ok := s.handles[a.Handle]; !ok {
			return nil, genericError("handle '%d' has not been found", a.Handle)
		}
		delete(s.handles, a.Handle)
		return nil, nil
	}
	return nil, &qga.Error{Class: "CommandNotFound", Desc: "The command " + cmd + " has not been found"}
}

func (s *Server) guestExec(args json.RawMessage) (any, *qga.Error) {
	var a struct {
		Path          string   `json:"path"`
		Arg           []string `json:"arg"`
		Env           []string `json:"env"`
		InputData     string   `json:"input-data"`
		CaptureOutput bool     `json:"capture-output"`
	}
	if err := json.Unmarshal(args, &a); err != nil || a.Path == "" {
		return nil, genericError("Parameter 'path' is missing")
	}
	call := ExecCall{Path: a.Path, Args: a.Arg, Env: a.Env}
	if a.InputData != "" {
		in, err := base64.StdEncoding.DecodeString(a.InputData)
		if err != nil {
			return nil, genericError("Invalid base64 data")
		}
		call.Stdin = in
	}
	s.execs = append(s.execs, call)
	out := s.exec(call)
	if !a.CaptureOutput {
		out.Stdout, out.Stderr = nil, nil
	}
	s.nextPID++
	s.procs[s.nextPID] = &process{out: out, endAt: time.Now().Add(out.Runtime)}
	return map[string]int64{"pid": s.nextPID}, nil
}

func (s *Server) guestExecStatus(args json.RawMessage) (any, *qga.Error) {
	var a struct {
		PID int64 `json:"pid"`
	}
	_ = json.Unmarshal(args, &a)
	p, ok := s.procs[a.PID]
	if !ok {
		return nil, genericError("Invalid parameter 'pid'")
	}
	if time.Now().Before(p.endAt) {
		return map[string]any{"exited": false}, nil
	}
	// Like QGA, forget the process once its end has been reported.
	delete(s.procs, a.PID)
	st := map[string]any{"exited": true}
	if p.out.Signal != 0 {
		st["signal"] = p.out.Signal
	} else {
		st["exitcode"] = p.out.ExitCode
	}
	if len(p.out.Stdout) > 0 {
		st["out-data"] = base64.StdEncoding.EncodeToString(p.out.Stdout)
	}
	if len(p.out.Stderr) > 0 {
		st["err-data"] = base64.StdEncoding.EncodeToString(p.out.Stderr)
	}
	if p.out.Truncated {
		st["out-truncated"], st["err-truncated"] = true, true
	}
	return st, nil
}

func (s *Server) fileOpen(args json.RawMessage) (any, *qga.Error) {
	var a struct {
		Path string `json:"path"`
		Mode string `json:"mode"`
	}
	if err := json.Unmarshal(args, &a); err != nil || a.Path == "" {
		return nil, genericError("Parameter 'path' is missing")
	}
	f := &openFile{path: a.Path}
	switch a.Mode {
	case "", "r":
		if _, ok := s.files[a.Path]; !ok {
			return nil, genericError("failed to open file '%s' (mode: 'r'): No such file or directory", a.Path)
		}
	case "w":
		s.files[a.Path] = []byte{}
	case "a":
		if _, ok := s.files[a.Path]; !ok {
			s.files[a.Path] = []byte{}
		}
		f.append = true
	default:
		return nil, genericError("invalid file open mode '%s'", a.Mode)
	}
	s.nextHandle++
	s.handles[s.nextHandle] = f
	return s.nextHandle, nil
}

func (s *Server) fileRead(args json.RawMessage) (any, *qga.Error) {
	var a struct {
		Handle int64 `json:"handle"`
		Count  *int  `json:"count"`
	}
	_ = json.Unmarshal(args, &a)
	f, ok := s.handles[a.Handle]
	if !ok {
		return nil, genericError("handle '%d' has not been found", a.Handle)
	}
	count := 4096 // QGA's default
	if a.Count != nil {
		count = *a.Count
	}
	if count < 0 || count > 48<<20 {
		return nil, genericError("value '%d' is invalid for argument count", count)
	}
	data := s.files[f.path]
	n := min(count, len(data)-f.pos)
	chunk := data[f.pos : f.pos+n]
	f.pos += n
	// As with fread and feof: end of file is reported only by a read
	// that asked for more than was left.
	return map[string]any{
		"count":   n,
		"buf-b64": base64.StdEncoding.EncodeToString(chunk),
		"eof":     count > n,
	}, nil
}

func (s *Server) fileWrite(args json.RawMessage) (any, *qga.Error) {
	var a struct {
		Handle int64  `json:"handle"`
		BufB64 string `json:"buf-b64"`
		Count  *int   `json:"count"`
	}
	_ = json.Unmarshal(args, &a)
	f, ok := s.handles[a.Handle]
	if !ok {
		return nil, genericError("handle '%d' has not been found", a.Handle)
	}
	buf, err := base64.StdEncoding.DecodeString(a.BufB64)
	if err != nil {
		return nil, genericError("Invalid base64 data")
	}
	if a.Count != nil {
		if *a.Count < 0 || *a.Count > len(buf) {
			return nil, genericError("value '%d' is invalid for argument count", *a.Count)
		}
		buf = buf[:*a.Count]
	}
	if s.maxWrite > 0 && len(buf) > s.maxWrite {
		buf = buf[:s.maxWrite]
	}
	data := s.files[f.path]
	if f.append {
		f.pos = len(data)
	}
	if end := f.pos + len(buf); end > len(data) {
		data = append(data, make([]byte, end-len(data))...)
	}
	copy(data[f.pos:], buf)
	f.pos += len(buf)
	s.files[f.path] = data
	return map[string]any{"count": len(buf), "eof": false}, nil
}
