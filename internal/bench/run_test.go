package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeGuest answers the runner as a guest would, recording what it was
// asked, and prints a fixed figure for every test the probe would run.
type fakeGuest struct {
	name  string
	log   *[]string
	mu    *sync.Mutex
	value float64
	// memFit is the buffer the guest's probe settles on with -mem-fit.
	memFit    int64
	failBus   string
	installed map[string][]byte
	attached  []string
	burning   chan struct{}
}

func (g *fakeGuest) record(s string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	*g.log = append(*g.log, g.name+": "+s)
}

func (g *fakeGuest) Install(_ context.Context, path string, data []byte) error {
	g.installed[path] = data
	g.record("install " + path)
	return nil
}

func (g *fakeGuest) Run(ctx context.Context, argv []string) ([]byte, error) {
	if argv[0] != GuestProbePath {
		g.record(strings.Join(argv, " "))
		return nil, nil
	}
	if argv[1] == "burn" {
		g.record("burn")
		close(g.burning)
		<-ctx.Done()
		g.record("burn stopped")
		return nil, ctx.Err()
	}
	args := strings.Join(argv[1:], " ")
	g.record("probe " + args)
	mem := int64(0)
	if strings.Contains(args, "-mem-fit") {
		mem = g.memFit
	}
	return fakeResult(args, g.value, mem), nil
}

func (g *fakeGuest) AttachDisk(_ context.Context, bus string, size int64) (func(context.Context) error, error) {
	if bus == g.failBus {
		return nil, errors.New("no room on the bus")
	}
	g.record(fmt.Sprintf("attach %s %d", bus, size))
	g.attached = append(g.attached, bus)
	return func(context.Context) error { g.record("detach " + bus); return nil }, nil
}

// fakeResult is what the probe prints for the groups in args.
func fakeResult(args string, v float64, mem int64) []byte {
	groups := ""
	for f := range strings.FieldsSeq(args) {
		if strings.Contains(f, "cpu") || f == "disk" {
			groups = f
		}
	}
	var res ProbeResult
	res.MemBytes = mem
	if strings.Contains(groups, "cpu") {
		res.Samples = append(res.Samples, Sample{Test: CPUIntSingle, Unit: "Mops/s", Value: v})
	}
	if strings.Contains(groups, "disk") {
		res.Samples = append(res.Samples, Sample{Test: DiskSeqRead, Unit: "MB/s", Value: v})
	}
	raw, _ := json.Marshal(res)
	return raw
}

type fakeHost struct {
	g     *fakeGuest // shares the log
	value float64
	fail  int // fail on this call, counted from 1
	calls int
}

func (h *fakeHost) Run(_ context.Context, args []string) ([]byte, error) {
	h.calls++
	h.g.mu.Lock()
	*h.g.log = append(*h.g.log, "host: probe "+strings.Join(args, " "))
	h.g.mu.Unlock()
	if h.calls == h.fail {
		return nil, errors.New("probe crashed")
	}
	return fakeResult(strings.Join(args, " "), h.value, 0), nil
}

func newFakes(names ...string) ([]*fakeGuest, *[]string) {
	log := &[]string{}
	mu := &sync.Mutex{}
	var out []*fakeGuest
	for _, n := range names {
		out = append(out, &fakeGuest{name: n, log: log, mu: mu, value: 50, memFit: 16 << 20,
			installed: map[string][]byte{}, burning: make(chan struct{})})
	}
	return out, log
}

func opts(buses ...string) Options {
	return Options{Duration: time.Millisecond, Repeats: 2, Threads: 2, MemBytes: 64 << 20, DiskBytes: 32 << 20, Buses: buses, HostDisk: "/pool/.bench-host"}
}

func TestRunAlternatesGuestAndHost(t *testing.T) {
	gs, log := newFakes("vm")
	g := gs[0]
	h := &fakeHost{g: g, value: 100}
	rows, err := Run(context.Background(), g, h, []byte("ELF"), opts("virtio", "nvme"))
	if err != nil {
		t.Fatal(err)
	}
	if string(g.installed[GuestProbePath]) != "ELF" {
		t.Fatalf("probe installed as %q", g.installed)
	}
	var steps []string
	for _, l := range *log {
		f := strings.Fields(l)
		step := f[0] + " " + f[1]
		switch {
		case f[1] == "probe" && strings.Contains(l, "-groups cpu,mem,disk") && strings.HasPrefix(l, "vm"):
			step += " all"
		case f[1] == "probe" && strings.Contains(l, "-groups disk"):
			step += " disk"
		}
		steps = append(steps, step)
	}
	want := []string{"vm: install", "vm: attach", "vm: attach",
		"vm: probe all", "vm: probe disk", "host: probe",
		"vm: probe all", "vm: probe disk", "host: probe",
		"vm: detach", "vm: detach", "vm: rm"}
	if !slices.Equal(steps, want) {
		t.Fatalf("steps:\n%s\nwant:\n%s", strings.Join(steps, "\n"), strings.Join(want, "\n"))
	}
	var evicting []string
	for _, l := range *log {
		if strings.Contains(l, "-evict") {
			evicting = append(evicting, l)
		}
	}
	// Only the first guest run clears out an earlier run's probe.
	if len(evicting) != 1 || !strings.HasPrefix(evicting[0], "vm: probe") || !strings.Contains(evicting[0], "-groups cpu,mem,disk") {
		t.Errorf("runs with -evict: %v", evicting)
	}
	for _, l := range *log {
		// The host's memory tests use the buffer the guest settled on.
		if strings.HasPrefix(l, "host:") && !strings.Contains(l, fmt.Sprintf("-mem %d", 16<<20)) {
			t.Errorf("host probe without the guest's buffer size: %s", l)
		}
		if strings.HasPrefix(l, "host:") && !strings.Contains(l, "-disk /pool/.bench-host") {
			t.Errorf("host probe not on the host's scratch file: %s", l)
		}
	}
	// Scratch disks have distinct sizes, so the probe can tell them apart.
	if !slices.Contains(*log, fmt.Sprintf("vm: attach virtio %d", 35<<20)) || !slices.Contains(*log, fmt.Sprintf("vm: attach nvme %d", 36<<20)) {
		t.Fatalf("attach sizes: %v", *log)
	}
	if len(rows) != 3 || rows[0].Percent != 50 || rows[1].Bus != "virtio" || rows[2].Bus != "nvme" {
		t.Fatalf("rows = %+v", rows)
	}
}

