package qmp_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/qmp/qmptest"
)

// logBuffer collects log output from the client's goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func newLogger(buf *logBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func dial(t *testing.T, s *qmptest.Server, opts ...qmp.Option) *qmp.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, s.Path(), opts...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// echo answers with its arguments.
func echo(args json.RawMessage) (any, *qmp.Error) { return args, nil }

func TestDialGreeting(t *testing.T) {
	tests := []struct {
		name        string
		greeting    string
		wantVersion string
		wantErr     bool
		wantErrIs   error
	}{
		{name: "qemu 7.2", greeting: qmptest.DefaultGreeting, wantVersion: "7.2.22"},
		{name: "qemu 9.1", greeting: `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 9}, "package": ""}, "capabilities": []}}`, wantVersion: "9.1.0"},
		{name: "not a QMP greeting", greeting: `{"hello": "world"}`, wantErr: true},
		{name: "garbage", greeting: `this is not json`, wantErr: true},
		{name: "wrong types", greeting: `{"QMP": {"version": {"qemu": {"major": "seven"}}}}`, wantErr: true},
		{name: "silent peer", greeting: ``, wantErr: true, wantErrIs: context.DeadlineExceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := qmptest.NewServer(t, qmptest.WithGreeting(tt.greeting))
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			c, err := qmp.Dial(ctx, s.Path())
			if tt.wantErr {
				if err == nil {
					_ = c.Close()
					t.Fatal("Dial succeeded, want error")
				}
				if tt.wantErrIs != nil && !errors.Is(err, tt.wantErrIs) {
					t.Fatalf("Dial error = %v, want %v", err, tt.wantErrIs)
				}
				return
			}
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer func() { _ = c.Close() }()
			if got := c.Version(); got != tt.wantVersion {
				t.Errorf("Version() = %q, want %q", got, tt.wantVersion)
			}
			reqs := s.Requests()
			if len(reqs) != 1 || reqs[0].Command != "qmp_capabilities" {
				t.Errorf("server got %+v, want just qmp_capabilities", reqs)
			}
		})
	}
}

func TestDialFailures(t *testing.T) {
	t.Run("no socket", func(t *testing.T) {
		_, err := qmp.Dial(context.Background(), "/nonexistent/qmp.sock")
		if !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("Dial error = %v, want one wrapping os.ErrNotExist", err)
		}
	})
	t.Run("capabilities refused", func(t *testing.T) {
		s := qmptest.NewServer(t)
		s.Handle("qmp_capabilities", func(json.RawMessage) (any, *qmp.Error) {
			return nil, &qmp.Error{Class: qmp.ClassGenericError, Desc: "no"}
		})
		_, err := qmp.Dial(context.Background(), s.Path())
		var qerr *qmp.Error
		if !errors.As(err, &qerr) || qerr.Desc != "no" {
			t.Fatalf("Dial error = %v, want the *qmp.Error from the server", err)
		}
	})
}

