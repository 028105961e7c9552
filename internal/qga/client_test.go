package qga_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qga/qgatest"
)

func dial(t *testing.T, s *qgatest.Server, opts ...qga.Option) *qga.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := qga.Dial(ctx, s.Path(), opts...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func count(cmds []string, name string) int {
	n := 0
	for _, c := range cmds {
		if c == name {
			n++
		}
	}
	return n
}

func TestSyncDiscardsStaleData(t *testing.T) {
	tests := []struct {
		name  string
		stale string
	}{
		{name: "nothing", stale: ""},
		{name: "text junk", stale: "login: Password: \r\n"},
		{name: "half a reply", stale: `{"return": {"host-name": "sta`},
		{name: "unterminated string", stale: `{"return": "abc {{{ [[[`},
		{name: "stale reply", stale: `{"return": {"host-name": "stale"}}` + "\n"},
		{name: "old sync reply after a delimiter", stale: "\xff" + `{"return": 12345}` + "\n"},
		{name: "stale reply after a delimiter", stale: "\xff" + `{"return": {"host-name": "stale"}}` + "\n"},
		{name: "error after a delimiter", stale: "\xff" + `{"error": {"class": "GenericError", "desc": "old"}}` + "\n"},
		{name: "partial object after a delimiter", stale: "\xff" + `{"return": {"host-name": "sta`},
		{name: "delimiters and garbage", stale: "\xff\xff}}]]\"\\\xff{\"a\":[1,2,{\"b\":\"}\"}]}\n\xff not json {}"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := qgatest.NewServer(t)
			s.InjectStale([]byte(tt.stale))
			c := dial(t, s)
			// Had the client taken stale output for a reply, the host
			// name would be "stale" or the call would fail.
			for range 2 {
				name, err := c.HostName(context.Background())
				if err != nil {
					t.Fatalf("HostName: %v", err)
				}
				if name != "guest" {
					t.Fatalf("HostName = %q, want %q", name, "guest")
				}
			}
			if got := s.Commands(); !slices.Equal(got, []string{"guest-sync-delimited", "guest-get-host-name", "guest-get-host-name"}) {
				t.Errorf("server got %v, want one sync then the two commands", got)
			}
		})
	}
}

