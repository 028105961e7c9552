package vm

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/nbd"
	"github.com/lodge-vm/lodge/internal/qcow2"
	"github.com/lodge-vm/lodge/internal/qmp"
)

// Change tracking for incremental backups. Each backup leaves on every
// disk's active layer a persistent dirty bitmap named after it, which from
// that instant records each cluster the guest writes. The next backup to
// the same repository reads only what that bitmap marks. The bitmap lives
// in the qcow2 file itself, so it survives a VM restart and a daemon
// restart; QEMU marks it in-use while it has the file open, so one a
// killed QEMU could not save is known to be useless, and the backup after
// it is full and says why.
//
// A running VM's bitmap cannot be read while it still records, so the
// backup point copies it, at the same instant as the copy-before-write
// point is taken, into a disabled bitmap that lives only in QEMU. The
// persistent one keeps recording through the backup: if the backup fails,
// nothing is lost, and the next backup reads a little more.
const (
	trackPrefix = "lodge-bk-"
	viewPrefix  = "lodge-bkview-"
)

// TrackBitmap is the name of the bitmap that records the writes since
// backup id.
func TrackBitmap(id string) string { return trackPrefix + id }

// BackupOptions say what a backup point is taken for.
type BackupOptions struct {
	// ID is the new backup's; the bitmap it leaves is named after it.
	ID string
	// Parent is the newest backup of the VM in the repository, whose
	// bitmap says what changed since; "" makes the backup full.
	Parent string
	// Keep are backups other repositories track changes from; their
	// bitmaps stay. Any other bitmap of ours is stale and removed.
	Keep []string
}

// BackupDisk is one disk held for a backup.
type BackupDisk struct {
	ExportDisk
	// Read lists, by offset, the ranges the backup must read (they may
	// overlap): those written since the parent, or, for a full backup,
	// those that hold data.
	Read []nbd.Extent
	// Full says the disk is read whole; Reason says why when a parent
	// was given.
	Full   bool
	Reason string
	// above is how many layers of the served chain were made after the
	// parent's bitmap stopped recording (by a snapshot or a clone, which
	// put new layers on top): everything they hold changed since too.
	above uint32
	// parentOnTop says the parent's bitmap is on the active layer, where
	// Commit can remove it; one in a lower layer is read-only.
	parentOnTop bool
}

// BackupPoint is a VM held at one point in time for a backup.
type BackupPoint struct {
	*Export
	Disks []BackupDisk
	s     *Service
	opts  BackupOptions
	// drop removes bitmap name from disk i's active layer, in QEMU or in
	// the file, so Commit and Close need not know which.
	drop func(ctx context.Context, disk int, name string) error
	// views are the bitmaps served with each disk, "" for a full one.
	views     []string
	committed bool
}

