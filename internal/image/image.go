// Package image is the image library: read-only qcow2 files that VM disks
// are thin overlays on. Import converts any supported format to qcow2 and
// refuses files that point at other files.
package image

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/ovf"
	"github.com/lodge-vm/lodge/internal/storage"
	"github.com/lodge-vm/lodge/internal/store"
)

const bucket = "images"

// Formats that import accepts, as qemu-img names them.
var Formats = map[string]bool{"qcow2": true, "raw": true, "vpc": true, "vhdx": true, "vmdk": true}

type record struct {
	api.Image
	Importing bool `json:"importing,omitempty"`
}

// Library manages images under $LODGE_HOME/images.
type Library struct {
	dir   string
	store store.Store
	img   *storage.QEMUImg
	log   *slog.Logger
	// Users lists the VMs that use an image.
	Users func(ctx context.Context, image string) ([]string, error)

	mu   sync.Mutex
	busy map[string]string
}

// lock marks an image busy with an operation, refusing a second one.
func (l *Library) lock(name, op string) (func(), error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if cur, ok := l.busy[name]; ok {
		return nil, fmt.Errorf("image %q: %w: %s is in progress", name, errdefs.ErrBusy, cur)
	}
	if l.busy == nil {
		l.busy = map[string]string{}
	}
	l.busy[name] = op
	return func() {
		l.mu.Lock()
		delete(l.busy, name)
		l.mu.Unlock()
	}, nil
}

// New returns a library rooted at home/images.
func New(home string, st store.Store, img *storage.QEMUImg, log *slog.Logger) *Library {
	if log == nil {
		log = slog.Default()
	}
	return &Library{dir: filepath.Join(home, "images"), store: st, img: img, log: log.With("component", "image")}
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// ValidateName refuses names that could escape the images directory.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) || name == "." || name == ".." || filepath.Base(name) != name || containsDotDot(name) {
		return fmt.Errorf("image name %q: %w: use letters, digits, '.', '-' and '_' (at most 63), no '..'", name, errdefs.ErrInvalid)
	}
	return nil
}

func containsDotDot(s string) bool {
	for i := 0; i+1 < len(s); i++ {
		if s[i] == '.' && s[i+1] == '.' {
			return true
		}
	}
	return false
}

// Get returns one image with the VMs that use it.
func (l *Library) Get(ctx context.Context, name string) (api.Image, error) {
	img, err := l.Resolve(ctx, name)
	if err != nil {
		return api.Image{}, err
	}
	all, err := l.records(ctx)
	if err != nil {
		return api.Image{}, err
	}
	return l.withUsers(ctx, img, all)
}

// Resolve returns an image as it is stored, without its chain, children
// and users, which cost a look at every image and VM: what a VM being
// created or rebuilt needs of it.
func (l *Library) Resolve(ctx context.Context, name string) (api.Image, error) {
	var r record
	err := l.store.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, bucket, name, &r) })
	if errors.Is(err, store.ErrNotFound) || (err == nil && r.Importing) {
		return api.Image{}, fmt.Errorf("image %q: %w (see lodge image list)", name, errdefs.ErrNotFound)
	}
	if err != nil {
		return api.Image{}, err
	}
	return r.Image, nil
}

func (l *Library) records(ctx context.Context) (map[string]api.Image, error) {
	var recs []record
	err := l.store.View(ctx, func(tx store.Tx) error {
		var err error
		recs, err = store.ListJSON[record](tx, bucket)
		return err
	})
	out := make(map[string]api.Image, len(recs))
	for _, r := range recs {
		if !r.Importing {
			out[r.Name] = r.Image
		}
	}
	return out, err
}

// withUsers fills in what depends on an image and what it depends on.
func (l *Library) withUsers(ctx context.Context, img api.Image, all map[string]api.Image) (api.Image, error) {
	img.Chain, img.Children = []string{img.Name}, []string{}
	for p := img.Parent; p != "" && len(img.Chain) <= len(all); p = all[p].Parent {
		img.Chain = append(img.Chain, p)
	}
	for _, o := range all {
		if o.Parent == img.Name {
			img.Children = append(img.Children, o.Name)
		}
	}
	sort.Strings(img.Children)
	img.UsedBy = []string{}
	if l.Users != nil {
		users, err := l.Users(ctx, img.Name)
		if err != nil {
			return img, err
		}
		if users != nil {
			img.UsedBy = users
		}
	}
	return img, nil
}