func TestExecute(t *testing.T) {
	type result struct {
		N    int    `json:"n"`
		Name string `json:"name"`
	}
	tests := []struct {
		name      string
		cmd       string
		handler   qmptest.HandlerFunc
		args      any
		result    any // pointer to decode into, or nil
		wantArgs  string
		want      any
		wantClass string // a *qmp.Error of this class is expected
		wantErr   bool   // some other error is expected
	}{
		{
			name:     "args and result",
			cmd:      "echo",
			handler:  echo,
			args:     map[string]any{"n": 7, "name": "web"},
			result:   &result{},
			wantArgs: `{"n":7,"name":"web"}`,
			want:     &result{N: 7, Name: "web"},
		},
		{
			name:    "no args, result ignored",
			cmd:     "stop",
			handler: func(json.RawMessage) (any, *qmp.Error) { return map[string]int{"x": 1}, nil },
		},
		{
			name:    "typed nil args are omitted",
			cmd:     "echo",
			handler: echo,
			args:    (*result)(nil),
		},
		{
			name:    "raw args",
			cmd:     "echo",
			handler: echo,
			args:    json.RawMessage(`{"n":3}`), wantArgs: `{"n":3}`,
			result: &result{}, want: &result{N: 3},
		},
		{
			name: "error reply",
			cmd:  "device_del",
			handler: func(json.RawMessage) (any, *qmp.Error) {
				return nil, &qmp.Error{Class: qmp.ClassDeviceNotFound, Desc: "Device 'x' not found"}
			},
			wantClass: qmp.ClassDeviceNotFound,
		},
		{name: "unknown command", cmd: "no-such-command", wantClass: qmp.ClassCommandNotFound},
		{
			name:    "reply does not fit result",
			cmd:     "query-status",
			handler: func(json.RawMessage) (any, *qmp.Error) { return "a string", nil },
			result:  &result{},
			wantErr: true,
		},
		{
			name:    "unmarshalable args",
			cmd:     "echo",
			handler: echo,
			args:    map[string]any{"f": func() {}},
			wantErr: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := qmptest.NewServer(t)
			if tt.handler != nil {
				s.Handle(tt.cmd, tt.handler)
			}
			c := dial(t, s)
			err := c.Execute(context.Background(), tt.cmd, tt.args, tt.result)
			var qerr *qmp.Error
			switch {
			case tt.wantClass != "":
				if !errors.As(err, &qerr) || qerr.Class != tt.wantClass {
					t.Fatalf("err = %v, want *qmp.Error of class %s", err, tt.wantClass)
				}
				if !strings.Contains(err.Error(), tt.cmd) {
					t.Errorf("error %q does not name the command", err)
				}
			case tt.wantErr:
				if err == nil || errors.As(err, &qerr) {
					t.Fatalf("err = %v, want a non-QMP error", err)
				}
			case err != nil:
				t.Fatalf("Execute: %v", err)
			}
			if tt.want != nil {
				got, _ := json.Marshal(tt.result)
				want, _ := json.Marshal(tt.want)
				if !bytes.Equal(got, want) {
					t.Errorf("result = %s, want %s", got, want)
				}
			}
			if tt.wantErr {
				return
			}
			reqs := s.Requests()
			last := reqs[len(reqs)-1]
			if last.Command != tt.cmd {
				t.Fatalf("server got %q, want %q", last.Command, tt.cmd)
			}
			if string(last.Args) != tt.wantArgs {
				t.Errorf("server got arguments %s, want %q", last.Args, tt.wantArgs)
			}
		})
	}
}

