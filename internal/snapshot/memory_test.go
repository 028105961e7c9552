package snapshot

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/qmp/qmptest"
)

// fakeQEMU models the migration commands on a qmptest.Monitor. With
// pause-before-switchover on, "migrate" is a live save: it writes the
// state, stops the guest and waits in pre-switchover for
// migrate-continue, then completes and leaves the guest stopped in
// postmigrate; with passes set, it never converges instead (one pass per
// query) until migrate_cancel. Otherwise it is a background snapshot: it
// writes the state and resumes the guest. "migrate-incoming" reads the
// pipe to EOF.
type fakeQEMU struct {
	*qmptest.Monitor
	mu       sync.Mutex
	status   string // of the migration
	errDesc  string
	loaded   string
	failWith string // makes the outgoing migration fail
	caps     map[string]bool
	passes   int64 // of a live save that does not converge
	endless  bool
	out      *os.File // the stream of an endless save
	resume   chan struct{}
}

func newFakeQEMU(state string) *fakeQEMU {
	f := &fakeQEMU{Monitor: qmptest.NewMonitor(), status: "none", caps: map[string]bool{}}
	ok := func(json.RawMessage) (any, error) { return nil, nil }
	f.Handle("migrate-set-capabilities", func(raw json.RawMessage) (any, error) {
		var a struct {
			Capabilities []struct {
				Capability string `json:"capability"`
				State      bool   `json:"state"`
			} `json:"capabilities"`
		}
		_ = json.Unmarshal(raw, &a)
		f.mu.Lock()
		for _, c := range a.Capabilities {
			f.caps[c.Capability] = c.State
		}
		f.mu.Unlock()
		return nil, nil
	})
	f.Handle("query-migrate-capabilities", func(json.RawMessage) (any, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		var out []map[string]any
		for k, v := range f.caps {
			out = append(out, map[string]any{"capability": k, "state": v})
		}
		return out, nil
	})
	f.Handle("migrate-set-parameters", ok)
	f.Handle("migrate", func(json.RawMessage) (any, error) {
		w := f.FD(fdName)
		f.set("active", "")
		f.mu.Lock()
		isLive, endless := f.caps["pause-before-switchover"], f.endless
		f.resume = make(chan struct{})
		resume := f.resume
		f.mu.Unlock()
		if isLive && endless {
			// A first pass, longer than the state: the fallback must
			// overwrite it and cut the file where its own stream ends.
			_, _ = io.WriteString(w, strings.Repeat("first pass ", 10))
			f.mu.Lock()
			f.out = w
			f.mu.Unlock()
			return nil, nil
		}
		go func() {
			if !isLive {
				f.SetStatus("running")
			}
			_, werr := io.WriteString(w, state)
			if werr != nil { // the reader went away: QEMU fails too
				_ = w.Close()
				f.set("failed", werr.Error())
				return
			}
			if f.failWith != "" {
				_ = w.Close()
				f.set("failed", f.failWith)
				return
			}
			if isLive {
				f.SetStatus("finish-migrate")
				f.set("pre-switchover", "")
				if _, open := <-resume; !open && f.migrationStatus() == "cancelling" {
					_ = w.Close()
					f.SetStatus("running")
					f.set("cancelled", "")
					return
				}
				_ = w.Close()
				f.SetStatus("postmigrate")
				f.set("completed", "")
				return
			}
			_ = w.Close()
			f.set("completed", "")
		}()
		return nil, nil
	})
	f.Handle("migrate-continue", func(json.RawMessage) (any, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.status != "pre-switchover" {
			return nil, &qmp.Error{Class: qmp.ClassGenericError, Desc: "Migration not in expected state: " + f.status}
		}
		f.resume <- struct{}{}
		return nil, nil
	})
	f.Handle("migrate_cancel", func(json.RawMessage) (any, error) {
		f.mu.Lock()
		st := f.status
		f.mu.Unlock()
		switch st {
		case "pre-switchover":
			f.set("cancelling", "")
			close(f.resume)
		case "active":
			f.mu.Lock()
			if f.out != nil {
				_ = f.out.Close()
				f.out = nil
			}
			f.mu.Unlock()
			f.set("cancelled", "")
		}
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
		if f.endless && f.status == "active" {
			f.passes++
		}
		return map[string]any{"status": f.status, "error-desc": f.errDesc, "downtime": 7,
			"ram": map[string]int64{"transferred": 1 + f.passes, "total": 2, "remaining": 1, "dirty-sync-count": 1 + f.passes}}, nil
	})
	return f
}

func (f *fakeQEMU) migrationStatus() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status
}

