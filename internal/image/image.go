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
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
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
	var r record
	err := l.store.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, bucket, name, &r) })
	if errors.Is(err, store.ErrNotFound) || (err == nil && r.Importing) {
		return api.Image{}, fmt.Errorf("image %q: %w (see lodge image list)", name, errdefs.ErrNotFound)
	}
	if err != nil {
		return api.Image{}, err
	}
	return l.withUsers(ctx, r.Image)
}

func (l *Library) withUsers(ctx context.Context, img api.Image) (api.Image, error) {
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
	var recs []record
	err := l.store.View(ctx, func(tx store.Tx) error {
		var err error
		recs, err = store.ListJSON[record](tx, bucket)
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, 0, len(recs))
	for _, r := range recs {
		if r.Importing {
			continue
		}
		img, err := l.withUsers(ctx, r.Image)
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
// explicitly so it is never probed again later. progress gets 0..1.
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
	info, err := l.img.Info(ctx, src)
	if err != nil {
		return api.Image{}, fmt.Errorf("import image %q: %w", name, err)
	}
	if !Formats[info.Format] {
		return api.Image{}, fmt.Errorf("import image %q: %s: %w: format %q is not supported (qcow2, raw, vpc, vhdx, vmdk)", name, src, errdefs.ErrInvalid, info.Format)
	}
	if err := storage.CheckSelfContained(info); err != nil {
		return api.Image{}, fmt.Errorf("import image %q: %s: %w: %w", name, src, errdefs.ErrInvalid, err)
	}
	if info.VirtualSize <= 0 {
		return api.Image{}, fmt.Errorf("import image %q: %s: %w: empty disk", name, src, errdefs.ErrInvalid)
	}
	dir := filepath.Join(l.dir, name)
	dst := filepath.Join(dir, "disk.qcow2")
	r := record{Image: api.Image{Name: name, Path: dst, Format: "qcow2", SourceFormat: info.Format, VirtualSize: info.VirtualSize, CreatedAt: time.Now().UTC()}, Importing: true}
	err = l.store.Update(ctx, func(tx store.Tx) error {
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
		return api.Image{}, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail(fmt.Errorf("import image %q: %w", name, err))
	}
	tmp := filepath.Join(dir, ".disk.qcow2.tmp")
	if err := l.img.ConvertProgress(ctx, src, info.Format, tmp, progress); err != nil {
		return fail(fmt.Errorf("import image %q: %w", name, err))
	}
	if err := os.Chmod(tmp, 0o444); err != nil {
		return fail(fmt.Errorf("import image %q: %w", name, err))
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fail(fmt.Errorf("import image %q: %w", name, err))
	}
	out, err := l.img.Info(ctx, dst)
	if err != nil {
		return fail(fmt.Errorf("import image %q: %w", name, err))
	}
	r.ActualSize, r.Importing = out.ActualSize, false
	if err := l.store.Update(ctx, func(tx store.Tx) error { return store.PutJSON(tx, bucket, name, r) }); err != nil {
		return fail(err)
	}
	l.log.Info("imported", "image", name, "from", src, "format", info.Format, "size", info.VirtualSize)
	return l.withUsers(ctx, r.Image)
}

// Delete removes an image that no VM uses.
func (l *Library) Delete(ctx context.Context, name string) error {
	img, err := l.Get(ctx, name)
	if err != nil {
		return err
	}
	if len(img.UsedBy) > 0 {
		return fmt.Errorf("image %q: %w by vm %v: delete those first", name, errdefs.ErrInUse, img.UsedBy)
	}
	if err := os.RemoveAll(filepath.Join(l.dir, name)); err != nil {
		return fmt.Errorf("delete image %q: %w", name, err)
	}
	return l.store.Update(ctx, func(tx store.Tx) error { return tx.Delete(bucket, name) })
}

// Recover removes imports a crash interrupted.
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
		if r.Importing {
			l.log.Warn("removing interrupted import", "image", r.Name)
			_ = os.RemoveAll(filepath.Join(l.dir, r.Name))
			if err := l.store.Update(ctx, func(tx store.Tx) error { return tx.Delete(bucket, r.Name) }); err != nil {
				return err
			}
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
