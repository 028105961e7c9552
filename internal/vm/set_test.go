package vm

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qemu/qemutest"
)

// fakeBalloon models a guest's balloon: with a driver it moves toward
// the target in steps; without, it never moves.
// Its virtio-mem device plugs toward the requested size, but cannot
// unplug below floor.
type fakeBalloon struct {
	mu                 sync.Mutex
	actual, target     int64
	driver             bool
	targets            []int64
	plugged, requested int64
	floor              int64
	// noVirtioMem makes its virtio-mem device never move; pc-dimms then
	// come in at nextDimm bytes each, and go when ejects is set.
	noVirtioMem bool
	dimms       []int64
	nextDimm    int64
	ejects      bool
	// booting makes the guest send no balloon reports yet.
	booting bool
}

// qomArgs are the arguments of qom-get and qom-set.
type qomArgs struct {
	Path     string `json:"path"`
	Property string `json:"property"`
	Value    int64  `json:"value"`
}

func (b *fakeBalloon) install(vm *qemutest.VM) {
	vm.Mon.Handle("balloon", func(raw json.RawMessage) (any, error) {
		var a struct {
			Value int64 `json:"value"`
		}
		_ = json.Unmarshal(raw, &a)
		b.mu.Lock()
		b.target = a.Value
		b.targets = append(b.targets, a.Value)
		b.mu.Unlock()
		return nil, nil
	})
	vm.Mon.Handle("qom-set", func(raw json.RawMessage) (any, error) {
		var a qomArgs
		_ = json.Unmarshal(raw, &a)
		if a.Property == "requested-size" {
			b.mu.Lock()
			b.requested = a.Value
			b.mu.Unlock()
		}
		return nil, nil
	})
	vm.Mon.Handle("qom-get", func(raw json.RawMessage) (any, error) {
		var a qomArgs
		_ = json.Unmarshal(raw, &a)
		b.mu.Lock()
		defer b.mu.Unlock()
		lastUpdate := 1
		if b.booting {
			lastUpdate = 0
		}
		return map[string]any{"last-update": lastUpdate, "stats": map[string]int64{
			"stat-total-memory": b.actual, "stat-free-memory": b.actual / 2, "stat-available-memory": b.actual - 40<<20}}, nil
	})
	vm.Mon.Handle("query-memory-devices", func(json.RawMessage) (any, error) {
		b.mu.Lock()
		defer b.mu.Unlock()
		if !b.noVirtioMem {
			want := max(b.requested, min(b.floor, b.plugged))
			b.plugged += max(min(want-b.plugged, 64<<20), -64<<20)
		}
		devs := []map[string]any{}
		if b.plugged > 0 {
			devs = append(devs, map[string]any{"type": "virtio-mem", "data": map[string]any{"id": "hotmem0", "size": b.plugged}})
		}
		for i, d := range b.dimms {
			devs = append(devs, map[string]any{"type": "dimm", "data": map[string]any{"id": "dimm" + strconv.Itoa(i), "size": d}})
		}
		return devs, nil
	})
	vm.Mon.Handle("query-acpi-ospm-status", func(json.RawMessage) (any, error) {
		b.mu.Lock()
		defer b.mu.Unlock()
		var out []map[string]any
		for i := range b.dimms {
			out = append(out, map[string]any{"device": "dimm" + strconv.Itoa(i), "source": 1, "status": 0})
		}
		return out, nil
	})
	vm.Mon.Handle("object-add", func(json.RawMessage) (any, error) { return nil, nil })
	vm.Mon.Handle("object-del", func(json.RawMessage) (any, error) { return nil, nil })
	vm.Mon.Handle("device_add", func(raw json.RawMessage) (any, error) {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.dimms = append(b.dimms, b.nextDimm)
		return nil, nil
	})
	vm.Mon.Handle("device_del", func(json.RawMessage) (any, error) {
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.ejects {
			b.dimms = b.dimms[:len(b.dimms)-1]
		}
		return nil, nil
	})
	vm.Mon.Handle("query-balloon", func(json.RawMessage) (any, error) {
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.driver && b.actual != b.target {
			step := max(min(b.target-b.actual, 64<<20), -64<<20)
			b.actual += step
		}
		return map[string]int64{"actual": b.actual}, nil
	})
}