// TestRepliesMatchedByID runs concurrent callers against servers that
// answer in the opposite order, or in random order, and checks that
// every caller gets its own reply.
func TestRepliesMatchedByID(t *testing.T) {
	tests := []struct {
		name    string
		opts    []qmptest.ServerOption
		workers int
		calls   int // per worker
		jitter  bool
	}{
		{name: "reversed", opts: []qmptest.ServerOption{qmptest.WithReversedReplies(8)}, workers: 8, calls: 1},
		{name: "reversed repeatedly", opts: []qmptest.ServerOption{qmptest.WithReversedReplies(4)}, workers: 4, calls: 10},
		{name: "random delays", workers: 32, calls: 25, jitter: true},
		{name: "delayed replies", opts: []qmptest.ServerOption{qmptest.WithReplyDelay(5 * time.Millisecond)}, workers: 8, calls: 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := qmptest.NewServer(t, tt.opts...)
			s.Handle("echo", func(args json.RawMessage) (any, *qmp.Error) {
				if tt.jitter {
					time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
				}
				return args, nil
			})
			c := dial(t, s)
			var wg sync.WaitGroup
			errs := make(chan error, tt.workers*tt.calls)
			for w := range tt.workers {
				wg.Go(func() {
					for i := range tt.calls {
						want := fmt.Sprintf("w%d-c%d", w, i)
						var got struct{ Tag string }
						if err := c.Execute(context.Background(), "echo", map[string]string{"tag": want}, &got); err != nil {
							errs <- err
							return
						}
						if got.Tag != want {
							errs <- fmt.Errorf("caller %s got reply %q", want, got.Tag)
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			seen := map[string]bool{}
			for _, r := range s.Requests() {
				var id string
				if err := json.Unmarshal(r.ID, &id); err != nil {
					t.Fatalf("request id %s is not a string", r.ID)
				}
				if seen[id] {
					t.Fatalf("id %s used twice", id)
				}
				seen[id] = true
			}
			if want := tt.workers*tt.calls + 1; len(seen) != want {
				t.Errorf("server saw %d ids, want %d", len(seen), want)
			}
		})
	}
}

func TestTimeouts(t *testing.T) {
	tests := []struct {
		name   string
		opts   []qmp.Option
		ctx    func() (context.Context, context.CancelFunc)
		want   error
		atMost time.Duration
	}{
		{
			name: "context deadline",
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 100*time.Millisecond)
			},
			want: context.DeadlineExceeded, atMost: time.Second,
		},
		{
			name: "default timeout",
			opts: []qmp.Option{qmp.WithTimeout(100 * time.Millisecond)},
			ctx:  func() (context.Context, context.CancelFunc) { return context.Background(), func() {} },
			want: context.DeadlineExceeded, atMost: time.Second,
		},
		{
			name: "cancelled",
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(50*time.Millisecond, cancel)
				return ctx, cancel
			},
			want: context.Canceled, atMost: time.Second,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := qmptest.NewServer(t)
			s.Handle("hang", func(json.RawMessage) (any, *qmp.Error) { return qmptest.NoReply, nil })
			s.Handle("ping", func(json.RawMessage) (any, *qmp.Error) { return map[string]string{"pong": "yes"}, nil })
			c := dial(t, s, tt.opts...)
			ctx, cancel := tt.ctx()
			defer cancel()
			start := time.Now()
			err := c.Execute(ctx, "hang", nil, nil)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if d := time.Since(start); d > tt.atMost {
				t.Errorf("call took %s, want at most %s", d, tt.atMost)
			}
			// The connection survives a timed-out call.
			var got struct{ Pong string }
			if err := c.Execute(context.Background(), "ping", nil, &got); err != nil || got.Pong != "yes" {
				t.Fatalf("ping after timeout: %+v, %v", got, err)
			}
		})
	}
}

func TestLateReplyIsDropped(t *testing.T) {
	s := qmptest.NewServer(t)
	release := make(chan struct{})
	s.Handle("slow", func(json.RawMessage) (any, *qmp.Error) {
		<-release
		return map[string]string{"v": "late"}, nil
	})
	s.Handle("fast", func(json.RawMessage) (any, *qmp.Error) { return map[string]string{"v": "fast"}, nil })
	var logs logBuffer
	c := dial(t, s, qmp.WithLogger(newLogger(&logs)))

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := c.Execute(ctx, "slow", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow: err = %v, want deadline exceeded", err)
	}
	close(release)
	waitFor(t, "late reply to be logged", func() bool { return strings.Contains(logs.String(), "nobody waits") })

	var got struct{ V string }
	if err := c.Execute(context.Background(), "fast", nil, &got); err != nil {
		t.Fatal(err)
	}
	if got.V != "fast" {
		t.Fatalf("fast got %q, want its own reply", got.V)
	}
}

func TestMalformedMessagesAreSkipped(t *testing.T) {
	s := qmptest.NewServer(t)
	s.Handle("ping", func(json.RawMessage) (any, *qmp.Error) { return map[string]int{"n": 1}, nil })
	var logs logBuffer
	c := dial(t, s, qmp.WithLogger(newLogger(&logs)))
	events, cancel := c.Subscribe()
	defer cancel()

	junk := []string{
		`{"return": {}, "id": "no-such-id"}`,
		`{"return": {}}`,
		`{"return": {}, "id": 2}`,
		`[1, 2, 3]`,
		`"a string"`,
		`{"event": 5}`,
		`{"event": ""}`,
		`{"greetings": "unexpected"}`,
		`{"event": "BAD_TIME", "timestamp": "yesterday"}`,
	}
	for _, j := range junk {
		s.WriteRaw([]byte(j + "\r\n"))
	}
	var got struct{ N int }
	if err := c.Execute(context.Background(), "ping", nil, &got); err != nil || got.N != 1 {
		t.Fatalf("ping after junk: %+v, %v", got, err)
	}
	// The event with an unreadable timestamp is still an event.
	select {
	case ev := <-events:
		if ev.Name != "BAD_TIME" || !ev.Time.IsZero() {
			t.Fatalf("got event %+v, want BAD_TIME with zero time", ev)
		}
	case <-time.After(time.Second):
		t.Fatal("no event")
	}
	select {
	case ev := <-events:
		t.Fatalf("unexpected event %+v", ev)
	default:
	}
	if n := strings.Count(logs.String(), "level=WARN"); n != len(junk)-1 {
		t.Errorf("logged %d warnings, want %d:\n%s", n, len(junk)-1, logs.String())
	}
}

