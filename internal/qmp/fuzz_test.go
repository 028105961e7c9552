package qmp

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// fuzzConn plays back fixed bytes as QEMU's side of the connection and
// swallows whatever is written to it.
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

const fuzzGreeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}` + "\r\n"

// FuzzDecodeReply feeds arbitrary bytes from "QEMU" to the reader: it
// must neither panic nor hang, must answer every waiting caller exactly
// once, and must close subscriptions when the stream ends.
func FuzzDecodeReply(f *testing.F) {
	f.Add([]byte(`{"return": {"status": "running", "running": true}, "id": "1"}` + "\r\n"))
	f.Add([]byte(`{"error": {"class": "GenericError", "desc": "nope"}, "id": "1"}`))
	f.Add([]byte(`{"event": "SHUTDOWN", "data": {"guest": true}, "timestamp": {"seconds": 1700000000, "microseconds": 5}}` + "\r\n" + `{"return": null, "id": "1"}`))
	f.Add([]byte(`{"event": "X", "timestamp": {"seconds": -9223372036854775808, "microseconds": 9223372036854775807}}`))
	f.Add([]byte(`{"id": "1", "error": "not an object"} {"id": ["1"], "return": 1} [1] "s" 5 null`))
	f.Add([]byte(`{"return": {}, "id": "1"`))
	f.Add([]byte(fuzzGreeting + `{"return": {}, "id": "1"}` + "\r\n" + `{"return": {"status": "paused", "running": false}, "id": "2"}`))
	f.Add([]byte("\xff\xfe{}"))
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))

	f.Fuzz(func(t *testing.T, data []byte) {
		// The dispatcher alone, with a caller waiting for id 1.
		conn := &fuzzConn{r: bytes.NewReader(data)}
		c := &Client{
			conn: conn, dec: json.NewDecoder(conn), log: discard, bufSize: 4,
			pending: map[string]chan reply{}, subs: map[*subscription]struct{}{},
			done: make(chan struct{}), readerDone: make(chan struct{}),
		}
		waiter := make(chan reply, 1)
		c.pending["1"] = waiter
		events, _ := c.Subscribe()
		c.readLoop()
		select {
		case r := <-waiter:
			if r.err == nil && r.ret == nil {
				t.Fatal("caller got a reply with neither value nor error")
			}
		default:
			t.Fatal("waiting caller was never answered")
		}
		for ev := range events {
			if ev.Name == "" {
				t.Fatal("event without a name delivered")
			}
		}
		select {
		case <-c.Done():
		default:
			t.Fatal("Done not closed at end of stream")
		}

		// The whole client, greeting included.
		conn = &fuzzConn{r: bytes.NewReader(append([]byte(fuzzGreeting), data...))}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		cl, err := NewClient(ctx, conn, WithLogger(discard))
		if err != nil {
			return
		}
		var st Status
		_ = cl.Execute(ctx, "query-status", nil, &st)
		select {
		case <-cl.Done():
		case <-ctx.Done():
			t.Fatal("client still connected after end of stream")
		}
		_ = cl.Close()
	})
}