func TestExec(t *testing.T) {
	binary := []byte{0, 1, 2, 0xff, 0xfe, '\n', '"', '\\'}
	tests := []struct {
		name      string
		req       qga.ExecRequest
		outcome   qgatest.ExecOutcome
		want      qga.ExecResult
		minPolls  int
		wantStdin []byte
	}{
		{
			name:    "stdout and exit 0",
			req:     qga.ExecRequest{Path: "/bin/uname", Args: []string{"-r"}},
			outcome: qgatest.ExecOutcome{Stdout: []byte("6.1.0\n")},
			want:    qga.ExecResult{Stdout: []byte("6.1.0\n")},
		},
		{
			name:    "stderr and exit code",
			req:     qga.ExecRequest{Path: "/bin/false", Env: []string{"LANG=C", "X=a b"}},
			outcome: qgatest.ExecOutcome{ExitCode: 3, Stderr: []byte("boom\n")},
			want:    qga.ExecResult{ExitCode: 3, Stderr: []byte("boom\n")},
		},
		{
			name:      "binary stdin and output",
			req:       qga.ExecRequest{Path: "/bin/cat", Stdin: binary},
			outcome:   qgatest.ExecOutcome{Stdout: binary, Stderr: binary},
			want:      qga.ExecResult{Stdout: binary, Stderr: binary},
			wantStdin: binary,
		},
		{
			name:    "killed by a signal",
			req:     qga.ExecRequest{Path: "/bin/sleep", Args: []string{"100"}},
			outcome: qgatest.ExecOutcome{Signal: 9},
			want:    qga.ExecResult{ExitCode: -1, Signal: 9},
		},
		{
			name:    "truncated output",
			req:     qga.ExecRequest{Path: "/bin/yes"},
			outcome: qgatest.ExecOutcome{Stdout: []byte("y\ny\n"), Truncated: true},
			want:    qga.ExecResult{Stdout: []byte("y\ny\n"), Truncated: true},
		},
		{
			name:     "runs a while",
			req:      qga.ExecRequest{Path: "/bin/sleep", Args: []string{"0.15"}},
			outcome:  qgatest.ExecOutcome{Runtime: 150 * time.Millisecond, Stdout: []byte("done")},
			want:     qga.ExecResult{Stdout: []byte("done")},
			minPolls: 3,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := qgatest.NewServer(t)
			s.SetExec(func(qgatest.ExecCall) qgatest.ExecOutcome { return tt.outcome })
			c := dial(t, s)
			got, err := c.Exec(context.Background(), tt.req)
			if err != nil {
				t.Fatalf("Exec: %v", err)
			}
			if got.ExitCode != tt.want.ExitCode || got.Signal != tt.want.Signal || got.Truncated != tt.want.Truncated ||
				!bytes.Equal(got.Stdout, tt.want.Stdout) || !bytes.Equal(got.Stderr, tt.want.Stderr) {
				t.Errorf("Exec = %+v, want %+v", got, tt.want)
			}
			execs := s.Execs()
			if len(execs) != 1 {
				t.Fatalf("server saw %d guest-exec, want 1", len(execs))
			}
			call := execs[0]
			if call.Path != tt.req.Path || !slices.Equal(call.Args, tt.req.Args) || !slices.Equal(call.Env, tt.req.Env) || !bytes.Equal(call.Stdin, tt.wantStdin) {
				t.Errorf("server got %+v, want %+v", call, tt.req)
			}
			polls := count(s.Commands(), "guest-exec-status")
			if polls < max(1, tt.minPolls) {
				t.Errorf("polled %d times, want at least %d", polls, max(1, tt.minPolls))
			}
			// Backoff: 150 ms of runtime must not take dozens of polls.
			if polls > 12 {
				t.Errorf("polled %d times; backoff not working", polls)
			}
		})
	}
}

func TestExecHonoursContext(t *testing.T) {
	s := qgatest.NewServer(t)
	s.SetExec(func(qgatest.ExecCall) qgatest.ExecOutcome { return qgatest.ExecOutcome{Runtime: time.Hour} })
	c := dial(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Exec(ctx, qga.ExecRequest{Path: "/bin/sleep", Args: []string{"3600"}})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Exec: err = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Exec returned after %s", d)
	}
	// The client is still usable.
	if err := c.Ping(context.Background()); err != nil {
		t.Fatalf("Ping after cancelled Exec: %v", err)
	}
}

func TestFileRoundTrip(t *testing.T) {
	const chunk = 48 << 10
	sizes := []int{0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3*chunk + 17}
	for _, maxWrite := range []int{0, 10000} {
		for _, size := range sizes {
			t.Run(fmt.Sprintf("size=%d/maxwrite=%d", size, maxWrite), func(t *testing.T) {
				s := qgatest.NewServer(t)
				s.SetMaxWrite(maxWrite)
				c := dial(t, s)
				data := make([]byte, size)
				for i := range data {
					data[i] = byte(rand.IntN(256))
				}
				const path = "/etc/lodge/blob"
				if err := c.FileWrite(context.Background(), path, data); err != nil {
					t.Fatalf("FileWrite: %v", err)
				}
				stored, ok := s.File(path)
				if !ok || !bytes.Equal(stored, data) {
					t.Fatalf("guest has %d bytes (exists %v), want the %d written", len(stored), ok, size)
				}
				got, err := c.FileRead(context.Background(), path)
				if err != nil {
					t.Fatalf("FileRead: %v", err)
				}
				if !bytes.Equal(got, data) {
					t.Fatalf("read back %d bytes, differing from the %d written", len(got), size)
				}
				if n := s.OpenHandles(); n != 0 {
					t.Errorf("%d file handles left open in the guest", n)
				}
				cmds := s.Commands()
				if want := (size + chunk - 1) / chunk; maxWrite == 0 && count(cmds, "guest-file-write") != want {
					t.Errorf("%d guest-file-write calls, want %d", count(cmds, "guest-file-write"), want)
				}
				// Reading stops at the first short read, which the agent
				// flags eof; only a size that is a multiple of the chunk
				// needs the extra, empty read.
				if want := size/chunk + 1; count(cmds, "guest-file-read") != want {
					t.Errorf("%d guest-file-read calls, want %d: %v", count(cmds, "guest-file-read"), want, cmds)
				}
			})
		}
	}
}

