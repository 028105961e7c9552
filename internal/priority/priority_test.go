package priority

import (
	"errors"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// recorder is a fake autogroup: it keeps every nice value written and
// answers with the queued errors first.
type recorder struct {
	mu      sync.Mutex
	written []int
	errs    []error
}

func (r *recorder) write(nice int) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.errs) > 0 {
		err := r.errs[0]
		r.errs = r.errs[1:]
		if err != nil {
			return err
		}
	}
	r.written = append(r.written, nice)
	return nil
}

func (r *recorder) values() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.written)
}

// withGroup swaps the package's group for a fake one for the test.
func withGroup(t *testing.T, owned bool, errs ...error) *recorder {
	t.Helper()
	rec := &recorder{errs: errs}
	saved := group
	group = &state{owned: owned, write: rec.write}
	t.Cleanup(func() { group = saved })
	return rec
}

func TestBackgroundHolds(t *testing.T) {
	rec := withGroup(t, true)
	first := Background()
	second := Background()
	if got := rec.values(); !slices.Equal(got, []int{backgroundNice}) {
		t.Fatalf("two holds wrote %v, want [%d]", got, backgroundNice)
	}
	first()
	first() // a second release of one hold must not end the other
	if got := rec.values(); !slices.Equal(got, []int{backgroundNice}) {
		t.Fatalf("after one of two holds ended, wrote %v, want the group still lowered", got)
	}
	second()
	if got := rec.values(); !slices.Equal(got, []int{backgroundNice, 0}) {
		t.Fatalf("after both holds ended, wrote %v, want [%d 0]", got, backgroundNice)
	}
}

func TestBackgroundLeavesASharedGroupAlone(t *testing.T) {
	rec := withGroup(t, false)
	Background()()
	if got := rec.values(); len(got) != 0 {
		t.Fatalf("a group the process does not own was written %v", got)
	}
}

func TestBackgroundRetriesWhenRateLimited(t *testing.T) {
	rec := withGroup(t, true, nil, syscall.EAGAIN)
	release := Background()
	release() // refused: the kernel allows one change per 100 ms
	if got := rec.values(); !slices.Equal(got, []int{backgroundNice}) {
		t.Fatalf("the refused restore wrote %v", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !slices.Equal(rec.values(), []int{backgroundNice, 0}) {
		if time.Now().After(deadline) {
			t.Fatalf("the restore was not retried: wrote %v", rec.values())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestBackgroundGivesUpOnOtherErrors(t *testing.T) {
	rec := withGroup(t, true, errors.New("permission denied"))
	Background()()
	Background()()
	if got := rec.values(); len(got) != 0 {
		t.Fatalf("after a hard error the group was still written %v", got)
	}
	if group.owned {
		t.Fatal("after a hard error the group is still taken as owned")
	}
}