// List returns every image, by name.
func (l *Library) List(ctx context.Context) ([]api.Image, error) {
	all, err := l.records(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, 0, len(all))
	for _, r := range all {
		img, err := l.withUsers(ctx, r, all)
		if err != nil {
			return nil, err
		}
		out = append(out, img)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Import copies a disk file into the library as a read-only qcow2. The
// format is read from the file by qemu-img; raw data is named raw
// explicitly so it is never probed again later. An OVA (or a loose .ovf
// with its disks beside it) is unpacked and checked against its manifest
// first, and its descriptor's CPUs and memory become the image's defaults.
// progress gets 0..1.
func (l *Library) Import(ctx context.Context, name, src string, progress func(float64)) (api.Image, error) {
	if err := ValidateName(name); err != nil {
		return api.Image{}, err
	}
	if !filepath.IsAbs(src) {
		return api.Image{}, fmt.Errorf("import image %q: file %q: %w: give an absolute path", name, src, errdefs.ErrInvalid)
	}
	st, err := os.Stat(src)
	if err != nil {
		return api.Image{}, fmt.Errorf("import image %q: %w", name, err)
	}
	if !st.Mode().IsRegular() {
		return api.Image{}, fmt.Errorf("import image %q: %s: %w: not a regular file", name, src, errdefs.ErrInvalid)
	}
	var appliance *ovf.Descriptor
	disk := src
	switch {
	case strings.EqualFold(filepath.Ext(src), ".ovf"):
		d, disks, err := ovf.ReadOVF(ctx, src)
		if err != nil {
			return api.Image{}, fmt.Errorf("import image %q: %s: %w: %w", name, src, errdefs.ErrInvalid, err)
		}
		appliance, disk = &d, disks[0]
	case isTar(src):
		tmp, err := os.MkdirTemp(l.dir, ".ova-")
		if err != nil {
			return api.Image{}, fmt.Errorf("import image %q: %w", name, err)
		}
		defer func() { _ = os.RemoveAll(tmp) }()
		d, disks, err := ovf.ReadOVA(ctx, src, tmp, st.Size())
		if err != nil {
			if errors.Is(err, ovf.ErrInvalid) {
				err = fmt.Errorf("%w: %w", errdefs.ErrInvalid, err)
			}
			return api.Image{}, fmt.Errorf("import image %q: %s: %w", name, src, err)
		}
		appliance, disk = &d, disks[0]
	}
	if appliance != nil && len(appliance.Disks) > 1 {
		return api.Image{}, fmt.Errorf("import image %q: %s: %w: appliance %q has %d disks; a Lodge image holds one disk so far", name, src, errdefs.ErrInvalid, appliance.Name, len(appliance.Disks))
	}
	info, err := l.img.Info(ctx, disk)
	if err != nil {
		return api.Image{}, fmt.Errorf("import image %q: %w", name, err)
	}
	if !Formats[info.Format] {
		return api.Image{}, fmt.Errorf("import image %q: %s: %w: format %q is not supported (qcow2, raw, vpc, vhdx, vmdk, ova)", name, src, errdefs.ErrInvalid, info.Format)
	}
	if err := storage.CheckSelfContained(disk, info); err != nil {
		return api.Image{}, fmt.Errorf("import image %q: %s: %w: %w", name, src, errdefs.ErrInvalid, err)
	}
	if info.VirtualSize <= 0 {
		return api.Image{}, fmt.Errorf("import image %q: %s: %w: empty disk", name, src, errdefs.ErrInvalid)
	}
	r := api.Image{Name: name, SourceFormat: info.Format}
	if appliance != nil {
		r.SourceFormat = "ova/" + info.Format
		if strings.EqualFold(filepath.Ext(src), ".ovf") {
			r.SourceFormat = "ovf/" + info.Format
		}
		r.CPUs, r.Memory = appliance.CPUs, appliance.Memory
	}
	return l.add(ctx, r, "import", func(ctx context.Context, tmp string) error {
		return l.img.ConvertProgress(ctx, disk, info.Format, tmp, progress)
	})
}

// isTar reports whether path is a POSIX tar archive, as an OVA is.
func isTar(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer func() { _ = f.Close() }()
	magic := make([]byte, 5)
	if _, err := f.ReadAt(magic, 257); err != nil {
		return false
	}
	return string(magic) == "ustar"
}

// add creates image r: it records the intent, has fill write the disk
// under a temporary name, then makes it read-only and renames it into
// place. Whatever fails or is cancelled leaves no trace, and a crash is
// undone by Recover.
func (l *Library) add(ctx context.Context, img api.Image, verb string, fill func(ctx context.Context, tmp string) error) (api.Image, error) {
	name := img.Name
	dir := filepath.Join(l.dir, name)
	img.Path, img.Format, img.CreatedAt = filepath.Join(dir, "disk.qcow2"), "qcow2", time.Now().UTC()
	r := record{Image: img, Importing: true}
	err := l.store.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(bucket, name); err == nil {
			return fmt.Errorf("image %q: %w", name, errdefs.ErrExists)
		}
		return store.PutJSON(tx, bucket, name, r)
	})
	if err != nil {
		return api.Image{}, err
	}
	fail := func(err error) (api.Image, error) {
		_ = os.RemoveAll(dir)
		_ = l.store.Update(context.WithoutCancel(ctx), func(tx store.Tx) error { return tx.Delete(bucket, name) })
		return api.Image{}, fmt.Errorf("%s image %q: %w", verb, name, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail(err)
	}
	tmp := filepath.Join(dir, ".disk.qcow2.tmp")
	if err := fill(ctx, tmp); err != nil {
		return fail(err)
	}
	if err := os.Chmod(tmp, 0o444); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, r.Path); err != nil {
		return fail(err)
	}
	out, err := l.img.Info(ctx, r.Path)
	if err != nil {
		return fail(err)
	}
	r.ActualSize, r.VirtualSize, r.Importing = out.ActualSize, out.VirtualSize, false
	if err := l.store.Update(ctx, func(tx store.Tx) error { return store.PutJSON(tx, bucket, name, r) }); err != nil {
		return fail(err)
	}
	l.log.Info(verb, "image", name, "parent", r.Parent, "size", r.VirtualSize)
	return l.Get(ctx, name)
}

