// Package storage manages disk files: pools (directories, on any drive) and
// qcow2 volumes made and inspected through qemu-img. It stands alone: it
// knows nothing of VMs or of the store.
package storage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// dieWithParent ends a qemu-img whose daemon was killed, so a half-made
// copy that the next daemon removes is not still being written.
var dieWithParent = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}

// ErrUnsafeImage is returned for an image whose header points at other
// files (a backing file or an external data file): opening it would make
// QEMU read whatever path it names on this host.
var ErrUnsafeImage = errors.New("image refers to other files")

// Info is what qemu-img reports about one image file.
type Info struct {
	Filename        string `json:"filename"`
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	ActualSize      int64  `json:"actual-size"`
	BackingFilename string `json:"backing-filename,omitempty"`
	BackingFormat   string `json:"backing-filename-format,omitempty"`
	DirtyFlag       bool   `json:"dirty-flag,omitempty"`
	FormatSpecific  struct {
		Type string `json:"type"`
		Data struct {
			DataFile string `json:"data-file,omitempty"`
			// Extents are a VMDK's data files, which its text descriptor
			// may place anywhere.
			Extents []struct {
				Filename string `json:"filename"`
			} `json:"extents,omitempty"`
			// Bitmaps are a qcow2's persistent dirty bitmaps.
			Bitmaps []Bitmap `json:"bitmaps,omitempty"`
		} `json:"data"`
	} `json:"format-specific"`
}

// Bitmap is a persistent dirty bitmap as qemu-img reports it. The flag
// "in-use" on a file no QEMU has open means the QEMU that had it was
// killed before saving it: the bitmap no longer says anything.
type Bitmap struct {
	Name        string   `json:"name"`
	Flags       []string `json:"flags"`
	Granularity int64    `json:"granularity"`
}

// Inconsistent says whether the bitmap was left unsaved.
func (b Bitmap) Inconsistent() bool { return slices.Contains(b.Flags, "in-use") }

// QEMUImg runs qemu-img.
type QEMUImg struct {
	Binary string
	// InfoLimit bounds qemu-img info on untrusted files, which a crafted
	// header could otherwise keep busy or make allocate without end.
	InfoCPUSeconds int
	InfoMemory     int64
}

// NewQEMUImg returns a runner for the given binary (qemu-img if empty).
func NewQEMUImg(binary string) *QEMUImg {
	if binary == "" {
		binary = "qemu-img"
	}
	return &QEMUImg{Binary: binary, InfoCPUSeconds: 30, InfoMemory: 1 << 30}
}

func (q *QEMUImg) run(ctx context.Context, limited bool, args ...string) ([]byte, error) {
	name, argv := q.Binary, args
	if limited {
		if prlimit, err := exec.LookPath("prlimit"); err == nil {
			argv = append([]string{
				"--cpu=" + strconv.Itoa(q.InfoCPUSeconds),
				"--as=" + strconv.FormatInt(q.InfoMemory, 10),
				"--", q.Binary,
			}, args...)
			name = prlimit
		}
	}
	cmd := exec.CommandContext(ctx, name, argv...)
	cmd.WaitDelay = 5 * time.Second
	cmd.SysProcAttr = dieWithParent
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, imgError(args[0], stderr.String(), err)
	}
	return stdout.Bytes(), nil
}

