package backup

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// ChunkSize is how much of a disk one chunk holds in a repository made by
// Init. Larger chunks deduplicate worse and make an incremental backup
// read and store a whole chunk for each small change in it (4 MiB, as
// Proxmox uses, stored twice the data libvirt copies for scattered 4 MiB
// writes); smaller ones cost more files and syscalls per gigabyte.
const ChunkSize = 1 << 20

const (
	repoFormat = 1
	markerName = "lodge-repo.json"

	// The bounds Open accepts for a repository's chunk size. The floor
	// keeps a chunk a whole number of sectors; the ceiling bounds what a
	// damaged or hostile chunk file can make the reader allocate.
	minChunkSize = 4 << 10
	maxChunkSize = 16 << 20

	dirChunks  = "chunks"
	dirBackups = "backups"
	dirWriters = "writers"
	dirTmp     = "tmp"
	gcLockName = "gc.lock"
)

// Repo is an open backup repository. It holds no state that can go stale,
// so any number of goroutines and processes may use one directory.
type Repo struct {
	path      string
	id        string
	chunkSize int

	// raw holds buffers of chunkSize capacity, reused because a fresh
	// slice per chunk is zeroed by the runtime first.
	raw sync.Pool

	direct directState
}

type repoConfig struct {
	Format    int       `json:"format"`
	ID        string    `json:"id"`
	ChunkSize int       `json:"chunk_size"`
	CreatedAt time.Time `json:"created_at"`
}

// Init makes a repository at path, which must be missing or an empty
// directory. A directory holding a repository already gives ErrExists.
func Init(path string) (*Repo, error) {
	return initRepo(path, ChunkSize)
}

// initRepo lets tests make repositories with small chunks, which keeps
// them fast while still cutting disks into many chunks.
func initRepo(path string, chunkSize int) (*Repo, error) {
	if path == "" {
		return nil, fmt.Errorf("init backup repository: %w: no path given", errdefs.ErrInvalid)
	}
	if !validChunkSize(chunkSize) {
		return nil, fmt.Errorf("init backup repository %q: %w: chunk size %d", path, errdefs.ErrInvalid, chunkSize)
	}
	path = filepath.Clean(path)
	fi, err := os.Stat(path)
	switch {
	case err == nil && !fi.IsDir():
		return nil, fmt.Errorf("init backup repository %q: %w: not a directory", path, errdefs.ErrInvalid)
	case err == nil:
		entries, err := os.ReadDir(path)
		if err != nil {
			return nil, fmt.Errorf("init backup repository %q: %w", path, err)
		}
		for _, e := range entries {
			if e.Name() == markerName {
				return nil, fmt.Errorf("init backup repository %q: %w", path, errdefs.ErrExists)
			}
		}
		// What an Init cut short leaves behind is no reason to refuse:
		// the marker is written last, so its absence means nothing here
		// was ever used.
		for _, e := range entries {
			switch e.Name() {
			case dirChunks, dirBackups, dirWriters, dirTmp, gcLockName:
				continue
			}
			return nil, fmt.Errorf("init backup repository %q: %w: not empty and not a lodge backup repository", path, errdefs.ErrInvalid)
		}
	case errors.Is(err, fs.ErrNotExist):
		if err := os.MkdirAll(path, 0o700); err != nil {
			return nil, fmt.Errorf("init backup repository %q: %w", path, err)
		}
		if err := syncDir(filepath.Dir(path)); err != nil {
			return nil, fmt.Errorf("init backup repository %q: %w", path, err)
		}
	default:
		return nil, fmt.Errorf("init backup repository %q: %w", path, err)
	}

	for _, d := range []string{dirTmp, dirBackups, dirWriters, dirChunks} {
		if err := mkdir(filepath.Join(path, d)); err != nil {
			return nil, fmt.Errorf("init backup repository %q: %w", path, err)
		}
	}
	// All 256 fan-out directories exist from the start, so storing a
	// chunk never has to create one (and sync its parent).
	for i := range 256 {
		if err := mkdir(filepath.Join(path, dirChunks, fmt.Sprintf("%02x", i))); err != nil {
			return nil, fmt.Errorf("init backup repository %q: %w", path, err)
		}
	}
	for _, d := range []string{filepath.Join(path, dirChunks), path} {
		if err := syncDir(d); err != nil {
			return nil, fmt.Errorf("init backup repository %q: %w", path, err)
		}
	}

	cfg := repoConfig{Format: repoFormat, ID: randomHex(16), ChunkSize: chunkSize, CreatedAt: time.Now().UTC()}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("init backup repository %q: %w", path, err)
	}
	b = append(b, '\n')
	err = writeFileAtomic(filepath.Join(path, dirTmp), filepath.Join(path, markerName), b, true)
	if errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("init backup repository %q: %w", path, errdefs.ErrExists)
	}
	if err != nil {
		return nil, fmt.Errorf("init backup repository %q: %w", path, err)
	}
	return newRepo(path, cfg), nil
}

