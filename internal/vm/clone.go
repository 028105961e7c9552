package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/storage"
	"github.com/lodge-vm/lodge/internal/store"
)

// intentCloning marks a source VM whose disk tops are being frozen into
// layers; NextDisks holds the new tops. Recover rolls forward when a new
// top exists and is a valid overlay, and back otherwise.
const intentCloning = "cloning"

// How long the guest's filesystems may stay frozen: Windows' VSS gives up
// after 10 s, and a snapshot-sync takes milliseconds.
const freezeTimeout = 10 * time.Second

// Clone copies VM src to a new VM. A linked clone is a thin overlay on a
// frozen layer of src's disk, made in constant time whatever the disk's
// size; a full clone is an independent, sparse copy. A running src keeps
// running: its filesystems are frozen through the agent while QEMU moves
// its writes to a new top. progress gets bytes done and total of a full
// copy.
func (s *Service) Clone(ctx context.Context, src string, req api.CloneVM, progress func(done, total int64)) (api.VM, error) {
	if err := ValidateName("vm", req.Name); err != nil {
		return api.VM{}, err
	}
	if req.Name == src {
		return api.VM{}, fmt.Errorf("clone vm %q: %w: the clone needs a name of its own", src, errdefs.ErrInvalid)
	}
	unlockSrc, err := s.lock(src, "clone")
	if err != nil {
		return api.VM{}, err
	}
	defer unlockSrc()
	unlockDst, err := s.lock(req.Name, "clone")
	if err != nil {
		return api.VM{}, err
	}
	defer unlockDst()
	r, err := s.load(ctx, src)
	if err != nil {
		return api.VM{}, err
	}
	if r.Intent != "" {
		return api.VM{}, fmt.Errorf("clone vm %q: %w: it is being %s", src, errdefs.ErrState, r.Intent)
	}
	running := s.alive(src)

	var dstPool *storage.Pool
	if req.Pool != "" {
		p, err := s.cfg.Pools.Get(ctx, req.Pool)
		if err != nil {
			return api.VM{}, fmt.Errorf("clone vm %q: %w", src, err)
		}
		dstPool = &p
	}
	// Plan each disk: base is what the clone's disk is layered on (or
	// copied from); next is src's new top when its current one must be
	// frozen first. A stopped src whose top holds nothing yet needs no new
	// layer: the clone shares the top's own backing file.
	next := make([]string, len(r.Disks))
	base := make([]string, len(r.Disks))
	dst := r
	dst.Name, dst.ClonedFrom, dst.CurrentSnapshot = req.Name, src, ""
	if !req.KeepIdentity {
		dst.Hostname, dst.IdentityPending = req.Name, true
	}
	dst.State, dst.StateReason, dst.Wanted, dst.StartedAt, dst.PID = api.StateStopped, "", api.StateStopped, nil, 0
	dst.CreatedAt, dst.Intent, dst.NextDisks = time.Now().UTC(), intentCreating, nil
	dst.Ballooned = 0
	if req.Project != "" {
		dst.Project = req.Project
	}
	dst.Disks = make([]api.Disk, len(r.Disks))
	dst.NICs = append([]api.NIC(nil), r.NICs...)
	var copyTotal int64
	for i, d := range r.Disks {
		pool := dstPool
		if pool == nil {
			p, err := s.cfg.Pools.Get(ctx, d.Pool)
			if err != nil {
				return api.VM{}, fmt.Errorf("clone vm %q: disk %q: %w", src, d.Name, err)
			}
			pool = &p
		}
		if err := pool.Check(); err != nil {
			return api.VM{}, fmt.Errorf("clone vm %q: %w", src, err)
		}
		base[i] = d.Path
		switch {
		case running:
			next[i] = s.siblingPath(ctx, d, src)
		case !req.Full:
			has, err := s.cfg.Volumes.HasData(ctx, d.Path)
			if err != nil {
				return api.VM{}, fmt.Errorf("clone vm %q: disk %q: %w", src, d.Name, err)
			}
			if has {
				next[i] = s.siblingPath(ctx, d, src)
			} else {
				base[i] = d.Backing
			}
		}
		nd := d
		nd.Pool, nd.Path, nd.Backing = pool.Name, pool.NewVolumePath(req.Name, d.Name), base[i]
		if req.Full {
			nd.Backing = ""
			copyTotal += d.Size
		}
		dst.Disks[i] = nd
	}
	if dstPool != nil {
		dst.Pool = dstPool.Name
	}
	anyNext := false
	for _, n := range next {
		anyNext = anyNext || n != ""
	}
	err = s.insert(ctx, &dst, !req.KeepIdentity, func(tx store.Tx) error {
		if !anyNext {
			return nil
		}
		var cur record
		if err := store.GetJSON(tx, bucket, src, &cur); err != nil {
			return err
		}
		cur.Intent, cur.NextDisks = intentCloning, next
		return store.PutJSON(tx, bucket, src, cur)
	})
	if err != nil {
		return api.VM{}, err
	}
	cleanup := context.WithoutCancel(ctx)
	fail := func(err error) (api.VM, error) {
		s.discard(cleanup, dst)
		s.collectLayers(cleanup)
		return api.VM{}, err
	}

	if anyNext {
		if err := s.freezeTops(ctx, "clone", r, next, running); err != nil {
			return fail(err)
		}
	}
	for i, d := range dst.Disks {
		if req.Full {
			if err := s.fullCopy(ctx, base[i], d.Path, copyTotal, progress); err != nil {
				return fail(fmt.Errorf("clone vm %q to %q: disk %q: %w", src, req.Name, d.Name, err))
			}
			continue
		}
		if err := s.cfg.Volumes.CreateOverlay(ctx, base[i], d.Path, d.Size); err != nil {
			return fail(fmt.Errorf("clone vm %q to %q: disk %q: %w", src, req.Name, d.Name, err))
		}
	}
	if err := os.MkdirAll(s.vmDir(dst.Name), 0o750); err != nil {
		return fail(fmt.Errorf("vm %q: %w", dst.Name, err))
	}
	if err := s.writeSeed(ctx, dst); err != nil {
		return fail(err)
	}
	dst, err = s.update(ctx, dst.Name, func(x *record) error { x.Intent = ""; return nil })
	if err != nil {
		return fail(err)
	}
	s.publish(dst.Name, "vm-created", dst.State, "cloned from "+src)
	s.log.Info("cloned", "vm", dst.Name, "from", src, "full", req.Full, "keep_identity", req.KeepIdentity, "running", running)
	return s.view(dst), nil
}

