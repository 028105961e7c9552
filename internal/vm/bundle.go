package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/bundle"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/nbd"
	"github.com/lodge-vm/lodge/internal/network"
	"github.com/lodge-vm/lodge/internal/project"
	"github.com/lodge-vm/lodge/internal/qcow2"
	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/store"
	"github.com/lodge-vm/lodge/internal/units"
)

// Exports and imports read a stopped VM's disks straight from their
// image files where package qcow2 can, and otherwise move them through
// NBD: qemu-nbd for files no QEMU has open (images with features only
// QEMU reads, and views with a dirty bitmap), and the VM's own QEMU for a
// running one, which serves a point-in-time view of each disk (a
// "fleecing" node that keeps a copy of each block before the guest
// overwrites it). The guest keeps running and its disks' chains are left
// exactly as they were.

// ExportDisk is one disk of an export.
type ExportDisk struct {
	api.Disk
	// Data reads the view: straight from the image files for a stopped
	// VM whose images Lodge can read itself, otherwise through Conn.
	Data DiskReader
	// Conn serves the view over NBD; it is nil when Data reads the files.
	Conn *nbd.Conn
	// Source names the same view for QEMU's tools (qemu-img), in Format:
	// an NBD URI of raw data, or the qcow2 image file itself.
	Source, Format string
}

// DiskReader reads a disk as it was at an export's point in time.
type DiskReader interface {
	io.ReaderAt
	Size() int64
	// DataExtents lists the ranges that may hold data; the rest reads
	// as zeros.
	DataExtents(ctx context.Context, off, length int64) ([]nbd.Extent, error)
}

// fileView is a DiskReader over a stopped VM's image files.
type fileView struct{ *qcow2.Reader }

func (v fileView) DataExtents(_ context.Context, off, length int64) ([]nbd.Extent, error) {
	return nbdExtents(v.Reader.DataExtents(off, length))
}

func (v fileView) DirtyExtents(_ context.Context, bitmap string, off, length int64) ([]nbd.Extent, error) {
	return nbdExtents(v.Reader.DirtyExtents(bitmap, off, length))
}

func (v fileView) AllocatedAbove(_ context.Context, depth uint32, off, length int64) ([]nbd.Extent, error) {
	return nbdExtents(v.Reader.AllocatedAbove(int(depth), off, length))
}

// hasBitmap says whether the chain holds a bitmap named name that can be
// read.
func (v fileView) hasBitmap(name string) bool {
	b, ok := v.Bitmap(name)
	return ok && b.Usable && !b.InUse
}

func nbdExtents(ext []qcow2.Extent, err error) ([]nbd.Extent, error) {
	if err != nil {
		return nil, err
	}
	out := make([]nbd.Extent, len(ext))
	for i, e := range ext {
		out[i] = nbd.Extent{Offset: e.Offset, Length: e.Length}
	}
	return out, nil
}

// openFiles reads disk d straight from its image files, which is several
// times faster than through qemu-nbd, when the chain uses only what
// package qcow2 reads; ok is false otherwise.
func (s *Service) openFiles(d api.Disk) (_ ExportDisk, ok bool) {
	rd, err := qcow2.OpenReader(d.Path)
	if err != nil {
		level := slog.LevelWarn
		if errors.Is(err, qcow2.ErrUnsupported) {
			level = slog.LevelInfo
		}
		s.log.Log(context.Background(), level, "reading the disk through qemu-nbd", "disk", d.Name, "path", d.Path, "reason", err)
		return ExportDisk{}, false
	}
	return ExportDisk{Disk: d, Data: fileView{rd}, Source: d.Path, Format: "qcow2"}, true
}

// Export is a VM held at one point in time for reading.
type Export struct {
	VM        api.VM
	CloudInit string
	// Consistency is "stopped", "frozen" or "crash".
	Consistency string
	Disks       []ExportDisk
	// Tree is set for an export with snapshots; each ExportDisk's Conn
	// then serves the disk's base, if it has one.
	Tree    *ExportTree
	release []func()
	mu      sync.Mutex
	err     error // why the export was stopped, if it was
	gate    *yieldGate
}

