package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/snapshot"
	"github.com/lodge-vm/lodge/internal/store"
	"github.com/lodge-vm/lodge/internal/units"
)

// A snapshot freezes the VM's disk tops into read-only layers, exactly as
// a linked clone does, and keeps their names; with memory it also keeps
// the running guest's memory and device state in a file under the VM's
// directory. Reverting puts new empty tops on the snapshot's layers.
const snapBucket = "snapshots"

// Intents on the VM record while a snapshot is taken or reverted to.
const (
	intentSnapshotting = "snapshotting"
	intentReverting    = "reverting"
)

// Snapshot record states.
const (
	snapCreating = "creating"
	snapReady    = "ready"
	snapDeleting = "deleting"
)

// Room kept free beyond the memory state itself, for the new tops and
// the store.
const snapshotSlack = 64 << 20

type snapRecord struct {
	api.Snapshot
	// Disks are the VM's disks as they were: each Path is a frozen layer.
	Disks []api.Disk `json:"disks"`
	CPUs  int        `json:"cpus"`
	// MemorySize is the QEMU's memory (-m) when taken, MaxMemorySize its
	// hot-plug ceiling (-m maxmem), which a memory state needs again, and
	// Target the guest's memory target then.
	MemorySize    int64 `json:"memory_size"`
	MaxMemorySize int64 `json:"max_memory_size,omitempty"`
	Target        int64 `json:"target,omitempty"`
	// MaxMemory is the VM's max_memory setting then.
	MaxMemory int64 `json:"max_memory,omitempty"`
	// Dimms are the pc-dimms the guest had, which its memory state needs,
	// as it needs the QEMU's CPU layout.
	Dimms       []int64 `json:"dimms,omitempty"`
	BootCPUs    int     `json:"boot_cpus,omitempty"`
	BootMaxCPUs int     `json:"boot_max_cpus,omitempty"`
	HotCPUs     int     `json:"hot_cpus,omitempty"`
	MaxCPUs     int     `json:"max_cpus,omitempty"`
	MemFile     string  `json:"mem_file,omitempty"`
	// Paused records a guest that was paused when taken; revert leaves it
	// paused.
	Paused bool   `json:"paused,omitempty"`
	State  string `json:"state"`
}

func snapKey(vm, snap string) string { return vm + "/" + snap }

// stateReserve is the most a running VM's memory state can take: all the
// memory its guest has, each 4 KiB page with its header, and room for the
// device state.
func (s *Service) stateReserve(ctx context.Context, in *instance, r record) int64 {
	boot, ceiling := r.bootSizes()
	size := boot
	if ceiling > boot {
		if h, err := pluggedMemory(ctx, in.mon); err == nil {
			size += h.total()
		} else {
			size = ceiling
		}
	}
	return size + size/64 + snapshotSlack
}

// applyTo gives a VM the CPUs and memory settings it had when the
// snapshot was taken.
func (sr snapRecord) applyTo(v *api.VM) {
	v.CPUs, v.Memory = sr.CPUs, sr.MemorySize
	if sr.Target > 0 {
		v.Memory = sr.Target
	}
	if sr.MaxMemory > 0 {
		v.MaxMemory = sr.MaxMemory
	}
	v.MaxCPUs = sr.MaxCPUs
}

func (s *Service) snapDir(vm string) string { return filepath.Join(s.vmDir(vm), "snapshots") }

// vmSnapshots lists one VM's snapshot records inside a transaction.
func vmSnapshots(tx store.Tx, vm string) ([]snapRecord, error) {
	all, err := store.ListJSON[snapRecord](tx, snapBucket)
	if err != nil {
		return nil, err
	}
	out := all[:0]
	for _, sr := range all {
		if sr.VM == vm {
			out = append(out, sr)
		}
	}
	return out, nil
}