// siblingPath names a new top for disk d of vm next to its current one.
func (s *Service) siblingPath(ctx context.Context, d api.Disk, vm string) string {
	p, err := s.cfg.Pools.Get(ctx, d.Pool)
	if err != nil {
		// The pool record is gone but the disk is where it is: stay there.
		p = storage.Pool{Name: d.Pool, Path: filepath.Dir(d.Path)}
	}
	return p.NewVolumePath(vm, d.Name)
}

// freezeTops turns src's current tops (where next is set) into read-only
// layers with new writable tops above them, and records the change. A
// running VM switches in QEMU with its filesystems frozen; a stopped one
// gets new overlay files.
func (s *Service) freezeTops(ctx context.Context, op string, r record, next []string, running bool) error {
	switched := make([]bool, len(r.Disks))
	var err error
	if running {
		err = s.snapshotRunning(ctx, op, r, next, switched)
	} else {
		for i, d := range r.Disks {
			if next[i] == "" {
				continue
			}
			if err = s.cfg.Volumes.CreateOverlay(ctx, d.Path, next[i], d.Size); err != nil {
				err = fmt.Errorf("%s vm %q: disk %q: new top: %w", op, r.Name, d.Name, err)
				break
			}
			switched[i] = true
		}
		if err != nil {
			// Nothing ran on the new tops yet: undo them all.
			for i := range switched {
				if switched[i] {
					_ = os.Remove(next[i])
					switched[i] = false
				}
			}
		}
	}
	if cerr := s.commitTops(context.WithoutCancel(ctx), r.Name, next, switched); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

// commitTops makes the switched disks' new tops current and registers
// their old tops as layers, clearing the cloning intent. New tops that
// were made but not switched to are removed.
func (s *Service) commitTops(ctx context.Context, name string, next []string, switched []bool) error {
	for i, p := range next {
		if p != "" && (i >= len(switched) || !switched[i]) {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				s.log.Warn("remove unused new top", "vm", name, "path", p, "err", err)
			}
		}
	}
	var frozen []string
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		var cur record
		if err := store.GetJSON(tx, bucket, name, &cur); err != nil {
			return err
		}
		var ls []layer
		for i := range cur.Disks {
			if i >= len(switched) || !switched[i] {
				continue
			}
			d := &cur.Disks[i]
			ls = append(ls, layer{Path: d.Path, Backing: d.Backing})
			frozen = append(frozen, d.Path)
			d.Backing, d.Path = d.Path, next[i]
		}
		cur.Intent, cur.NextDisks = "", nil
		if err := putLayers(tx, ls); err != nil {
			return err
		}
		return store.PutJSON(tx, bucket, name, cur)
	})
	if err != nil {
		return fmt.Errorf("vm %q: record new disk tops: %w", name, err)
	}
	for _, f := range frozen {
		// Read-only on disk too, as a guard against anything writing to a
		// file that clones depend on.
		if err := os.Chmod(f, 0o440); err != nil {
			s.log.Warn("make layer read-only", "path", f, "err", err)
		}
	}
	return nil
}

// snapshotRunning moves a running VM's writes to new tops. The guest's
// filesystems are frozen through the agent around the switch, so the
// frozen layers hold a clean filesystem; without an agent they hold what
// a power cut would have left, and the log says so.
func (s *Service) snapshotRunning(ctx context.Context, op string, r record, next []string, switched []bool) error {
	in := s.instance(r.Name)
	if in == nil {
		return fmt.Errorf("%s vm %q: it stopped: %w", op, r.Name, errdefs.ErrState)
	}
	if err := s.prepareTops(ctx, op, r, next); err != nil {
		return err
	}
	_, err := s.atFrozenPoint(ctx, op, r, in, func() error { return s.switchTops(ctx, op, r, in, next, switched) })
	return err
}