// Yielded is how long the export's readers paused for the guest's writes
// so far.
func (e *Export) Yielded() time.Duration {
	if e.gate == nil {
		return 0
	}
	return e.gate.total()
}

// Close lets go of the point in time and the VM.
func (e *Export) Close() {
	for _, d := range e.Disks {
		if d.Conn != nil {
			_ = d.Conn.Close()
		}
		if f, ok := d.Data.(fileView); ok {
			_ = f.Close()
		}
	}
	for i := len(e.release) - 1; i >= 0; i-- {
		e.release[i]()
	}
	e.release = nil
}

// socketDirPrefix starts the name of every NBD socket directory, which
// then carries the daemon's pid, so that a later daemon can tell the ones
// a killed daemon left (sweepSocketDirs).
const socketDirPrefix = "lodge-nbd-"

// socketDir makes a private directory for NBD sockets. It is not under
// LODGE_HOME, whose path may be too long for a unix socket.
func socketDir() (string, func(), error) {
	dir, err := os.MkdirTemp("", socketDirPrefix+strconv.Itoa(os.Getpid())+"-")
	if err != nil {
		return "", nil, fmt.Errorf("socket directory: %w", err)
	}
	return dir, func() { _ = os.RemoveAll(dir) }, nil
}

// sweepSocketDirs removes the NBD socket directories under tmp that
// daemons no longer running left (killed mid-export). A directory whose
// daemon's pid is alive, even as some other process now, is kept.
func sweepSocketDirs(tmp string) {
	dirs, _ := filepath.Glob(filepath.Join(tmp, socketDirPrefix+"*-*"))
	for _, dir := range dirs {
		pid, err := strconv.Atoi(strings.SplitN(strings.TrimPrefix(filepath.Base(dir), socketDirPrefix), "-", 2)[0])
		if err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			_ = os.RemoveAll(dir)
		}
	}
}

// OpenExport holds VM name at the present moment for reading, until
// Close. A stopped VM is kept from starting; a running one keeps running,
// with its filesystems frozen through the agent for the instant the point
// is taken.
// withSnapshots carries the snapshot tree too; it needs a stopped VM.
func (s *Service) OpenExport(ctx context.Context, name string, withSnapshots bool) (_ *Export, err error) {
	unlock, err := s.lock(name, "export")
	if err != nil {
		return nil, err
	}
	e := &Export{release: []func(){unlock}}
	defer func() {
		if err != nil {
			e.Close()
		}
	}()
	r, err := s.load(ctx, name)
	if err != nil {
		return nil, err
	}
	if r.Intent != "" {
		return nil, fmt.Errorf("export vm %q: %w: it is being %s", name, errdefs.ErrState, r.Intent)
	}
	e.VM, e.CloudInit = s.view(r), r.CloudInit
	dir, rmDir, err := socketDir()
	if err != nil {
		return nil, err
	}
	e.release = append(e.release, rmDir)
	in := s.instance(name)
	switch {
	case withSnapshots && in != nil:
		return nil, fmt.Errorf("export vm %q with snapshots: %w: stop it first (a running VM is exported without its snapshots)", name, errdefs.ErrState)
	case withSnapshots:
		err = s.exportTree(ctx, e, r, dir)
	case in != nil:
		err = s.fleece(ctx, e, r, in, dir, fleeceHooks{})
	default:
		err = s.serveStopped(ctx, e, r, dir, nil)
	}
	if err != nil {
		return nil, fmt.Errorf("export vm %q: %w", name, err)
	}
	return e, nil
}