func TestSetMemoryWhileRunning(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "web") // 256 MiB
	b := &fakeBalloon{actual: 256 << 20, target: 256 << 20, driver: true}
	f.drv.OnLaunch = b.install
	if _, err := f.svc.Start(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	v, err := f.svc.Set(ctx, "web", api.SetVM{Memory: 128 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if v.Memory != 128<<20 || v.MemoryActual != 128<<20 {
		t.Fatalf("after shrinking: memory %d, actual %d; want 128 MiB both", v.Memory, v.MemoryActual)
	}
	if v.MemoryUsed != 40<<20 {
		t.Fatalf("memory used %d, want total less available (40 MiB)", v.MemoryUsed)
	}
	if v, err = f.svc.Set(ctx, "web", api.SetVM{Memory: 256 << 20}); err != nil || v.MemoryActual != 256<<20 {
		t.Fatalf("growing back: %v, actual %d", err, v.MemoryActual)
	}

	bad := []struct {
		req  api.SetVM
		want error
		msg  string
	}{
		{api.SetVM{Memory: 512 << 20}, errdefs.ErrInvalid, "above its max_memory"},
		{api.SetVM{Memory: 32 << 20}, errdefs.ErrInvalid, "at least"},
		{api.SetVM{CPUs: 2}, errdefs.ErrState, "while the VM is stopped"},
		{api.SetVM{MaxMemory: 1 << 30}, errdefs.ErrState, "while the VM is stopped"},
	}
	for _, tt := range bad {
		_, err := f.svc.Set(ctx, "web", tt.req)
		if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("Set(%+v) = %v, want %v with %q", tt.req, err, tt.want, tt.msg)
		}
	}
	if r, _ := f.svc.load(ctx, "web"); r.Memory != 256<<20 || r.CPUs != 1 || r.MaxMemory != 256<<20 {
		t.Errorf("refused changes left the record at memory %d, cpus %d, max %d", r.Memory, r.CPUs, r.MaxMemory)
	}
}

// A guest without a balloon driver is found out within the stall time,
// and nothing is left half-set: the balloon target goes back.
func TestSetMemoryWithoutBalloonDriver(t *testing.T) {
	balloonStall = 300 * time.Millisecond
	defer func() { balloonStall = 10 * time.Second }()
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "web")
	b := &fakeBalloon{actual: 256 << 20, target: 256 << 20}
	f.drv.OnLaunch = b.install
	if _, err := f.svc.Start(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	_, err := f.svc.Set(ctx, "web", api.SetVM{Memory: 128 << 20})
	if err == nil || !strings.Contains(err.Error(), "did not move") {
		t.Fatalf("Set on a guest without a balloon driver = %v", err)
	}
	b.mu.Lock()
	targets := b.targets
	b.mu.Unlock()
	if len(targets) != 2 || targets[1] != 256<<20 {
		t.Errorf("balloon targets %v: want the old target put back", targets)
	}
	if r, _ := f.svc.load(ctx, "web"); r.Memory != 256<<20 {
		t.Errorf("record memory %d after a failed change", r.Memory)
	}
}

func TestSetWhileStopped(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "db")
	v, err := f.svc.Set(ctx, "db", api.SetVM{CPUs: 2, MaxMemory: 1 << 30, Memory: 768 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if v.CPUs != 2 || v.MaxMemory != 1<<30 || v.Memory != 768<<20 {
		t.Fatalf("after set: %+v", v)
	}
	if _, err := f.svc.Set(ctx, "db", api.SetVM{MaxMemory: 512 << 20}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("max_memory below memory: %v", err)
	}
}

// Memory above the boot size is plugged through virtio-mem; going back
// below it unplugs first, and what the guest cannot unplug the balloon
// takes from the boot memory instead.
func TestSetMemoryHotplug(t *testing.T) {
	balloonStall = 300 * time.Millisecond
	defer func() { balloonStall = 10 * time.Second }()
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.svc.Create(ctx, api.CreateVM{Name: "web", Image: "tiny", Memory: 256 << 20, MaxMemory: 4 << 30}); err != nil {
		t.Fatal(err)
	}
	b := &fakeBalloon{actual: 256 << 20, target: 256 << 20, driver: true, floor: 8 << 20}
	var args []string
	f.drv.OnLaunch = func(vm *qemutest.VM) {
		b.install(vm)
		args, _ = vm.Machine.Args()
	}
	if _, err := f.svc.Start(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if joined := strings.Join(args, " "); !strings.Contains(joined, "slots=8,maxmem=7936M") || !strings.Contains(joined, "virtio-mem-pci") {
		t.Fatalf("a VM with max_memory above memory boots without room for hot-plug:\n%s", joined)
	}
	v, err := f.svc.Set(ctx, "web", api.SetVM{Memory: 768 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if v.MemoryPlugged != 512<<20 || v.MemoryActual != 768<<20 {
		t.Fatalf("after growing to 768 MiB: plugged %d, actual %d", v.MemoryPlugged, v.MemoryActual)
	}
	if v, err = f.svc.Set(ctx, "web", api.SetVM{Memory: 128 << 20}); err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	plugged, target := b.plugged, b.target
	b.mu.Unlock()
	if plugged != 8<<20 || target != 120<<20 || v.MemoryActual != 128<<20 {
		t.Fatalf("after shrinking to 128 MiB: plugged %d, balloon target %d, actual %d; want 8 MiB stuck and the balloon at 120 MiB", plugged, target, v.MemoryActual)
	}
	if _, err := f.svc.Set(ctx, "web", api.SetVM{Memory: 5 << 30}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("growing past max_memory: %v", err)
	}
	// The host limit is 2 GiB.
	if _, err := f.svc.Set(ctx, "web", api.SetVM{Memory: 3 << 30}); !errors.Is(err, errdefs.ErrLimit) || !strings.Contains(err.Error(), "memory limit 2G, allocated 128M, requested 2.9G more") {
		t.Fatalf("growing past the host limit: %v", err)
	}
}

// A start is admitted with what its QEMU takes beyond the guest's memory.
func TestAdmitCountsOverhead(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.svc.cfg.Host = func() Host {
		return Host{MemoryTotal: 8 << 30, MemoryLimit: 600 << 20, Overcommit: 1, VMOverhead: 100 << 20}
	}
	f.create(t, "a")
	f.create(t, "b")
	if _, err := f.svc.Start(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	_, err := f.svc.Start(ctx, "b")
	if !errors.Is(err, errdefs.ErrLimit) || !strings.Contains(err.Error(), "memory limit 600M, allocated 356M, requested 356M (256M and 100M for QEMU itself)") {
		t.Fatalf("second start: %v", err)
	}
	if alloc, running, _, err := f.svc.MemoryAllocated(ctx); err != nil || alloc != 356<<20 || running != 1 {
		t.Fatalf("allocated %d with %d running, %v", alloc, running, err)
	}
}

// A guest without a virtio-mem driver gets pc-dimms in 128 MiB blocks,
// the balloon taking back what the rounding added; shrinking ejects whole
// dimms, and a dimm the guest keeps is made up for by the balloon.
func TestSetMemoryDimms(t *testing.T) {
	balloonStall = 300 * time.Millisecond
	defer func() { balloonStall = 10 * time.Second }()
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.svc.Create(ctx, api.CreateVM{Name: "old", Image: "tiny", Memory: 256 << 20, MaxMemory: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	b := &fakeBalloon{actual: 256 << 20, target: 256 << 20, driver: true, noVirtioMem: true, nextDimm: 256 << 20, ejects: true}
	f.drv.OnLaunch = b.install
	if _, err := f.svc.Start(ctx, "old"); err != nil {
		t.Fatal(err)
	}
	v, err := f.svc.Set(ctx, "old", api.SetVM{Memory: 500 << 20})
	if err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	target := b.target
	b.mu.Unlock()
	// 244 MiB more rounds up to one 256 MiB dimm; the balloon, which
	// QEMU measures against the boot memory and the dimms, takes 12.
	if v.MemoryPlugged != 256<<20 || target != 500<<20 || v.MemoryActual != 500<<20 {
		t.Fatalf("after growing to 500 MiB: plugged %d, balloon target %d MiB, actual %d", v.MemoryPlugged, target>>20, v.MemoryActual)
	}
	r, _ := f.svc.load(ctx, "old")
	if len(r.Dimms) != 1 || r.Dimms[0] != 256<<20 {
		t.Fatalf("record dimms %v", r.Dimms)
	}
	if v, err = f.svc.Set(ctx, "old", api.SetVM{Memory: 200 << 20}); err != nil || v.MemoryPlugged != 0 {
		t.Fatalf("shrinking below the boot size: %v, plugged %d", err, v.MemoryPlugged)
	}
	if r, _ := f.svc.load(ctx, "old"); len(r.Dimms) != 0 {
		t.Fatalf("record dimms after the eject: %v", r.Dimms)
	}

	// Between whole dimms the balloon makes up the difference.
	if _, err := f.svc.Set(ctx, "old", api.SetVM{Memory: 512 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.Set(ctx, "old", api.SetVM{Memory: 300 << 20}); err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	target, dimms := b.target, len(b.dimms)
	b.ejects = false
	b.mu.Unlock()
	if target != 300<<20 || dimms != 1 {
		t.Fatalf("at 300 MiB: balloon target %d MiB, %d dimms; want the balloon at 300 MiB of boot and dimm", target>>20, dimms)
	}
	// A dimm the guest will not give up is reported, and nothing changes.
	_, err = f.svc.Set(ctx, "old", api.SetVM{Memory: 200 << 20})
	if !errors.Is(err, errdefs.ErrState) || !strings.Contains(err.Error(), "did not give up dimm0") {
		t.Fatalf("shrinking past a stuck dimm: %v", err)
	}
	if r, _ := f.svc.load(ctx, "old"); r.Memory != 300<<20 || len(r.Dimms) != 1 {
		t.Fatalf("after the refused eject: memory %d, dimms %v", r.Memory, r.Dimms)
	}
}

// A guest that takes no virtio-mem block while it shows no sign of
// running (no agent, no balloon reports) may still be booting: the call
// waits for it a while, then says so and plugs no dimm on a guess.
func TestSetMemoryWhileBooting(t *testing.T) {
	balloonStall, balloonTimeout = 300*time.Millisecond, 500*time.Millisecond
	defer func() { balloonStall, balloonTimeout = 10*time.Second, 60*time.Second }()
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.svc.Create(ctx, api.CreateVM{Name: "new", Image: "tiny", Memory: 256 << 20, MaxMemory: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	b := &fakeBalloon{actual: 256 << 20, target: 256 << 20, driver: true, noVirtioMem: true, nextDimm: 256 << 20, booting: true}
	f.drv.OnLaunch = b.install
	if _, err := f.svc.Start(ctx, "new"); err != nil {
		t.Fatal(err)
	}
	_, err := f.svc.Set(ctx, "new", api.SetVM{Memory: 512 << 20})
	if !errors.Is(err, errdefs.ErrState) || !strings.Contains(err.Error(), "no sign of running yet") {
		t.Fatalf("set while booting: %v", err)
	}
	b.mu.Lock()
	dimms := len(b.dimms)
	b.mu.Unlock()
	if r, _ := f.svc.load(ctx, "new"); dimms != 0 || r.Memory != 256<<20 || len(r.Dimms) != 0 {
		t.Fatalf("a refused set plugged %d dimms, left memory %d", dimms, r.Memory)
	}
}
