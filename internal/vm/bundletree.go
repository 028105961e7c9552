package vm

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/bundle"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/nbd"
	"github.com/lodge-vm/lodge/internal/qcow2"
	"github.com/lodge-vm/lodge/internal/store"
)

// An export with snapshots carries each disk as the tree of files Lodge
// keeps it in: the VM's own qcow2 layers (snapshots' frozen layers and
// the current top), on a base that is everything below them (the image,
// flattened). An import recreates the same tree, so reverting there works
// as it does here and nothing is stored twice.

// ExportTree is the snapshot tree of an export.
type ExportTree struct {
	Layers    []bundle.Layer
	Snapshots []bundle.Snapshot
	Current   string
	// Tops names each disk's current layer; Bases says which disks have a
	// base (served through ExportDisk.Data).
	Tops  map[string]string
	Bases map[string]bool
	// Files maps layer and memory entries to the files holding them.
	Files map[string]string
}

// exportTree fills e with the tree of stopped VM r.
func (s *Service) exportTree(ctx context.Context, e *Export, r record, dir string) error {
	e.Consistency = "stopped"
	var layers map[string]layer
	var snaps []snapRecord
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		all, err := store.ListJSON[layer](tx, layerBucket)
		if err != nil {
			return err
		}
		layers = map[string]layer{}
		for _, l := range all {
			layers[l.Path] = l
		}
		snaps, err = vmSnapshots(tx, r.Name)
		return err
	})
	if err != nil {
		return err
	}
	snaps = parentsFirst(snaps)
	t := &ExportTree{Current: r.CurrentSnapshot, Tops: map[string]string{}, Bases: map[string]bool{}, Files: map[string]string{}}
	ids := map[string]string{} // file → layer id
	for i, d := range r.Disks {
		starts := []string{d.Path}
		for _, sn := range snaps {
			if i < len(sn.Disks) {
				starts = append(starts, sn.Disks[i].Path)
			}
		}
		backing := func(p string) string {
			if p == d.Path {
				return d.Backing
			}
			return layers[p].Backing
		}
		owned := func(p string) bool { _, ok := layers[p]; return p == d.Path || ok }
		base, baseSeen := "", false
		var order []string
		var visit func(p string) error
		visit = func(p string) error {
			if _, done := ids[p]; done {
				return nil
			}
			b := backing(p)
			if b != "" && owned(b) {
				if err := visit(b); err != nil {
					return err
				}
			} else {
				if baseSeen && b != base {
					return fmt.Errorf("disk %q: its layers stand on two bases (%s, %s)", d.Name, base, b)
				}
				base, baseSeen = b, true
			}
			ids[p] = d.Name + "-" + strconv.Itoa(len(order))
			order = append(order, p)
			return nil
		}
		for _, p := range starts {
			if err := visit(p); err != nil {
				return err
			}
		}
		for _, p := range order {
			fi, err := os.Stat(p)
			if err != nil {
				return fmt.Errorf("disk %q: layer %s: %w", d.Name, p, err)
			}
			parent := ""
			if b := backing(p); b != "" && owned(b) {
				parent = ids[b]
			}
			id := ids[p]
			t.Layers = append(t.Layers, bundle.Layer{ID: id, Disk: d.Name, Parent: parent, Entry: bundle.LayerEntry(id), Size: fi.Size()})
			t.Files[bundle.LayerEntry(id)] = p
		}
		t.Tops[d.Name] = ids[d.Path]
		ed := ExportDisk{Disk: d}
		if base != "" {
			t.Bases[d.Name] = true
			srv, err := nbd.Serve(ctx, nbd.ServerOptions{
				Path: base, Format: "qcow2", ReadOnly: true, ForceShare: true,
				Socket: filepath.Join(dir, "base"+strconv.Itoa(i)+".sock"),
			})
			if err != nil {
				return fmt.Errorf("disk %q: %w", d.Name, err)
			}
			e.release = append(e.release, func() { _ = srv.Stop() })
			if ed.Conn, err = srv.Dial(ctx, nbd.ContextAllocation); err != nil {
				return fmt.Errorf("disk %q: %w", d.Name, err)
			}
			ed.Data = ed.Conn
		}
		e.Disks = append(e.Disks, ed)
	}
	for _, sn := range snaps {
		bs := bundle.Snapshot{Name: sn.Name, Parent: sn.Parent, CreatedAt: sn.CreatedAt, Description: sn.Description, Layers: map[string]string{}}
		for i, d := range sn.Disks {
			if i < len(r.Disks) {
				bs.Layers[r.Disks[i].Name] = ids[d.Path]
			}
		}
		if sn.Memory && sn.MemFile != "" {
			fi, err := os.Stat(sn.MemFile)
			if err != nil {
				return fmt.Errorf("snapshot %q: memory state: %w", sn.Name, err)
			}
			bs.Memory = &bundle.MemoryState{
				Entry: bundle.MemoryEntry(sn.Name), Size: fi.Size(),
				CPUs: sn.CPUs, MaxCPUs: sn.MaxCPUs, BootCPUs: sn.BootCPUs, BootMaxCPUs: sn.BootMaxCPUs, HotCPUs: sn.HotCPUs,
				MemorySize: sn.MemorySize, MaxMemorySize: sn.MaxMemorySize, Target: sn.Target, MaxMemory: sn.MaxMemory,
				Dimms: sn.Dimms, Paused: sn.Paused,
			}
			t.Files[bs.Memory.Entry] = sn.MemFile
		}
		t.Snapshots = append(t.Snapshots, bs)
	}
	e.Tree = t
	return nil
}

