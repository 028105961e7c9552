package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/store"
	"github.com/lodge-vm/lodge/internal/units"
)

// AddDisk gives VM name a new empty data disk of size bytes, after its
// other disks, on its root disk's bus and in its pool. A running VM gets
// it at once, hot-plugged, on the buses that take that (virtio, SCSI,
// NVMe); on IDE the VM must be stopped.
func (s *Service) AddDisk(ctx context.Context, name string, size int64) (api.VM, error) {
	r, unlock, err := s.loadForDisks(ctx, name, fmt.Sprintf("add a disk to vm %q", name))
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	bus := r.Disks[0].Bus
	sizes := []int64{size}
	for _, d := range r.Disks[1:] {
		sizes = append(sizes, d.Size)
	}
	if err := checkDataDisks(name, bus, sizes); err != nil {
		return api.VM{}, fmt.Errorf("add a disk to %w", err)
	}
	in := s.instance(name)
	if in != nil && bus == qemu.BusIDE {
		return api.VM{}, fmt.Errorf("add a disk to vm %q: %w: QEMU cannot hot-plug an IDE disk; stop the VM first", name, errdefs.ErrState)
	}
	pool, err := s.cfg.Pools.Get(ctx, r.Disks[0].Pool)
	if err != nil {
		return api.VM{}, fmt.Errorf("add a disk to vm %q: %w", name, err)
	}
	if err := pool.Check(); err != nil {
		return api.VM{}, fmt.Errorf("add a disk to vm %q: %w", name, err)
	}
	disk := api.Disk{Name: freeDiskName(r.Disks), Bus: bus, Size: size, Pool: pool.Name}
	disk.Path = pool.NewVolumePath(name, disk.Name)
	next := r
	next.Disks = append(slices.Clone(r.Disks), disk)
	if err := s.cfg.Store.View(ctx, func(tx store.Tx) error { return checkQuota(tx, r, next) }); err != nil {
		return api.VM{}, fmt.Errorf("add a disk to vm %q: %w", name, err)
	}
	if err := s.cfg.Volumes.CreateOverlay(ctx, "", disk.Path, size); err != nil {
		return api.VM{}, fmt.Errorf("add a disk to vm %q: create %s: %w", name, disk.Path, err)
	}
	detach := func(context.Context) error { return nil }
	if in != nil {
		node := "disk" + strconv.Itoa(len(r.Disks))
		dev, err := diskDevice(bus, node, len(r.Disks))
		if err == nil {
			detach, err = plugDisk(ctx, in.mon, node, disk.Path, []map[string]any{dev})
		}
		if err != nil {
			_ = os.Remove(disk.Path)
			return api.VM{}, fmt.Errorf("add a disk to vm %q: %w", name, err)
		}
	}
	if _, err := s.updateTx(ctx, name, func(tx store.Tx, x *record) error {
		if err := checkQuota(tx, *x, next); err != nil {
			return err
		}
		x.Disks = append(x.Disks, disk)
		return nil
	}); err != nil {
		_ = detach(context.WithoutCancel(ctx))
		_ = os.Remove(disk.Path)
		return api.VM{}, fmt.Errorf("add a disk to vm %q: %w", name, err)
	}
	s.publish(name, "vm-disk-added", "", fmt.Sprintf("disk %s, %s", disk.Name, units.FormatSize(size)))
	s.log.Info("disk added", "vm", name, "disk", disk.Name, "size", size, "hotplug", in != nil)
	return s.Get(ctx, name)
}

