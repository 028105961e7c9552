package identity

import (
	"context"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qga/qgatest"
)

func TestGeneralize(t *testing.T) {
	tests := []struct {
		name     string
		os       string
		exitCode int
		windows  bool
		wantErr  string
		wantPath string
		wantArg  string
	}{
		{"linux", "debian", 0, false, "", "/bin/sh", "rm -f /etc/ssh/ssh_host_*"},
		{"linux script fails", "debian", 1, false, "exited 1", "/bin/sh", ": >/etc/machine-id"},
		{"windows", "mswindows", 0, true, "", `C:\Windows\System32\cmd.exe`, "/generalize"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := qgatest.NewAgent()
			a.SetOSInfo(qga.OSInfo{ID: tt.os})
			var got qga.ExecRequest
			a.SetExec(func(_ context.Context, req qga.ExecRequest) (qga.ExecResult, error) {
				got = req
				return qga.ExecResult{ExitCode: tt.exitCode, Stderr: []byte("no room")}, nil
			})
			windows, err := Generalize(context.Background(), a)
			if windows != tt.windows {
				t.Errorf("windows = %v, want %v", windows, tt.windows)
			}
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("err = %v, want %q", err, tt.wantErr)
			}
			if got.Path != tt.wantPath || !strings.Contains(strings.Join(got.Args, " "), tt.wantArg) {
				t.Errorf("ran %s %q; want %s with %q", got.Path, got.Args, tt.wantPath, tt.wantArg)
			}
		})
	}
}

func TestApply(t *testing.T) {
	a := qgatest.NewAgent()
	var got qga.ExecRequest
	a.SetExec(func(_ context.Context, req qga.ExecRequest) (qga.ExecResult, error) {
		got = req
		return qga.ExecResult{}, nil
	})
	if err := Apply(context.Background(), a, "web-2"); err != nil {
		t.Fatal(err)
	}
	// The hostname travels as an argument, never spliced into the script.
	if got.Path != "/bin/sh" || got.Args[len(got.Args)-1] != "web-2" || strings.Contains(got.Args[1], "web-2") {
		t.Errorf("ran %s %q", got.Path, got.Args)
	}
	if err := Apply(context.Background(), a, "bad;name"); err == nil {
		t.Error("Apply accepted a hostname with a ';'")
	}
	a.SetOSInfo(qga.OSInfo{ID: "mswindows"})
	if err := Apply(context.Background(), a, "web-2"); err == nil || !strings.Contains(err.Error(), "sysprep") {
		t.Errorf("Apply on Windows = %v, want a refusal pointing at sysprep", err)
	}
}
