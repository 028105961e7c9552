package vm

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// The watcher stops an export whose fleecing files grow past their room,
// once, and not one that stays within it.
func TestWatchFleece(t *testing.T) {
	fleeceEvery = time.Millisecond
	tests := []struct {
		name     string
		write    int64 // into the fleecing file while watched
		wantTrip bool
	}{
		{name: "within its room", write: 1 << 20},
		{name: "past its room", write: 3 << 20, wantTrip: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			path := filepath.Join(t.TempDir(), "disk.fleece.qcow2")
			if err := os.WriteFile(path, make([]byte, 0), 0o600); err != nil {
				t.Fatal(err)
			}
			e := &Export{gate: newYieldGate()}
			trips := make(chan struct{}, 2)
			stop := f.svc.watchFleece(e, "vm1", []string{path}, 2<<20, func() { trips <- struct{}{} })
			// Real data: a file of zeros could be sparse.
			data := []byte(strings.Repeat("fleece", int(tt.write/6)+1))[:tt.write]
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			var tripped bool
			select {
			case <-trips:
				tripped = true
			case <-time.After(200 * time.Millisecond):
			}
			stop()
			if tripped != tt.wantTrip {
				t.Fatalf("tripped: %v, want %v", tripped, tt.wantTrip)
			}
			readErr := errors.New("nbd: connection lost")
			got := e.Cause(readErr)
			if !tt.wantTrip {
				if !errors.Is(got, readErr) || e.Err() != nil {
					t.Fatalf("Cause = %v, Err = %v: want the read's own error and none", got, e.Err())
				}
				return
			}
			if !errors.Is(got, errdefs.ErrNoSpace) || !strings.Contains(got.Error(), "fleece_limit") {
				t.Fatalf("Cause = %v: want ErrNoSpace naming fleece_limit", got)
			}
			if e.Cause(nil) != nil {
				t.Error("Cause(nil) of a stopped export is not nil")
			}
			if len(trips) != 0 {
				t.Error("the watcher stopped the export twice")
			}
		})
	}
}

// Socket directories of daemons that are gone are swept; those of live
// processes, and names not ours, are kept.
func TestSweepSocketDirs(t *testing.T) {
	tmp := t.TempDir()
	// A pid far above any pid_max is never alive.
	dead := filepath.Join(tmp, socketDirPrefix+"2147483000-123")
	live := filepath.Join(tmp, socketDirPrefix+strconv.Itoa(os.Getppid())+"-456")
	old := filepath.Join(tmp, socketDirPrefix+"789") // before pids were in the name
	other := filepath.Join(tmp, "lodge-other-1-2")
	for _, d := range []string{dead, live, old, other} {
		if err := os.MkdirAll(filepath.Join(d, "sub"), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	sweepSocketDirs(tmp)
	for d, want := range map[string]bool{dead: false, live: true, old: true, other: true} {
		if _, err := os.Stat(d); (err == nil) != want {
			t.Errorf("%s exists: %v, want %v", filepath.Base(d), err == nil, want)
		}
	}
}