// parentsFirst orders snapshots so each comes after its parent.
func parentsFirst(snaps []snapRecord) []snapRecord {
	var out []snapRecord
	placed := map[string]bool{"": true}
	for len(out) < len(snaps) {
		progress := false
		for _, sn := range snaps {
			if sn.State != snapReady || placed[sn.Name] || !placed[sn.Parent] {
				continue
			}
			out = append(out, sn)
			placed[sn.Name], progress = true, true
		}
		if !progress {
			break // the rest hang off a snapshot not ready: leave them out
		}
	}
	return out
}

// treeImport is the part of an import that recreates a snapshot tree.
type treeImport struct {
	paths    map[string]string // layer id → file
	bases    map[string]string // disk → base file
	files    map[string]*os.File
	sizes    map[string]int64 // entry → exact file size
	memEntry map[string]bool  // memory entries that are dropped
}

// planTree lays out the files of spec's tree in pool p and fills r's
// disks, and returns the layer and snapshot records to store with it.
func (s *Service) planTree(r *record, spec ImportSpec, poolPath func(disk string) string) (*treeImport, []layer, []snapRecord) {
	ti := &treeImport{paths: map[string]string{}, bases: map[string]string{}, files: map[string]*os.File{}, sizes: map[string]int64{}, memEntry: map[string]bool{}}
	m := spec.Tree
	for _, d := range m.Disks {
		if d.Base != "" {
			ti.bases[d.Name] = poolPath(d.Name)
		}
	}
	parentPath := func(l bundle.Layer) string {
		if l.Parent == "" {
			return ti.bases[l.Disk]
		}
		return ti.paths[l.Parent]
	}
	byID := map[string]bundle.Layer{}
	for _, l := range m.Layers {
		ti.paths[l.ID] = poolPath(l.Disk)
		byID[l.ID] = l
		ti.sizes[l.Entry] = l.Size
	}
	r.CurrentSnapshot = m.CurrentSnapshot
	tops := map[string]bool{}
	for i, d := range m.Disks {
		tops[d.Top] = true
		r.Disks[i].Path = ti.paths[d.Top]
		r.Disks[i].Backing = parentPath(byID[d.Top])
	}
	var ls []layer
	for _, d := range m.Disks {
		if b := ti.bases[d.Name]; b != "" {
			ls = append(ls, layer{Path: b})
		}
	}
	for _, l := range m.Layers {
		if !tops[l.ID] {
			ls = append(ls, layer{Path: ti.paths[l.ID], Backing: parentPath(l)})
		}
	}
	var srs []snapRecord
	for _, sn := range m.Snapshots {
		sr := snapRecord{
			Snapshot: api.Snapshot{Name: sn.Name, VM: r.Name, Parent: sn.Parent, CreatedAt: sn.CreatedAt, Description: sn.Description},
			CPUs:     r.CPUs, MemorySize: r.Memory, Target: r.Memory, MaxMemory: r.MaxMemory, MaxCPUs: r.MaxCPUs,
			State: snapReady,
		}
		for _, d := range r.Disks {
			sd := d
			id := sn.Layers[d.Name]
			sd.Path, sd.Backing = ti.paths[id], parentPath(byID[id])
			sr.Disks = append(sr.Disks, sd)
		}
		if mem := sn.Memory; mem != nil {
			// A memory state holds the identity the guest had (its MAC
			// among it): it comes along only with that identity.
			if spec.KeepIdentity {
				sr.Memory, sr.MemFile = true, filepath.Join(s.snapDir(r.Name), sn.Name+".mem")
				sr.CPUs, sr.MaxCPUs, sr.BootCPUs, sr.BootMaxCPUs, sr.HotCPUs = mem.CPUs, mem.MaxCPUs, mem.BootCPUs, mem.BootMaxCPUs, mem.HotCPUs
				sr.MemorySize, sr.MaxMemorySize, sr.Target, sr.MaxMemory = mem.MemorySize, mem.MaxMemorySize, mem.Target, mem.MaxMemory
				sr.Dimms, sr.Paused = mem.Dimms, mem.Paused
				ti.sizes[mem.Entry] = mem.Size
			} else {
				ti.memEntry[mem.Entry] = true
			}
		}
		srs = append(srs, sr)
	}
	return ti, ls, srs
}

