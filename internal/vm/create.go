package vm

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/identity"
	"github.com/lodge-vm/lodge/internal/network"
	"github.com/lodge-vm/lodge/internal/project"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/store"
	"github.com/lodge-vm/lodge/internal/units"
)

// Defaults for create.
const (
	DefaultCPUs     = 1
	DefaultMemory   = 512 << 20
	DefaultDiskSize = 8 << 30
	MinMemory       = 64 << 20
	MaxCPUs         = 255
)

// Validate checks a create request against itself, the host and the
// image, filling defaults. It changes nothing.
func (s *Service) validateCreate(ctx context.Context, req *api.CreateVM) (api.Image, error) {
	if err := ValidateName("vm", req.Name); err != nil {
		return api.Image{}, err
	}
	if req.Image == "" {
		return api.Image{}, fmt.Errorf("vm %q: %w: an image is required (--image)", req.Name, errdefs.ErrInvalid)
	}
	img, err := s.cfg.Images.Resolve(ctx, req.Image)
	if err != nil {
		return api.Image{}, fmt.Errorf("vm %q: %w", req.Name, err)
	}
	// An appliance's descriptor says what it needs; flags still win.
	if req.CPUs == 0 {
		req.CPUs = max(img.CPUs, DefaultCPUs)
	}
	if req.Memory == 0 && img.Memory > 0 {
		req.Memory = img.Memory
	}
	if req.CPUs < 1 || req.CPUs > MaxCPUs {
		return api.Image{}, fmt.Errorf("vm %q: cpus %d: %w: must be between 1 and %d", req.Name, req.CPUs, errdefs.ErrInvalid, MaxCPUs)
	}
	if req.MaxCPUs != 0 && (req.MaxCPUs < req.CPUs || req.MaxCPUs > MaxCPUs) {
		return api.Image{}, fmt.Errorf("vm %q: max cpus %d: %w: must be between its cpus (%d) and %d", req.Name, req.MaxCPUs, errdefs.ErrInvalid, req.CPUs, MaxCPUs)
	}
	if req.Memory == 0 {
		req.Memory = DefaultMemory
	}
	if req.Memory < MinMemory {
		return api.Image{}, fmt.Errorf("vm %q: memory %s: %w: must be at least %s", req.Name, units.FormatSize(req.Memory), errdefs.ErrInvalid, units.FormatSize(MinMemory))
	}
	if req.MaxMemory == 0 {
		req.MaxMemory = req.Memory
	}
	if req.MaxMemory < req.Memory {
		return api.Image{}, fmt.Errorf("vm %q: max memory %s is below memory %s: %w", req.Name, units.FormatSize(req.MaxMemory), units.FormatSize(req.Memory), errdefs.ErrInvalid)
	}
	if req.MinMemory < 0 || req.MinMemory > req.Memory || (req.MinMemory != 0 && req.MinMemory < MinMemory) {
		return api.Image{}, fmt.Errorf("vm %q: min memory %s: %w: must be between %s and its memory %s", req.Name, units.FormatSize(req.MinMemory), errdefs.ErrInvalid, units.FormatSize(MinMemory), units.FormatSize(req.Memory))
	}
	if total := s.hostMemory(); total > 0 && req.MaxMemory > total {
		return api.Image{}, fmt.Errorf("vm %q: memory %s is more than the host has (%s): %w", req.Name, units.FormatSize(req.MaxMemory), units.FormatSize(total), errdefs.ErrLimit)
	}
	if req.DiskBus == "" {
		req.DiskBus = qemu.BusVirtio
	}
	if !slices.Contains(qemu.Buses, req.DiskBus) {
		return api.Image{}, fmt.Errorf("vm %q: disk bus %q: %w: want virtio, scsi, ide or nvme", req.Name, req.DiskBus, errdefs.ErrInvalid)
	}
	if req.Pool == "" {
		req.Pool = "default"
	}
	if len(req.Networks) == 0 {
		req.Networks = []string{cmp.Or(req.Network, network.Builtin)}
	}
	for i, n := range req.Networks {
		if slices.Contains(req.Networks[:i], n) {
			return api.Image{}, fmt.Errorf("vm %q: network %q: %w: given twice", req.Name, n, errdefs.ErrInvalid)
		}
		if err := s.checkNetwork(ctx, n); err != nil {
			return api.Image{}, fmt.Errorf("vm %q: %w", req.Name, err)
		}
	}
	if req.DiskSize == 0 {
		req.DiskSize = max(DefaultDiskSize, img.VirtualSize)
	}
	if req.DiskSize < img.VirtualSize {
		return api.Image{}, fmt.Errorf("vm %q: disk %s is smaller than image %q (%s): %w", req.Name, units.FormatSize(req.DiskSize), img.Name, units.FormatSize(img.VirtualSize), errdefs.ErrInvalid)
	}
	if err := checkDataDisks(req.Name, req.DiskBus, req.DataDisks); err != nil {
		return api.Image{}, err
	}
	return img, nil
}

