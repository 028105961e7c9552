package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestProbeMeasuresEveryTest(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "scratch")
	res, err := Probe(context.Background(), ProbeConfig{
		Duration: 20 * time.Millisecond, Threads: 2, MemBytes: 4 << 20,
		DiskPath: disk, DiskBytes: 4 << 20,
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{CPUIntSingle, CPUIntAll, CPUFloatSingle, CPUFloatAll, MemRead, MemWrite, MemCopy, MemLatency,
		DiskSeqWrite, DiskSeqRead, DiskRandWrite4K, DiskRandRead4K}
	if len(res.Samples) != len(want) {
		t.Fatalf("got %d samples, want %d: %+v", len(res.Samples), len(want), res.Samples)
	}
	for i, s := range res.Samples {
		if s.Test != want[i] || !(s.Value > 0) || s.Unit == "" {
			t.Errorf("sample %d = %+v, want %s with a positive value and a unit", i, s, want[i])
		}
		if s.Lower != (s.Test == MemLatency) {
			t.Errorf("%s: lower = %v", s.Test, s.Lower)
		}
	}
	// The sequential write fills the whole area, so the reads find data.
	if fi, err := os.Stat(disk); err != nil || fi.Size() != 4<<20 {
		t.Fatalf("scratch file after the run: %v, %v; want 4 MiB", fi, err)
	}
}

func TestProbeGroups(t *testing.T) {
	res, err := Probe(context.Background(), ProbeConfig{Duration: 5 * time.Millisecond, Threads: 1, MemBytes: 1 << 20, Groups: []string{GroupMem}})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range res.Samples {
		if !strings.HasPrefix(s.Test, "mem.") {
			t.Errorf("group mem ran %s", s.Test)
		}
	}
	if len(res.Samples) != 4 {
		t.Fatalf("group mem gave %d samples, want 4", len(res.Samples))
	}
}

func TestProbeConfigValidate(t *testing.T) {
	good := ProbeConfig{Duration: time.Second, Threads: 1, MemBytes: 1 << 20}
	tests := []struct {
		name   string
		change func(*ProbeConfig)
		want   string
	}{
		{"good", func(*ProbeConfig) {}, ""},
		{"no duration", func(c *ProbeConfig) { c.Duration = 0 }, "duration"},
		{"no threads", func(c *ProbeConfig) { c.Threads = 0 }, "threads"},
		{"tiny buffer", func(c *ProbeConfig) { c.MemBytes = 4096 }, "memory buffer"},
		{"tiny buffer, no mem tests", func(c *ProbeConfig) { c.MemBytes = 0; c.Groups = []string{GroupCPU} }, ""},
		{"tiny disk", func(c *ProbeConfig) { c.DiskPath = "/x"; c.DiskBytes = 4096 }, "disk area"},
		{"unknown group", func(c *ProbeConfig) { c.Groups = []string{"gpu"} }, `group "gpu"`},
	}
	for _, tt := range tests {
		c := good
		tt.change(&c)
		err := c.Validate()
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("%s: Validate() = %v, want an error with %q", tt.name, err, tt.want)
		}
	}
}

func TestLinkCycleVisitsEveryLineOnce(t *testing.T) {
	for _, lines := range []int{2, 3, 1000} {
		buf := make([]uint64, lines*lineWords)
		if !linkCycle(buf) {
			t.Fatalf("%d lines: not linked", lines)
		}
		seen := map[uint64]bool{}
		p := uint64(0)
		for range lines {
			if seen[p] || p%lineWords != 0 {
				t.Fatalf("%d lines: step to %d repeats or is not a line start", lines, p)
			}
			seen[p] = true
			p = buf[p]
		}
		if p != 0 {
			t.Fatalf("%d lines: cycle does not close after visiting all lines (at %d)", lines, p)
		}
	}
	if linkCycle(make([]uint64, lineWords)) {
		t.Fatal("one line linked")
	}
}

func TestFindDisk(t *testing.T) {
	sys := t.TempDir()
	for name, sectors := range map[string]string{"vda": "16777216\n", "vdb": "532480\n", "sr0": "garbage"} {
		if err := os.MkdirAll(filepath.Join(sys, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sys, name, "size"), []byte(sectors), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := FindDisk(context.Background(), sys, 532480*512, time.Second)
	if err != nil || got != "/dev/vdb" {
		t.Fatalf("FindDisk = %q, %v; want /dev/vdb", got, err)
	}
	if _, err := FindDisk(context.Background(), sys, 1<<30, 150*time.Millisecond); err == nil || !strings.Contains(err.Error(), "no disk of 1073741824 bytes") {
		t.Fatalf("FindDisk of a missing size = %v, want a one-line reason", err)
	}
}

func TestBurnStopsWithItsContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan struct{})
	go func() { Burn(ctx, 1<<20); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Burn ran on after its context ended")
	}
}

func TestEvictOthers(t *testing.T) {
	// A copy of sleep under a name no other process has.
	src, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep binary")
	}
	raw, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "lodge-evict-t")
	if err := os.WriteFile(bin, raw, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	// Its comm is set once it has exec'd.
	eventuallyComm(t, cmd.Process.Pid, "lodge-evict-t")
	n, err := EvictOthers("/proc", "lodge-evict-t", 5*time.Second)
	if err != nil || n != 1 {
		t.Fatalf("EvictOthers = %d, %v; want 1 process killed", n, err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the process survived")
	}
	if n, _ := EvictOthers("/proc", "lodge-evict-t", time.Second); n != 0 {
		t.Fatalf("second eviction killed %d", n)
	}
}

func eventuallyComm(t *testing.T, pid int, want string) {
	t.Helper()
	for range 100 {
		raw, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm"))
		if strings.TrimSpace(string(raw)) == want {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("process %d never became %s", pid, want)
}