// Delete removes an image that no VM uses.
func (l *Library) Delete(ctx context.Context, name string) error {
	unlock, err := l.lock(name, "delete")
	if err != nil {
		return err
	}
	defer unlock()
	img, err := l.Get(ctx, name)
	if err != nil {
		return err
	}
	if len(img.UsedBy) > 0 || len(img.Children) > 0 {
		return fmt.Errorf("image %q: %w: %s depend on it: delete them first, or flatten the images", name, errdefs.ErrInUse, dependents(img))
	}
	if err := os.RemoveAll(filepath.Join(l.dir, name)); err != nil {
		return fmt.Errorf("delete image %q: %w", name, err)
	}
	return l.store.Update(ctx, func(tx store.Tx) error { return tx.Delete(bucket, name) })
}

func dependents(img api.Image) string {
	var parts []string
	if len(img.UsedBy) > 0 {
		parts = append(parts, "vm "+strings.Join(img.UsedBy, ", "))
	}
	if len(img.Children) > 0 {
		parts = append(parts, "image "+strings.Join(img.Children, ", "))
	}
	return strings.Join(parts, " and ")
}

// Recover removes imports and publishes a crash interrupted, and finishes
// flattens.
func (l *Library) Recover(ctx context.Context) error {
	var recs []record
	if err := l.store.View(ctx, func(tx store.Tx) error {
		var err error
		recs, err = store.ListJSON[record](tx, bucket)
		return err
	}); err != nil {
		return err
	}
	for _, r := range recs {
		if !r.Importing {
			if err := l.recoverFlatten(ctx, r); err != nil {
				return err
			}
			continue
		}
		l.log.Warn("removing interrupted import or publish", "image", r.Name)
		_ = os.RemoveAll(filepath.Join(l.dir, r.Name))
		if err := l.store.Update(ctx, func(tx store.Tx) error { return tx.Delete(bucket, r.Name) }); err != nil {
			return err
		}
	}
	return nil
}

// First returns the path of some image, for the accelerator probe.
func (l *Library) First(ctx context.Context) string {
	imgs, err := l.List(ctx)
	if err != nil || len(imgs) == 0 {
		return ""
	}
	return imgs[0].Path
}