// OpenBackup holds VM name at the present moment for a backup, and says
// for each disk what must be read. Until Commit, the point can be dropped
// with Close and the VM's change tracking is as before.
func (s *Service) OpenBackup(ctx context.Context, name string, opts BackupOptions) (_ *BackupPoint, err error) {
	if opts.ID == "" {
		return nil, fmt.Errorf("backup vm %q: %w: no backup id", name, errdefs.ErrInvalid)
	}
	unlock, err := s.lock(name, "backup")
	if err != nil {
		return nil, err
	}
	e := &Export{release: []func(){unlock}}
	p := &BackupPoint{Export: e, s: s, opts: opts}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	r, err := s.load(ctx, name)
	if err != nil {
		return nil, err
	}
	if r.Intent != "" {
		return nil, fmt.Errorf("backup vm %q: %w: it is being %s", name, errdefs.ErrState, r.Intent)
	}
	e.VM, e.CloudInit = s.view(r), r.CloudInit
	dir, rmDir, err := socketDir()
	if err != nil {
		return nil, err
	}
	e.release = append(e.release, rmDir)
	p.Disks = make([]BackupDisk, len(r.Disks))
	p.views = make([]string, len(r.Disks))
	in := s.instance(name)
	if in != nil {
		err = s.backupRunning(ctx, p, r, in, dir)
	} else {
		err = s.backupStopped(ctx, p, r, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("backup vm %q: %w", name, err)
	}
	for i := range p.Disks {
		d := &p.Disks[i]
		d.ExportDisk = e.Disks[i]
		if err := d.planReads(ctx, p.views[i], in != nil); err != nil {
			return nil, fmt.Errorf("backup vm %q: disk %q: %w", name, d.Name, err)
		}
	}
	return p, nil
}

// changeReader says what changed in a disk's view: through NBD, or from
// the image files of a stopped VM.
type changeReader interface {
	DirtyExtents(ctx context.Context, bitmap string, off, length int64) ([]nbd.Extent, error)
	AllocatedAbove(ctx context.Context, depth uint32, off, length int64) ([]nbd.Extent, error)
}

var (
	_ changeReader = (*nbd.Conn)(nil)
	_ changeReader = fileView{}
)

// planReads lists what the backup reads of the disk.
func (d *BackupDisk) planReads(ctx context.Context, view string, running bool) error {
	var err error
	if d.Full {
		d.Read, err = d.Data.DataExtents(ctx, 0, d.Size)
		return err
	}
	changes, ok := d.Data.(changeReader)
	if !ok {
		return fmt.Errorf("%T cannot say what changed", d.Data)
	}
	if d.Read, err = changes.DirtyExtents(ctx, view, 0, d.Size); err != nil {
		return err
	}
	if d.above > 0 {
		// A running VM's view is served from the fleecing node, one
		// layer above the active one; what that node holds are blocks
		// the guest overwrote since the point, read again for nothing.
		depth := d.above
		if running {
			depth++
		}
		newer, err := changes.AllocatedAbove(ctx, depth, 0, d.Size)
		if err != nil {
			return err
		}
		d.Read = append(d.Read, newer...)
		slices.SortFunc(d.Read, func(a, b nbd.Extent) int { return cmp.Compare(a.Offset, b.Offset) })
	}
	return nil
}

// layerBitmaps are the bitmaps one layer of a disk's chain holds.
type layerBitmaps struct {
	path, node string
	have, bad  []string
}

// plan decides, from the bitmaps each layer of a disk's chain holds (the
// active layer first), whether the disk's backup can be incremental, and
// lists the bitmaps of ours on the active layer that nothing needs.
func (p *BackupPoint) plan(i int, chain []layerBitmaps) (stale []string) {
	d := &p.Disks[i]
	parent := p.opts.Parent
	want := TrackBitmap(parent)
	at := -1
	for k, l := range chain {
		if parent != "" && slices.Contains(l.have, want) {
			at = k
			break
		}
	}
	switch {
	case parent == "":
		d.Full = true
	case at < 0:
		// QEMU keeps a bitmap added while it runs in memory until it
		// closes the file, so one killed leaves no trace of it at all.
		d.Full, d.Reason = true, fmt.Sprintf("change tracking since backup %s was lost: disk %q has no bitmap for it (its QEMU was killed before saving it, or a revert replaced the layers it was in)", parent, d.Name)
	case slices.Contains(chain[at].bad, want):
		d.Full, d.Reason = true, fmt.Sprintf("change tracking since backup %s was lost: disk %q's bitmap was not saved (its QEMU was killed or crashed)", parent, d.Name)
	default:
		d.above, d.parentOnTop = uint32(at), at == 0
	}
	if len(chain) == 0 {
		return nil
	}
	for _, b := range chain[0].have {
		id, ok := strings.CutPrefix(b, trackPrefix)
		if !ok {
			continue
		}
		useful := (id == parent && !d.Full) || slices.Contains(p.opts.Keep, id)
		if !useful || slices.Contains(chain[0].bad, b) {
			stale = append(stale, b)
		}
	}
	return stale
}

// chainOfFiles is chainOf for a stopped VM: it reads the chain and its
// bitmaps from the image files, which is faster than qemu-img, and falls
// back to chainOf for images package qcow2 does not read.
func (s *Service) chainOfFiles(ctx context.Context, d api.Disk) ([]layerBitmaps, error) {
	rd, err := qcow2.OpenReader(d.Path)
	if err != nil {
		s.log.Info("listing bitmaps through qemu-img", "disk", d.Name, "path", d.Path, "reason", err)
		return s.chainOf(ctx, d)
	}
	defer func() { _ = rd.Close() }()
	var out []layerBitmaps
	for _, l := range rd.Layers() {
		lb := layerBitmaps{path: l.Path}
		for _, b := range l.Bitmaps {
			lb.have = append(lb.have, b.Name)
			if b.InUse || !b.Usable {
				lb.bad = append(lb.bad, b.Name)
			}
		}
		out = append(out, lb)
	}
	return out, nil
}

// chainOf lists the layers of disk d's chain, active first.
func (s *Service) chainOf(ctx context.Context, d api.Disk) ([]layerBitmaps, error) {
	infos, err := s.cfg.Volumes.Chain(ctx, d.Path)
	if err != nil {
		return nil, err
	}
	out := make([]layerBitmaps, 0, len(infos))
	for _, info := range infos {
		l := layerBitmaps{path: info.Filename}
		for _, b := range info.FormatSpecific.Data.Bitmaps {
			l.have = append(l.have, b.Name)
			if b.Inconsistent() {
				l.bad = append(l.bad, b.Name)
			}
		}
		out = append(out, l)
	}
	return out, nil
}

func (s *Service) backupRunning(ctx context.Context, p *BackupPoint, r record, in *instance, dir string) error {
	s.clearFleece(ctx, in)
	devs, err := qmp.QueryBlock(ctx, in.mon)
	if err != nil {
		return err
	}
	nodes, err := qmp.QueryNamedBlockNodes(ctx, in.mon)
	if err != nil {
		return err
	}
	for _, n := range nodes {
		for _, b := range n.DirtyBitmaps {
			if strings.HasPrefix(b.Name, viewPrefix) {
				// Left by a backup whose daemon was killed; it lives in
				// QEMU only and nothing reads it now.
				_ = qmp.RemoveBitmap(ctx, in.mon, n.NodeName, b.Name)
			}
		}
	}
	tops := make([]string, len(r.Disks))
	sources := make([]qmp.BitmapRef, len(r.Disks))
	for i, d := range r.Disks {
		p.Disks[i].Disk = d
		tops[i] = topNode(devs, "disk"+strconv.Itoa(i)+"-dev")
		if tops[i] == "" {
			return fmt.Errorf("disk %q: QEMU lists no such device", d.Name)
		}
		// The files say which layers there are; QEMU, which has them
		// open, says which bitmaps they hold now.
		chain, err := s.chainOf(ctx, d)
		if err != nil {
			return fmt.Errorf("disk %q: %w", d.Name, err)
		}
		for k := range chain {
			chain[k].have, chain[k].bad = nil, nil
			for _, n := range nodes {
				if k == 0 && n.NodeName != tops[i] || k > 0 && (n.File != chain[k].path || n.Driver != "qcow2") {
					continue
				}
				chain[k].node = n.NodeName
				for _, b := range n.DirtyBitmaps {
					chain[k].have = append(chain[k].have, b.Name)
					if b.Inconsistent {
						chain[k].bad = append(chain[k].bad, b.Name)
					}
				}
				break
			}
		}
		for _, b := range p.plan(i, chain) {
			if err := qmp.RemoveBitmap(ctx, in.mon, tops[i], b); err != nil {
				return fmt.Errorf("disk %q: remove stale bitmap %s: %w", d.Name, b, err)
			}
		}
		if dk := &p.Disks[i]; !dk.Full {
			sources[i] = qmp.BitmapRef{Node: chain[dk.above].node, Name: TrackBitmap(p.opts.Parent)}
			if sources[i].Node == "" {
				dk.Full, dk.Reason = true, fmt.Sprintf("disk %q: the layer %s that tracks changes since backup %s is not open in QEMU", d.Name, chain[dk.above].path, p.opts.Parent)
				continue
			}
			p.views[i] = viewPrefix + p.opts.ID
		}
	}
	p.drop = func(ctx context.Context, i int, name string) error {
		return qmp.RemoveBitmap(ctx, in.mon, tops[i], name)
	}
	hooks := fleeceHooks{
		actions: func(i int, top string) []qmp.Action {
			acts := []qmp.Action{qmp.AddBitmap(top, TrackBitmap(p.opts.ID), true, false)}
			if v := p.views[i]; v != "" {
				acts = append(acts, qmp.AddBitmap(top, v, false, true), qmp.MergeBitmaps(top, v, sources[i]))
			}
			return acts
		},
		bitmap: func(i int, _ string) string { return p.views[i] },
	}
	// Registered before the point is taken so that it runs after the
	// views stop being served: a served bitmap cannot be removed. Until
	// Commit, the new bitmap goes again too.
	p.release = append(p.release, func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		for i := range r.Disks {
			if p.views[i] != "" {
				_ = qmp.RemoveBitmap(cctx, in.mon, tops[i], p.views[i])
			}
			if !p.committed {
				_ = qmp.RemoveBitmap(cctx, in.mon, tops[i], TrackBitmap(p.opts.ID))
			}
		}
	})
	return s.fleece(ctx, p.Export, r, in, dir, hooks)
}