func (s *Service) loadSnapshot(ctx context.Context, vm, snap string) (snapRecord, error) {
	var sr snapRecord
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, snapBucket, snapKey(vm, snap), &sr) })
	if errors.Is(err, store.ErrNotFound) || (err == nil && sr.State != snapReady) {
		return sr, fmt.Errorf("snapshot %q of vm %q: %w", snap, vm, errdefs.ErrNotFound)
	}
	return sr, err
}

// CreateSnapshot takes a snapshot. A running VM keeps running: with
// memory, its state is written in the background while the guest runs,
// after a pause of milliseconds; without, its filesystems are frozen
// through the agent around the disk switch. progress gets the memory
// state's bytes written and total.
func (s *Service) CreateSnapshot(ctx context.Context, vm string, req api.CreateSnapshot, progress func(done, total int64)) (api.Snapshot, error) {
	if err := ValidateName("snapshot", req.Name); err != nil {
		return api.Snapshot{}, err
	}
	unlock, err := s.lock(vm, "snapshot")
	if err != nil {
		return api.Snapshot{}, err
	}
	defer unlock()
	r, err := s.load(ctx, vm)
	if err != nil {
		return api.Snapshot{}, err
	}
	if r.Intent != "" {
		return api.Snapshot{}, fmt.Errorf("snapshot %q of vm %q: %w: it is being %s", req.Name, vm, errdefs.ErrState, r.Intent)
	}
	in := s.instance(vm)
	running := in != nil
	withMemory := running && !req.NoMemory
	if err := os.MkdirAll(s.snapDir(vm), 0o750); err != nil {
		return api.Snapshot{}, fmt.Errorf("snapshot %q of vm %q: %w", req.Name, vm, err)
	}
	if err := s.checkSnapshotSpace(ctx, r, req.Name, withMemory); err != nil {
		return api.Snapshot{}, err
	}
	next := make([]string, len(r.Disks))
	for i, d := range r.Disks {
		next[i] = s.siblingPath(ctx, d, vm)
	}
	sr := snapRecord{
		Snapshot: api.Snapshot{
			Name: req.Name, VM: vm, Parent: r.CurrentSnapshot, CreatedAt: time.Now().UTC(),
			Memory: withMemory, Description: req.Description,
		},
		Disks: append([]api.Disk(nil), r.Disks...), CPUs: r.CPUs, MemorySize: r.Memory, Target: r.Memory,
		MaxMemory: r.MaxMemory, MaxCPUs: r.MaxCPUs,
		Paused: r.State == api.StatePaused, State: snapCreating,
	}
	if withMemory {
		sr.MemFile = filepath.Join(s.snapDir(vm), req.Name+".mem")
		sr.MemorySize, sr.MaxMemorySize = r.bootSizes()
		sr.Dimms = r.Dimms
		sr.BootCPUs, sr.BootMaxCPUs, sr.HotCPUs = r.BootCPUs, r.BootMaxCPUs, r.HotCPUs
	}
	err = s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		var cur record
		if err := store.GetJSON(tx, bucket, vm, &cur); err != nil {
			return err
		}
		if _, err := tx.Get(snapBucket, snapKey(vm, req.Name)); err == nil {
			return fmt.Errorf("snapshot %q of vm %q: %w", req.Name, vm, errdefs.ErrExists)
		}
		cur.Intent, cur.NextDisks = intentSnapshotting, next
		if err := store.PutJSON(tx, snapBucket, snapKey(vm, req.Name), sr); err != nil {
			return err
		}
		return store.PutJSON(tx, bucket, vm, cur)
	})
	if err != nil {
		return api.Snapshot{}, err
	}
	bg := context.WithoutCancel(ctx)
	if withMemory {
		switched := make([]bool, len(r.Disks))
		if err := s.prepareTops(ctx, "snapshot", r, next); err != nil {
			s.dropSnapshot(bg, sr)
			return api.Snapshot{}, err
		}
		in.snapshotting.Store(true)
		stats, serr := snapshot.Save(ctx, in.mon, sr.MemFile, s.stateReserve(ctx, in, r), func(ctx context.Context) error {
			return s.switchTops(ctx, "snapshot", r, in, next, switched)
		}, progress)
		in.snapshotting.Store(false)
		err = s.commitTops(bg, vm, next, switched)
		if serr != nil {
			err = fmt.Errorf("snapshot %q of vm %q: %w", req.Name, vm, serr)
		}
		sr.PauseMS = stats.Pause.Milliseconds()
		if err == nil {
			s.log.Info("memory state saved", "vm", vm, "snapshot", req.Name, "method", stats.Method, "fallback", stats.Fallback, "pause", stats.Pause, "bytes", stats.Bytes, "elapsed", stats.Elapsed, "sync", stats.Sync)
		}
	} else {
		err = s.freezeTops(ctx, "snapshot", r, next, running)
	}
	if err != nil {
		s.dropSnapshot(bg, sr)
		if errors.Is(err, syscall.ENOSPC) {
			err = fmt.Errorf("%w (%w)", err, errdefs.ErrNoSpace)
		}
		return api.Snapshot{}, err
	}
	err = s.cfg.Store.Update(bg, func(tx store.Tx) error {
		sr.State = snapReady
		if err := store.PutJSON(tx, snapBucket, snapKey(vm, req.Name), sr); err != nil {
			return err
		}
		var cur record
		if err := store.GetJSON(tx, bucket, vm, &cur); err != nil {
			return err
		}
		cur.CurrentSnapshot = req.Name
		return store.PutJSON(tx, bucket, vm, cur)
	})
	if err != nil {
		s.dropSnapshot(bg, sr)
		return api.Snapshot{}, fmt.Errorf("snapshot %q of vm %q: record: %w", req.Name, vm, err)
	}
	s.publish(vm, "snapshot-created", "", req.Name)
	s.log.Info("snapshot taken", "vm", vm, "snapshot", req.Name, "memory", withMemory, "pause_ms", sr.PauseMS)
	out := sr.Snapshot
	out.Current, out.Size = true, s.snapshotSize(sr)
	return out, nil
}