// openTree creates the tree's files: bases as qcow2 written directly,
// layers and memory states as the plain files they were.
func (im *Import) openTree(spec ImportSpec) error {
	ti, s := im.tree, im.s
	for disk, path := range ti.bases {
		size := int64(0)
		for _, d := range spec.Tree.Disks {
			if d.Name == disk {
				size = d.BaseSize
			}
		}
		w, err := qcow2.Create(path, size)
		if err != nil {
			return fmt.Errorf("disk %q: base: %w", disk, err)
		}
		im.writers[bundle.BaseEntry(disk)] = w
	}
	open := func(entry, path string) error {
		if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
			return err
		}
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o640)
		if err != nil {
			return err
		}
		ti.files[entry] = f
		return f.Truncate(bundle.RoundBlock(ti.sizes[entry]))
	}
	for _, l := range spec.Tree.Layers {
		if err := open(l.Entry, ti.paths[l.ID]); err != nil {
			return fmt.Errorf("disk %q layer %q: %w", l.Disk, l.ID, err)
		}
	}
	for _, sn := range spec.Tree.Snapshots {
		if sn.Memory != nil && !ti.memEntry[sn.Memory.Entry] {
			if err := open(sn.Memory.Entry, filepath.Join(s.snapDir(im.r.Name), sn.Name+".mem")); err != nil {
				return fmt.Errorf("snapshot %q: memory state: %w", sn.Name, err)
			}
		}
	}
	return nil
}

// treeEntry is where an entry of a tree import goes.
func (im *Import) treeEntry(name string) (io.WriterAt, bool) {
	if f, ok := im.tree.files[name]; ok {
		return f, true
	}
	if im.tree.memEntry[name] {
		return discardAt{}, true
	}
	return nil, false
}

type discardAt struct{}

func (discardAt) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

// finishTree cuts each file to its size, syncs it, and checks each layer
// before pointing it at its new parent: a layer from a bundle is a qcow2
// file from outside, and qemu-img must find it sound and self-contained
// before any QEMU opens it.
func (im *Import) finishTree(ctx context.Context, spec ImportSpec) error {
	ti := im.tree
	for entry, f := range ti.files {
		err := f.Truncate(ti.sizes[entry])
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		delete(ti.files, entry)
		if err != nil {
			return fmt.Errorf("%s: %w", entry, err)
		}
	}
	v := im.s.cfg.Volumes
	sizes := map[string]int64{}
	for _, d := range spec.Tree.Disks {
		sizes[d.Name] = d.Size
	}
	for _, l := range spec.Tree.Layers {
		path := ti.paths[l.ID]
		info, err := v.Info(ctx, path)
		if err != nil {
			return fmt.Errorf("disk %q layer %q: %w: %w", l.Disk, l.ID, errdefs.ErrInvalid, err)
		}
		switch {
		case info.Format != "qcow2":
			return fmt.Errorf("disk %q layer %q: %w: it is %s, not qcow2", l.Disk, l.ID, errdefs.ErrInvalid, info.Format)
		case info.FormatSpecific.Data.DataFile != "" || len(info.FormatSpecific.Data.Extents) > 0:
			return fmt.Errorf("disk %q layer %q: %w: it names other files", l.Disk, l.ID, errdefs.ErrInvalid)
		case info.VirtualSize != sizes[l.Disk]:
			return fmt.Errorf("disk %q layer %q: %w: %d bytes, the disk is %d", l.Disk, l.ID, errdefs.ErrInvalid, info.VirtualSize, sizes[l.Disk])
		}
		if err := v.Check(ctx, path); err != nil {
			return fmt.Errorf("disk %q layer %q: %w: qemu-img check: %w", l.Disk, l.ID, errdefs.ErrInvalid, err)
		}
		parent := ti.bases[l.Disk]
		if l.Parent != "" {
			parent = ti.paths[l.Parent]
		}
		if err := v.SetBacking(ctx, path, parent); err != nil {
			return fmt.Errorf("disk %q layer %q: %w", l.Disk, l.ID, err)
		}
	}
	return nil
}

// closeTree closes what is open, for an abort.
func (im *Import) closeTree() {
	if im.tree == nil {
		return
	}
	for entry, f := range im.tree.files {
		_ = f.Close()
		delete(im.tree.files, entry)
	}
}

// freezeTree makes the imported bases and frozen layers read-only, as
// Lodge keeps its own.
func (im *Import) freezeTree() {
	tops := map[string]bool{}
	for _, d := range im.spec.Tree.Disks {
		tops[d.Top] = true
	}
	for id, path := range im.tree.paths {
		if !tops[id] {
			_ = os.Chmod(path, 0o440)
		}
	}
	for _, path := range im.tree.bases {
		_ = os.Chmod(path, 0o440)
	}
}
