package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/image"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qemu/qemutest"
	"github.com/lodge-vm/lodge/internal/qmp/qmptest"
	"github.com/lodge-vm/lodge/internal/storage"
	"github.com/lodge-vm/lodge/internal/store"
)

type fakeImages map[string]api.Image

func (f fakeImages) Resolve(_ context.Context, name string) (api.Image, error) {
	img, ok := f[name]
	if !ok {
		return api.Image{}, fmt.Errorf("image %q: %w", name, errdefs.ErrNotFound)
	}
	return img, nil
}

// Publish records what it was asked and runs the preparation step on a
// stand-in file, as the real library does before freezing the image.
func (f fakeImages) Publish(ctx context.Context, spec image.PublishSpec) (api.Image, error) {
	if spec.Prepare != nil {
		if err := spec.Prepare(ctx, spec.Top+".published"); err != nil {
			return api.Image{}, err
		}
	}
	img := api.Image{Name: spec.Name, Parent: spec.Parent, PublishedFrom: spec.VM, Path: spec.Top + "|" + spec.TopBacking, Generalized: spec.Prepare != nil}
	f[spec.Name] = img
	return img, nil
}

type fakePools struct{ dir string }

func (f fakePools) Get(_ context.Context, name string) (storage.Pool, error) {
	if name != "default" {
		return storage.Pool{}, fmt.Errorf("pool %q: %w", name, errdefs.ErrNotFound)
	}
	return storage.Pool{Name: "default", Path: f.dir}, nil
}

// fakeVolumes stands in for qemu-img: an "overlay" is a text file whose
// first line names its backing file; more lines are data written to it.
type fakeVolumes struct{ fail error }

func (f fakeVolumes) CreateOverlay(_ context.Context, backing, path string, _ int64) error {
	if f.fail != nil {
		return f.fail
	}
	if _, err := os.Stat(path); err == nil {
		return os.ErrExist
	}
	return os.WriteFile(path, []byte(backing+"\n"), 0o600)
}

func (f fakeVolumes) ConvertProgress(_ context.Context, src, _, dst string, progress func(float64)) error {
	if f.fail != nil {
		return f.fail
	}
	progress(1)
	return os.WriteFile(dst, []byte("\ncopy of "+src+"\n"), 0o600)
}

func (f fakeVolumes) HasData(_ context.Context, path string) (bool, error) {
	b, err := os.ReadFile(path)
	return strings.Count(string(b), "\n") > 1, err
}

// Rebase keeps path's data lines and appends the old backing's, as
// qemu-img's safe rebase copies what differs.
func (f fakeVolumes) Rebase(_ context.Context, path, backing string) error {
	if f.fail != nil {
		return f.fail
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	old, data, _ := strings.Cut(string(b), "\n")
	moved, _ := os.ReadFile(old)
	_, oldData, _ := strings.Cut(string(moved), "\n")
	return os.WriteFile(path, []byte(backing+"\n"+data+oldData), 0o600)
}

func (f fakeVolumes) SetBacking(_ context.Context, path, backing string) error {
	return f.Rebase(context.Background(), path, backing)
}

func (f fakeVolumes) Check(context.Context, string) error { return f.fail }

func (f fakeVolumes) Info(_ context.Context, path string) (storage.Info, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return storage.Info{}, err
	}
	backing, _, _ := strings.Cut(string(b), "\n")
	return storage.Info{Filename: path, Format: "qcow2", BackingFilename: backing}, nil
}

type recorder struct {
	mu     sync.Mutex
	events []api.Event
}

func (r *recorder) Publish(ev api.Event) {
	r.mu.Lock()
	r.events = append(r.events, ev)
	r.mu.Unlock()
}

