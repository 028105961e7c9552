package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/units"
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
	// What the guest uses comes from its balloon driver's reports, every
	// 2 s: 64 MiB more in its tmpfs shows up.
	var before int64
	eventually(t, 30*time.Second, "a memory report from the guest", func() bool { before = h.show("bal").MemoryUsed; return before > 0 })
	h.exec("bal", "sh", "-c", "dd if=/dev/urandom of=/dev/shm/x bs=1M count=64 2>/dev/null")
	eventually(t, 30*time.Second, "the guest's report to grow by 64 MiB", func() bool { return h.show("bal").MemoryUsed >= before+60<<20 })
	h.exec("bal", "rm", "/dev/shm/x")

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

// TestMemoryHotplug grows a running guest past its boot memory through
// virtio-mem, seen in its MemTotal, shrinks it below the boot memory
// again, and brings plugged memory back with a memory snapshot.
func TestMemoryHotplug(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("hot", "--max-memory", "768M") // boots with 256M
	boot := h.memTotal("hot")

	h.must("set", "hot", "memory=768M")
	if got := h.memTotal("hot"); got-boot < 500<<10 {
		t.Fatalf("guest MemTotal went from %d to %d KiB after plugging 512 MiB", boot, got)
	}
	v := h.show("hot")
	if v.MemoryPlugged != 512<<20 || v.MemoryActual != 768<<20 {
		t.Fatalf("show after memory=768M: plugged %d, actual %d", v.MemoryPlugged, v.MemoryActual)
	}
	// Memory that was plugged stays usable: fill 400 MiB of it.
	h.exec("hot", "sh", "-c", "mount -o remount,size=600M /dev/shm && dd if=/dev/zero of=/dev/shm/fill bs=1M count=400 2>/dev/null")
	h.must("snapshot", "create", "hot", "big")
	h.exec("hot", "rm", "/dev/shm/fill")

	h.must("set", "hot", "memory=192M")
	if got := h.memTotal("hot"); got > boot-56<<10 {
		t.Fatalf("guest MemTotal %d KiB after memory=192M; it booted with %d", got, boot)
	}
	if v := h.show("hot"); v.MemoryPlugged != 0 || v.MemoryActual < 188<<20 || v.MemoryActual > 196<<20 {
		t.Fatalf("show after memory=192M: plugged %d, actual %d", v.MemoryPlugged, v.MemoryActual)
	}

	h.must("snapshot", "revert", "hot", "big")
	if got := h.memTotal("hot"); got-boot < 500<<10 {
		t.Fatalf("guest MemTotal %d KiB after reverting to a snapshot taken with 512 MiB plugged", got)
	}
	if out := h.exec("hot", "sh", "-c", "wc -c </dev/shm/fill"); strings.TrimSpace(out) != strconv.Itoa(400<<20) {
		t.Fatalf("file in plugged memory after revert: %q bytes", out)
	}
	if v := h.show("hot"); v.Memory != 768<<20 || v.MemoryPlugged != 512<<20 {
		t.Fatalf("show after revert: memory %d, plugged %d", v.Memory, v.MemoryPlugged)
	}
	_, errOut, code := h.lodge("set", "hot", "memory=1G")
	if code != 1 || !strings.Contains(errOut, "above its max_memory 768M") {
		t.Fatalf("growing past max_memory: exit %d, %q", code, errOut)
	}
}

// TestMemoryDimms: a guest without a virtio-mem driver (unloaded here)
// grows past its boot memory through a pc-dimm instead, keeps it across a
// memory snapshot and revert, and gives it back.
func TestMemoryDimms(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("old", "--max-memory", "768M") // boots with 256M
	h.exec("old", "rmmod", "virtio_mem")
	boot := h.memTotal("old")

	h.must("set", "old", "memory=512M")
	if got := h.memTotal("old"); got-boot < 200<<10 {
		t.Fatalf("guest MemTotal went from %d to %d KiB after a 256 MiB pc-dimm", boot, got)
	}
	if v := h.show("old"); v.MemoryPlugged != 256<<20 || v.MemoryActual < 508<<20 || v.MemoryActual > 516<<20 {
		t.Fatalf("show after memory=512M: plugged %d, actual %d", v.MemoryPlugged, v.MemoryActual)
	}
	h.must("snapshot", "create", "old", "big")
	h.must("set", "old", "memory=200M")
	if got := h.memTotal("old"); got > boot-40<<10 {
		t.Fatalf("guest MemTotal %d KiB after memory=200M; it booted with %d", got, boot)
	}
	if v := h.show("old"); v.MemoryPlugged != 0 {
		t.Fatalf("the pc-dimm is still plugged at memory=200M: %d", v.MemoryPlugged)
	}
	h.must("snapshot", "revert", "old", "big")
	if got := h.memTotal("old"); got-boot < 200<<10 {
		t.Fatalf("guest MemTotal %d KiB after reverting to a snapshot taken with a pc-dimm", got)
	}
}