// checkSnapshotSpace refuses a snapshot that cannot fit: the memory state
// may take up to the guest's RAM, and every pool needs room for new tops.
func (s *Service) checkSnapshotSpace(ctx context.Context, r record, snap string, withMemory bool) error {
	if withMemory {
		free, err := freeBytes(s.snapDir(r.Name))
		if err != nil {
			return fmt.Errorf("snapshot %q of vm %q: %w", snap, r.Name, err)
		}
		if need := r.Memory + snapshotSlack; free < need {
			return fmt.Errorf("snapshot %q of vm %q: %w: %s free in %s, the memory state needs up to %s",
				snap, r.Name, errdefs.ErrNoSpace, units.FormatSize(free), s.snapDir(r.Name), units.FormatSize(need))
		}
	}
	for _, d := range r.Disks {
		free, err := freeBytes(filepath.Dir(d.Path))
		if err != nil {
			return fmt.Errorf("snapshot %q of vm %q: disk %q: %w", snap, r.Name, d.Name, err)
		}
		if free < snapshotSlack {
			return fmt.Errorf("snapshot %q of vm %q: disk %q: %w: %s free in %s", snap, r.Name, d.Name, errdefs.ErrNoSpace, units.FormatSize(free), filepath.Dir(d.Path))
		}
	}
	return nil
}

