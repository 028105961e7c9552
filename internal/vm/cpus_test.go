package vm

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qemu/qemutest"
	"github.com/lodge-vm/lodge/internal/qga/qgatest"
)

// fakeCPUSlots models a machine's CPU sockets: device_add fills one,
// device_del empties it.
type fakeCPUSlots struct {
	mu      sync.Mutex
	plugged []bool
}

func (f *fakeCPUSlots) install(vm *qemutest.VM) {
	f.plugged = make([]bool, vm.Machine.MaxCPUs)
	for i := range vm.Machine.CPUs {
		f.plugged[i] = true
	}
	vm.Mon.Handle("query-hotpluggable-cpus", func(json.RawMessage) (any, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		var out []map[string]any
		for i, p := range f.plugged {
			slot := map[string]any{"type": "max-x86_64-cpu", "props": map[string]int{"socket-id": i, "core-id": 0, "thread-id": 0}}
			if p {
				slot["qom-path"] = "/machine/cpu" + string(rune('0'+i))
			}
			out = append(out, slot)
		}
		return out, nil
	})
	vm.Mon.Handle("device_add", func(raw json.RawMessage) (any, error) {
		var a struct {
			Socket int `json:"socket-id"`
		}
		_ = json.Unmarshal(raw, &a)
		f.mu.Lock()
		f.plugged[a.Socket] = true
		f.mu.Unlock()
		return nil, nil
	})
	vm.Mon.Handle("device_del", func(raw json.RawMessage) (any, error) {
		var a struct {
			ID string `json:"id"`
		}
		_ = json.Unmarshal(raw, &a)
		f.mu.Lock()
		f.plugged[int(a.ID[len("cpu")]-'0')] = false
		f.mu.Unlock()
		return nil, nil
	})
}

func (f *fakeCPUSlots) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, p := range f.plugged {
		if p {
			n++
		}
	}
	return n
}

// CPUs are plugged into a running VM that booted with room for them and
// brought online through the agent, and taken offline and out again; a
// VM without room, or a count past it, is refused.
func TestSetCPUsWhileRunning(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	agent := qgatest.NewAgent()
	agent.SetCPUs(4)
	f.drv.GuestAgent = agent
	slots := &fakeCPUSlots{}
	f.drv.OnLaunch = slots.install
	if _, err := f.svc.Create(ctx, api.CreateVM{Name: "web", Image: "tiny", Memory: 256 << 20, CPUs: 1, MaxCPUs: 4}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.Start(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	online := func() int {
		cpus, _ := agent.VCPUs(ctx)
		n := 0
		for _, c := range cpus {
			if c.Online {
				n++
			}
		}
		return n
	}
	v, err := f.svc.Set(ctx, "web", api.SetVM{CPUs: 3})
	if err != nil || v.CPUs != 3 || slots.count() != 3 || online() != 3 {
		t.Fatalf("after cpus=3: %v, cpus %d, plugged %d, online %d", err, v.CPUs, slots.count(), online())
	}
	if v, err = f.svc.Set(ctx, "web", api.SetVM{CPUs: 2}); err != nil || v.CPUs != 2 || slots.count() != 2 || online() != 2 {
		t.Fatalf("after cpus=2: %v, cpus %d, plugged %d, online %d", err, v.CPUs, slots.count(), online())
	}
	if r, _ := f.svc.load(ctx, "web"); r.HotCPUs != 1 {
		t.Fatalf("record hot CPUs %d, want 1", r.HotCPUs)
	}
	for _, tt := range []struct {
		req  api.SetVM
		want error
		msg  string
	}{
		{api.SetVM{CPUs: 5}, errdefs.ErrInvalid, "above its max_cpus 4"},
		{api.SetVM{MaxCPUs: 8}, errdefs.ErrState, "while the VM is stopped"},
	} {
		if _, err := f.svc.Set(ctx, "web", tt.req); !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("Set(%+v) = %v, want %v with %q", tt.req, err, tt.want, tt.msg)
		}
	}
	if slots.count() != 2 {
		t.Errorf("refused changes left %d CPUs plugged", slots.count())
	}
}