// serveStopped serves each disk's chain with qemu-nbd, read-only, with
// the persistent dirty bitmap bitmaps[i] of disk i, if there is one.
func (s *Service) serveStopped(ctx context.Context, e *Export, r record, dir string, bitmaps []string) error {
	e.Consistency = "stopped"
	for i, d := range r.Disks {
		var bitmap string
		if i < len(bitmaps) {
			bitmap = bitmaps[i]
		}
		if ed, ok := s.openFiles(d); ok {
			f := ed.Data.(fileView)
			if bitmap == "" || f.hasBitmap(bitmap) {
				e.Disks = append(e.Disks, ed)
				continue
			}
			_ = f.Close()
		}
		srv, err := nbd.Serve(ctx, nbd.ServerOptions{
			Path: d.Path, Format: "qcow2", ReadOnly: true, Bitmap: bitmap, AllocationDepth: true,
			Socket: filepath.Join(dir, "disk"+strconv.Itoa(i)+".sock"),
		})
		if err != nil {
			return fmt.Errorf("disk %q: %w", d.Name, err)
		}
		e.release = append(e.release, func() { _ = srv.Stop() })
		contexts := []string{nbd.ContextAllocation, nbd.ContextAllocationDepth}
		if bitmap != "" {
			contexts = append(contexts, nbd.ContextBitmap(bitmap))
		}
		c, err := srv.Dial(ctx, contexts...)
		if err != nil {
			return fmt.Errorf("disk %q: %w", d.Name, err)
		}
		e.Disks = append(e.Disks, ExportDisk{Disk: d, Data: c, Conn: c, Source: "nbd+unix:///?socket=" + filepath.Join(dir, "disk"+strconv.Itoa(i)+".sock"), Format: "raw"})
	}
	return nil
}

// Names of the QEMU objects an export adds; a prefix lets a later export
// clear what a killed daemon left.
const (
	fleecePrefix   = "lodge-fleece"
	fleeceJobTag   = "lodge-export"
	fleeceFileTail = ".fleece.qcow2"
)

// fleeceHooks add to the point a running VM's disks are held at.
type fleeceHooks struct {
	// actions for disk i, whose active layer is node top, run in the
	// transaction that takes the point.
	actions func(i int, top string) []qmp.Action
	// bitmap names a dirty bitmap of top to serve with disk i's view.
	bitmap func(i int, top string) string
}