// Open opens the repository at path.
func Open(path string) (*Repo, error) {
	if path == "" {
		return nil, fmt.Errorf("open backup repository: %w: no path given", errdefs.ErrInvalid)
	}
	path = filepath.Clean(path)
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("open backup repository %q: %w", path, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("open backup repository %q: %w", path, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("open backup repository %q: %w: not a directory", path, errdefs.ErrInvalid)
	}
	b, err := os.ReadFile(filepath.Join(path, markerName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("open backup repository %q: %w: not a lodge backup repository (no %s)", path, errdefs.ErrInvalid, markerName)
	}
	if err != nil {
		return nil, fmt.Errorf("open backup repository %q: %w", path, err)
	}
	var cfg repoConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("open backup repository %q: %w: %s: %w", path, errdefs.ErrInvalid, markerName, err)
	}
	switch {
	case cfg.Format != repoFormat:
		return nil, fmt.Errorf("open backup repository %q: %w: format %d; this lodge reads format %d", path, errdefs.ErrInvalid, cfg.Format, repoFormat)
	case !validChunkSize(cfg.ChunkSize):
		return nil, fmt.Errorf("open backup repository %q: %w: chunk size %d out of range", path, errdefs.ErrInvalid, cfg.ChunkSize)
	case !validRepoID(cfg.ID):
		return nil, fmt.Errorf("open backup repository %q: %w: bad repository id %q", path, errdefs.ErrInvalid, cfg.ID)
	}
	for _, d := range []string{dirChunks, dirBackups} {
		if fi, err := os.Stat(filepath.Join(path, d)); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("open backup repository %q: %w: damaged: %s/ is missing", path, errdefs.ErrInvalid, d)
		}
	}
	return newRepo(path, cfg), nil
}

func newRepo(path string, cfg repoConfig) *Repo {
	r := &Repo{path: path, id: cfg.ID, chunkSize: cfg.ChunkSize}
	r.raw.New = func() any { return make([]byte, r.chunkSize) }
	return r
}

// Path is the repository's directory.
func (r *Repo) Path() string { return r.path }

// ID is the repository's random identity, which tells copies of one
// repository from the repository itself.
func (r *Repo) ID() string { return r.id }

// ChunkSize is how much of a disk one chunk of this repository holds:
// what chunk indices in DiskInput.Read count in.
func (r *Repo) ChunkSize() int { return r.chunkSize }

