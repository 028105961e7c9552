package vm

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/qemu/qemutest"
	"github.com/lodge-vm/lodge/internal/qga/qgatest"
)

// Under pressure the VM with the most to spare gives first, down to its
// floor and never into what its guest uses; VMs without a floor keep
// their memory; between the marks nothing moves; once pressure has
// passed, everything goes back.
func TestRebalance(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	balloons := map[string]*fakeBalloon{}
	f.drv.OnLaunch = func(vm *qemutest.VM) {
		b := &fakeBalloon{actual: 256 << 20, target: 256 << 20, driver: true}
		balloons[vm.Machine.Name] = b
		b.install(vm)
	}
	floors := map[string]int64{"a": 128 << 20, "b": 0, "c": 200 << 20}
	for _, name := range []string{"a", "b", "c"} {
		if _, err := f.svc.Create(ctx, api.CreateVM{Name: name, Image: "tiny", Memory: 256 << 20, MinMemory: floors[name]}); err != nil {
			t.Fatal(err)
		}
		if _, err := f.svc.Start(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	targets := func() map[string]int64 {
		out := map[string]int64{}
		for name, b := range balloons {
			b.mu.Lock()
			out[name] = b.target
			b.mu.Unlock()
		}
		return out
	}
	held := func(name string) int64 {
		r, err := f.svc.load(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		return r.Ballooned
	}

	// 150 MiB short of the high mark: a gives 128 MiB (its guest uses 40
	// MiB, so its floor of 128 MiB binds), c the 22 MiB left.
	if err := f.svc.Rebalance(ctx, Pressure{Available: 100 << 20, Low: 200 << 20, High: 250 << 20}); err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{"a": 128 << 20, "b": 256 << 20, "c": 234 << 20}
	for name, w := range want {
		if got := targets()[name]; got != w {
			t.Errorf("after pressure: balloon of %s at %d MiB, want %d MiB", name, got>>20, w>>20)
		}
	}
	if held("a") != 128<<20 || held("b") != 0 || held("c") != 234<<20 {
		t.Errorf("held: a %d, b %d, c %d", held("a"), held("b"), held("c"))
	}
	var balloonEvents int
	f.events.mu.Lock()
	for _, ev := range f.events.events {
		if ev.Kind == "vm-balloon" && strings.Contains(ev.Message, "below 200M") {
			balloonEvents++
		}
	}
	f.events.mu.Unlock()
	if balloonEvents != 2 {
		t.Errorf("%d vm-balloon events for the two changes", balloonEvents)
	}

	// Between the marks nothing moves.
	if err := f.svc.Rebalance(ctx, Pressure{Available: 220 << 20, Low: 200 << 20, High: 250 << 20}); err != nil {
		t.Fatal(err)
	}
	if got := targets()["a"]; got != 128<<20 {
		t.Errorf("between the marks the balloon of a moved to %d MiB", got>>20)
	}

	// An explicit set wins over the auto-balloon.
	if v, err := f.svc.Set(ctx, "c", api.SetVM{Memory: 256 << 20}); err != nil || v.Ballooned != 0 || targets()["c"] != 256<<20 {
		t.Fatalf("set after auto-balloon: %v, held %d, balloon %d", err, v.Ballooned, targets()["c"])
	}

	if err := f.svc.Rebalance(ctx, Pressure{Available: 4 << 30, Low: 200 << 20, High: 250 << 20}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b", "c"} {
		if got := targets()[name]; got != 256<<20 || held(name) != 0 {
			t.Errorf("after pressure ended: %s balloon at %d MiB, held %d", name, got>>20, held(name))
		}
	}
}

func TestMinMemoryValidation(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.svc.Create(ctx, api.CreateVM{Name: "x", Image: "tiny", Memory: 256 << 20, MinMemory: 512 << 20}); err == nil || !strings.Contains(err.Error(), "min memory") {
		t.Fatalf("create with min above memory: %v", err)
	}
	f.create(t, "web")
	for _, tt := range []struct {
		req  api.SetVM
		want string
	}{
		{api.SetVM{MinMemory: ptr(int64(300 << 20))}, "above its memory"},
		{api.SetVM{MinMemory: ptr(int64(32 << 20))}, "at least"},
		{api.SetVM{Memory: 128 << 20, MinMemory: ptr(int64(200 << 20))}, "above its memory"},
	} {
		if _, err := f.svc.Set(ctx, "web", tt.req); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Set(%+v) = %v, want %q", tt.req, err, tt.want)
		}
	}
	if v, err := f.svc.Set(ctx, "web", api.SetVM{MinMemory: ptr(int64(128 << 20))}); err != nil || v.MinMemory != 128<<20 {
		t.Fatalf("min_memory=128M: %v, %d", err, v.MinMemory)
	}
	if v, err := f.svc.Set(ctx, "web", api.SetVM{Memory: 100 << 20}); err == nil {
		t.Fatalf("memory below min_memory accepted: %+v", v)
	}
}

func ptr[T any](v T) *T { return &v }

// A guest whose balloon driver sends no reports still shows what it uses:
// its /proc/meminfo, read through the agent.
func TestMemoryUsedThroughAgent(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	agent := qgatest.NewAgent()
	agent.PutFile("/proc/meminfo", []byte("MemTotal:  200000 kB\nMemFree: 10 kB\nMemAvailable:  150000 kB\n"))
	f.drv.GuestAgent = agent
	f.drv.OnLaunch = func(vm *qemutest.VM) {
		vm.Mon.Handle("query-chardev", func(json.RawMessage) (any, error) {
			return []map[string]any{{"label": "qga0", "frontend-open": true}}, nil
		})
		vm.Mon.Handle("qom-get", func(json.RawMessage) (any, error) {
			return map[string]any{"last-update": 0, "stats": map[string]int64{}}, nil
		})
	}
	f.create(t, "web")
	if _, err := f.svc.Start(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	v, err := f.svc.Get(ctx, "web")
	if err != nil || v.MemoryUsed != 50000<<10 {
		t.Fatalf("memory used %d, %v; want total less available from the agent", v.MemoryUsed, err)
	}
}