// prepareTops creates the new tops (where next is set) of a running VM
// before it switches to them, so that the switch, made with the guest
// paused or its filesystems frozen, only opens files. On failure it
// removes what it made.
func (s *Service) prepareTops(ctx context.Context, op string, r record, next []string) error {
	for i, d := range r.Disks {
		if next[i] == "" {
			continue
		}
		if err := s.cfg.Volumes.CreateOverlay(ctx, d.Path, next[i], d.Size); err != nil {
			for j := range i {
				if next[j] != "" {
					_ = os.Remove(next[j])
				}
			}
			return fmt.Errorf("%s vm %q: disk %q: new top: %w", op, r.Name, d.Name, err)
		}
	}
	return nil
}

// switchTops makes QEMU put new overlays (where next is set) on top of a
// running VM's disks, each in one step of its main loop.
func (s *Service) switchTops(ctx context.Context, op string, r record, in *instance, next []string, switched []bool) error {
	devs, err := qmp.QueryBlock(ctx, in.mon)
	if err != nil {
		return fmt.Errorf("%s vm %q: %w", op, r.Name, err)
	}
	for i, d := range r.Disks {
		if next[i] == "" {
			continue
		}
		node := topNode(devs, "disk"+strconv.Itoa(i)+"-dev")
		if node == "" {
			return fmt.Errorf("%s vm %q: disk %q: QEMU lists no such device", op, r.Name, d.Name)
		}
		if err := qmp.SnapshotExisting(ctx, in.mon, node, next[i], "disk"+strconv.Itoa(i)+"-"+randomHex(4)); err != nil {
			return fmt.Errorf("%s vm %q: disk %q: switch to a new top: %w", op, r.Name, d.Name, err)
		}
		switched[i] = true
	}
	return nil
}

// topNode finds the node at the top of a device's chain. QEMU names the
// device by its id, or by a QOM path under it for virtio devices.
func topNode(devs []qmp.BlockDevice, id string) string {
	for _, d := range devs {
		if d.Inserted == nil {
			continue
		}
		if d.QDev == id || d.QDev == "/machine/peripheral/"+id || strings.HasPrefix(d.QDev, "/machine/peripheral/"+id+"/") {
			return d.Inserted.NodeName
		}
	}
	return ""
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// fullCopy writes the whole chain under src into a standalone file at
// dst, through a temporary name, so a cancelled or failed copy leaves
// nothing behind.
func (s *Service) fullCopy(ctx context.Context, src, dst string, total int64, progress func(done, total int64)) error {
	tmp := dst + ".tmp"
	err := s.cfg.Volumes.ConvertProgress(ctx, src, "qcow2", tmp, func(f float64) {
		if progress != nil {
			progress(int64(f*float64(total)), total)
		}
	})
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		_ = os.Remove(tmp)
		if ctx.Err() != nil {
			return fmt.Errorf("copy cancelled: %w", ctx.Err())
		}
		return err
	}
	return nil
}

// recoverTops finishes or undoes a switch to new disk tops (for a clone
// or a snapshot) that the daemon died in: a new top that exists as a
// valid overlay of the old one may already hold the guest's writes, so it
// is kept.
func (s *Service) recoverTops(ctx context.Context, r record) error {
	switched := make([]bool, len(r.Disks))
	// New tops are made before a running VM switches to them, so while
	// its QEMU runs, only QEMU knows which ones it writes to.
	tops, running := s.qemuTops(ctx, r.Name)
	for i, d := range r.Disks {
		if i >= len(r.NextDisks) || r.NextDisks[i] == "" {
			continue
		}
		if running {
			switched[i] = tops[r.NextDisks[i]]
			continue
		}
		info, err := s.cfg.Volumes.Info(ctx, r.NextDisks[i])
		if err == nil && info.BackingFilename == d.Path {
			switched[i] = true
			continue
		}
		if rerr := os.Remove(r.NextDisks[i]); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fmt.Errorf("vm %q: remove half-made top %s: %w", r.Name, r.NextDisks[i], rerr)
		}
	}
	s.log.Warn("finishing interrupted switch to new disk tops", "vm", r.Name, "intent", r.Intent, "switched", switched)
	return s.commitTops(ctx, r.Name, r.NextDisks, switched)
}

// qemuTops asks a VM's QEMU, if it runs, which files are its disks' tops.
func (s *Service) qemuTops(ctx context.Context, name string) (map[string]bool, bool) {
	runDir := s.runDir(name)
	if _, err := s.cfg.Driver.PID(runDir); err != nil {
		return nil, false
	}
	mctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	mon, err := s.cfg.Driver.Monitor(mctx, runDir)
	if err != nil {
		return nil, false
	}
	defer func() { _ = mon.Close() }()
	devs, err := qmp.QueryBlock(mctx, mon)
	if err != nil {
		return nil, false
	}
	tops := map[string]bool{}
	for _, d := range devs {
		if d.Inserted != nil {
			tops[d.Inserted.File] = true
		}
	}
	return tops, true
}