// TestCPUHotplug plugs a CPU into a running guest that booted with room
// for it, sees it online inside, and takes it out again.
func TestCPUHotplug(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("cpu", "--cpus", "1", "--max-cpus", "2")
	online := func() string { return strings.TrimSpace(h.exec("cpu", "cat", "/sys/devices/system/cpu/online")) }
	if got := online(); got != "0" {
		t.Fatalf("online CPUs at boot: %q", got)
	}
	h.must("set", "cpu", "cpus=2")
	if got := online(); got != "0-1" {
		t.Fatalf("online CPUs after cpus=2: %q", got)
	}
	if v := h.show("cpu"); v.CPUs != 2 || v.MaxCPUs != 2 {
		t.Fatalf("show after cpus=2: cpus %d, max %d", v.CPUs, v.MaxCPUs)
	}
	h.must("set", "cpu", "cpus=1")
	if got := online(); got != "0" {
		t.Fatalf("online CPUs after cpus=1: %q", got)
	}
	_, errOut, code := h.lodge("set", "cpu", "cpus=3")
	if code != 1 || !strings.Contains(errOut, "above its max_cpus 2") {
		t.Fatalf("cpus past max_cpus: exit %d, %q", code, errOut)
	}
}

// TestAutoBalloon fakes the host's available memory (the daemon reads it
// from a file its config names): under pressure an idle guest gives its
// memory back down to its min_memory, each change an event; when the
// pressure passes, it gets the memory back. The guest side is real.
func TestAutoBalloon(t *testing.T) {
	t.Parallel()
	h := newHostNoDaemon(t)
	meminfo := filepath.Join(h.home, "meminfo")
	setAvailable := func(size int64) {
		t.Helper()
		if err := os.WriteFile(meminfo, []byte(fmt.Sprintf("MemTotal: 25165824 kB\nMemAvailable: %d kB\n", size>>10)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	setAvailable(8 << 30)
	conf := fmt.Sprintf("auto_balloon:\n  enabled: true\n  threshold: 1G\n  interval: 300ms\n  meminfo: %s\n", meminfo)
	if err := os.WriteFile(filepath.Join(h.home, "config.yaml"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	waitProbe(t)
	h.startDaemon()
	t.Cleanup(h.cleanup)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var changes []string
	go func() {
		_ = h.c.Events(ctx, func(ev api.Event) {
			if ev.Kind == "vm-balloon" {
				mu.Lock()
				changes = append(changes, ev.Message)
				mu.Unlock()
			}
		})
	}()

	h.vm("idle", "--memory", "512M", "--min-memory", "192M")
	full := h.memTotal("idle")
	eventually(t, 30*time.Second, "a memory report from the guest", func() bool { return h.show("idle").MemoryUsed > 0 })

	setAvailable(512 << 20)
	eventually(t, 60*time.Second, "the guest to give memory back down to its floor", func() bool {
		v := h.show("idle")
		return v.Ballooned == 192<<20 && v.MemoryActual <= 196<<20
	})
	if small := h.memTotal("idle"); full-small < 300<<10 {
		t.Fatalf("guest MemTotal %d KiB under pressure, %d before", small, full)
	}
	if v := h.show("idle"); v.Memory != 512<<20 {
		t.Fatalf("the auto-balloon changed the memory setting to %d", v.Memory)
	}

	setAvailable(4 << 30)
	eventually(t, 60*time.Second, "the guest to get its memory back", func() bool {
		v := h.show("idle")
		return v.Ballooned == 0 && v.MemoryActual >= 508<<20
	})
	if back := h.memTotal("idle"); back < full-16<<10 {
		t.Fatalf("guest MemTotal %d KiB after the pressure passed, %d before", back, full)
	}
	mu.Lock()
	got := append([]string(nil), changes...)
	mu.Unlock()
	if len(got) < 2 || !strings.Contains(got[0], "512M -> 192M") || !strings.Contains(got[len(got)-1], "-> 512M") {
		t.Fatalf("vm-balloon events %q: want 512M -> 192M and back", got)
	}
	var info api.HostInfo
	mustJSON(t, h.must("host", "info", "-o", "json"), &info)
	if !info.AutoBalloon || info.AutoBalloonThreshold != 1<<30 || info.MemoryAvailable != 4<<30 {
		t.Fatalf("host info: auto-balloon %v, threshold %d, available %d", info.AutoBalloon, info.AutoBalloonThreshold, info.MemoryAvailable)
	}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"set", "idle", "min_memory=1G"}, 1, "above its memory 512M"},
		{[]string{"set", "idle", "min_memory=lots"}, 2, "not a size"},
		{[]string{"host", "set", "auto_balloon=maybe"}, 2, "want on or off"},
		{[]string{"host", "set", "auto_balloon_threshold=100T"}, 1, "the host has only"},
	} {
		_, errOut, code := h.lodge(c.args...)
		if code != c.code || !strings.Contains(errOut, c.want) {
			t.Errorf("lodge %v: exit %d, %q; want exit %d with %q", c.args, code, errOut, c.code, c.want)
		}
	}
	if v := h.show("idle"); v.MinMemory != 192<<20 {
		t.Errorf("refused changes left min_memory at %d", v.MinMemory)
	}
}

// TestHostLimits: starting or growing VMs past the host's memory limit is
// refused with the numbers; giving memory back through the balloon makes
// room; the limit set with `host set` survives a daemon crash.
func TestHostLimits(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	var info api.HostInfo
	mustJSON(t, h.must("host", "info", "-o", "json"), &info)
	// Each running VM also counts for what its QEMU takes beyond the
	// guest's memory; the limit leaves room for two and a half VMs.
	o := info.VMOverhead
	if o < 32<<20 {
		t.Fatalf("host info: vm_overhead %d; QEMU takes more than that", o)
	}
	limit := 700<<20 + 3*o
	mustJSON(t, h.must("host", "set", "memory_limit="+strconv.FormatInt(limit>>20, 10)+"M", "-o", "json"), &info)
	if info.MemoryLimit != limit || info.Overcommit != 1 {
		t.Fatalf("after host set: limit %d, overcommit %g", info.MemoryLimit, info.Overcommit)
	}
	size := units.FormatSize
	h.vm("la") // 256M each
	h.vm("lb")
	h.importGuest()
	h.must("create", "lc", "--image", "tiny", "--memory", "256M")
	_, errOut, code := h.lodge("start", "lc")
	want := fmt.Sprintf("memory limit %s, allocated %s, requested %s (256M and %s for QEMU itself)", size(limit), size(512<<20+2*o), size(256<<20+o), size(o))
	if code != 1 || !strings.Contains(errOut, want) {
		t.Fatalf("start past the limit: exit %d, %q; want %q", code, errOut, want)
	}
	h.must("set", "la", "memory=128M")
	h.must("start", "lc")
	_, errOut, code = h.lodge("set", "la", "memory=256M")
	want = fmt.Sprintf("memory limit %s, allocated %s, requested 128M more", size(limit), size(640<<20+3*o))
	if code != 1 || !strings.Contains(errOut, want) {
		t.Fatalf("growing past the limit: exit %d, %q; want %q", code, errOut, want)
	}
	mustJSON(t, h.must("host", "info", "-o", "json"), &info)
	if info.MemoryAllocated != 640<<20+3*o || info.MemoryFree != 60<<20 {
		t.Fatalf("host info: allocated %d, free %d; want %d and 60M", info.MemoryAllocated, info.MemoryFree, 640<<20+3*o)
	}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"host", "set", "memory_limit=100T"}, 1, "the host has"},
		{[]string{"host", "set", "overcommit=0.5"}, 1, "between 1 and 100"},
		{[]string{"host", "set", "memory_limit=lots"}, 2, "not a size"},
		{[]string{"host", "set", "cpus=4"}, 2, "unknown setting"},
	} {
		_, errOut, code := h.lodge(c.args...)
		if code != c.code || !strings.Contains(errOut, c.want) {
			t.Errorf("lodge %v: exit %d, %q; want exit %d with %q", c.args, code, errOut, c.code, c.want)
		}
	}
	h.killDaemon()
	h.startDaemon()
	mustJSON(t, h.must("host", "info", "-o", "json"), &info)
	if info.MemoryLimit != limit {
		t.Fatalf("limit after a daemon crash: %d, want %d", info.MemoryLimit, limit)
	}
}