// checkDataDisks checks the sizes of a new VM's data disks against the
// places its bus has.
func checkDataDisks(vm, bus string, sizes []int64) error {
	most := api.MaxDataDisks
	if bus == qemu.BusIDE {
		// IDE has four places, and the seed CD takes one.
		most = 2
	}
	if len(sizes) > most {
		return fmt.Errorf("vm %q: %d data disks: %w: a VM on %s takes at most %d", vm, len(sizes), errdefs.ErrInvalid, bus, most)
	}
	for i, size := range sizes {
		if !api.DataDiskSizeOK(size) {
			return fmt.Errorf("vm %q: data disk %d of %s: %w: want at least %s, in whole 512-byte sectors", vm, i+1, units.FormatSize(size), errdefs.ErrInvalid, units.FormatSize(api.MinDataDisk))
		}
	}
	return nil
}

// checkNetwork says whether a VM may have a NIC on network n.
func (s *Service) checkNetwork(ctx context.Context, n string) error {
	if n == network.Builtin {
		return nil
	}
	if s.cfg.Networks == nil {
		return fmt.Errorf("network %q: %w: only the built-in %q network exists here", n, errdefs.ErrNotFound, network.Builtin)
	}
	return s.cfg.Networks.Check(ctx, n)
}

// identityOf is the part of a record that must be unique on the host.
type identityOf struct {
	UUID string `json:"uuid"`
	CID  uint32 `json:"cid"`
	NICs []struct {
		MAC string `json:"mac"`
	} `json:"nics"`
}

// hasMAC reports whether the VM holds mac on one of its NICs.
func (o identityOf) hasMAC(mac string) bool {
	for _, n := range o.NICs {
		if n.MAC == mac {
			return true
		}
	}
	return false
}

// errIdentityTaken means a freshly drawn UUID or MAC is already in use;
// insert draws again.
var errIdentityTaken = errors.New("identity already taken")

// insert stores a new VM record. With fresh, it gives the VM a new UUID,
// instance-id and MACs, drawn outside the transaction (store code stays
// deterministic) and checked for uniqueness inside it, and the lowest free
// vsock CID. also runs in the same transaction.
func (s *Service) insert(ctx context.Context, r *record, fresh bool, also func(tx store.Tx) error) error {
	for attempt := 0; ; attempt++ {
		if fresh {
			r.UUID, r.InstanceID = identity.NewUUID(), identity.NewUUID()
			for i := range r.NICs {
				r.NICs[i].MAC = identity.NewMAC()
			}
		}
		err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
			if _, err := tx.Get(bucket, r.Name); err == nil {
				return fmt.Errorf("vm %q: %w", r.Name, errdefs.ErrExists)
			}
			// Only the identities: decoding whole records made a create
			// with 1000 VMs defined twice as slow as with 100.
			others, err := store.ListJSON[identityOf](tx, bucket)
			if err != nil {
				return err
			}
			cids := map[uint32]bool{}
			for _, o := range others {
				cids[o.CID] = true
				if !fresh {
					continue
				}
				if o.UUID == r.UUID {
					return errIdentityTaken
				}
				for _, n := range r.NICs {
					if o.hasMAC(n.MAC) {
						return errIdentityTaken
					}
				}
			}
			if fresh || r.CID == 0 {
				// 0-2 are reserved for the hypervisor, the loopback and the host.
				r.CID = 3
				for cids[r.CID] {
					r.CID++
				}
			}
			if err := checkQuota(tx, record{}, *r); err != nil {
				return err
			}
			if also != nil {
				if err := also(tx); err != nil {
					return err
				}
			}
			return store.PutJSON(tx, bucket, r.Name, *r)
		})
		if !errors.Is(err, errIdentityTaken) || attempt > 10 {
			return err
		}
	}
}