func freeBytes(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// dropSnapshot forgets a snapshot that was not completed. Its disk
// layers, if the switch happened, stay in the VM's chain as plain layers.
func (s *Service) dropSnapshot(ctx context.Context, sr snapRecord) {
	if sr.MemFile != "" {
		for _, p := range []string{sr.MemFile, sr.MemFile + ".part"} {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				s.log.Warn("remove memory state", "path", p, "err", err)
			}
		}
	}
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		var cur record
		if err := store.GetJSON(tx, bucket, sr.VM, &cur); err == nil && cur.Intent == intentSnapshotting {
			cur.Intent, cur.NextDisks = "", nil
			if err := store.PutJSON(tx, bucket, sr.VM, cur); err != nil {
				return err
			}
		}
		return tx.Delete(snapBucket, snapKey(sr.VM, sr.Name))
	})
	if err != nil {
		s.log.Error("remove snapshot record", "vm", sr.VM, "snapshot", sr.Name, "err", err)
	}
}

// snapshotSize is the space a snapshot holds: its layers' allocated
// blocks and its memory state.
func (s *Service) snapshotSize(sr snapRecord) int64 {
	n := allocated(sr.MemFile)
	for _, d := range sr.Disks {
		n += allocated(d.Path)
	}
	return n
}

// ListSnapshots returns a VM's snapshot tree, parents before children.
func (s *Service) ListSnapshots(ctx context.Context, vm string) ([]api.Snapshot, error) {
	r, err := s.load(ctx, vm)
	if err != nil {
		return nil, err
	}
	return s.snapshotViews(ctx, vm, r.CurrentSnapshot, true)
}

// snapshotViews returns a VM's finished snapshots as the API shows them,
// parents first. A size costs a stat per file, so only listing asks.
func (s *Service) snapshotViews(ctx context.Context, vm, current string, sized bool) ([]api.Snapshot, error) {
	var recs []snapRecord
	if err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		recs, err = vmSnapshots(tx, vm)
		return err
	}); err != nil {
		return nil, err
	}
	out := make([]api.Snapshot, 0, len(recs))
	for _, sr := range recs {
		if sr.State != snapReady {
			continue
		}
		v := sr.Snapshot
		v.Current = sr.Name == current
		if sized {
			v.Size = s.snapshotSize(sr)
		}
		out = append(out, v)
	}
	return snapshot.Sort(out), nil
}

func (s *Service) snapshotNames(ctx context.Context, vm string) []string {
	snaps, err := s.snapshotViews(ctx, vm, "", false)
	if err != nil {
		return nil
	}
	names := make([]string, len(snaps))
	for i, sn := range snaps {
		names[i] = sn.Name
	}
	return names
}

