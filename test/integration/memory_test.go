package integration

import (
	"strconv"
	"strings"
	"testing"
)

// memTotal is the guest's MemTotal in KiB.
func (h *host) memTotal(vm string) int64 {
	h.t.Helper()
	f := strings.Fields(h.exec(vm, "grep", "MemTotal", "/proc/meminfo"))
	if len(f) < 2 {
		h.t.Fatalf("meminfo of %s: %v", vm, f)
	}
	n, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil {
		h.t.Fatal(err)
	}
	return n
}

// TestMemoryBalloon shrinks a running guest from 512 MiB to 256 MiB and
// grows it back, seen from the guest, and refuses what cannot be done.
func TestMemoryBalloon(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("bal", "--memory", "512M")
	full := h.memTotal("bal")

	h.must("set", "bal", "memory=256M")
	v := h.show("bal")
	if v.Memory != 256<<20 || v.MemoryActual < 252<<20 || v.MemoryActual > 260<<20 {
		t.Fatalf("after memory=256M: memory %d, actual %d", v.Memory, v.MemoryActual)
	}
	if small := h.memTotal("bal"); full-small < 200<<10 {
		t.Fatalf("guest MemTotal went from %d to %d KiB: the balloon took nothing", full, small)
	}

	h.must("set", "bal", "memory=512M")
	if back := h.memTotal("bal"); back < full-16<<10 {
		t.Fatalf("guest MemTotal %d KiB after growing back, was %d", back, full)
	}

	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"set", "bal", "memory=1G"}, 1, "above its max_memory"},
		{[]string{"set", "bal", "memory=32M"}, 1, "at least"},
		{[]string{"set", "bal", "cpus=2"}, 1, "while the VM is stopped"},
		{[]string{"set", "bal", "memory=lots"}, 2, "not a size"},
		{[]string{"set", "bal", "colour=red"}, 2, "unknown setting"},
	} {
		_, errOut, code := h.lodge(c.args...)
		if code != c.code || !strings.Contains(errOut, c.want) || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("lodge %v: exit %d, %q; want exit %d and a line with %q", c.args, code, errOut, c.code, c.want)
		}
	}
	if v := h.show("bal"); v.Memory != 512<<20 || v.CPUs != 1 {
		t.Errorf("refused changes left memory %d, cpus %d", v.Memory, v.CPUs)
	}
}