// imgError names the qemu-img command and carries the first line of its
// own message, without the "qemu-img: " it repeats at the start.
func imgError(op, stderr string, err error) error {
	msg := strings.TrimPrefix(strings.TrimSpace(stderr), "qemu-img: ")
	if msg == "" {
		return fmt.Errorf("qemu-img %s: %w", op, err)
	}
	return fmt.Errorf("qemu-img %s: %s: %w", op, firstLine(msg), err)
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// Info inspects one file without following its backing chain, under CPU
// and memory limits, and without taking QEMU's lock (the file may be in
// use by a running VM).
func (q *QEMUImg) Info(ctx context.Context, path string) (Info, error) {
	out, err := q.run(ctx, true, "info", "--output=json", "--force-share", path)
	if err != nil {
		return Info{}, err
	}
	var info Info
	if err := json.Unmarshal(out, &info); err != nil {
		return Info{}, fmt.Errorf("qemu-img info %s: decode: %w", path, err)
	}
	return info, nil
}

// CheckSelfContained refuses an image at path that names other files: a
// backing file, an external data file, or a VMDK extent anywhere but a
// regular file beside the descriptor (split VMDKs keep their extents
// there, and nothing legitimate keeps them elsewhere).
func CheckSelfContained(path string, info Info) error {
	if info.BackingFilename != "" {
		return fmt.Errorf("%w: backing file %q", ErrUnsafeImage, info.BackingFilename)
	}
	if info.FormatSpecific.Data.DataFile != "" {
		return fmt.Errorf("%w: data file %q", ErrUnsafeImage, info.FormatSpecific.Data.DataFile)
	}
	dir := filepath.Dir(path)
	for _, e := range info.FormatSpecific.Data.Extents {
		f := e.Filename
		if !filepath.IsAbs(f) {
			f = filepath.Join(dir, f)
		}
		if f == path {
			continue
		}
		st, err := os.Lstat(f)
		if filepath.Dir(f) != dir || err != nil || !st.Mode().IsRegular() {
			return fmt.Errorf("%w: VMDK extent %q is not a file beside the descriptor", ErrUnsafeImage, e.Filename)
		}
	}
	return nil
}

// CreateOverlay makes a thin qcow2 at path on top of backing. size 0 keeps
// the backing file's size. With a size, the backing file is not opened:
// it may be a layer that a running QEMU holds, and the caller knows it.
// An existing file at path is never overwritten. An empty backing makes
// a standalone empty disk of size bytes.
func (q *QEMUImg) CreateOverlay(ctx context.Context, backing, path string, size int64) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("create overlay %s: %w", path, os.ErrExist)
	}
	if backing == "" {
		_, err := q.run(ctx, false, "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", path, strconv.FormatInt(size, 10))
		return err
	}
	args := []string{"create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-F", "qcow2", "-b", backing}
	if size > 0 {
		args = append(args, "-u", path, strconv.FormatInt(size, 10))
	} else {
		args = append(args, path)
	}
	_, err := q.run(ctx, false, args...)
	return err
}

// CopyTop writes the clusters of src's own layer (not those of its backing
// chain) into a new qcow2 at dst whose backing file is backing, which must
// hold what src's backing file holds.
func (q *QEMUImg) CopyTop(ctx context.Context, src, backing, dst string) error {
	_, err := q.run(ctx, false, "convert", "-f", "qcow2", "-O", "qcow2", "-o", "cluster_size=64k", "-B", backing, "-F", "qcow2", src, dst)
	return err
}

// Rebase points path at a new backing file, first writing into path every
// cluster where the old chain and the new one differ, so what the guest
// sees does not change.
func (q *QEMUImg) Rebase(ctx context.Context, path, backing string) error {
	args := []string{"rebase", "-f", "qcow2", "-b", backing}
	if backing != "" {
		args = append(args, "-F", "qcow2")
	}
	_, err := q.run(ctx, false, append(args, path)...)
	return err
}

// HasData reports whether path's own layer holds any cluster, written
// data or written zeroes, over its backing chain.
func (q *QEMUImg) HasData(ctx context.Context, path string) (bool, error) {
	out, err := q.run(ctx, false, "map", "--output=json", "-f", "qcow2", "--force-share", path)
	if err != nil {
		return false, err
	}
	var extents []struct {
		Depth   int  `json:"depth"`
		Present bool `json:"present"`
	}
	if err := json.Unmarshal(out, &extents); err != nil {
		return false, fmt.Errorf("qemu-img map %s: decode: %w", path, err)
	}
	for _, e := range extents {
		if e.Depth == 0 && e.Present {
			return true, nil
		}
	}
	return false, nil
}

// Create makes an empty thin qcow2.
func (q *QEMUImg) Create(ctx context.Context, path string, size int64) error {
	_, err := q.run(ctx, false, "create", "-q", "-f", "qcow2", path, strconv.FormatInt(size, 10))
	return err
}

// Resize grows the qcow2 at path to size bytes. The new end reads as
// zeros and takes no room until written.
func (q *QEMUImg) Resize(ctx context.Context, path string, size int64) error {
	_, err := q.run(ctx, false, "resize", "-q", "-f", "qcow2", path, strconv.FormatInt(size, 10))
	return err
}