// RevertSnapshot returns a VM to a snapshot. What the VM held since is
// dropped; other snapshots are kept. A snapshot with memory comes back
// running (or paused, if it was taken paused); one without comes back
// stopped unless req.Start.
func (s *Service) RevertSnapshot(ctx context.Context, vm, snap string, req api.RevertSnapshot) (api.VM, error) {
	unlock, err := s.lock(vm, "revert")
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	r, err := s.load(ctx, vm)
	if err != nil {
		return api.VM{}, err
	}
	sr, err := s.loadSnapshot(ctx, vm, snap)
	if err != nil {
		return api.VM{}, err
	}
	if r.Intent != "" {
		return api.VM{}, fmt.Errorf("revert vm %q to %q: %w: it is being %s", vm, snap, errdefs.ErrState, r.Intent)
	}
	if sr.Memory {
		if _, err := os.Stat(sr.MemFile); err != nil {
			return api.VM{}, fmt.Errorf("revert vm %q to %q: memory state: %w", vm, snap, err)
		}
	}
	// The VM gets the snapshot's CPUs and memory back: they must still
	// fit its project.
	back := r
	sr.applyTo(&back.VM)
	if err := s.cfg.Store.View(ctx, func(tx store.Tx) error { return checkQuota(tx, r, back) }); err != nil {
		return api.VM{}, fmt.Errorf("revert vm %q to %q: %w", vm, snap, err)
	}
	next := make([]string, len(sr.Disks))
	for i, d := range sr.Disks {
		next[i] = s.siblingPath(ctx, d, vm)
	}
	if _, err := s.update(ctx, vm, func(x *record) error {
		x.Intent, x.NextDisks = intentReverting, next
		return nil
	}); err != nil {
		return api.VM{}, err
	}
	bg := context.WithoutCancel(ctx)
	undo := func(err error) (api.VM, error) {
		for _, p := range next {
			_ = os.Remove(p)
		}
		if _, uerr := s.update(bg, vm, func(x *record) error { x.Intent, x.NextDisks = "", nil; return nil }); uerr != nil {
			s.log.Error("clear revert intent", "vm", vm, "err", uerr)
		}
		return api.VM{}, err
	}
	if s.alive(vm) {
		// The current state is being thrown away: no need to let the
		// guest shut down.
		if err := s.stopLocked(ctx, vm, true, 0); err != nil {
			return undo(fmt.Errorf("revert vm %q to %q: %w", vm, snap, err))
		}
	}
	for i, d := range sr.Disks {
		if err := s.cfg.Volumes.CreateOverlay(ctx, d.Path, next[i], d.Size); err != nil {
			return undo(fmt.Errorf("revert vm %q to %q: disk %q: %w", vm, snap, d.Name, err))
		}
	}
	err = s.cfg.Store.Update(bg, func(tx store.Tx) error {
		var cur record
		if err := store.GetJSON(tx, bucket, vm, &cur); err != nil {
			return err
		}
		// The old tops become doomed layers, so that their files go even
		// if the daemon dies right after this transaction.
		var old []layer
		for _, d := range cur.Disks {
			old = append(old, layer{Path: d.Path, Backing: d.Backing, Deleting: true})
		}
		if err := putLayers(tx, old); err != nil {
			return err
		}
		cur.Disks = make([]api.Disk, len(sr.Disks))
		for i, d := range sr.Disks {
			d.Backing, d.Path = d.Path, next[i]
			cur.Disks[i] = d
		}
		sr.applyTo(&cur.VM)
		cur.CurrentSnapshot = snap
		cur.Intent, cur.NextDisks = "", nil
		return store.PutJSON(tx, bucket, vm, cur)
	})
	if err != nil {
		return undo(fmt.Errorf("revert vm %q to %q: record: %w", vm, snap, err))
	}
	s.collectLayers(bg)
	s.publish(vm, "snapshot-reverted", "", snap)
	s.log.Info("reverted", "vm", vm, "snapshot", snap, "memory", sr.Memory)
	switch {
	case sr.Memory:
		return s.boot(ctx, vm, &sr)
	case req.Start:
		return s.boot(ctx, vm, nil)
	}
	return s.Get(ctx, vm)
}

// resumeState loads a snapshot's memory state into a QEMU started with
// -incoming and resumes the guest. On failure QEMU is stopped and the VM
// is left stopped with its reverted disks.
func (s *Service) resumeState(ctx context.Context, in *instance, sr *snapRecord) (string, error) {
	if err := snapshot.Load(ctx, in.mon, sr.MemFile); err != nil {
		in.stopping.Store(true)
		_ = s.cfg.Driver.Kill(context.WithoutCancel(ctx), in.runDir, 5*time.Second)
		<-in.done
		return "", fmt.Errorf("revert vm %q to %q: %w", in.name, sr.Name, err)
	}
	s.syncAgentOpen(ctx, in)
	if sr.Paused {
		return api.StatePaused, nil
	}
	if err := qmp.Cont(ctx, in.mon); err != nil {
		return "", fmt.Errorf("revert vm %q to %q: resume: %w", in.name, sr.Name, err)
	}
	return api.StateRunning, nil
}