func TestFileErrors(t *testing.T) {
	t.Run("missing file", func(t *testing.T) {
		s := qgatest.NewServer(t)
		c := dial(t, s)
		_, err := c.FileRead(context.Background(), "/no/such/file")
		var qerr *qga.Error
		if !errors.As(err, &qerr) || !strings.Contains(qerr.Desc, "No such file") {
			t.Fatalf("err = %v, want a *qga.Error about the missing file", err)
		}
	})
	t.Run("too large", func(t *testing.T) {
		s := qgatest.NewServer(t)
		s.PutFile("/big", make([]byte, 100<<10))
		c := dial(t, s, qga.WithMaxFileSize(64<<10))
		if _, err := c.FileRead(context.Background(), "/big"); !errors.Is(err, qga.ErrTooLarge) {
			t.Fatalf("err = %v, want ErrTooLarge", err)
		}
		if n := s.OpenHandles(); n != 0 {
			t.Errorf("%d file handles left open after a failed read", n)
		}
	})
	t.Run("write failing midway closes the handle", func(t *testing.T) {
		s := qgatest.NewServer(t)
		var writes atomic.Int32
		s.Handle("guest-file-write", func(json.RawMessage) (any, *qga.Error) {
			if writes.Add(1) == 2 {
				return nil, &qga.Error{Class: "GenericError", Desc: "No space left on device"}
			}
			return map[string]any{"count": 48 << 10, "eof": false}, nil
		})
		c := dial(t, s)
		err := c.FileWrite(context.Background(), "/f", make([]byte, 3*48<<10))
		var qerr *qga.Error
		if !errors.As(err, &qerr) || !strings.Contains(err.Error(), "No space") {
			t.Fatalf("err = %v, want the agent's error", err)
		}
		if n := s.OpenHandles(); n != 0 {
			t.Errorf("%d file handles left open after a failed write", n)
		}
	})
}

func TestErrorReply(t *testing.T) {
	s := qgatest.NewServer(t)
	s.Handle("guest-get-host-name", func(json.RawMessage) (any, *qga.Error) {
		return nil, &qga.Error{Class: "GenericError", Desc: "hostname unavailable"}
	})
	c := dial(t, s)
	_, err := c.HostName(context.Background())
	var qerr *qga.Error
	if !errors.As(err, &qerr) {
		t.Fatalf("err = %v (%T), want *qga.Error", err, err)
	}
	if qerr.Class != "GenericError" || qerr.Desc != "hostname unavailable" {
		t.Errorf("error = %+v", qerr)
	}
	if errors.Is(err, qga.ErrUnresponsive) || errors.Is(err, qga.ErrClosed) {
		t.Errorf("a refusal must not look like a transport failure: %v", err)
	}
	// An error reply keeps the stream in step: no resync needed.
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := count(s.Commands(), "guest-sync-delimited"); n != 1 {
		t.Errorf("synced %d times, want once", n)
	}
}