func TestEventsReachEverySubscriber(t *testing.T) {
	s := qmptest.NewServer(t)
	c := dial(t, s)
	a, cancelA := c.Subscribe()
	b, cancelB := c.Subscribe()
	defer cancelB()
	all := c.Events()
	if c.Events() != all {
		t.Fatal("Events() returned a different channel on the second call")
	}

	before := time.Now().Add(-time.Second)
	s.Emit("BALLOON_CHANGE", map[string]int64{"actual": 1 << 30})
	s.Emit("SHUTDOWN", map[string]any{"guest": true, "reason": "guest-shutdown"})
	want := []struct{ name, data string }{
		{"BALLOON_CHANGE", `{"actual":1073741824}`},
		{"SHUTDOWN", `{"guest":true,"reason":"guest-shutdown"}`},
	}
	got := map[string][]qmp.Event{}
	for name, ch := range map[string]<-chan qmp.Event{"a": a, "b": b, "events": all} {
		for range want {
			got[name] = append(got[name], recv(t, ch))
		}
	}
	for name, evs := range got {
		for i, w := range want {
			ev := evs[i]
			if ev.Name != w.name || string(ev.Data) != w.data {
				t.Errorf("%s[%d] = %s %s, want %s %s", name, i, ev.Name, ev.Data, w.name, w.data)
			}
			if ev.Time.Before(before) || ev.Time.After(time.Now()) {
				t.Errorf("%s[%d] time %v is not QEMU's timestamp", name, i, ev.Time)
			}
		}
	}
	// Subscribers do not share buffers.
	got["a"][0].Data[0] = 'X'
	if got["b"][0].Data[0] != '{' {
		t.Error("changing one subscriber's event data changed another's")
	}

	cancelA()
	cancelA() // harmless
	if _, ok := <-a; ok {
		t.Fatal("channel still open after cancel")
	}
	s.Emit("RESUME", nil)
	for name, ch := range map[string]<-chan qmp.Event{"b": b, "events": all} {
		if ev := recv(t, ch); ev.Name != "RESUME" || ev.Data != nil {
			t.Errorf("%s got %s %s, want RESUME without data", name, ev.Name, ev.Data)
		}
	}
}

func TestSlowSubscriberLosesOldestEvents(t *testing.T) {
	s := qmptest.NewServer(t)
	s.Handle("ping", func(json.RawMessage) (any, *qmp.Error) { return nil, nil })
	var logs logBuffer
	c := dial(t, s, qmp.WithEventBuffer(4), qmp.WithLogger(newLogger(&logs)))
	slow, cancel := c.Subscribe()
	defer cancel()

	for i := range 10 {
		s.Emit(fmt.Sprintf("E%d", i), nil)
	}
	// The reply follows the events on the wire, so once it is here the
	// reader has dealt with all of them, without blocking on slow.
	ctx, cancelCtx := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancelCtx()
	if err := c.Execute(ctx, "ping", nil, nil); err != nil {
		t.Fatalf("ping with a stalled subscriber: %v", err)
	}
	var names []string
	for len(slow) > 0 {
		names = append(names, (<-slow).Name)
	}
	if got, want := strings.Join(names, ","), "E6,E7,E8,E9"; got != want {
		t.Errorf("slow subscriber kept %s, want %s", got, want)
	}
	if n := strings.Count(logs.String(), "not keeping up"); n != 1 {
		t.Errorf("logged the overflow %d times, want once", n)
	}
}

