// Package qemutest has a fake qemu.Driver for unit tests of the layers
// above it: launches start nothing, and each "VM" is a qmptest.Monitor.
package qemutest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/qmp/qmptest"
)

// Driver is a fake qemu.Driver.
type Driver struct {
	mu       sync.Mutex
	nextPID  int
	vms      map[string]*VM
	launched []qemu.Machine
	// LaunchErr, if set, fails every launch.
	LaunchErr error
	// OnLaunch, if set, can script the new VM's monitor.
	OnLaunch func(vm *VM)
	// GuestAgent, if set, is returned for every VM.
	GuestAgent qga.Agent
}

var _ qemu.Driver = (*Driver)(nil)

// VM is one fake QEMU process.
type VM struct {
	PID     int
	Machine qemu.Machine
	Mon     *qmptest.Monitor
	alive   bool
}

// New returns a fake driver.
func New() *Driver { return &Driver{nextPID: 1000, vms: map[string]*VM{}} }

// Launch "starts" a VM whose monitor is a fresh qmptest.Monitor. The
// process counts as exited once its monitor closes (as after quit).
func (d *Driver) Launch(_ context.Context, m qemu.Machine) (int, error) {
	if _, err := m.Args(); err != nil {
		return 0, err
	}
	d.mu.Lock()
	if d.LaunchErr != nil {
		d.mu.Unlock()
		return 0, d.LaunchErr
	}
	d.nextPID++
	vm := &VM{PID: d.nextPID, Machine: m, Mon: qmptest.NewMonitor(), alive: true}
	d.vms[m.RunDir] = vm
	d.launched = append(d.launched, m)
	hook := d.OnLaunch
	d.mu.Unlock()
	go func() {
		<-vm.Mon.Done()
		d.mu.Lock()
		vm.alive = false
		d.mu.Unlock()
	}()
	if hook != nil {
		hook(vm)
	}
	return vm.PID, nil
}

// Launched lists every machine launched so far.
func (d *Driver) Launched() []qemu.Machine {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]qemu.Machine(nil), d.launched...)
}

// VM returns the fake process of a run directory.
func (d *Driver) VM(runDir string) *VM {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.vms[runDir]
}

// Adopt registers a running VM that a test made up (to test re-attach).
func (d *Driver) Adopt(runDir string, pid int, mon *qmptest.Monitor) *VM {
	d.mu.Lock()
	defer d.mu.Unlock()
	vm := &VM{PID: pid, Mon: mon, alive: true}
	d.vms[runDir] = vm
	go func() {
		<-mon.Done()
		d.mu.Lock()
		vm.alive = false
		d.mu.Unlock()
	}()
	return vm
}

// Crash makes a VM's process vanish without a word, as kill -9 would.
func (d *Driver) Crash(runDir string) {
	d.mu.Lock()
	vm := d.vms[runDir]
	if vm != nil {
		vm.alive = false
	}
	d.mu.Unlock()
	if vm != nil {
		_ = vm.Mon.Close()
	}
}

// Monitor returns the VM's monitor.
func (d *Driver) Monitor(_ context.Context, runDir string) (qmp.Monitor, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	vm := d.vms[runDir]
	if vm == nil || !vm.alive {
		return nil, fmt.Errorf("fake qmp %s: %w", runDir, qemu.ErrNotRunning)
	}
	return vm.Mon, nil
}

// Agent returns the scripted agent, or fails as an unresponsive one.
func (d *Driver) Agent(_ context.Context, runDir string) (qga.Agent, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.GuestAgent == nil {
		return nil, errors.New("fake agent: none scripted")
	}
	return d.GuestAgent, nil
}

// PID reports the fake process.
func (d *Driver) PID(runDir string) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	vm := d.vms[runDir]
	if vm == nil || !vm.alive {
		return 0, qemu.ErrNotRunning
	}
	return vm.PID, nil
}

// Kill ends the fake process.
func (d *Driver) Kill(_ context.Context, runDir string, _ time.Duration) error {
	d.Crash(runDir)
	return nil
}