// Create defines a VM: a thin overlay on the image in the pool, a new
// identity and a NoCloud seed. It records the intent first, so a crash
// half-way is undone by Recover.
func (s *Service) Create(ctx context.Context, req api.CreateVM) (api.VM, error) {
	img, err := s.validateCreate(ctx, &req)
	if err != nil {
		return api.VM{}, err
	}
	pool, err := s.cfg.Pools.Get(ctx, req.Pool)
	if err != nil {
		return api.VM{}, fmt.Errorf("vm %q: %w", req.Name, err)
	}
	if err := pool.Check(); err != nil {
		return api.VM{}, fmt.Errorf("vm %q: %w", req.Name, err)
	}
	unlock, err := s.lock(req.Name, "create")
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()

	r := record{
		VM: api.VM{
			Name: req.Name, Image: img.Name, CPUs: req.CPUs, MaxCPUs: req.MaxCPUs, Memory: req.Memory, MaxMemory: req.MaxMemory, MinMemory: req.MinMemory,
			Hostname: req.Name, State: api.StateStopped, CreatedAt: time.Now().UTC(),
			Disks: []api.Disk{{
				Name: "root", Bus: req.DiskBus, Size: req.DiskSize, Pool: pool.Name,
				Path: pool.NewVolumePath(req.Name, "root"), Backing: img.Path,
			}},
		},
		Pool: pool.Name, ImagePath: img.Path, CloudInit: req.CloudInit,
		Intent: intentCreating, Wanted: api.StateStopped,
	}
	for _, size := range req.DataDisks {
		name := freeDiskName(r.Disks)
		r.Disks = append(r.Disks, api.Disk{Name: name, Bus: req.DiskBus, Size: size, Pool: pool.Name, Path: pool.NewVolumePath(req.Name, name)})
	}
	r.Project = project.Name(req.Project)
	r.Stack = req.Stack
	for _, n := range req.Networks {
		r.NICs = append(r.NICs, api.NIC{Network: n})
	}
	if err := s.insert(ctx, &r, true, nil); err != nil {
		return api.VM{}, err
	}
	if err := s.materialise(ctx, r); err != nil {
		s.discard(context.WithoutCancel(ctx), r)
		return api.VM{}, err
	}
	r, err = s.update(ctx, r.Name, func(x *record) error { x.Intent = ""; return nil })
	if err != nil {
		return api.VM{}, err
	}
	s.publish(r.Name, "vm-created", r.State, "")
	s.log.Info("created", "vm", r.Name, "image", r.Image, "uuid", r.UUID)
	return s.view(r), nil
}

// materialise makes the files a record needs.
func (s *Service) materialise(ctx context.Context, r record) error {
	if err := os.MkdirAll(s.vmDir(r.Name), 0o750); err != nil {
		return fmt.Errorf("vm %q: %w", r.Name, err)
	}
	for _, d := range r.Disks {
		if err := s.cfg.Volumes.CreateOverlay(ctx, d.Backing, d.Path, d.Size); err != nil {
			return fmt.Errorf("vm %q: create disk %s: %w", r.Name, d.Path, err)
		}
	}
	if err := s.writeSeed(ctx, r); err != nil {
		return err
	}
	return nil
}

func (s *Service) seedPath(name string) string { return filepath.Join(s.vmDir(name), "seed.iso") }

func (s *Service) writeSeed(ctx context.Context, r record) error {
	if s.cfg.WriteSeed == nil {
		return nil
	}
	if err := s.cfg.WriteSeed(ctx, s.seedPath(r.Name), r.InstanceID, r.Hostname, []byte(r.CloudInit)); err != nil {
		return fmt.Errorf("vm %q: %w", r.Name, err)
	}
	return nil
}

// discard removes a VM's files and record.
func (s *Service) discard(ctx context.Context, r record) {
	for _, d := range r.Disks {
		// .tmp is a full clone's copy in progress.
		for _, p := range []string{d.Path, d.Path + ".tmp"} {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				s.log.Warn("remove disk", "vm", r.Name, "path", p, "err", err)
			}
		}
	}
	s.removeAll(s.vmDir(r.Name))
	s.removeAll(s.runDir(r.Name))
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		snaps, err := vmSnapshots(tx, r.Name)
		if err != nil {
			return err
		}
		for _, sr := range snaps {
			if err := tx.Delete(snapBucket, snapKey(r.Name, sr.Name)); err != nil {
				return err
			}
		}
		return tx.Delete(bucket, r.Name)
	})
	if err != nil {
		s.log.Error("remove record", "vm", r.Name, "err", err)
	}
}

// Delete removes a stopped VM with its disks and run directory. force
// stops a running one first.
func (s *Service) Delete(ctx context.Context, name string, force bool) error {
	unlock, err := s.lock(name, "delete")
	if err != nil {
		return err
	}
	defer unlock()
	r, err := s.load(ctx, name)
	if err != nil {
		return err
	}
	if s.alive(name) {
		if !force {
			return fmt.Errorf("vm %q is %s: %w: stop it first, or use --force", name, r.State, errdefs.ErrState)
		}
		if err := s.stopLocked(ctx, name, true, 0); err != nil {
			return err
		}
	}
	if _, err := s.update(ctx, name, func(x *record) error { x.Intent = intentDeleting; return nil }); err != nil {
		return err
	}
	s.discard(ctx, r)
	s.collectLayers(ctx)
	if s.cfg.Networks != nil {
		if err := s.cfg.Networks.Release(ctx, name); err != nil {
			s.log.Warn("release network leases", "vm", name, "err", err)
		}
	}
	s.publish(name, "vm-deleted", "", "")
	s.log.Info("deleted", "vm", name)
	return nil
}
