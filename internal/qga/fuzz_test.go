package qga

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// fuzzConn plays back fixed bytes as the agent's side of the connection
// and swallows whatever is written to it.
type fuzzConn struct {
	r *bytes.Reader
}

func (c *fuzzConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *fuzzConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *fuzzConn) Close() error                     { return nil }
func (c *fuzzConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *fuzzConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *fuzzConn) SetDeadline(time.Time) error      { return nil }
func (c *fuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fuzzConn) SetWriteDeadline(time.Time) error { return nil }

const fuzzSyncID = 42

// FuzzDecodeReply feeds arbitrary bytes from the "guest" through the
// sync handshake and a series of commands. Whatever the guest sends, the
// client must not panic or hang, and every call must either succeed or
// fail with an error.
func FuzzDecodeReply(f *testing.F) {
	sync := "\xff{\"return\": 42}\n"
	f.Add([]byte(sync + `{"return": {}}` + "\n" + `{"return": {"host-name": "g"}}`))
	f.Add([]byte("junk\xff{\"return\": 41}\xff{\"ret" + sync + `{"error": {"class": "GenericError", "desc": "x"}}`))
	f.Add([]byte(sync + `{"return": {"pid": 7}}{"return": {"exited": true, "exitcode": 1, "out-data": "aGk=", "err-data": "!!"}}`))
	f.Add([]byte(sync + `{"return": 1000}{"return": {"count": 3, "buf-b64": "YWJj", "eof": false}}{"return": {"count": 0, "buf-b64": "", "eof": true}}{"return": {}}`))
	f.Add([]byte(sync + `{"return": [{"name": "eth0", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.0.1", "prefix": 8}]}]}`))
	f.Add([]byte(sync + `{"return": "\"}\\"}` + `{"error": 5}{"neither": 1}[1]{"return": {"a": [}}`))
	f.Add([]byte("\xff\xff\xff{{{{{{{{"))
	f.Add([]byte(sync + "{\"return\": {\"exited\": false}}"))
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))

	f.Fuzz(func(t *testing.T, data []byte) {
		conn := &fuzzConn{r: bytes.NewReader(data)}
		cfg := buildConfig([]Option{WithLogger(discard), WithSyncTimeout(time.Second)})
		c := &Client{
			conn: conn, r: bufio.NewReader(conn), log: cfg.log, cfg: cfg,
			turn: make(chan struct{}, 1), needSync: true,
			newSyncID: func() int64 { return fuzzSyncID },
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := c.sync(ctx); err != nil {
			if ctx.Err() != nil {
				t.Fatal("sync hung")
			}
			return
		}
		calls := []func() error{
			func() error { return c.Ping(ctx) },
			func() error { _, err := c.HostName(ctx); return err },
			func() error { _, err := c.Exec(ctx, ExecRequest{Path: "/bin/true"}); return err },
			func() error { _, err := c.FileRead(ctx, "/f"); return err },
			func() error { _, err := c.NetworkInterfaces(ctx); return err },
			func() error { return c.Shutdown(ctx, "") },
		}
		for _, call := range calls {
			err := call()
			if ctx.Err() != nil {
				t.Fatal("call hung")
			}
			var qerr *Error
			if errors.As(err, &qerr) && qerr == nil {
				t.Fatal("nil *Error returned")
			}
		}
	})
}

// FuzzReadFrame checks the framer on its own: it must terminate, and
// whatever it returns must be a balanced object within the limit.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte(`{"return": {}}`))
	f.Add([]byte(`  {"a": "}\"{", "b": [1, {"c": []}]} {"x": 1}`))
	f.Add([]byte("{\"a\": \"\xff{\"b\": 1}"))
	f.Add([]byte(`}}]]{"a":`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bufio.NewReader(bytes.NewReader(data))
		for range len(data) + 1 {
			frame, err := readFrame(r, 256)
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, errFrameTooLarge) {
					t.Fatalf("unexpected error %v", err)
				}
				if errors.Is(err, errFrameTooLarge) {
					continue
				}
				return
			}
			if len(frame) > 256 || frame[0] != '{' || bytes.IndexByte(frame, delimiter) >= 0 {
				t.Fatalf("bad frame %q", frame)
			}
			last := frame[len(frame)-1]
			if last != '}' && last != ']' {
				t.Fatalf("frame %q does not end a value", frame)
			}
			// Whatever it is, decoding must not panic.
			_, _ = decodeReply(frame)
		}
	})
}