// DeleteSnapshot removes a snapshot. Its children move up to its parent.
// Where one of its disk layers backs exactly one file that only this VM
// uses, the layer's data is merged into that file (by QEMU while the VM
// runs) and the layer's space is freed; a layer shared with other
// snapshots' branches or with clones stays until they go.
func (s *Service) DeleteSnapshot(ctx context.Context, vm, snap string, progress func(done, total int64)) error {
	unlock, err := s.lock(vm, "snapshot delete")
	if err != nil {
		return err
	}
	defer unlock()
	r, err := s.load(ctx, vm)
	if err != nil {
		return err
	}
	sr, err := s.loadSnapshot(ctx, vm, snap)
	if err != nil {
		return err
	}
	if r.Intent != "" {
		return fmt.Errorf("delete snapshot %q of vm %q: %w: it is being %s", snap, vm, errdefs.ErrState, r.Intent)
	}
	err = s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		sibs, err := vmSnapshots(tx, vm)
		if err != nil {
			return err
		}
		for _, c := range sibs {
			if c.Parent == snap {
				c.Parent = sr.Parent
				if err := store.PutJSON(tx, snapBucket, snapKey(vm, c.Name), c); err != nil {
					return err
				}
			}
		}
		sr.State = snapDeleting
		if err := store.PutJSON(tx, snapBucket, snapKey(vm, snap), sr); err != nil {
			return err
		}
		var cur record
		if err := store.GetJSON(tx, bucket, vm, &cur); err != nil {
			return err
		}
		if cur.CurrentSnapshot == snap {
			cur.CurrentSnapshot = sr.Parent
		}
		return store.PutJSON(tx, bucket, vm, cur)
	})
	if err != nil {
		return fmt.Errorf("delete snapshot %q of vm %q: %w", snap, vm, err)
	}
	bg := context.WithoutCancel(ctx)
	s.finishSnapshotDelete(bg, sr)
	for _, d := range sr.Disks {
		if err := s.mergeLayer(ctx, vm, d.Path, progress); err != nil {
			// The snapshot is gone either way; only the space is not
			// freed yet.
			s.log.Warn("layer not merged", "vm", vm, "snapshot", snap, "layer", d.Path, "err", err)
		}
	}
	s.collectLayers(bg)
	s.publish(vm, "snapshot-deleted", "", snap)
	s.log.Info("snapshot deleted", "vm", vm, "snapshot", snap)
	return nil
}

// finishSnapshotDelete removes a deleting snapshot's memory state and
// record; its layers then go when nothing needs them.
func (s *Service) finishSnapshotDelete(ctx context.Context, sr snapRecord) {
	if sr.MemFile != "" {
		if err := os.Remove(sr.MemFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("remove memory state", "path", sr.MemFile, "err", err)
		}
	}
	if err := s.cfg.Store.Update(ctx, func(tx store.Tx) error { return tx.Delete(snapBucket, snapKey(sr.VM, sr.Name)) }); err != nil {
		s.log.Error("remove snapshot record", "vm", sr.VM, "snapshot", sr.Name, "err", err)
	}
}

// referrer is a file whose backing file is a given layer.
type referrer struct {
	path  string
	vm    string // the VM whose disk it is; "" for a layer
	disk  int
	layer bool
}

