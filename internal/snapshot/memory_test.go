package snapshot

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/qmp/qmptest"
)

// fakeQEMU models the migration commands on a qmptest.Monitor: "migrate"
// writes state into the passed pipe and resumes the guest, as QEMU's
// background snapshot does; "migrate-incoming" reads the pipe to EOF.
type fakeQEMU struct {
	*qmptest.Monitor
	mu       sync.Mutex
	status   string // of the migration
	errDesc  string
	loaded   string
	failWith string // makes the outgoing migration fail
}

func newFakeQEMU(state string) *fakeQEMU {
	f := &fakeQEMU{Monitor: qmptest.NewMonitor(), status: "none"}
	ok := func(json.RawMessage) (any, error) { return nil, nil }
	f.Handle("migrate-set-capabilities", ok)
	f.Handle("migrate-set-parameters", ok)
	f.Handle("migrate", func(json.RawMessage) (any, error) {
		w := f.FD(fdName)
		f.set("active", "")
		go func() {
			f.SetStatus("running")
			_, _ = io.WriteString(w, state)
			_ = w.Close()
			if f.failWith != "" {
				f.set("failed", f.failWith)
				return
			}
			f.set("completed", "")
		}()
		return nil, nil
	})
	f.Handle("migrate-incoming", func(json.RawMessage) (any, error) {
		r := f.FD(fdName)
		go func() {
			b, _ := io.ReadAll(r)
			_ = r.Close()
			f.mu.Lock()
			f.loaded = string(b)
			f.mu.Unlock()
			f.set("completed", "")
		}()
		return nil, nil
	})
	f.Handle("query-migrate", func(json.RawMessage) (any, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		return map[string]any{"status": f.status, "error-desc": f.errDesc,
			"ram": map[string]int64{"transferred": 1, "total": 2}}, nil
	})
	return f
}

func (f *fakeQEMU) set(status, desc string) {
	f.mu.Lock()
	f.status, f.errDesc = status, desc
	f.mu.Unlock()
}

func (f *fakeQEMU) loadedState() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.loaded
}

func TestSave(t *testing.T) {
	pollEvery = time.Millisecond
	boom := errors.New("disk switch refused")
	tests := []struct {
		name       string
		guest      string // run state before
		atPauseErr error
		failWith   string
		wantErr    string
		wantAfter  string
	}{
		{name: "running guest", guest: "running", wantAfter: "running"},
		{name: "paused guest stays paused", guest: "paused", wantAfter: "paused"},
		{name: "disk switch fails", guest: "running", atPauseErr: boom, wantErr: "disk switch refused", wantAfter: "running"},
		{name: "qemu fails", guest: "running", failWith: "No space left on device", wantErr: "No space left on device", wantAfter: "running"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := newFakeQEMU("STATE-BYTES")
			q.failWith = tt.failWith
			q.SetStatus(tt.guest)
			path := filepath.Join(t.TempDir(), "s.mem")
			var statusAtPause string
			_, err := Save(context.Background(), q, path, func(ctx context.Context) error {
				st, _ := qmp.QueryStatus(ctx, q)
				statusAtPause = st.Status
				return tt.atPauseErr
			}, nil)
			if got := q.Status(); got != tt.wantAfter {
				t.Errorf("guest is %s after Save, want %s", got, tt.wantAfter)
			}
			if statusAtPause != "paused" {
				t.Errorf("atPause ran with the guest %s, want paused", statusAtPause)
			}
			if _, perr := os.Stat(path + ".part"); perr == nil {
				t.Errorf("%s.part left behind", path)
			}
			b, rerr := os.ReadFile(path)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Save = %v, want an error with %q", err, tt.wantErr)
				}
				if rerr == nil {
					t.Fatalf("failed Save left %s", path)
				}
				return
			}
			if err != nil || string(b) != "STATE-BYTES" {
				t.Fatalf("Save = %v, file %q: want nil and STATE-BYTES", err, b)
			}
		})
	}
}

func TestSaveCancelled(t *testing.T) {
	pollEvery = time.Millisecond
	q := newFakeQEMU("x")
	// A migration that never ends until cancelled.
	q.Handle("migrate", func(json.RawMessage) (any, error) {
		q.set("active", "")
		q.SetStatus("running")
		return nil, nil
	})
	q.Handle("migrate_cancel", func(json.RawMessage) (any, error) {
		_ = q.FD(fdName).Close()
		q.set("cancelled", "")
		return nil, nil
	})
	path := filepath.Join(t.TempDir(), "s.mem")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := Save(ctx, q, path, func(context.Context) error { return nil }, nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Save = %v, want the context's error", err)
	}
	for _, p := range []string{path, path + ".part"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("cancelled Save left %s", p)
		}
	}
}

func TestLoad(t *testing.T) {
	pollEvery = time.Millisecond
	q := newFakeQEMU("")
	path := filepath.Join(t.TempDir(), "s.mem")
	want := strings.Repeat("memory page ", 50000)
	if err := os.WriteFile(path, []byte(want), 0o600); err != nil {
		t.Fatal(err)
	}
	var last int64
	if err := Load(context.Background(), q, path, func(done, _ int64) { last = done }); err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got := q.loadedState(); got != want {
		t.Fatalf("QEMU read %d bytes, want the file's %d", len(got), len(want))
	}
	if last != int64(len(want)) {
		t.Errorf("last progress %d, want %d", last, len(want))
	}
	if err := Load(context.Background(), q, path+".missing", nil); err == nil {
		t.Fatal("Load of a missing file succeeded")
	}
}