func (s *Service) backupStopped(ctx context.Context, p *BackupPoint, r record, dir string) error {
	v := s.cfg.Volumes
	for i, d := range r.Disks {
		p.Disks[i].Disk = d
		chain, err := s.chainOfFiles(ctx, d)
		if err != nil {
			return fmt.Errorf("disk %q: %w", d.Name, err)
		}
		for _, b := range p.plan(i, chain) {
			if err := v.RemoveBitmap(ctx, d.Path, b); err != nil {
				return fmt.Errorf("disk %q: remove stale bitmap %s: %w", d.Name, b, err)
			}
		}
		// Nothing writes to a stopped VM's disks while the VM is locked,
		// so the new bitmap can start before the point is read.
		if err := v.AddBitmap(ctx, d.Path, TrackBitmap(p.opts.ID)); err != nil {
			return fmt.Errorf("disk %q: %w", d.Name, err)
		}
		path := d.Path
		p.release = append(p.release, func() {
			if !p.committed {
				_ = v.RemoveBitmap(context.WithoutCancel(ctx), path, TrackBitmap(p.opts.ID))
			}
		})
		if !p.Disks[i].Full {
			// Both qemu-nbd and package qcow2 find the bitmap in whichever
			// layer holds it.
			p.views[i] = TrackBitmap(p.opts.Parent)
		}
	}
	p.drop = func(ctx context.Context, i int, name string) error { return v.RemoveBitmap(ctx, r.Disks[i].Path, name) }
	return s.serveStopped(ctx, p.Export, r, dir, p.views)
}

