package qmp_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/qmp/qmptest"
)

// A descriptor passed with getfd must reach the peer attached to the
// command itself, and still refer to the same open file.
func TestPassFD(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	type got struct {
		cmd  string
		name string
		data string
		err  error
	}
	result := make(chan got, 1)
	go func() {
		conn, err := l.AcceptUnix()
		if err != nil {
			result <- got{err: err}
			return
		}
		defer func() { _ = conn.Close() }()
		_, _ = conn.Write([]byte(qmptest.DefaultGreeting + "\n"))
		r := bufio.NewReader(conn)
		if _, err := r.ReadBytes('\n'); err != nil { // qmp_capabilities
			result <- got{err: err}
			return
		}
		_, _ = conn.Write([]byte(`{"return": {}, "id": "1"}` + "\n"))
		buf, oob := make([]byte, 4096), make([]byte, 64)
		n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		if err != nil {
			result <- got{err: err}
			return
		}
		var req struct {
			Execute   string            `json:"execute"`
			Arguments map[string]string `json:"arguments"`
			ID        string            `json:"id"`
		}
		_ = json.Unmarshal(buf[:n], &req)
		msgs, err := syscall.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			result <- got{cmd: req.Execute, err: err}
			return
		}
		fds, err := syscall.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			result <- got{cmd: req.Execute, err: err}
			return
		}
		f := os.NewFile(uintptr(fds[0]), "passed")
		data := make([]byte, 5)
		_, _ = f.ReadAt(data, 0)
		_ = f.Close()
		_, _ = conn.Write([]byte(`{"return": {}, "id": "` + req.ID + `"}` + "\n"))
		result <- got{cmd: req.Execute, name: req.Arguments["fdname"], data: string(data)}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	file := filepath.Join(t.TempDir(), "state")
	if err := os.WriteFile(file, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if err := c.PassFD(ctx, "mem", f); err != nil {
		t.Fatalf("PassFD: %v", err)
	}
	g := <-result
	if g.err != nil || g.cmd != "getfd" || g.name != "mem" || g.data != "hello" {
		t.Fatalf("peer got %+v, want getfd of \"mem\" carrying a file that reads hello", g)
	}
}