func TestRunDetachesAfterAFailure(t *testing.T) {
	gs, log := newFakes("vm")
	g := gs[0]
	h := &fakeHost{g: g, value: 100, fail: 2}
	_, err := Run(context.Background(), g, h, []byte("ELF"), opts("virtio", "scsi"))
	if err == nil || !strings.Contains(err.Error(), "round 2/2 on the host: probe crashed") {
		t.Fatalf("Run = %v, want the host's failure in round 2", err)
	}
	for _, want := range []string{"vm: detach virtio", "vm: detach scsi", "vm: rm -f " + GuestProbePath} {
		if !slices.Contains(*log, want) {
			t.Errorf("no %q after a failure: %v", want, *log)
		}
	}
}

func TestRunRefusesABusAndUnplugsTheOthers(t *testing.T) {
	gs, log := newFakes("vm")
	g := gs[0]
	g.failBus = "scsi"
	_, err := Run(context.Background(), g, &fakeHost{g: g, value: 100}, []byte("ELF"), opts("virtio", "scsi"))
	if err == nil || !strings.Contains(err.Error(), "attach scratch disk on bus scsi: no room on the bus") {
		t.Fatalf("Run = %v, want the bus named", err)
	}
	if !slices.Contains(*log, "vm: detach virtio") {
		t.Fatalf("virtio disk left attached: %v", *log)
	}
	for _, l := range *log {
		if strings.Contains(l, "probe run") {
			t.Fatalf("measured after a failed attach: %v", *log)
		}
	}
}

func TestRunKeepsCompanyBusyAndQuietForTheHost(t *testing.T) {
	gs, log := newFakes("vm", "busy1", "busy2")
	g := gs[0]
	o := opts("virtio")
	o.Busy = []Guest{gs[1], gs[2]}
	var paused bool
	o.Hush = func(_ context.Context, p bool) error {
		paused = p
		g.record(fmt.Sprintf("hush %v", p))
		return nil
	}
	h := &fakeHost{g: g, value: 100}
	// The host must run with the company paused.
	checkHost := hostFunc(func(ctx context.Context, args []string) ([]byte, error) {
		if !paused {
			t.Error("host measured while the busy VMs ran")
		}
		return h.Run(ctx, args)
	})
	if _, err := Run(context.Background(), g, checkHost, []byte("ELF"), o); err != nil {
		t.Fatal(err)
	}
	for _, b := range gs[1:] {
		select {
		case <-b.burning:
		default:
			t.Fatalf("%s never burned", b.name)
		}
		if string(b.installed[GuestProbePath]) != "ELF" {
			t.Fatalf("%s has no probe", b.name)
		}
		if !slices.Contains(*log, b.name+": burn stopped") {
			t.Fatalf("%s still burning after the run: %v", b.name, *log)
		}
	}
	if paused {
		t.Fatal("busy VMs left paused")
	}
}

type hostFunc func(ctx context.Context, args []string) ([]byte, error)

func (f hostFunc) Run(ctx context.Context, args []string) ([]byte, error) { return f(ctx, args) }

func TestDecodeResultRefusesRubbish(t *testing.T) {
	for _, in := range []string{"", "not json", `{"samples":[]}`, "lodge-probe: oops\n"} {
		if _, err := decodeResult([]byte(in)); err == nil {
			t.Errorf("decodeResult(%q) accepted", in)
		}
	}
}

func FuzzDecodeResult(f *testing.F) {
	f.Add([]byte(`{"cpus":2,"mem_bytes":1048576,"samples":[{"test":"cpu.int.single","unit":"Mops/s","value":1}]}`))
	f.Add([]byte(`{"samples":null}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		res, err := decodeResult(raw)
		if err == nil && len(res.Samples) == 0 {
			t.Fatal("accepted a result with no samples")
		}
		host, guest := newCollector(), newCollector()
		host.add("", res)
		guest.add("virtio", res)
		for _, r := range Rows(host, guest) {
			if r.Percent < 0 {
				t.Fatalf("negative percentage from %q", raw)
			}
		}
	})
}