func TestConnectionLoss(t *testing.T) {
	s := qmptest.NewServer(t)
	s.Handle("hang", func(json.RawMessage) (any, *qmp.Error) { return qmptest.NoReply, nil })
	c := dial(t, s)
	events, cancel := c.Subscribe()
	defer cancel()
	all := c.Events()

	const callers = 5
	errs := make(chan error, callers)
	for range callers {
		go func() { errs <- c.Execute(context.Background(), "hang", nil, nil) }()
	}
	waitFor(t, "all calls to reach the server", func() bool { return len(s.Requests()) == callers+1 })
	s.Disconnect()

	for range callers {
		select {
		case err := <-errs:
			if !errors.Is(err, qmp.ErrClosed) {
				t.Errorf("pending call: err = %v, want ErrClosed", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("pending call not failed after connection loss")
		}
	}
	select {
	case <-c.Done():
	case <-time.After(time.Second):
		t.Fatal("Done not closed")
	}
	for name, ch := range map[string]<-chan qmp.Event{"subscription": events, "events": all} {
		if _, ok := <-ch; ok {
			t.Errorf("%s channel not closed", name)
		}
	}
	if err := c.Execute(context.Background(), "hang", nil, nil); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("call after loss: err = %v, want ErrClosed", err)
	}
	late, _ := c.Subscribe()
	if _, ok := <-late; ok {
		t.Error("subscription after loss is open")
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close after loss: %v", err)
	}
}

func TestCloseFailsPendingCalls(t *testing.T) {
	s := qmptest.NewServer(t)
	s.Handle("hang", func(json.RawMessage) (any, *qmp.Error) { return qmptest.NoReply, nil })
	c := dial(t, s)
	errc := make(chan error, 1)
	go func() { errc <- c.Execute(context.Background(), "hang", nil, nil) }()
	waitFor(t, "the call to reach the server", func() bool { return len(s.Requests()) == 2 })
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-errc; !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("pending call: err = %v, want ErrClosed", err)
	}
	select {
	case <-c.Done():
	default:
		t.Fatal("Done not closed when Close returned")
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestCommandHelpers(t *testing.T) {
	tests := []struct {
		name string
		cmd  string
		call func(context.Context, qmp.Monitor) error
	}{
		{"Stop", "stop", qmp.Stop},
		{"Cont", "cont", qmp.Cont},
		{"SystemPowerdown", "system_powerdown", qmp.SystemPowerdown},
		{"SystemReset", "system_reset", qmp.SystemReset},
		{"Quit", "quit", qmp.Quit},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := qmptest.NewServer(t)
			s.Handle(tt.cmd, func(json.RawMessage) (any, *qmp.Error) { return nil, nil })
			c := dial(t, s)
			if err := tt.call(context.Background(), c); err != nil {
				t.Fatal(err)
			}
			reqs := s.Requests()
			if got := reqs[len(reqs)-1]; got.Command != tt.cmd || got.Args != nil {
				t.Fatalf("server got %s %s, want %s without arguments", got.Command, got.Args, tt.cmd)
			}
		})
	}

	t.Run("QueryStatus", func(t *testing.T) {
		s := qmptest.NewServer(t)
		s.Handle("query-status", func(json.RawMessage) (any, *qmp.Error) {
			return map[string]any{"status": "paused", "running": false, "singlestep": false}, nil
		})
		st, err := qmp.QueryStatus(context.Background(), dial(t, s))
		if err != nil || st != (qmp.Status{Status: "paused", Running: false}) {
			t.Fatalf("QueryStatus = %+v, %v", st, err)
		}
	})

	t.Run("Quit without reply", func(t *testing.T) {
		// QEMU may exit before its reply is out.
		s := qmptest.NewServer(t)
		s.Handle("quit", func(json.RawMessage) (any, *qmp.Error) {
			go s.Disconnect()
			return qmptest.NoReply, nil
		})
		c := dial(t, s)
		if err := qmp.Quit(context.Background(), c); err != nil {
			t.Fatalf("Quit: %v", err)
		}
		if err := qmp.Quit(context.Background(), c); !errors.Is(err, qmp.ErrClosed) {
			t.Fatalf("Quit on a closed monitor: err = %v, want ErrClosed", err)
		}
	})
}

func recv(t *testing.T, ch <-chan qmp.Event) qmp.Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("event channel closed")
		}
		return ev
	case <-time.After(2 * time.Second):
		t.Fatal("no event")
	}
	return qmp.Event{}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
