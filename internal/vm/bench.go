package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/bench"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qmp"
)

// benchGuest is a running VM as the benchmark runner drives it.
type benchGuest struct {
	s    *Service
	name string
	// dir is where scratch disks go: beside the VM's own disks, so the
	// disk tests measure the storage the VM really uses.
	dir string
	// booted are the buses whose scratch disk the VM was booted with.
	booted map[string]bool
}

var _ bench.Guest = (*benchGuest)(nil)

// BenchGuest returns the running VM name for the benchmark runner, and
// the directory of its disks, where the host's side of the disk tests
// belongs too.
func (s *Service) BenchGuest(ctx context.Context, name string) (bench.Guest, string, error) {
	r, dir, err := s.benchDisks(ctx, name)
	if err != nil {
		return nil, "", err
	}
	if s.instance(name) == nil || r.State != api.StateRunning {
		return nil, "", fmt.Errorf("bench vm %q: %w: it is %s, and a benchmark needs it running", name, errdefs.ErrState, r.State)
	}
	return &benchGuest{s: s, name: name, dir: dir}, dir, nil
}

// benchDisks loads a VM and the directory of its disks, where scratch
// disks go.
func (s *Service) benchDisks(ctx context.Context, name string) (record, string, error) {
	r, err := s.load(ctx, name)
	if err != nil {
		return record{}, "", err
	}
	if len(r.Disks) == 0 {
		return record{}, "", fmt.Errorf("bench vm %q: %w: it has no disk", name, errdefs.ErrInvalid)
	}
	return r, filepath.Dir(r.Disks[0].Path), nil
}

// scratchPath is where the scratch disk of bus goes for a benchmark of
// vm whose disks are in dir.
func scratchPath(dir, vm, bus string) string {
	return filepath.Join(dir, ".bench-"+vm+"-"+bus+".qcow2")
}

// BootForBench starts a stopped VM that ReserveForBench holds, with a
// new scratch disk of each size on each bus (IDE included, which cannot
// be hot-plugged), for this boot only. StopAfterBench stops it again and
// removes the scratch disks; a failed boot removes them at once.
func (s *Service) BootForBench(ctx context.Context, name string, buses []string, sizes []int64) (_ bench.Guest, _ string, err error) {
	_, dir, err := s.benchDisks(ctx, name)
	if err != nil {
		return nil, "", err
	}
	defer func() {
		if err != nil {
			s.removeScratch(dir, name, buses)
		}
	}()
	// QEMU's IDE bus takes disks by position (see qemu.Machine.Args): an
	// IDE scratch disk goes right after the VM's own.
	order := make([]int, 0, len(buses))
	for i, b := range buses {
		if b == qemu.BusIDE {
			order = append([]int{i}, order...)
		} else {
			order = append(order, i)
		}
	}
	var extra []qemu.Disk
	booted := map[string]bool{}
	for _, i := range order {
		path := scratchPath(dir, name, buses[i])
		_ = os.Remove(path)
		if err := s.cfg.Volumes.CreateOverlay(ctx, "", path, sizes[i]); err != nil {
			return nil, "", fmt.Errorf("scratch disk %s: %w", path, err)
		}
		extra = append(extra, qemu.Disk{Name: scratchID(buses[i]), Path: path, Bus: buses[i], Format: "qcow2"})
		booted[buses[i]] = true
	}
	if _, err := s.boot(ctx, name, nil, extra...); err != nil {
		return nil, "", fmt.Errorf("bench vm %q: boot with scratch disks: %w", name, err)
	}
	return &benchGuest{s: s, name: name, dir: dir, booted: booted}, dir, nil
}

// StopAfterBench stops a VM that BootForBench started, gracefully and
// then by force, and removes its scratch disks.
func (s *Service) StopAfterBench(ctx context.Context, name string, buses []string) error {
	var err error
	if s.alive(name) {
		err = s.stopLocked(ctx, name, false, 0)
	}
	if _, dir, derr := s.benchDisks(ctx, name); derr == nil {
		s.removeScratch(dir, name, buses)
	}
	return err
}

func (s *Service) removeScratch(dir, name string, buses []string) {
	for _, b := range buses {
		if err := os.Remove(scratchPath(dir, name, b)); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("remove scratch disk", "vm", name, "err", err)
		}
	}
}

// ReserveForBench marks the VM busy with a benchmark, so that a stop, a
// snapshot or a backup is refused with the reason rather than pulling the
// VM away mid-run. release ends it.
func (s *Service) ReserveForBench(name string) (release func(), err error) {
	return s.lock(name, "bench")
}

// Install implements bench.Guest. The file is written beside path and
// renamed over it: a probe a killed run left running keeps path busy
// (ETXTBSY) for writing, but not for a rename.
func (g *benchGuest) Install(ctx context.Context, path string, data []byte) error {
	tmp := path + ".new"
	if err := g.s.WriteGuestFile(ctx, g.name, tmp, data); err != nil {
		return err
	}
	if _, err := g.Run(ctx, []string{"chmod", "0755", tmp}); err != nil {
		return err
	}
	_, err := g.Run(ctx, []string{"mv", "-f", tmp, path})
	return err
}