// fleece sets up a point-in-time view of each disk of a running VM in its
// QEMU and serves it from QEMU's NBD server.
func (s *Service) fleece(ctx context.Context, e *Export, r record, in *instance, dir string, hooks fleeceHooks) error {
	s.clearFleece(ctx, in)
	room, err := s.fleeceRoom(r)
	if err != nil {
		return err
	}
	var paths []string
	e.gate = newYieldGate()
	devs, err := qmp.QueryBlock(ctx, in.mon)
	if err != nil {
		return err
	}
	var specs []qmp.FleeceSpec
	var actions []qmp.Action
	tops := make([]string, len(r.Disks))
	for i, d := range r.Disks {
		top := topNode(devs, "disk"+strconv.Itoa(i)+"-dev")
		if top == "" {
			return fmt.Errorf("disk %q: QEMU lists no such device", d.Name)
		}
		tops[i] = top
		if hooks.actions != nil {
			actions = append(actions, hooks.actions(i, top)...)
		}
		path := d.Path + fleeceFileTail
		// One left by an export whose daemon was killed: the VM lock says
		// no export runs now, and QEMU keeps its own handle if it still
		// has the file open.
		if err := os.Remove(path); err == nil {
			s.log.Warn("removed a fleecing file an interrupted export left", "vm", r.Name, "path", path)
		}
		if err := s.cfg.Volumes.CreateOverlay(ctx, "", path, d.Size); err != nil {
			return fmt.Errorf("disk %q: fleecing file: %w", d.Name, err)
		}
		e.release = append(e.release, func() { _ = os.Remove(path) })
		paths = append(paths, path)
		node := fleecePrefix + strconv.Itoa(i) + "-" + randomHex(4)
		if err := qmp.AddFleeceNode(ctx, in.mon, node, path, top); err != nil {
			return fmt.Errorf("disk %q: %w", d.Name, err)
		}
		e.release = append(e.release, func() {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if err := qmp.BlockdevDel(cctx, in.mon, node); err != nil {
				s.log.Warn("remove fleecing node", "vm", r.Name, "node", node, "err", err)
			}
		})
		specs = append(specs, qmp.FleeceSpec{JobID: fleeceJobTag + strconv.Itoa(i), Source: top, Target: node})
	}
	e.Consistency, err = s.atFrozenPoint(ctx, "export", r, in, func() error { return qmp.StartFleecing(ctx, in.mon, specs, actions...) })
	if err != nil {
		return err
	}
	e.release = append(e.release, func() { s.cancelJobs(context.WithoutCancel(ctx), in, specs) })
	sock := filepath.Join(dir, "qemu.sock")
	if err := qmp.NBDServerStart(ctx, in.mon, sock); err != nil {
		return err
	}
	e.release = append(e.release, func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = qmp.NBDServerStop(cctx, in.mon)
	})
	for i, sp := range specs {
		id, name := fleecePrefix+"-export"+strconv.Itoa(i), "disk"+strconv.Itoa(i)
		var bitmaps []qmp.BitmapRef
		contexts := []string{nbd.ContextAllocation, nbd.ContextAllocationDepth}
		if hooks.bitmap != nil {
			if b := hooks.bitmap(i, tops[i]); b != "" {
				bitmaps = append(bitmaps, qmp.BitmapRef{Node: tops[i], Name: b})
				contexts = append(contexts, nbd.ContextBitmap(b))
			}
		}
		if err := qmp.ExportNBD(ctx, in.mon, id, sp.Target, name, bitmaps...); err != nil {
			return fmt.Errorf("disk %q: %w", r.Disks[i].Name, err)
		}
		e.release = append(e.release, func() {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			_ = qmp.UnexportNBD(cctx, in.mon, id)
		})
		c, err := nbd.Dial(ctx, "unix", sock, nbd.Options{Export: name, MetaContexts: contexts})
		if err != nil {
			return fmt.Errorf("disk %q: %w", r.Disks[i].Name, err)
		}
		e.Disks = append(e.Disks, ExportDisk{Disk: r.Disks[i], Data: yieldingConn{c, e.gate}, Conn: c, Source: "nbd+unix:///" + name + "?socket=" + sock, Format: "raw"})
	}
	stop := s.watchFleece(e, r.Name, paths, room, func() {
		// Readers through QEMU's server (qemu-img, for an OVA) are cut
		// off before the view stops holding the point in time.
		bg := context.WithoutCancel(ctx)
		_ = qmp.NBDServerStop(bg, in.mon)
		s.cancelJobs(bg, in, specs)
	})
	e.release = append(e.release, stop)
	return nil
}

// cancelJobs stops the copy-before-write jobs and waits until they are
// gone, so their nodes can be closed.
func (s *Service) cancelJobs(ctx context.Context, in *instance, specs []qmp.FleeceSpec) {
	for _, sp := range specs {
		_ = qmp.JobCancel(ctx, in.mon, sp.JobID)
	}
	_ = waitFor(ctx, in, 50*time.Millisecond, 30*time.Second, func() (bool, error) {
		jobs, err := qmp.QueryJobs(ctx, in.mon)
		if err != nil {
			return false, err
		}
		for _, j := range jobs {
			for _, sp := range specs {
				if j.ID == sp.JobID {
					if j.Status == "concluded" {
						_ = qmp.JobDismiss(ctx, in.mon, j.ID)
					}
					return false, nil
				}
			}
		}
		return true, nil
	})
}

// clearFleece removes what an export killed with its daemon left in a
// running QEMU, so the next one can start.
func (s *Service) clearFleece(ctx context.Context, in *instance) {
	jobs, err := qmp.QueryJobs(ctx, in.mon)
	if err != nil {
		return
	}
	var stale []qmp.FleeceSpec
	for _, j := range jobs {
		if len(j.ID) > len(fleeceJobTag) && j.ID[:len(fleeceJobTag)] == fleeceJobTag {
			stale = append(stale, qmp.FleeceSpec{JobID: j.ID})
		}
	}
	if len(stale) == 0 {
		return
	}
	s.log.Warn("clearing an interrupted export", "vm", in.name)
	_ = qmp.NBDServerStop(ctx, in.mon)
	s.cancelJobs(ctx, in, stale)
	nodes, err := qmp.QueryNamedBlockNodes(ctx, in.mon)
	if err != nil {
		return
	}
	for _, n := range nodes {
		if len(n.NodeName) > len(fleecePrefix) && n.NodeName[:len(fleecePrefix)] == fleecePrefix {
			_ = qmp.BlockdevDel(ctx, in.mon, n.NodeName)
			if n.File != "" {
				_ = os.Remove(n.File)
			}
		}
	}
}