func TestTimeoutThenResync(t *testing.T) {
	s := qgatest.NewServer(t)
	var calls atomic.Int32
	s.Handle("guest-get-host-name", func(json.RawMessage) (any, *qga.Error) {
		if calls.Add(1) == 1 {
			// The agent is slow this once; its reply comes too late.
			time.Sleep(300 * time.Millisecond)
			return map[string]string{"host-name": "late"}, nil
		}
		return map[string]string{"host-name": "guest"}, nil
	})
	c := dial(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.HostName(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow HostName: err = %v, want deadline exceeded", err)
	}
	name, err := c.HostName(context.Background())
	if err != nil {
		t.Fatalf("HostName after timeout: %v", err)
	}
	if name != "guest" {
		t.Fatalf("HostName = %q: the late reply was taken for the new one", name)
	}
	if n := count(s.Commands(), "guest-sync-delimited"); n != 2 {
		t.Errorf("synced %d times, want twice (at connect and after the timeout)", n)
	}
}

func TestShutdown(t *testing.T) {
	tests := []struct {
		name      string
		mode      string
		wantMode  string
		wantClass string
	}{
		{name: "default", mode: "", wantMode: "powerdown"},
		{name: "reboot", mode: qga.ShutdownReboot, wantMode: "reboot"},
		{name: "bad mode", mode: "explode", wantClass: "GenericError"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := qgatest.NewServer(t)
			c := dial(t, s, qga.WithShutdownWait(200*time.Millisecond))
			start := time.Now()
			err := c.Shutdown(context.Background(), tt.mode)
			if tt.wantClass != "" {
				var qerr *qga.Error
				if !errors.As(err, &qerr) || qerr.Class != tt.wantClass {
					t.Fatalf("err = %v, want *qga.Error of class %s", err, tt.wantClass)
				}
				if d := time.Since(start); d > 150*time.Millisecond {
					t.Errorf("a refusal took %s; it should not wait for the full wait", d)
				}
			} else {
				if err != nil {
					t.Fatalf("Shutdown: %v", err)
				}
				if d := time.Since(start); d < 200*time.Millisecond || d > time.Second {
					t.Errorf("Shutdown returned after %s, want about the 200ms wait", d)
				}
				if got := s.Shutdowns(); !slices.Equal(got, []string{tt.wantMode}) {
					t.Errorf("agent got shutdowns %v, want [%s]", got, tt.wantMode)
				}
			}
			// The client resyncs and carries on.
			if err := c.Ping(context.Background()); err != nil {
				t.Fatalf("Ping after Shutdown: %v", err)
			}
		})
	}

	t.Run("QEMU exits", func(t *testing.T) {
		s := qgatest.NewServer(t)
		s.Handle("guest-shutdown", func(json.RawMessage) (any, *qga.Error) {
			go s.Disconnect()
			return qgatest.NoReply, nil
		})
		c := dial(t, s, qga.WithShutdownWait(2*time.Second))
		start := time.Now()
		if err := c.Shutdown(context.Background(), ""); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("Shutdown waited %s although the connection ended", d)
		}
		if err := c.Ping(context.Background()); !errors.Is(err, qga.ErrClosed) {
			t.Errorf("Ping after QEMU exit: err = %v, want ErrClosed", err)
		}
	})
}