// Run implements bench.Guest.
func (g *benchGuest) Run(ctx context.Context, argv []string) ([]byte, error) {
	res, err := g.s.Exec(ctx, g.name, api.ExecRequest{Command: argv, WaitSeconds: 60})
	if err != nil {
		return nil, err
	}
	if res.ExitCode != 0 {
		return nil, fmt.Errorf("%s in vm %q exited %d: %s", argv[0], g.name, res.ExitCode, strings.TrimSpace(string(res.Stderr)))
	}
	return res.Stdout, nil
}

// scratchID names a bus's scratch disk, node and device alike.
func scratchID(bus string) string { return "bench-" + bus }

// AttachDisk implements bench.Guest: it hot-plugs a new empty qcow2,
// opened as the VM's own disks are, on bus. IDE cannot be hot-plugged in
// QEMU, so that bus is refused with the reason.
func (g *benchGuest) AttachDisk(ctx context.Context, bus string, size int64) (func(context.Context) error, error) {
	if g.booted[bus] {
		// Leaves with the VM's QEMU; BootForBench's caller deletes it.
		return func(context.Context) error { return nil }, nil
	}
	in := g.s.instance(g.name)
	if in == nil {
		return nil, fmt.Errorf("vm %q: %w: not running", g.name, errdefs.ErrState)
	}
	id := scratchID(bus)
	var devices []map[string]any
	switch bus {
	case qemu.BusVirtio:
		devices = []map[string]any{{"driver": "virtio-blk-pci", "drive": id, "id": id + "-dev"}}
	case qemu.BusSCSI:
		// A controller of its own, so the VM's SCSI disks (if any) are
		// untouched and it leaves with the scratch disk.
		devices = []map[string]any{
			{"driver": "virtio-scsi-pci", "id": id + "-hba"},
			{"driver": "scsi-hd", "bus": id + "-hba.0", "drive": id, "id": id + "-dev"},
		}
	case qemu.BusNVMe:
		devices = []map[string]any{{"driver": "nvme", "serial": id, "drive": id, "id": id + "-dev"}}
	case qemu.BusIDE:
		return nil, fmt.Errorf("disk bus ide: %w: QEMU cannot hot-plug an IDE disk into running vm %q; stop it, and lodge bench boots it with its scratch disks", errdefs.ErrInvalid, g.name)
	default:
		return nil, fmt.Errorf("disk bus %q: %w: want %s", bus, errdefs.ErrInvalid, strings.Join(qemu.Buses, ", "))
	}
	path := scratchPath(g.dir, g.name, bus)
	// A scratch disk left by a killed daemon is rubbish: start afresh.
	sweepScratch(ctx, in.mon, id, devices)
	_ = os.Remove(path)
	if err := g.s.cfg.Volumes.CreateOverlay(ctx, "", path, size); err != nil {
		return nil, fmt.Errorf("scratch disk %s: %w", path, err)
	}
	plugged, err := plugDisk(ctx, in.mon, id, path, devices)
	if err != nil {
		_ = os.Remove(path)
		return nil, fmt.Errorf("%s scratch disk in vm %q: %w", bus, g.name, err)
	}
	return func(ctx context.Context) error {
		err := plugged(ctx)
		if rmErr := os.Remove(path); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
			err = errors.Join(err, rmErr)
		}
		return err
	}, nil
}

// sweepScratch unplugs and closes what a run cut short by a killed daemon
// left in the running QEMU under the names this run is about to use.
func sweepScratch(ctx context.Context, mon qmp.Monitor, node string, devices []map[string]any) {
	// Errors are expected (nothing was left, the usual case) and any
	// that matter resurface when the new disk is plugged in.
	for i := len(devices) - 1; i >= 0; i-- {
		_ = unplug(ctx, mon, devices[i]["id"].(string))
	}
	_ = qmp.BlockdevDel(ctx, mon, node)
}

// unplug asks the guest to give up device id and waits until QEMU says
// it is gone: a PCI device leaves only once the guest has let go of it.
func unplug(ctx context.Context, mon qmp.Monitor, id string) error {
	events, cancel := mon.Subscribe()
	defer cancel()
	if err := qmp.DeviceDel(ctx, mon, id); err != nil {
		return fmt.Errorf("unplug %s: %w", id, err)
	}
	timeout := time.NewTimer(30 * time.Second)
	defer timeout.Stop()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return fmt.Errorf("unplug %s: %w", id, qmp.ErrClosed)
			}
			var data struct {
				Device string `json:"device"`
			}
			if ev.Name == "DEVICE_DELETED" && json.Unmarshal(ev.Data, &data) == nil && data.Device == id {
				return nil
			}
		case <-timeout.C:
			return fmt.Errorf("unplug %s: the guest did not release it within 30s", id)
		case <-ctx.Done():
			return fmt.Errorf("unplug %s: %w", id, ctx.Err())
		}
	}
}
