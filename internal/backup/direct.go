package backup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A backup's new chunks are written with O_DIRECT where the filesystem
// takes it. Through the page cache, the kernel's copy of a full backup's
// gigabyte into freshly allocated cache pages took more CPU than hashing
// it (46% of the samples of a full backup on a 2-CPU host), and all of it
// was still to be written by the syncfs at the end. A direct write hands
// the buffer to the disk instead. The syncfs still makes the files'
// metadata durable and flushes the disk's cache.

// directAlign is the alignment O_DIRECT asks of buffers, offsets and
// lengths: the page size, which every block size divides.
const directAlign = 4096

// errNoDirect means the filesystem refuses O_DIRECT (tmpfs, some FUSE and
// network filesystems); the caller writes through the page cache instead.
var errNoDirect = errors.New("O_DIRECT not supported")

// directState is what a Repo knows of direct writes to its filesystem.
type directState struct {
	refused atomic.Bool
	seq     atomic.Uint64
}

// alignedBuffer returns an empty slice whose array starts on a
// directAlign boundary and holds at least n bytes rounded up to it.
func alignedBuffer(n int) []byte {
	n = roundUp(n)
	b := make([]byte, n+directAlign)
	skip := (directAlign - int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))%directAlign)) % directAlign
	return b[skip : skip : skip+n]
}

func aligned(b []byte) bool {
	return uintptr(unsafe.Pointer(unsafe.SliceData(b)))%directAlign == 0
}

func roundUp(n int) int { return (n + directAlign - 1) &^ (directAlign - 1) }

// stageChunk writes a chunk's stored bytes to a new file in tmp/,
// unsynced, and returns its path.
func (r *Repo) stageChunk(stored []byte) (string, error) {
	if !r.direct.refused.Load() {
		path, err := r.writeDirect(stored)
		if !errors.Is(err, errNoDirect) {
			return path, err
		}
		r.direct.refused.Store(true)
	}
	return writeTempSync(r.tmpDir(), "chunk-", stored, false)
}

// writeDirect writes data to a new file in tmp/: its whole blocks with
// O_DIRECT, then the last partial block, if any, through the page cache.
// (Padding that block and cutting the file back to length instead made
// the filesystem read the block back from the disk first, half a
// millisecond per chunk.) data is copied first only if its array is not
// aligned.
func (r *Repo) writeDirect(data []byte) (string, error) {
	var fd int
	var path string
	for {
		path = filepath.Join(r.tmpDir(), fmt.Sprintf("chunk-d%d-%d", os.Getpid(), r.direct.seq.Add(1)))
		var err error
		fd, err = unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_DIRECT|unix.O_CLOEXEC, 0o600)
		switch {
		case errors.Is(err, unix.EEXIST):
			continue // left by an earlier process that had this pid
		case errors.Is(err, unix.EINVAL):
			return "", errNoDirect
		case err != nil:
			return "", &os.PathError{Op: "open", Path: path, Err: err}
		}
		break
	}
	whole := len(data) &^ (directAlign - 1)
	buf := data
	if !aligned(buf) {
		buf = append(alignedBuffer(len(data)), data...)
	}
	err := writeAll(fd, buf[:whole])
	if err == nil && whole < len(data) {
		var flags int
		if flags, err = unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err == nil {
			_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags&^unix.O_DIRECT)
		}
		if err == nil {
			err = writeAll(fd, buf[whole:])
		}
		if err == nil {
			// Its writeback starts now, not in the syncfs at commit.
			_ = unix.SyncFileRange(fd, int64(whole), 0, unix.SYNC_FILE_RANGE_WRITE)
		}
	}
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
		if errors.Is(err, unix.EINVAL) {
			// Opened, but the device wants a larger alignment.
			return "", errNoDirect
		}
		return "", &os.PathError{Op: "write", Path: path, Err: err}
	}
	return path, nil
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		// After a short write the rest starts unaligned; the next write
		// then says why it stopped (ENOSPC), or EINVAL.
		b = b[n:]
	}
	return nil
}