// ResizeDisk grows disk diskName of VM name to size bytes; a running
// guest sees the new size at once. A disk never shrinks here: the guest's
// filesystem would lose what lies past the new end.
func (s *Service) ResizeDisk(ctx context.Context, name, diskName string, size int64) (api.VM, error) {
	r, unlock, err := s.loadForDisks(ctx, name, fmt.Sprintf("resize disk %q of vm %q", diskName, name))
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	i := slices.IndexFunc(r.Disks, func(d api.Disk) bool { return d.Name == diskName })
	if i < 0 {
		names := make([]string, len(r.Disks))
		for k, d := range r.Disks {
			names[k] = d.Name
		}
		return api.VM{}, fmt.Errorf("resize disk %q of vm %q: %w (it has %s)", diskName, name, errdefs.ErrNotFound, strings.Join(names, ", "))
	}
	d := r.Disks[i]
	switch {
	case size%512 != 0:
		return api.VM{}, fmt.Errorf("resize disk %q of vm %q to %d bytes: %w: want whole 512-byte sectors", diskName, name, size, errdefs.ErrInvalid)
	case size < d.Size:
		return api.VM{}, fmt.Errorf("resize disk %q of vm %q to %s: %w: it is %s, and a disk only grows (shrinking would cut off the guest's data)", diskName, name, units.FormatSize(size), errdefs.ErrInvalid, units.FormatSize(d.Size))
	case size == d.Size:
		return s.view(r), nil
	}
	next := r
	next.Disks = slices.Clone(r.Disks)
	next.Disks[i].Size = size
	if err := s.cfg.Store.View(ctx, func(tx store.Tx) error { return checkQuota(tx, r, next) }); err != nil {
		return api.VM{}, fmt.Errorf("resize disk %q of vm %q: %w", diskName, name, err)
	}
	if in := s.instance(name); in != nil {
		devs, err := qmp.QueryBlock(ctx, in.mon)
		if err != nil {
			return api.VM{}, fmt.Errorf("resize disk %q of vm %q: %w", diskName, name, err)
		}
		node := topNode(devs, "disk"+strconv.Itoa(i)+"-dev")
		if node == "" {
			return api.VM{}, fmt.Errorf("resize disk %q of vm %q: QEMU lists no such device", diskName, name)
		}
		if err := in.mon.Execute(ctx, "block_resize", map[string]any{"node-name": node, "size": size}, nil); err != nil {
			return api.VM{}, fmt.Errorf("resize disk %q of vm %q: %w", diskName, name, err)
		}
	} else if err := s.cfg.Volumes.Resize(ctx, d.Path, size); err != nil {
		return api.VM{}, fmt.Errorf("resize disk %q of vm %q: %w", diskName, name, err)
	}
	// The disk has grown; a record that cannot say so would make the
	// next boot's guest see a smaller disk than its filesystem, so the
	// size is stored whatever the quota says now.
	if _, err := s.update(ctx, name, func(x *record) error { x.Disks[i].Size = size; return nil }); err != nil {
		return api.VM{}, fmt.Errorf("resize disk %q of vm %q: %w", diskName, name, err)
	}
	s.publish(name, "vm-disk-resized", "", fmt.Sprintf("disk %s, %s -> %s", diskName, units.FormatSize(d.Size), units.FormatSize(size)))
	s.log.Info("disk resized", "vm", name, "disk", diskName, "from", d.Size, "to", size)
	return s.Get(ctx, name)
}

// loadForDisks locks and loads VM name for a change to its disks, which
// is refused while it has snapshots: a revert would bring back a disk
// list, or sizes, that no longer match the files.
func (s *Service) loadForDisks(ctx context.Context, name, what string) (record, func(), error) {
	unlock, err := s.lock(name, "disk")
	if err != nil {
		return record{}, nil, err
	}
	r, err := s.load(ctx, name)
	switch {
	case err != nil:
	case r.Intent != "":
		err = fmt.Errorf("%s: %w: it is being %s", what, errdefs.ErrState, r.Intent)
	case r.State == api.StatePaused:
		err = fmt.Errorf("%s: %w: it is paused; resume or stop it first", what, errdefs.ErrState)
	default:
		if snaps := s.snapshotNames(ctx, name); len(snaps) > 0 {
			err = fmt.Errorf("%s: %w: it has snapshots (%s), which a change to its disks would not match; delete them first", what, errdefs.ErrState, strings.Join(snaps, ", "))
		}
	}
	if err != nil {
		unlock()
		return record{}, nil, err
	}
	return r, unlock, nil
}

// freeDiskName is the first of data1, data2, ... that no disk has.
func freeDiskName(disks []api.Disk) string {
	for i := 1; ; i++ {
		name := "data" + strconv.Itoa(i)
		if !slices.ContainsFunc(disks, func(d api.Disk) bool { return d.Name == name }) {
			return name
		}
	}
}

// diskDevice is the device_add of disk i on bus, attached to node: the
// one the command line gives it.
func diskDevice(bus, node string, i int) (map[string]any, error) {
	props, err := qemu.DiskDevice(bus, node, i)
	if err != nil {
		return nil, err
	}
	dev := make(map[string]any, len(props))
	for _, p := range props {
		dev[p.Name] = p.Value
	}
	return dev, nil
}

// plugDisk opens the standalone qcow2 file at path in a running QEMU as
// node and plugs devices in for it, in order. detach undoes it all; the
// file stays.
func plugDisk(ctx context.Context, mon qmp.Monitor, node, path string, devices []map[string]any) (func(context.Context) error, error) {
	if err := qmp.OpenDisk(ctx, mon, node, path); err != nil {
		return nil, fmt.Errorf("open disk %s: %w", path, err)
	}
	var plugged []string
	detach := func(ctx context.Context) error {
		var errs []error
		for i := len(plugged) - 1; i >= 0; i-- {
			if err := unplug(ctx, mon, plugged[i]); err != nil {
				errs = append(errs, err)
			}
		}
		if err := qmp.BlockdevDel(ctx, mon, node); err != nil {
			errs = append(errs, fmt.Errorf("close disk %s: %w", node, err))
		}
		return errors.Join(errs...)
	}
	for _, dev := range devices {
		if err := mon.Execute(ctx, "device_add", dev, nil); err != nil {
			_ = detach(context.WithoutCancel(ctx))
			return nil, fmt.Errorf("plug %s in: %w", dev["driver"], err)
		}
		plugged = append(plugged, dev["id"].(string))
	}
	return detach, nil
}