type fixture struct {
	svc    *Service
	drv    *qemutest.Driver
	store  store.Store
	home   string
	events *recorder
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	home := t.TempDir()
	pools := filepath.Join(home, "pools")
	if err := os.MkdirAll(pools, 0o755); err != nil {
		t.Fatal(err)
	}
	f := &fixture{drv: qemutest.New(), store: store.NewMemory(), home: home, events: &recorder{}}
	f.svc = New(Config{
		Home: home, Store: f.store, Driver: f.drv, Volumes: fakeVolumes{},
		Images: fakeImages{"tiny": {Name: "tiny", Path: "/img/tiny.qcow2", VirtualSize: 300 << 20}},
		Pools:  fakePools{pools}, Events: f.events,
		Host: func() Host { return Host{MemoryTotal: 8 << 30, MemoryLimit: 2 << 30, Overcommit: 1} },
		Accel: func(context.Context) (qemu.Accel, error) {
			return qemu.Accel{Accel: "tcg", Reason: "test"}, nil
		},
		StopTimeout: 2 * time.Second,
	})
	t.Cleanup(f.svc.Close)
	return f
}

func (f *fixture) create(t *testing.T, name string) api.VM {
	t.Helper()
	v, err := f.svc.Create(context.Background(), api.CreateVM{Name: name, Image: "tiny", Memory: 256 << 20})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func (f *fixture) waitState(t *testing.T, name, want string) api.VM {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		v, err := f.svc.Get(context.Background(), name)
		if err == nil && v.State == want {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("vm %s: state %q (%v), want %q", name, v.State, err, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestCreateValidation(t *testing.T) {
	tests := []struct {
		name string
		req  api.CreateVM
		err  error
		want string
	}{
		{"slash", api.CreateVM{Name: "a/b", Image: "tiny"}, errdefs.ErrInvalid, `vm name "a/b"`},
		{"dotdot", api.CreateVM{Name: "..", Image: "tiny"}, errdefs.ErrInvalid, `vm name ".."`},
		{"no image", api.CreateVM{Name: "x"}, errdefs.ErrInvalid, "image is required"},
		{"unknown image", api.CreateVM{Name: "x", Image: "nope"}, errdefs.ErrNotFound, `image "nope"`},
		{"negative cpus", api.CreateVM{Name: "x", Image: "tiny", CPUs: -1}, errdefs.ErrInvalid, "cpus -1"},
		{"small memory", api.CreateVM{Name: "x", Image: "tiny", Memory: 1 << 20}, errdefs.ErrInvalid, "at least 64M"},
		{"over host", api.CreateVM{Name: "x", Image: "tiny", Memory: 16 << 30}, errdefs.ErrLimit, "more than the host has (8G)"},
		{"max below memory", api.CreateVM{Name: "x", Image: "tiny", Memory: 1 << 30, MaxMemory: 512 << 20}, errdefs.ErrInvalid, "below memory"},
		{"small disk", api.CreateVM{Name: "x", Image: "tiny", DiskSize: 1 << 20}, errdefs.ErrInvalid, "smaller than image"},
		{"bad bus", api.CreateVM{Name: "x", Image: "tiny", DiskBus: "usb"}, errdefs.ErrInvalid, `disk bus "usb"`},
		{"unknown pool", api.CreateVM{Name: "x", Image: "tiny", Pool: "far"}, errdefs.ErrNotFound, `pool "far"`},
		{"unknown net", api.CreateVM{Name: "x", Image: "tiny", Network: "lan"}, errdefs.ErrNotFound, `network "lan"`},
		{"small data disk", api.CreateVM{Name: "x", Image: "tiny", DataDisks: []int64{1 << 30, 4096}}, errdefs.ErrInvalid, "data disk 2 of 4K"},
		{"data disk not in sectors", api.CreateVM{Name: "x", Image: "tiny", DataDisks: []int64{1<<20 + 100}}, errdefs.ErrInvalid, "whole 512-byte sectors"},
		{"too many data disks", api.CreateVM{Name: "x", Image: "tiny", DataDisks: make([]int64, api.MaxDataDisks+1)}, errdefs.ErrInvalid, "at most 8"},
		{"too many on ide", api.CreateVM{Name: "x", Image: "tiny", DiskBus: "ide", DataDisks: []int64{1 << 20, 1 << 20, 1 << 20}}, errdefs.ErrInvalid, "a VM on ide takes at most 2"},
	}
	f := newFixture(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := f.svc.Create(context.Background(), tt.req)
			if !errors.Is(err, tt.err) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Create = %v, want %v mentioning %q", err, tt.err, tt.want)
			}
		})
	}
	vms, _ := f.svc.List(context.Background())
	files, _ := os.ReadDir(filepath.Join(f.home, "pools"))
	if len(vms) != 0 || len(files) != 0 {
		t.Fatalf("bad input left %d VMs and %d files", len(vms), len(files))
	}
}

func TestCreateDefaultsAndIdentity(t *testing.T) {
	f := newFixture(t)
	a := f.create(t, "a")
	b := f.create(t, "b")
	if a.CPUs != 1 || a.Memory != 256<<20 || a.MaxMemory != 256<<20 || a.Disks[0].Size != DefaultDiskSize || a.Disks[0].Bus != "virtio" {
		t.Fatalf("defaults = %+v", a)
	}
	if a.UUID == b.UUID || a.NICs[0].MAC == b.NICs[0].MAC || a.InstanceID == b.InstanceID {
		t.Fatal("two VMs share an identity")
	}
	if a.State != api.StateStopped || a.Hostname != "a" || a.Disks[0].Backing != "/img/tiny.qcow2" {
		t.Fatalf("a = %+v", a)
	}
	if _, err := f.svc.Create(context.Background(), api.CreateVM{Name: "a", Image: "tiny"}); !errors.Is(err, errdefs.ErrExists) {
		t.Fatalf("duplicate create: %v", err)
	}
}

func TestCreateDataDisks(t *testing.T) {
	f := newFixture(t)
	v, err := f.svc.Create(context.Background(), api.CreateVM{Name: "db", Image: "tiny", DiskBus: "scsi", DataDisks: []int64{1 << 30, 64 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	if len(v.Disks) != 3 {
		t.Fatalf("disks = %+v, want root, data1, data2", v.Disks)
	}
	for i, want := range []struct {
		name string
		size int64
	}{{"data1", 1 << 30}, {"data2", 64 << 20}} {
		d := v.Disks[i+1]
		if d.Name != want.name || d.Size != want.size || d.Bus != "scsi" || d.Backing != "" || d.Pool != "default" {
			t.Fatalf("disk %d = %+v, want %s of %d on scsi with no backing", i+1, d, want.name, want.size)
		}
		if raw, err := os.ReadFile(d.Path); err != nil || string(raw) != "\n" {
			t.Fatalf("disk %s: file %q, %v; want an empty volume with no backing", d.Name, raw, err)
		}
	}
	if v.Disks[1].Path == v.Disks[2].Path || v.Disks[1].Path == v.Disks[0].Path {
		t.Fatalf("disks share a file: %+v", v.Disks)
	}
}

func TestCreateFailureLeavesNothing(t *testing.T) {
	f := newFixture(t)
	f.svc.cfg.Volumes = fakeVolumes{fail: errors.New("disk full")}
	_, err := f.svc.Create(context.Background(), api.CreateVM{Name: "x", Image: "tiny"})
	if err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Create = %v", err)
	}
	if _, err := f.svc.Get(context.Background(), "x"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("record left behind: %v", err)
	}
	if _, err := os.Stat(f.svc.vmDir("x")); !os.IsNotExist(err) {
		t.Fatal("vm dir left behind")
	}
}

func TestStartStopGraceful(t *testing.T) {
	f := newFixture(t)
	f.create(t, "web")
	// A guest that obeys the power button.
	f.drv.OnLaunch = func(vm *qemutest.VM) {
		vm.Mon.Handle("system_powerdown", func(json.RawMessage) (any, error) {
			go vm.Mon.Emit("SHUTDOWN", map[string]any{"guest": true, "reason": "guest-shutdown"})
			return nil, nil
		})
	}
	ctx := context.Background()
	v, err := f.svc.Start(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if v.State != api.StateRunning || v.PID == 0 || v.StartedAt == nil {
		t.Fatalf("after start: %+v", v)
	}
	if _, err := f.svc.Start(ctx, "web"); !errors.Is(err, errdefs.ErrState) {
		t.Fatalf("second start: %v", err)
	}
	m := f.drv.Launched()[0]
	if m.Accel != "tcg" || m.CPUModel != "max" || m.Memory != 256<<20 || m.SeedISO == "" {
		t.Fatalf("machine = %+v", m)
	}
	begin := time.Now()
	v, err = f.svc.Stop(ctx, "web", false, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if time.Since(begin) > 5*time.Second {
		t.Fatalf("graceful stop waited %s", time.Since(begin))
	}
	if v.State != api.StateStopped || v.PID != 0 || v.StateReason != "stopped by request" {
		t.Fatalf("after stop: %+v", v)
	}
	cmds := strings.Join(f.drv.VM(m.RunDir).Mon.Commands(), ",")
	if !strings.Contains(cmds, "system_powerdown") || !strings.Contains(cmds, "quit") {
		t.Fatalf("commands = %s, want system_powerdown then quit", cmds)
	}
}

func TestStopForcedAfterTimeout(t *testing.T) {
	f := newFixture(t)
	f.create(t, "deaf")
	ctx := context.Background()
	if _, err := f.svc.Start(ctx, "deaf"); err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	v, err := f.svc.Stop(ctx, "deaf", false, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(begin); took < 300*time.Millisecond {
		t.Fatalf("forced before the timeout: %s", took)
	}
	if v.State != api.StateStopped {
		t.Fatalf("state %s", v.State)
	}
}

func TestPauseResume(t *testing.T) {
	f := newFixture(t)
	f.create(t, "p")
	ctx := context.Background()
	if _, err := f.svc.Pause(ctx, "p"); !errors.Is(err, errdefs.ErrState) {
		t.Fatalf("pause of a stopped VM: %v", err)
	}
	if _, err := f.svc.Start(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	if v, err := f.svc.Pause(ctx, "p"); err != nil || v.State != api.StatePaused {
		t.Fatalf("pause: %+v %v", v, err)
	}
	if _, err := f.svc.Pause(ctx, "p"); !errors.Is(err, errdefs.ErrState) || !strings.Contains(err.Error(), "already paused") {
		t.Fatalf("pause of a paused VM: %v", err)
	}
	if v, err := f.svc.Resume(ctx, "p"); err != nil || v.State != api.StateRunning {
		t.Fatalf("resume: %+v %v", v, err)
	}
	if _, err := f.svc.Resume(ctx, "p"); !errors.Is(err, errdefs.ErrState) {
		t.Fatalf("resume of a running VM: %v", err)
	}
}

func TestCrashAndGuestPowerOff(t *testing.T) {
	f := newFixture(t)
	f.create(t, "c")
	ctx := context.Background()
	if _, err := f.svc.Start(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	f.drv.Crash(f.svc.runDir("c"))
	v := f.waitState(t, "c", api.StateError)
	if !strings.Contains(v.StateReason, "unexpectedly") {
		t.Fatalf("reason = %q", v.StateReason)
	}
	if _, err := f.svc.Start(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	vm := f.drv.VM(f.svc.runDir("c"))
	vm.Mon.Emit("SHUTDOWN", map[string]any{"guest": true, "reason": "guest-shutdown"})
	v = f.waitState(t, "c", api.StateStopped)
	if v.StateReason != "the guest powered off" {
		t.Fatalf("reason = %q", v.StateReason)
	}
}

func TestBusyRefusesSecondOperation(t *testing.T) {
	f := newFixture(t)
	f.create(t, "b")
	unlock, err := f.svc.lock("b", "start")
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.svc.Stop(context.Background(), "b", true, 0)
	if !errors.Is(err, errdefs.ErrBusy) || !strings.Contains(err.Error(), "start is in progress") {
		t.Fatalf("Stop while busy = %v", err)
	}
	unlock()
	// Another VM is not held up.
	f.create(t, "other")
}

func TestIdentityConflictAndAdmission(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	a := f.create(t, "a")
	f.create(t, "b")
	if _, err := f.svc.Start(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	// Make b an exact copy of a's identity, as --keep-identity will.
	if _, err := f.svc.update(ctx, "b", func(r *record) error { r.UUID = a.UUID; return nil }); err != nil {
		t.Fatal(err)
	}
	_, err := f.svc.Start(ctx, "b")
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), `running vm "a"`) {
		t.Fatalf("start of a copy = %v", err)
	}
	// Admission: 2G limit, 256M each; a 2G VM does not fit beside a.
	if _, err := f.svc.update(ctx, "b", func(r *record) error { r.UUID = "other"; r.Memory = 2 << 30; return nil }); err != nil {
		t.Fatal(err)
	}
	_, err = f.svc.Start(ctx, "b")
	if !errors.Is(err, errdefs.ErrLimit) || !strings.Contains(err.Error(), "limit 2G, allocated 256M, requested 2G") {
		t.Fatalf("start over the limit = %v", err)
	}
	if v, _ := f.svc.Get(ctx, "b"); v.State != api.StateStopped {
		t.Fatalf("refused start changed state to %s", v.State)
	}
}

func TestRecover(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "alive")
	f.create(t, "dead")
	f.create(t, "off")
	f.create(t, "half")
	for name, state := range map[string]string{"alive": api.StateRunning, "dead": api.StateRunning, "off": api.StateRunning} {
		if _, err := f.svc.update(ctx, name, func(r *record) error { r.State = state; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.svc.update(ctx, "half", func(r *record) error { r.Intent = intentCreating; return nil }); err != nil {
		t.Fatal(err)
	}
	f.drv.Adopt(f.svc.runDir("alive"), 4242, qmptest.NewMonitor())
	off := qmptest.NewMonitor()
	off.SetStatus("shutdown")
	f.drv.Adopt(f.svc.runDir("off"), 4343, off)

	if err := f.svc.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if v := f.waitState(t, "alive", api.StateRunning); v.PID != 4242 {
		t.Fatalf("alive pid = %d", v.PID)
	}
	if v := f.waitState(t, "dead", api.StateError); !strings.Contains(v.StateReason, "while the daemon was not running") {
		t.Fatalf("dead reason = %q", v.StateReason)
	}
	if v := f.waitState(t, "off", api.StateStopped); v.StateReason != "the guest powered off" {
		t.Fatalf("off reason = %q", v.StateReason)
	}
	if _, err := f.svc.Get(ctx, "half"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("interrupted create survived recovery: %v", err)
	}
}

func TestDeleteRemovesFiles(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	v := f.create(t, "d")
	if _, err := f.svc.Start(ctx, "d"); err != nil {
		t.Fatal(err)
	}
	if err := f.svc.Delete(ctx, "d", false); !errors.Is(err, errdefs.ErrState) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("delete of running VM = %v", err)
	}
	if err := f.svc.Delete(ctx, "d", true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(v.Disks[0].Path); !os.IsNotExist(err) {
		t.Fatal("disk left behind")
	}
	if _, err := f.svc.Get(ctx, "d"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatal("record left behind")
	}
}

func TestFullDiskPausesWithReason(t *testing.T) {
	f := newFixture(t)
	f.create(t, "full")
	ctx := context.Background()
	if _, err := f.svc.Start(ctx, "full"); err != nil {
		t.Fatal(err)
	}
	vm := f.drv.VM(f.svc.runDir("full"))
	vm.Mon.Emit("BLOCK_IO_ERROR", map[string]any{"device": "", "node-name": "disk0", "operation": "write", "action": "stop", "nospace": true, "reason": "No space left on device"})
	vm.Mon.SetStatus("io-error")
	vm.Mon.Emit("STOP", nil)
	v := f.waitState(t, "full", api.StatePaused)
	if !strings.Contains(v.StateReason, "no space left") {
		t.Fatalf("reason = %q", v.StateReason)
	}
	if _, err := f.svc.Resume(ctx, "full"); err != nil {
		t.Fatal(err)
	}
	if v := f.waitState(t, "full", api.StateRunning); v.StateReason != "" {
		t.Fatalf("reason after resume = %q", v.StateReason)
	}
}

func (f fakeVolumes) AddBitmap(context.Context, string, string) error    { return f.fail }
func (f fakeVolumes) Resize(context.Context, string, int64) error        { return f.fail }
func (f fakeVolumes) RemoveBitmap(context.Context, string, string) error { return f.fail }

func (f fakeVolumes) Chain(ctx context.Context, path string) ([]storage.Info, error) {
	info, err := f.Info(ctx, path)
	return []storage.Info{info}, err
}
