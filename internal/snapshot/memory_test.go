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
	"syscall"
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
			_, werr := io.WriteString(w, state)
			_ = w.Close()
			if werr != nil { // the reader went away: QEMU fails too
				f.set("failed", werr.Error())
				return
			}
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
			_, err := Save(context.Background(), q, path, 1<<20, func(ctx context.Context) error {
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

// A cancelled save lets QEMU finish (stopping a background snapshot
// half-way hangs the guest), then throws the state away.
func TestSaveCancelled(t *testing.T) {
	pollEvery = time.Millisecond
	q := newFakeQEMU("x")
	ctx, cancel := context.WithCancel(context.Background())
	q.Handle("migrate", func(json.RawMessage) (any, error) {
		w := q.FD(fdName)
		q.set("active", "")
		q.SetStatus("running")
		cancel()
		go func() {
			time.Sleep(20 * time.Millisecond)
			_, _ = io.WriteString(w, "state")
			_ = w.Close()
			q.set("completed", "")
		}()
		return nil, nil
	})
	path := filepath.Join(t.TempDir(), "s.mem")
	_, err := Save(ctx, q, path, 1<<20, func(context.Context) error { return nil }, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Save = %v, want the context's error", err)
	}
	if q.Commands()[len(q.Commands())-1] == "migrate_cancel" {
		t.Error("Save cancelled QEMU's migration")
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
	if err := Load(context.Background(), q, path); err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got := q.loadedState(); got != want {
		t.Fatalf("QEMU read %d bytes, want the file's %d", len(got), len(want))
	}
	if err := Load(context.Background(), q, path+".missing"); err == nil {
		t.Fatal("Load of a missing file succeeded")
	}
}

// A full disk fails the save cleanly, while QEMU still gets to finish.
func TestSaveDiskFull(t *testing.T) {
	pollEvery = time.Millisecond
	q := newFakeQEMU(strings.Repeat("page", 100000))
	path := filepath.Join(t.TempDir(), "s.mem")
	// The writer opens path.part; /dev/full fails every write with ENOSPC.
	if err := os.Symlink("/dev/full", path+".part"); err != nil {
		t.Fatal(err)
	}
	_, err := Save(context.Background(), q, path, 1<<20, func(context.Context) error { return nil }, nil)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Save to a full disk = %v, want ENOSPC", err)
	}
	if got := q.Status(); got != "running" {
		t.Errorf("guest is %s, want running", got)
	}
	if _, err := os.Lstat(path + ".part"); err == nil {
		t.Errorf("%s.part left behind", path)
	}
	q.mu.Lock()
	status := q.status
	q.mu.Unlock()
	if status != "completed" {
		t.Errorf("QEMU's side of the save ended %q: the writer stopped draining the stream", status)
	}
}

// A save left running by a dead daemon is waited for, not refused; one
// that never ends is refused with a reason.
func TestSaveWaitsForEarlierSave(t *testing.T) {
	pollEvery = time.Millisecond
	q := newFakeQEMU("state")
	q.set("active", "")
	go func() { time.Sleep(30 * time.Millisecond); q.set("completed", "") }()
	path := filepath.Join(t.TempDir(), "s.mem")
	if _, err := Save(context.Background(), q, path, 1<<20, func(context.Context) error { return nil }, nil); err != nil {
		t.Fatalf("Save after an earlier save ended: %v", err)
	}

	idleWait = 20 * time.Millisecond
	defer func() { idleWait = 2 * time.Minute }()
	q.set("active", "")
	_, err := Save(context.Background(), q, path+"2", 1<<20, func(context.Context) error { return nil }, nil)
	if err == nil || !strings.Contains(err.Error(), "still active") {
		t.Fatalf("Save during an endless earlier save = %v, want 'still active'", err)
	}
}

// Where the filesystem can reserve space, QEMU writes the file itself
// into room set aside first, and what it did not use is given back.
func TestSaveReservesRoom(t *testing.T) {
	pollEvery = time.Millisecond
	q := newFakeQEMU("STATE")
	path := filepath.Join(t.TempDir(), "s.mem")
	var reserved int64
	_, err := Save(context.Background(), q, path, 64<<20, func(context.Context) error {
		var st syscall.Stat_t
		if err := syscall.Stat(path+".part", &st); err == nil {
			reserved = st.Blocks * 512
		}
		return nil
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if reserved < 64<<20 {
		t.Skipf("this filesystem reserved %d bytes: no fallocate here", reserved)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "STATE" || st.Blocks*512 > 1<<20 {
		t.Fatalf("state %q in %d allocated bytes: want STATE and the reservation given back", b, st.Blocks*512)
	}
}
