package vm

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/nbd"
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
	// Read lists the ranges the backup must read: those written since
	// the parent, or, for a full backup, those that hold data.
	Read []nbd.Extent
	// Full says the disk is read whole; Reason says why when a parent
	// was given.
	Full   bool
	Reason string
}

// BackupPoint is a VM held at one point in time for a backup.
type BackupPoint struct {
	*Export
	Disks []BackupDisk
	s     *Service
	opts  BackupOptions
	// tracks drop bitmap name of disk i; it is set up per state (running
	// or stopped) so Commit and Close need not know which.
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
	if in := s.instance(name); in != nil {
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
		if d.Full {
			d.Read, err = d.Conn.DataExtents(ctx, 0, d.Size)
		} else {
			d.Read, err = d.Conn.DirtyExtents(ctx, p.views[i], 0, d.Size)
		}
		if err != nil {
			return nil, fmt.Errorf("backup vm %q: disk %q: %w", name, d.Name, err)
		}
	}
	return p, nil
}

// plan decides, from the bitmaps a disk's active layer has, whether the
// disk's backup can be incremental, and lists the bitmaps of ours that
// nothing needs any more.
func (p *BackupPoint) plan(i int, have []string, inconsistent []string) (stale []string) {
	d := &p.Disks[i]
	parent := p.opts.Parent
	switch {
	case parent == "":
		d.Full = true
	case slices.Contains(inconsistent, TrackBitmap(parent)):
		d.Full, d.Reason = true, fmt.Sprintf("change tracking since backup %s was lost: disk %q's bitmap was not saved (its QEMU was killed or crashed)", parent, d.Name)
	case !slices.Contains(have, TrackBitmap(parent)):
		// QEMU keeps a bitmap added while it runs in memory until it
		// closes the file, so one killed leaves no trace of it at all.
		d.Full, d.Reason = true, fmt.Sprintf("change tracking since backup %s was lost: disk %q has no bitmap for it (its QEMU was killed before saving it, or a snapshot, revert or restore replaced the disk's active layer)", parent, d.Name)
	}
	for _, b := range have {
		id, ok := strings.CutPrefix(b, trackPrefix)
		if !ok {
			continue
		}
		useful := (id == parent && !d.Full) || slices.Contains(p.opts.Keep, id)
		if !useful || slices.Contains(inconsistent, b) {
			stale = append(stale, b)
		}
	}
	return stale
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
	for i, d := range r.Disks {
		p.Disks[i].Disk = d
		tops[i] = topNode(devs, "disk"+strconv.Itoa(i)+"-dev")
		if tops[i] == "" {
			return fmt.Errorf("disk %q: QEMU lists no such device", d.Name)
		}
		var have, bad []string
		for _, n := range nodes {
			if n.NodeName != tops[i] {
				continue
			}
			for _, b := range n.DirtyBitmaps {
				have = append(have, b.Name)
				if b.Inconsistent {
					bad = append(bad, b.Name)
				}
			}
		}
		for _, b := range p.plan(i, have, bad) {
			if err := qmp.RemoveBitmap(ctx, in.mon, tops[i], b); err != nil {
				return fmt.Errorf("disk %q: remove stale bitmap %s: %w", d.Name, b, err)
			}
		}
	}
	p.drop = func(ctx context.Context, i int, name string) error {
		return qmp.RemoveBitmap(ctx, in.mon, tops[i], name)
	}
	for i := range r.Disks {
		if !p.Disks[i].Full {
			p.views[i] = viewPrefix + p.opts.ID
		}
	}
	hooks := fleeceHooks{
		actions: func(i int, top string) []qmp.Action {
			acts := []qmp.Action{qmp.AddBitmap(top, TrackBitmap(p.opts.ID), true, false)}
			if v := p.views[i]; v != "" {
				acts = append(acts, qmp.AddBitmap(top, v, false, true), qmp.MergeBitmaps(top, v, TrackBitmap(p.opts.Parent)))
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
		info, err := v.Info(ctx, d.Path)
		if err != nil {
			return fmt.Errorf("disk %q: %w", d.Name, err)
		}
		var have, bad []string
		for _, b := range info.FormatSpecific.Data.Bitmaps {
			have = append(have, b.Name)
			if b.Inconsistent() {
				bad = append(bad, b.Name)
			}
		}
		for _, b := range p.plan(i, have, bad) {
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
		if d.Full {
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