// atFrozenPoint runs fn with the guest's filesystems frozen through its
// agent, and says how consistent the point is: "frozen", or "crash" when
// there is no agent to freeze with (what a power cut would leave).
func (s *Service) atFrozenPoint(ctx context.Context, op string, r record, in *instance, fn func() error) (string, error) {
	st, err := qmp.QueryStatus(ctx, in.mon)
	if err != nil {
		return "", fmt.Errorf("%s vm %q: %w", op, r.Name, err)
	}
	if in.groupFrozen.Load() {
		return "frozen", fn()
	}
	consistency := "crash"
	if st.Running && in.agentUp() {
		if err := s.freeze(ctx, r.Name); err == nil {
			consistency = "frozen"
		} else {
			s.log.Warn("filesystems not frozen: the "+op+" is crash-consistent", "vm", r.Name, "err", err)
		}
	} else if st.Running {
		s.log.Warn("no guest agent: the "+op+" is crash-consistent", "vm", r.Name)
	}
	if consistency == "frozen" {
		defer s.thaw(ctx, r.Name)
	}
	return consistency, fn()
}

// freeze freezes a guest's filesystems through its agent.
func (s *Service) freeze(ctx context.Context, name string) error {
	fctx, cancel := context.WithTimeout(ctx, freezeTimeout)
	defer cancel()
	return s.withAgent(fctx, name, 0, func(a qga.Agent) error { _, err := a.FSFreeze(fctx); return err })
}

// thaw thaws what freeze froze, even once ctx is done.
func (s *Service) thaw(ctx context.Context, name string) {
	tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), freezeTimeout)
	defer cancel()
	if err := s.withAgent(tctx, name, 0, func(a qga.Agent) error { _, err := a.FSThaw(tctx); return err }); err != nil {
		s.log.Error("thaw filesystems", "vm", name, "err", err)
	}
}

// FreezeAll freezes, through their agents, the filesystems of those of
// the named VMs that run, and holds them frozen until thaw is called.
// Points taken for each of them meanwhile, one after the other, then hold
// all the guests at one moment, since none of them writes in between;
// each alone would be frozen only for its own instant. A VM that cannot be
// frozen is left as it is, and its point says it is crash-consistent.
func (s *Service) FreezeAll(ctx context.Context, names []string) (thaw func()) {
	var frozen []*instance
	for _, name := range names {
		in := s.instance(name)
		if in == nil || !in.agentUp() {
			continue
		}
		if st, err := qmp.QueryStatus(ctx, in.mon); err != nil || !st.Running {
			continue
		}
		if err := s.freeze(ctx, name); err != nil {
			s.log.Warn("filesystems not frozen for a group point", "vm", name, "err", err)
			continue
		}
		in.groupFrozen.Store(true)
		frozen = append(frozen, in)
	}
	return func() {
		for _, in := range frozen {
			s.thaw(ctx, in.name)
			in.groupFrozen.Store(false)
		}
		frozen = nil
	}
}

// ImportSpec is a VM to recreate from a bundle.
type ImportSpec struct {
	api.VM
	CloudInit string
	// KeepIdentity keeps UUID, MACs, instance-id and hostname (a move);
	// otherwise the VM gets new ones, as a clone does.
	KeepIdentity bool
	Pool         string
	// Data is how many bytes will be written, for the space check.
	Data int64
	// Tree, for a bundle with snapshots, is its manifest: the disks are
	// recreated as its tree of layers.
	Tree *bundle.Manifest
}

// Import is a VM being filled from a bundle: its record exists with a
// creating intent, so a crash half-way is undone by Recover. Its disks
// are written as qcow2 directly (package qcow2): a fresh standalone disk
// needs nothing of QEMU's, and skipping qemu-nbd triples the write rate.
type Import struct {
	s       *Service
	r       record
	unlock  func()
	writers map[string]*qcow2.Writer // by entry name
	tree    *treeImport
	spec    ImportSpec
	done    bool
}