// ConvertProgress copies src (of the given format) into a new qcow2 at dst,
// reporting progress as a fraction (0..1) if progress is not nil. Holes and
// zero runs stay unallocated.
func (q *QEMUImg) ConvertProgress(ctx context.Context, src, srcFormat, dst string, progress func(float64)) error {
	// -W lets the copy coroutines write out of order: the target is new
	// and unseen until renamed, so order does not matter, and it is faster.
	cmd := exec.CommandContext(ctx, q.Binary, "convert", "-p", "-W", "-f", srcFormat, "-O", "qcow2", "-o", "cluster_size=64k", src, dst)
	cmd.WaitDelay = 5 * time.Second
	cmd.SysProcAttr = dieWithParent
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("qemu-img convert: %w", err)
	}
	// qemu-img -p rewrites one line: "    (12.34/100%)\r".
	buf := make([]byte, 256)
	for {
		n, rerr := out.Read(buf)
		if n > 0 && progress != nil {
			chunk := string(buf[:n])
			if i := strings.LastIndexByte(chunk, '('); i >= 0 {
				if j := strings.Index(chunk[i:], "/100%"); j > 0 {
					if f, perr := strconv.ParseFloat(chunk[i+1:i+j], 64); perr == nil {
						progress(f / 100)
					}
				}
			}
		}
		if rerr != nil {
			break
		}
	}
	if err := cmd.Wait(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return imgError("convert", stderr.String(), err)
	}
	return nil
}

// SetBacking records backing as path's backing file without reading
// either (qemu-img rebase -u): for a layer whose data already is what it
// must be over that backing file, such as one just received whole.
func (q *QEMUImg) SetBacking(ctx context.Context, path, backing string) error {
	args := []string{"rebase", "-u", "-f", "qcow2", "-b", backing}
	if backing != "" {
		args = append(args, "-F", "qcow2")
	}
	_, err := q.run(ctx, true, append(args, path)...)
	return err
}

// Chain describes path and every file under it, top first, as qemu-img
// info --backing-chain does. It reads headers only, so it is safe on
// files a running QEMU has open.
func (q *QEMUImg) Chain(ctx context.Context, path string) ([]Info, error) {
	out, err := q.run(ctx, true, "info", "--output=json", "--force-share", "--backing-chain", path)
	if err != nil {
		return nil, err
	}
	var chain []Info
	if err := json.Unmarshal(out, &chain); err != nil {
		return nil, fmt.Errorf("qemu-img info --backing-chain %s: decode: %w", path, err)
	}
	return chain, nil
}

// AddBitmap adds a persistent dirty bitmap to the qcow2 at path, which
// from then on records every cluster written to it.
func (q *QEMUImg) AddBitmap(ctx context.Context, path, name string) error {
	_, err := q.run(ctx, false, "bitmap", "--add", "-f", "qcow2", path, name)
	return err
}

// RemoveBitmap removes one.
func (q *QEMUImg) RemoveBitmap(ctx context.Context, path, name string) error {
	_, err := q.run(ctx, false, "bitmap", "--remove", "-f", "qcow2", path, name)
	return err
}

// Check runs qemu-img check on one file, without its backing chain,
// under the same limits as Info: a crafted image's metadata is refused
// rather than trusted.
func (q *QEMUImg) Check(ctx context.Context, path string) error {
	spec, err := json.Marshal(map[string]any{
		"driver": "qcow2", "backing": nil,
		"file": map[string]any{"driver": "file", "filename": path},
	})
	if err != nil {
		return err
	}
	_, err = q.run(ctx, true, "check", "-q", "-U", "json:"+string(spec))
	return err
}

// DataExtents lists the regions of an ordinary file that hold data, from
// the filesystem's own map (SEEK_DATA/SEEK_HOLE), each widened to whole
// 512-byte blocks. A filesystem without that map reports the whole file.
func DataExtents(f *os.File) ([][2]int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := fi.Size()
	var out [][2]int64
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return [][2]int64{{0, size}}, nil //nolint:nilerr // no map: the whole file is data
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		start, end := data&^511, min((hole+511)&^511, (size+511)&^511)
		if n := len(out); n > 0 && out[n-1][0]+out[n-1][1] >= start {
			out[n-1][1] = end - out[n-1][0]
		} else {
			out = append(out, [2]int64{start, end - start})
		}
		off = hole
	}
	return out, nil
}