// Commit says the backup is safely stored: the VM's change tracking moves
// on to it, and the point is let go. The bitmap of the parent goes, unless
// another repository still tracks from it.
func (p *BackupPoint) Commit(ctx context.Context) error {
	p.committed = true
	drop := p.drop
	// Let go of the served views first: a stopped VM's file is locked by
	// qemu-nbd until then.
	for i := range p.Export.Disks {
		if c := p.Export.Disks[i].Conn; c != nil {
			_ = c.Close()
			p.Export.Disks[i].Conn = nil
		}
	}
	release := p.release
	p.release = nil
	// The VM lock is the first release; it is kept until the bitmaps are
	// done.
	for i := len(release) - 1; i >= 1; i-- {
		release[i]()
	}
	defer release[0]()
	if p.opts.Parent == "" || slices.Contains(p.opts.Keep, p.opts.Parent) {
		return nil
	}
	var errs []error
	for i, d := range p.Disks {
		if !d.parentOnTop {
			continue
		}
		if err := drop(ctx, i, TrackBitmap(p.opts.Parent)); err != nil {
			errs = append(errs, fmt.Errorf("disk %q: %w", d.Name, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		// The backup is stored; a bitmap left behind is removed as stale
		// by the next backup.
		return fmt.Errorf("backup %s of vm %q: drop the bitmap of backup %s: %w", p.opts.ID, p.VM.Name, p.opts.Parent, err)
	}
	return nil
}