// Usage counts the chunk files and the bytes they take.
func (r *Repo) Usage() (chunks int, bytes int64, err error) {
	err = r.walkChunks(func(_ Digest, _ string, fi fs.FileInfo) error {
		chunks++
		bytes += fi.Size()
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("backup repository %q: usage: %w", r.path, err)
	}
	return chunks, bytes, nil
}

// walkChunks calls fn for every chunk file, skipping anything in chunks/
// that is not named like one.
func (r *Repo) walkChunks(fn func(d Digest, path string, fi fs.FileInfo) error) error {
	top := filepath.Join(r.path, dirChunks)
	dirs, err := os.ReadDir(top)
	if err != nil {
		return err
	}
	for _, dir := range dirs {
		if !dir.IsDir() || len(dir.Name()) != 2 {
			continue
		}
		sub := filepath.Join(top, dir.Name())
		files, err := os.ReadDir(sub)
		if err != nil {
			return err
		}
		for _, f := range files {
			var d Digest
			name := f.Name()
			if !strings.HasPrefix(name, dir.Name()) || d.UnmarshalText([]byte(name)) != nil || d.IsZero() {
				continue
			}
			fi, err := f.Info()
			if errors.Is(err, fs.ErrNotExist) {
				continue // GC got there first
			}
			if err != nil {
				return err
			}
			if !fi.Mode().IsRegular() {
				continue
			}
			if err := fn(d, filepath.Join(sub, name), fi); err != nil {
				return err
			}
		}
	}
	return nil
}

func (r *Repo) chunkPath(d Digest) string {
	h := d.String()
	return filepath.Join(r.path, dirChunks, h[:2], h)
}

func (r *Repo) manifestPath(id string) string {
	return filepath.Join(r.path, dirBackups, id+".json")
}

func (r *Repo) tmpDir() string { return filepath.Join(r.path, dirTmp) }

// scratchDirs makes tmp/ and writers/ if someone cleaned them away by
// hand: they hold nothing that outlives a process, so that is no damage.
func (r *Repo) scratchDirs() error {
	for _, d := range []string{dirTmp, dirWriters} {
		if err := mkdir(filepath.Join(r.path, d)); err != nil {
			return err
		}
	}
	return nil
}

// chunkCount is how many chunks a disk of size bytes takes.
func (r *Repo) chunkCount(size int64) int64 {
	return chunkCount(size, r.chunkSize)
}

func chunkCount(size int64, chunkSize int) int64 {
	n := size / int64(chunkSize)
	if size%int64(chunkSize) != 0 {
		n++
	}
	return n
}

// chunkLen is the length of chunk i of a disk of size bytes: chunkSize,
// except for a short last chunk.
func chunkLen(size int64, chunkSize int, i int64) int {
	return int(min(int64(chunkSize), size-i*int64(chunkSize)))
}

func validChunkSize(n int) bool {
	return n >= minChunkSize && n <= maxChunkSize && n%minChunkSize == 0
}

func validRepoID(id string) bool {
	if len(id) < 8 || len(id) > 64 {
		return false
	}
	for _, c := range []byte(id) {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return hex.EncodeToString(b)
}

func mkdir(path string) error {
	err := os.Mkdir(path, 0o700)
	if errors.Is(err, fs.ErrExist) {
		return nil
	}
	return err
}

// syncDir makes renames and removals in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// writeFileAtomic puts data at dst so that dst is either missing or whole
// after a crash. With noReplace an existing dst fails with fs.ErrExist
// rather than being overwritten, which is what makes a manifest id taken
// once taken for good.
func writeFileAtomic(tmpDir, dst string, data []byte, noReplace bool) error {
	tmp, err := writeTemp(tmpDir, "w-", data)
	if err != nil {
		return err
	}
	if noReplace {
		err = renameNoReplace(tmp, dst)
	} else {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(dst))
}

// writeTemp writes data to a new synced file in dir and returns its path.
func writeTemp(dir, prefix string, data []byte) (string, error) {
	return writeTempSync(dir, prefix, data, true)
}

// writeTempSync is writeTemp that may leave the syncing to a later
// syncfs, for files written by the thousand. Such a file's writeback is
// started at once, without waiting for it: the disk then writes while
// the backup hashes and compresses what follows, and the syncfs at the
// end, which took a quarter of a full backup's time, has little left.
func writeTempSync(dir, prefix string, data []byte, sync bool) (string, error) {
	f, err := os.CreateTemp(dir, prefix+"*")
	if err != nil {
		return "", err
	}
	_, err = f.Write(data)
	switch {
	case err == nil && sync:
		err = f.Sync()
	case err == nil:
		// A filesystem that cannot is left to the syncfs.
		_ = unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// renameNoReplace renames from to to unless to exists. Not every
// filesystem a backup disk may carry can do that in one step, so it falls
// back to a hard link, then to a check before a plain rename (which only
// two processes committing one id in the same instant could race).
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	switch {
	case err == nil:
		return nil
	case !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EOPNOTSUPP):
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	err = os.Link(from, to)
	if err == nil {
		return os.Remove(from)
	}
	if errors.Is(err, fs.ErrExist) {
		return err
	}
	if _, err := os.Lstat(to); err == nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: unix.EEXIST}
	}
	return os.Rename(from, to)
}

// joinErrors is errors.Join on one line: these errors end up in one-line
// messages for people.
func joinErrors(errs ...error) error {
	var keep []error
	for _, e := range errs {
		if e != nil {
			keep = append(keep, e)
		}
	}
	switch len(keep) {
	case 0:
		return nil
	case 1:
		return keep[0]
	}
	return &multiError{errs: keep}
}

type multiError struct{ errs []error }

func (m *multiError) Error() string {
	parts := make([]string, len(m.errs))
	for i, e := range m.errs {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "; ")
}

func (m *multiError) Unwrap() []error { return m.errs }