// BeginImport creates the VM's record and empty disks and opens them for
// writing.
func (s *Service) BeginImport(ctx context.Context, spec ImportSpec) (_ *Import, err error) {
	name := spec.Name
	if err := ValidateName("vm", name); err != nil {
		return nil, err
	}
	if spec.Pool == "" {
		spec.Pool = "default"
	}
	pool, err := s.cfg.Pools.Get(ctx, spec.Pool)
	if err != nil {
		return nil, fmt.Errorf("import vm %q: %w", name, err)
	}
	if err := pool.Check(); err != nil {
		return nil, fmt.Errorf("import vm %q: %w", name, err)
	}
	if free, err := freeBytes(pool.Path); err == nil && free < spec.Data+snapshotSlack {
		return nil, fmt.Errorf("import vm %q: %w: pool %q has %s free, the disks need %s", name, errdefs.ErrNoSpace, pool.Name, units.FormatSize(free), units.FormatSize(spec.Data))
	}
	if total := s.hostMemory(); total > 0 && max(spec.Memory, spec.MaxMemory) > total {
		return nil, fmt.Errorf("import vm %q: memory %s is more than the host has (%s): %w", name, units.FormatSize(max(spec.Memory, spec.MaxMemory)), units.FormatSize(total), errdefs.ErrLimit)
	}
	unlock, err := s.lock(name, "import")
	if err != nil {
		return nil, err
	}
	im := &Import{s: s, unlock: unlock, writers: map[string]*qcow2.Writer{}, spec: spec}
	r := record{
		VM: api.VM{
			Name: name, UUID: spec.UUID, InstanceID: spec.InstanceID, Hostname: spec.Hostname,
			CPUs: spec.CPUs, MaxCPUs: spec.MaxCPUs, Memory: spec.Memory, MaxMemory: max(spec.MaxMemory, spec.Memory), MinMemory: spec.MinMemory,
			State: api.StateStopped, CreatedAt: time.Now().UTC(),
		},
		Pool: pool.Name, CloudInit: spec.CloudInit, Intent: intentCreating, Wanted: api.StateStopped,
	}
	r.Project = project.Name(spec.Project)
	r.Stack = spec.Stack
	for _, n := range spec.NICs {
		// A NIC stays on its network where this host has one of that
		// name (a stack restored with its networks); otherwise it goes
		// on the built-in one, which every host has.
		nw := n.Network
		if nw == "" || s.checkNetwork(ctx, nw) != nil {
			nw = network.Builtin
		}
		r.NICs = append(r.NICs, api.NIC{Network: nw, MAC: n.MAC})
	}
	for _, d := range spec.Disks {
		r.Disks = append(r.Disks, api.Disk{Name: d.Name, Bus: d.Bus, Size: d.Size, Pool: pool.Name, Path: pool.NewVolumePath(name, d.Name)})
	}
	if !spec.KeepIdentity {
		r.Hostname, r.IdentityPending = name, true
	} else if r.Hostname == "" {
		r.Hostname = name
	}
	var ls []layer
	var srs []snapRecord
	if spec.Tree != nil {
		im.tree, ls, srs = s.planTree(&r, spec, func(disk string) string { return pool.NewVolumePath(name, disk) })
	}
	err = s.insert(ctx, &r, !spec.KeepIdentity, func(tx store.Tx) error {
		if spec.KeepIdentity {
			if err := identityFree(tx, r); err != nil {
				return err
			}
		}
		// The tree's files are on record from the start, so that a crash
		// half-way is undone by Recover like any other part of the VM.
		if err := putLayers(tx, ls); err != nil {
			return err
		}
		for _, sr := range srs {
			if err := store.PutJSON(tx, snapBucket, snapKey(r.Name, sr.Name), sr); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		unlock()
		return nil, fmt.Errorf("import vm %q: %w", name, err)
	}
	im.r = r
	defer func() {
		if err != nil {
			im.Abort(context.WithoutCancel(ctx))
		}
	}()
	if im.tree != nil {
		if err := im.openTree(spec); err != nil {
			return nil, fmt.Errorf("import vm %q: %w", name, err)
		}
		return im, nil
	}
	for _, d := range r.Disks {
		w, err := qcow2.Create(d.Path, d.Size)
		if err != nil {
			return nil, fmt.Errorf("import vm %q: disk %q: %w", name, d.Name, err)
		}
		im.writers[bundle.DiskEntry(d.Name)] = w
	}
	return im, nil
}

// identityFree refuses a kept identity that a VM on this host already
// has: two machines with one UUID or MAC confuse DHCP, licences and
// monitoring alike.
func identityFree(tx store.Tx, r record) error {
	others, err := store.ListJSON[record](tx, bucket)
	if err != nil {
		return err
	}
	for _, o := range others {
		if o.UUID == r.UUID {
			return fmt.Errorf("%w: vm %q already has uuid %s; import without --keep-identity to get a new one", errdefs.ErrExists, o.Name, r.UUID)
		}
		for _, on := range o.NICs {
			for _, n := range r.NICs {
				if n.MAC == on.MAC {
					return fmt.Errorf("%w: vm %q already has mac %s; import without --keep-identity to get a new one", errdefs.ErrExists, o.Name, n.MAC)
				}
			}
		}
	}
	return nil
}

// VM is the record as created, with the identity it got.
func (im *Import) VM() api.VM { return im.s.view(im.r) }

// Entry is where a bundle entry's data goes.
func (im *Import) Entry(name string) (io.WriterAt, error) {
	if w, ok := im.writers[name]; ok {
		return w, nil
	}
	if im.tree != nil {
		if w, ok := im.treeEntry(name); ok {
			return w, nil
		}
	}
	return nil, fmt.Errorf("import vm %q: no place for %s", im.r.Name, name)
}

// closeDisks finishes the disks as images (synced), or with keep false
// just closes them for removal.
func (im *Import) closeDisks(keep bool) error {
	var first error
	for name, w := range im.writers {
		if !keep {
			w.Abort()
			continue
		}
		if err := w.Close(); err != nil && first == nil {
			first = fmt.Errorf("disk %q: %w", name, err)
		}
	}
	im.writers = map[string]*qcow2.Writer{}
	return first
}

// Commit makes the imported VM real: disks flushed, seed written, intent
// cleared.
func (im *Import) Commit(ctx context.Context) (api.VM, error) {
	s, r := im.s, im.r
	if err := im.closeDisks(true); err != nil {
		im.Abort(context.WithoutCancel(ctx))
		return api.VM{}, fmt.Errorf("import vm %q: %w", r.Name, err)
	}
	if im.tree != nil {
		if err := im.finishTree(ctx, im.spec); err != nil {
			im.Abort(context.WithoutCancel(ctx))
			return api.VM{}, fmt.Errorf("import vm %q: %w", r.Name, err)
		}
		im.freezeTree()
	}
	if err := os.MkdirAll(s.vmDir(r.Name), 0o750); err != nil {
		im.Abort(context.WithoutCancel(ctx))
		return api.VM{}, fmt.Errorf("import vm %q: %w", r.Name, err)
	}
	if err := s.writeSeed(ctx, r); err != nil {
		im.Abort(context.WithoutCancel(ctx))
		return api.VM{}, err
	}
	r, err := s.update(ctx, r.Name, func(x *record) error { x.Intent = ""; return nil })
	if err != nil {
		im.Abort(context.WithoutCancel(ctx))
		return api.VM{}, err
	}
	im.done = true
	im.unlock()
	s.publish(r.Name, "vm-created", r.State, "imported from a bundle")
	s.log.Info("imported", "vm", r.Name, "uuid", r.UUID)
	return s.view(r), nil
}

// Abort removes everything the import made.
func (im *Import) Abort(ctx context.Context) {
	if im.done {
		return
	}
	im.done = true
	im.closeTree()
	_ = im.closeDisks(false)
	im.s.discard(ctx, im.r)
	im.s.collectLayers(ctx)
	im.unlock()
}