func TestUnresponsiveAgent(t *testing.T) {
	tests := []struct {
		name         string
		ctxTimeout   time.Duration
		opts         []qga.Option
		minAttempts  int
		atLeast      time.Duration
		atMost       time.Duration
		wantDeadline bool
	}{
		{name: "context shorter than an attempt", ctxTimeout: 300 * time.Millisecond, minAttempts: 1, atLeast: 250 * time.Millisecond, atMost: time.Second},
		{name: "several attempts", ctxTimeout: 500 * time.Millisecond, opts: []qga.Option{qga.WithSyncTimeout(100 * time.Millisecond)}, minAttempts: 3, atLeast: 450 * time.Millisecond, atMost: 1500 * time.Millisecond},
		{name: "default timeout", opts: []qga.Option{qga.WithTimeout(300 * time.Millisecond), qga.WithSyncTimeout(100 * time.Millisecond)}, minAttempts: 2, atLeast: 250 * time.Millisecond, atMost: 1500 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := qgatest.NewServer(t)
			s.SetMute(true)
			ctx := context.Background()
			if tt.ctxTimeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.ctxTimeout)
				defer cancel()
			}
			start := time.Now()
			c, err := qga.Dial(ctx, s.Path(), tt.opts...)
			elapsed := time.Since(start)
			if err == nil {
				_ = c.Close()
				t.Fatal("Dial succeeded with a mute agent")
			}
			if !errors.Is(err, qga.ErrUnresponsive) || !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err = %v, want ErrUnresponsive and DeadlineExceeded", err)
			}
			if elapsed < tt.atLeast || elapsed > tt.atMost {
				t.Errorf("gave up after %s, want between %s and %s", elapsed, tt.atLeast, tt.atMost)
			}
			if n := count(s.Commands(), "guest-sync-delimited"); n < tt.minAttempts {
				t.Errorf("%d sync attempts, want at least %d", n, tt.minAttempts)
			}
		})
	}

	t.Run("socket that never answers", func(t *testing.T) {
		// Like QEMU's chardev while no agent runs: accepts and swallows.
		dir, err := os.MkdirTemp("", "qga")
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = os.RemoveAll(dir) }()
		ln, err := net.Listen("unix", filepath.Join(dir, "qga.sock"))
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = ln.Close() }()
		go func() {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer func() { _ = conn.Close() }()
			_, _ = conn.Read(make([]byte, 4096))
			time.Sleep(2 * time.Second)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		_, err = qga.Dial(ctx, filepath.Join(dir, "qga.sock"))
		if !errors.Is(err, qga.ErrUnresponsive) {
			t.Fatalf("err = %v, want ErrUnresponsive", err)
		}
	})

	t.Run("cancelled is not unresponsive", func(t *testing.T) {
		s := qgatest.NewServer(t)
		s.SetMute(true)
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(100*time.Millisecond, cancel)
		_, err := qga.Dial(ctx, s.Path())
		if !errors.Is(err, context.Canceled) || errors.Is(err, qga.ErrUnresponsive) {
			t.Fatalf("err = %v, want context.Canceled only", err)
		}
	})

	t.Run("agent stops answering later", func(t *testing.T) {
		s := qgatest.NewServer(t)
		c := dial(t, s, qga.WithSyncTimeout(100*time.Millisecond))
		s.SetMute(true)
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		if err := c.Ping(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Ping: err = %v, want deadline exceeded", err)
		}
		ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel2()
		if err := c.Ping(ctx2); !errors.Is(err, qga.ErrUnresponsive) {
			t.Fatalf("Ping needing a resync: err = %v, want ErrUnresponsive", err)
		}
		s.SetMute(false)
		if err := c.Ping(context.Background()); err != nil {
			t.Fatalf("Ping once the agent is back: %v", err)
		}
	})
}