func (f *fakeQEMU) set(status, desc string) {
	f.mu.Lock()
	f.status, f.errDesc = status, desc
	f.mu.Unlock()
	f.Emit("MIGRATION", map[string]string{"status": status})
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
		name         string
		guest        string // run state before
		endless      bool   // a live save never converges
		atPauseErr   error
		failWith     string
		wantErr      string
		wantAfter    string
		wantMethod   string
		wantFallback bool
	}{
		{name: "running guest is saved live", guest: "running", wantAfter: "running", wantMethod: MethodLive},
		{name: "paused guest stays paused", guest: "paused", wantAfter: "paused", wantMethod: MethodBackground},
		{name: "no convergence falls back", guest: "running", endless: true, wantAfter: "running", wantMethod: MethodBackground, wantFallback: true},
		{name: "disk switch fails", guest: "running", atPauseErr: boom, wantErr: "disk switch refused", wantAfter: "running"},
		{name: "disk switch fails in the background", guest: "paused", atPauseErr: boom, wantErr: "disk switch refused", wantAfter: "paused"},
		{name: "qemu fails", guest: "running", failWith: "No space left on device", wantErr: "No space left on device", wantAfter: "running"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := newFakeQEMU("STATE-BYTES")
			q.failWith, q.endless = tt.failWith, tt.endless
			q.SetStatus(tt.guest)
			path := filepath.Join(t.TempDir(), "s.mem")
			runningAtPause := false
			stats, err := Save(context.Background(), q, path, 1<<20, func(ctx context.Context) error {
				st, _ := qmp.QueryStatus(ctx, q)
				runningAtPause = st.Running
				return tt.atPauseErr
			}, nil)
			if got := q.Status(); got != tt.wantAfter {
				t.Errorf("guest is %s after Save, want %s", got, tt.wantAfter)
			}
			if runningAtPause {
				t.Error("atPause ran with the guest running")
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
			if stats.Method != tt.wantMethod || stats.Fallback != tt.wantFallback {
				t.Errorf("saved by %s (fallback %v), want %s (fallback %v)", stats.Method, stats.Fallback, tt.wantMethod, tt.wantFallback)
			}
		})
	}
}

// A cancelled live save is stopped in QEMU at once, and the guest runs
// on.
func TestSaveLiveCancelled(t *testing.T) {
	pollEvery = time.Millisecond
	q := newFakeQEMU("x")
	q.endless = true
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for q.migrationStatus() != "active" {
			time.Sleep(time.Millisecond)
		}
		cancel()
	}()
	path := filepath.Join(t.TempDir(), "s.mem")
	_, err := Save(ctx, q, path, 1<<20, func(context.Context) error { return nil }, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Save = %v, want the context's error", err)
	}
	if got := q.migrationStatus(); got != "cancelled" {
		t.Errorf("QEMU's migration is %s, want cancelled", got)
	}
	if got := q.Status(); got != "running" {
		t.Errorf("guest is %s, want running", got)
	}
	for _, p := range []string{path, path + ".part"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("cancelled Save left %s", p)
		}
	}
}

// Settle cancels a live save a dead daemon left waiting before its
// switchover, but lets a background snapshot run to its end.
func TestSettle(t *testing.T) {
	pollEvery = time.Millisecond
	for _, tt := range []struct {
		name       string
		live       bool
		wantCancel bool
	}{
		{name: "live save waiting", live: true, wantCancel: true},
		{name: "background snapshot running", live: false, wantCancel: false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			q := newFakeQEMU("x")
			q.caps["pause-before-switchover"] = tt.live
			q.caps["background-snapshot"] = !tt.live
			// A save whose daemon is gone: QEMU holds the stream.
			f, err := os.Create(filepath.Join(t.TempDir(), "s.mem.part"))
			if err != nil {
				t.Fatal(err)
			}
			if err := q.PassFD(context.Background(), fdName, f); err != nil {
				t.Fatal(err)
			}
			_ = f.Close()
			if tt.live {
				q.SetStatus("running")
			} else {
				q.Handle("migrate", func(json.RawMessage) (any, error) {
					q.set("active", "")
					go func() { time.Sleep(20 * time.Millisecond); q.set("completed", "") }()
					return nil, nil
				})
			}
			if err := qmp.Migrate(context.Background(), q, "fd:"+fdName); err != nil {
				t.Fatal(err)
			}
			for tt.live && q.migrationStatus() != "pre-switchover" {
				time.Sleep(time.Millisecond)
			}
			if err := Settle(context.Background(), q); err != nil {
				t.Fatal(err)
			}
			cancelled := slices.Contains(q.Commands(), "migrate_cancel")
			if cancelled != tt.wantCancel {
				t.Fatalf("migrate_cancel sent: %v, want %v", cancelled, tt.wantCancel)
			}
			if want := map[bool]string{true: "cancelled", false: "active"}[tt.live]; q.migrationStatus() != want {
				t.Errorf("QEMU's migration is %s after Settle, want %s", q.migrationStatus(), want)
			}
		})
	}
}

// A cancelled background save lets QEMU finish (stopping a background
// snapshot half-way hangs the guest), then throws the state away.
func TestSaveBackgroundCancelled(t *testing.T) {
	pollEvery = time.Millisecond
	q := newFakeQEMU("x")
	q.SetStatus("paused")
	ctx, cancel := context.WithCancel(context.Background())
	q.Handle("migrate", func(json.RawMessage) (any, error) {
		w := q.FD(fdName)
		q.set("active", "")
		q.SetStatus("running") // QEMU resumes even a paused guest
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
