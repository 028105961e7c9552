// Package priority keeps Lodge's own bulk work, hashing and compressing
// backups and bundles, from taking CPU time that running VMs need.
//
// Lowering a thread's nice value is not enough on its own. With the
// kernel's autogroup scheduling (on by default in Debian's kernels), every
// session shares the CPUs as one group, whatever the nice values inside
// it; and QEMU, started with -daemonize, makes a session per VM. A daemon
// whose backup workers run at nice 10 still weighs as much as a whole VM,
// and on a busy host its workers took a third of a guest's CPU time. So
// while bulk work runs, the daemon also lowers its own group's nice value,
// which it can only do without side effects when the group is its own.
package priority

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// backgroundNice is the nice value of bulk work: a thread or group at
// nice 10 weighs about a ninth of one at nice 0.
const backgroundNice = 10

// retryAfter is a little more than the kernel's limit of one change of an
// autogroup's nice value per 100 ms for a process without CAP_SYS_ADMIN.
const retryAfter = 110 * time.Millisecond

const autogroupPath = "/proc/self/autogroup"

// state is the process's one autogroup and who holds it lowered.
type state struct {
	mu      sync.Mutex
	owned   bool // the group holds this process alone
	holds   int
	applied int // the nice value last written
	retry   *time.Timer
	write   func(nice int) error
}

var group = &state{write: writeAutogroup}

func writeAutogroup(nice int) error {
	return os.WriteFile(autogroupPath, []byte(strconv.Itoa(nice)), 0)
}

// OwnGroup makes the calling process the leader of a session of its own,
// if it is not already, so that its autogroup holds nothing else and
// Background may lower it. It fails when the process leads a process
// group (a shell's foreground or background job), which setsid refuses;
// Background then leaves the group alone and only threads are lowered.
func OwnGroup() error {
	if _, err := os.Stat(autogroupPath); err != nil {
		return fmt.Errorf("the kernel has no autogroup scheduling, so thread priorities suffice: %w", err)
	}
	if sid, err := unix.Getsid(0); err != nil || sid != os.Getpid() {
		if _, err := unix.Setsid(); err != nil {
			return fmt.Errorf("start a session of its own (start the daemon with setsid or a service manager): %w", err)
		}
	}
	group.mu.Lock()
	group.owned = true
	group.mu.Unlock()
	return nil
}

// Background lowers the process's group for as long as any caller holds
// it. Calling release ends this caller's hold; a second call does nothing.
func Background() (release func()) {
	group.hold(1)
	var once sync.Once
	return func() { once.Do(func() { group.hold(-1) }) }
}

func (s *state) hold(delta int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.holds += delta
	s.applyLocked()
}

func (s *state) applyLocked() {
	if !s.owned {
		return
	}
	want := 0
	if s.holds > 0 {
		want = backgroundNice
	}
	if want == s.applied {
		return
	}
	err := s.write(want)
	switch {
	case errors.Is(err, syscall.EAGAIN):
		if s.retry == nil {
			s.retry = time.AfterFunc(retryAfter, func() {
				s.mu.Lock()
				defer s.mu.Unlock()
				s.retry = nil
				s.applyLocked()
			})
		}
	case err != nil:
		// Nothing more to try: stop changing a group that refuses it.
		s.owned = false
	default:
		s.applied = want
	}
}

// LowerThread lowers the calling goroutine's thread to the background
// nice value for the rest of the goroutine's life. It never unlocks the
// thread, so the runtime retires it with the goroutine rather than hand
// it, still lowered, to other work.
func LowerThread() {
	runtime.LockOSThread()
	_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), backgroundNice)
}