// mergeLayer folds the layer at path into the one file backed by it, if
// there is exactly one and no other VM reads it, and points that file at
// the layer's own backing. The layer is then unreferenced and collected.
func (s *Service) mergeLayer(ctx context.Context, vm, path string, progress func(done, total int64)) error {
	var (
		lay    layer
		refs   []referrer
		inLive bool // the file to rewrite is in this VM's open chain
	)
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		if err := store.GetJSON(tx, layerBucket, path, &lay); err != nil {
			return err
		}
		vms, err := store.ListJSON[record](tx, bucket)
		if err != nil {
			return err
		}
		layers, err := store.ListJSON[layer](tx, layerBucket)
		if err != nil {
			return err
		}
		snaps, err := store.ListJSON[snapRecord](tx, snapBucket)
		if err != nil {
			return err
		}
		for _, sn := range snaps {
			for _, d := range sn.Disks {
				if d.Path == path {
					return fmt.Errorf("another snapshot (%s) holds it", sn.Name)
				}
			}
		}
		for _, v := range vms {
			for i, d := range v.Disks {
				if d.Backing == path {
					refs = append(refs, referrer{path: d.Path, vm: v.Name, disk: i})
				}
			}
		}
		for _, l := range layers {
			if l.Backing == path && !l.Deleting {
				refs = append(refs, referrer{path: l.Path, layer: true})
			}
		}
		if len(refs) != 1 {
			return fmt.Errorf("%d files are layered on it", len(refs))
		}
		ref := refs[0]
		if ref.vm != "" && ref.vm != vm {
			return fmt.Errorf("vm %q is layered on it", ref.vm)
		}
		inLive = !ref.layer
		if ref.layer {
			// Only this VM's chain may pass through the file being
			// rewritten: another VM's QEMU may have it open.
			for name, chain := range chainsOf(vms, layers) {
				if name != vm && chain[ref.path] {
					return fmt.Errorf("vm %q reads %s", name, ref.path)
				}
				if name == vm {
					inLive = chain[ref.path]
				}
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("merge layer %s: %w", path, err)
	}
	ref := refs[0]
	if need := allocated(path); need > 0 {
		if free, err := freeBytes(filepath.Dir(ref.path)); err == nil && free < need+snapshotSlack {
			return fmt.Errorf("merge layer %s: %w: %s free, needs up to %s", path, errdefs.ErrNoSpace, units.FormatSize(free), units.FormatSize(need))
		}
	}
	if in := s.instance(vm); in != nil && inLive {
		err = s.streamRunning(ctx, in, ref.path, lay.Backing, progress)
	} else {
		err = s.cfg.Volumes.Rebase(ctx, ref.path, lay.Backing)
	}
	if err != nil {
		return fmt.Errorf("merge layer %s into %s: %w", path, ref.path, err)
	}
	return s.cfg.Store.Update(context.WithoutCancel(ctx), func(tx store.Tx) error {
		if ref.layer {
			var l layer
			if err := store.GetJSON(tx, layerBucket, ref.path, &l); err != nil {
				return err
			}
			l.Backing = lay.Backing
			if err := store.PutJSON(tx, layerBucket, ref.path, l); err != nil {
				return err
			}
		} else {
			var cur record
			if err := store.GetJSON(tx, bucket, ref.vm, &cur); err != nil {
				return err
			}
			if ref.disk < len(cur.Disks) && cur.Disks[ref.disk].Path == ref.path {
				cur.Disks[ref.disk].Backing = lay.Backing
			}
			if err := store.PutJSON(tx, bucket, ref.vm, cur); err != nil {
				return err
			}
		}
		// Snapshots keep their disks' backing for show; keep it true.
		snaps, err := store.ListJSON[snapRecord](tx, snapBucket)
		if err != nil {
			return err
		}
		for _, sn := range snaps {
			changed := false
			for i := range sn.Disks {
				if sn.Disks[i].Path == ref.path {
					sn.Disks[i].Backing, changed = lay.Backing, true
				}
			}
			if changed {
				if err := store.PutJSON(tx, snapBucket, snapKey(sn.VM, sn.Name), sn); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// chainsOf maps each VM to the set of files in its disks' chains.
func chainsOf(vms []record, layers []layer) map[string]map[string]bool {
	backing := map[string]string{}
	for _, l := range layers {
		backing[l.Path] = l.Backing
	}
	out := map[string]map[string]bool{}
	for _, v := range vms {
		set := map[string]bool{}
		for _, d := range v.Disks {
			for p := d.Backing; p != "" && !set[p]; p = backing[p] {
				set[p] = true
			}
		}
		out[v.Name] = set
	}
	return out
}

func allocated(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// streamRunning has QEMU copy into the file at top what it reads through
// its backing chain down to base, then drop the layers in between, while
// the guest runs.
func (s *Service) streamRunning(ctx context.Context, in *instance, top, base string, progress func(done, total int64)) error {
	nodes, err := qmp.QueryNamedBlockNodes(ctx, in.mon)
	if err != nil {
		return err
	}
	nodeOf := func(file string) string {
		for _, n := range nodes {
			if n.File == file && n.Driver != "file" {
				return n.NodeName
			}
		}
		return ""
	}
	topNode := nodeOf(top)
	if topNode == "" {
		return fmt.Errorf("QEMU has no node for %s", top)
	}
	baseNode := ""
	if base != "" {
		if baseNode = nodeOf(base); baseNode == "" {
			return fmt.Errorf("QEMU has no node for %s", base)
		}
	}
	job := "merge-" + randomHex(4)
	if err := qmp.BlockStream(ctx, in.mon, job, topNode, baseNode); err != nil {
		return err
	}
	bg := context.WithoutCancel(ctx)
	defer func() { _ = qmp.JobDismiss(bg, in.mon, job) }()
	for {
		jobs, err := qmp.QueryJobs(bg, in.mon)
		if err != nil {
			return err
		}
		var j *qmp.Job
		for i := range jobs {
			if jobs[i].ID == job {
				j = &jobs[i]
			}
		}
		if j == nil {
			return fmt.Errorf("job %s vanished", job)
		}
		if progress != nil {
			progress(j.Current, j.Total)
		}
		if j.Status == "concluded" || j.Status == "null" {
			if j.ErrorMsg != "" {
				return fmt.Errorf("qemu: %s", j.ErrorMsg)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			// Cancelling a stream leaves every byte where it was: the
			// chain is as before, only partly copied.
			_ = qmp.JobCancel(bg, in.mon, job)
		case <-in.done:
			return fmt.Errorf("vm %q stopped during the merge", in.name)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// recoverSnapshots finishes what a dead daemon left: an interrupted
// snapshot is dropped (its disk switch, if made, is kept as plain
// layers), an interrupted revert is undone, an interrupted delete is
// finished. It reports whether the VM may have been left paused by a
// memory snapshot.
func (s *Service) recoverSnapshots(ctx context.Context, r record) (bool, error) {
	var recs []snapRecord
	if err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		recs, err = vmSnapshots(tx, r.Name)
		return err
	}); err != nil {
		return false, err
	}
	wasSnapshotting := r.Intent == intentSnapshotting
	switch r.Intent {
	case intentSnapshotting:
		if err := s.recoverTops(ctx, r); err != nil {
			return false, err
		}
	case intentReverting:
		s.log.Warn("undoing interrupted revert", "vm", r.Name)
		for _, p := range r.NextDisks {
			if p != "" {
				_ = os.Remove(p)
			}
		}
		if _, err := s.update(ctx, r.Name, func(x *record) error { x.Intent, x.NextDisks = "", nil; return nil }); err != nil {
			return false, err
		}
	}
	for _, sr := range recs {
		switch sr.State {
		case snapCreating:
			s.log.Warn("dropping interrupted snapshot", "vm", r.Name, "snapshot", sr.Name)
			s.dropSnapshot(ctx, sr)
		case snapDeleting:
			s.log.Warn("finishing interrupted snapshot delete", "vm", r.Name, "snapshot", sr.Name)
			s.finishSnapshotDelete(ctx, sr)
		}
	}
	// Memory states whose record is gone (a crash between writing the
	// file and recording the snapshot).
	files, _ := filepath.Glob(filepath.Join(s.snapDir(r.Name), "*.mem*"))
	known := map[string]bool{}
	for _, sr := range recs {
		if sr.State == snapReady {
			known[sr.MemFile] = true
		}
	}
	for _, f := range files {
		if !known[f] && (strings.HasSuffix(f, ".mem") || strings.HasSuffix(f, ".mem.part")) {
			_ = os.Remove(f)
		}
	}
	return wasSnapshotting, nil
}