func TestConnectionLoss(t *testing.T) {
	t.Run("server disconnects", func(t *testing.T) {
		s := qgatest.NewServer(t)
		c := dial(t, s)
		s.Disconnect()
		err := c.Ping(context.Background())
		if !errors.Is(err, qga.ErrClosed) {
			t.Fatalf("err = %v, want ErrClosed", err)
		}
		if err := c.Ping(context.Background()); !errors.Is(err, qga.ErrClosed) {
			t.Fatalf("second call: err = %v, want ErrClosed", err)
		}
	})
	t.Run("Close interrupts a call", func(t *testing.T) {
		s := qgatest.NewServer(t)
		c := dial(t, s)
		s.SetMute(true)
		errc := make(chan error, 1)
		go func() { errc <- c.Ping(context.Background()) }()
		time.Sleep(50 * time.Millisecond)
		if err := c.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		select {
		case err := <-errc:
			if !errors.Is(err, qga.ErrClosed) {
				t.Fatalf("err = %v, want ErrClosed", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("Close did not interrupt the call")
		}
		if err := c.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	})
}

func TestConcurrentCalls(t *testing.T) {
	s := qgatest.NewServer(t)
	s.SetExec(func(call qgatest.ExecCall) qgatest.ExecOutcome {
		return qgatest.ExecOutcome{Stdout: []byte(strings.Join(call.Args, " ")), Runtime: 10 * time.Millisecond}
	})
	c := dial(t, s)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 16 {
		wg.Go(func() {
			for j := range 4 {
				want := fmt.Sprintf("%d-%d", i, j)
				res, err := c.Exec(context.Background(), qga.ExecRequest{Path: "/bin/echo", Args: []string{want}})
				if err != nil {
					errs <- err
					return
				}
				if string(res.Stdout) != want {
					errs <- fmt.Errorf("exec %s got %q", want, res.Stdout)
				}
				if name, err := c.HostName(context.Background()); err != nil || name != "guest" {
					errs <- fmt.Errorf("HostName = %q, %w", name, err)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestQueries(t *testing.T) {
	s := qgatest.NewServer(t)
	ifaces := []qga.Interface{
		{Name: "lo", HardwareAddress: "00:00:00:00:00:00", IPAddresses: []qga.IPAddress{{Type: "ipv4", Address: "127.0.0.1", Prefix: 8}}},
		{Name: "enp0s3", HardwareAddress: "52:54:00:ab:cd:ef", IPAddresses: []qga.IPAddress{
			{Type: "ipv4", Address: "192.168.122.7", Prefix: 24},
			{Type: "ipv6", Address: "fe80::5054:ff:feab:cdef", Prefix: 64},
		}},
		{Name: "dummy0"},
	}
	s.SetInterfaces(ifaces)
	s.SetHostName("web-1")
	c := dial(t, s)
	ctx := context.Background()

	got, err := c.NetworkInterfaces(ctx)
	if err != nil {
		t.Fatal(err)
	}
	gotJSON, _ := json.Marshal(got)
	wantJSON, _ := json.Marshal(ifaces)
	if !bytes.Equal(gotJSON, wantJSON) {
		t.Errorf("NetworkInterfaces = %s, want %s", gotJSON, wantJSON)
	}
	if name, err := c.HostName(ctx); err != nil || name != "web-1" {
		t.Errorf("HostName = %q, %v", name, err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Version != "7.2.22" || !slices.ContainsFunc(info.Commands, func(ci qga.CommandInfo) bool {
		return ci.Name == "guest-shutdown" && ci.Enabled && !ci.SuccessResponse
	}) {
		t.Errorf("Info = %+v", info)
	}
}

func TestFSFreeze(t *testing.T) {
	s := qgatest.NewServer(t)
	c := dial(t, s)
	ctx := context.Background()
	steps := []struct {
		name string
		do   func() (any, error)
		want any
		// wantClass: the step must fail with a *qga.Error of this class.
		wantClass string
	}{
		{name: "status", do: func() (any, error) { return c.FSFreezeStatus(ctx) }, want: "thawed"},
		{name: "freeze", do: func() (any, error) { return c.FSFreeze(ctx) }, want: 2},
		{name: "status frozen", do: func() (any, error) { return c.FSFreezeStatus(ctx) }, want: "frozen"},
		{name: "writes refused", do: func() (any, error) { return nil, c.FileWrite(ctx, "/x", []byte("x")) }, wantClass: "CommandNotFound"},
		{name: "ping allowed", do: func() (any, error) { return nil, c.Ping(ctx) }},
		{name: "thaw", do: func() (any, error) { return c.FSThaw(ctx) }, want: 2},
		{name: "status thawed", do: func() (any, error) { return c.FSFreezeStatus(ctx) }, want: "thawed"},
		{name: "thaw again", do: func() (any, error) { return c.FSThaw(ctx) }, want: 0},
	}
	for _, st := range steps {
		got, err := st.do()
		if st.wantClass != "" {
			var qerr *qga.Error
			if !errors.As(err, &qerr) || qerr.Class != st.wantClass {
				t.Fatalf("%s: err = %v, want *qga.Error of class %s", st.name, err, st.wantClass)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if got != st.want {
			t.Fatalf("%s = %v, want %v", st.name, got, st.want)
		}
	}
	if s.Frozen() {
		t.Error("guest left frozen")
	}
}
