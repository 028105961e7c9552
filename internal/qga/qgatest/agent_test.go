package qgatest_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qga/qgatest"
)

func TestAgent(t *testing.T) {
	ctx := context.Background()
	a := qgatest.NewAgent()

	if err := a.FileWrite(ctx, "/etc/motd", []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if got, err := a.FileRead(ctx, "/etc/motd"); err != nil || !bytes.Equal(got, []byte("hello")) {
		t.Fatalf("FileRead = %q, %v", got, err)
	}
	var qerr *qga.Error
	if _, err := a.FileRead(ctx, "/missing"); !errors.As(err, &qerr) {
		t.Fatalf("FileRead of a missing file: err = %v, want *qga.Error", err)
	}

	res, err := a.Exec(ctx, qga.ExecRequest{Path: "/bin/cat", Stdin: []byte("in")})
	if err != nil || string(res.Stdout) != "in" || res.ExitCode != 0 {
		t.Fatalf("default Exec = %+v, %v", res, err)
	}
	a.SetExec(func(_ context.Context, req qga.ExecRequest) (qga.ExecResult, error) {
		return qga.ExecResult{ExitCode: len(req.Args)}, nil
	})
	if res, err := a.Exec(ctx, qga.ExecRequest{Path: "/bin/x", Args: []string{"a", "b"}}); err != nil || res.ExitCode != 2 {
		t.Fatalf("scripted Exec = %+v, %v", res, err)
	}

	if n, err := a.FSFreeze(ctx); err != nil || n != 2 || !a.Frozen() {
		t.Fatalf("FSFreeze = %d, %v", n, err)
	}
	if err := a.FileWrite(ctx, "/x", nil); !errors.As(err, &qerr) {
		t.Fatalf("FileWrite while frozen: err = %v, want *qga.Error", err)
	}
	if s, err := a.FSFreezeStatus(ctx); err != nil || s != "frozen" {
		t.Fatalf("FSFreezeStatus = %q, %v", s, err)
	}
	if n, err := a.FSThaw(ctx); err != nil || n != 2 || a.Frozen() {
		t.Fatalf("FSThaw = %d, %v", n, err)
	}

	if err := a.Shutdown(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if err := a.Shutdown(ctx, "bogus"); !errors.As(err, &qerr) {
		t.Fatalf("Shutdown(bogus): err = %v, want *qga.Error", err)
	}
	if got := a.Shutdowns(); !slices.Equal(got, []string{"powerdown"}) {
		t.Fatalf("Shutdowns() = %v", got)
	}

	unresponsive := fmt.Errorf("sync: %w", qga.ErrUnresponsive)
	a.SetError("Ping", unresponsive)
	if err := a.Ping(ctx); !errors.Is(err, qga.ErrUnresponsive) {
		t.Fatalf("Ping with injected error: %v", err)
	}
	a.SetError("Ping", nil)
	if err := a.Ping(ctx); err != nil {
		t.Fatalf("Ping after reset: %v", err)
	}

	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.HostName(ctx); !errors.Is(err, qga.ErrClosed) {
		t.Fatalf("HostName after Close: err = %v, want ErrClosed", err)
	}
	want := []string{"FileWrite", "FileRead", "FileRead", "Exec", "Exec", "FSFreeze", "FileWrite", "FSFreezeStatus",
		"FSThaw", "Shutdown", "Shutdown", "Ping", "Ping", "HostName"}
	if got := a.Calls(); !slices.Equal(got, want) {
		t.Errorf("Calls() = %v, want %v", got, want)
	}
}
