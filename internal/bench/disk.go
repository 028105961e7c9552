package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// Block sizes of the sequential and random disk tests.
const (
	seqBlock  = 1 << 20
	randBlock = 4 << 10
	// align is what O_DIRECT wants of buffers and offsets on any device
	// Lodge attaches (4 KiB logical blocks at most).
	align = 4 << 10
)

// diskTests measures sequential throughput and 4 KiB random IOPS (one
// request in flight) on c.DiskPath, with O_DIRECT so that the guest's
// page cache is out of the picture. The write tests come first: a read
// of blocks never written would be answered from the image's metadata
// without touching the disk.
func diskTests(ctx context.Context, c ProbeConfig) ([]Sample, error) {
	f, buffered, err := openDirect(c.DiskPath)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	area := c.DiskBytes / seqBlock * seqBlock
	buf := alignedBuffer(seqBlock)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	sample := func(test, unit string, v float64) Sample {
		return Sample{Test: test, Unit: unit, Value: v, Buffered: buffered}
	}
	var out []Sample

	// Sequential write: at least one whole pass over the area, so that
	// every later read finds data, then on until the duration is up; the
	// final flush is part of the time.
	start := time.Now()
	var written int64
	for off := int64(0); written < area || time.Since(start) < c.Duration; off = (off + seqBlock) % area {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			return nil, fmt.Errorf("probe: write %s at %d: %w", c.DiskPath, off, err)
		}
		written += seqBlock
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("probe: flush %s: %w", c.DiskPath, err)
	}
	out = append(out, sample(DiskSeqWrite, "MB/s", float64(written)/time.Since(start).Seconds()/1e6))

	n, secs, err := timed(ctx, c.Duration, func(i int64) error {
		off := i * seqBlock % area
		_, err := f.ReadAt(buf, off)
		return wrapIO("read", c.DiskPath, off, err)
	})
	if err != nil {
		return nil, err
	}
	out = append(out, sample(DiskSeqRead, "MB/s", float64(n*seqBlock)/secs/1e6))

	small := buf[:randBlock]
	blocks := uint64(area / randBlock)
	rng := uint64(0x9e3779b97f4a7c15)
	next := func() int64 {
		rng ^= rng << 13
		rng ^= rng >> 7
		rng ^= rng << 17
		return int64(rng%blocks) * randBlock
	}
	n, secs, err = timed(ctx, c.Duration, func(int64) error {
		off := next()
		_, err := f.WriteAt(small, off)
		return wrapIO("write", c.DiskPath, off, err)
	})
	if err != nil {
		return nil, err
	}
	// Random writes are flushed too, as a database would; the flush is
	// inside the time but not counted as an operation.
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("probe: flush %s: %w", c.DiskPath, err)
	}
	out = append(out, sample(DiskRandWrite4K, "IOPS", float64(n)/secs))

	n, secs, err = timed(ctx, c.Duration, func(int64) error {
		off := next()
		_, err := f.ReadAt(small, off)
		return wrapIO("read", c.DiskPath, off, err)
	})
	if err != nil {
		return nil, err
	}
	out = append(out, sample(DiskRandRead4K, "IOPS", float64(n)/secs))
	return out, nil
}

func wrapIO(op, path string, off int64, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("probe: %s %s at %d: %w", op, path, off, err)
}

// timed calls op with 0, 1, 2... until d has passed and returns the count
// and the seconds taken.
func timed(ctx context.Context, d time.Duration, op func(i int64) error) (int64, float64, error) {
	start := time.Now()
	var i int64
	for ; i == 0 || time.Since(start) < d; i++ {
		if err := ctx.Err(); err != nil {
			return 0, 0, err
		}
		if err := op(i); err != nil {
			return 0, 0, err
		}
	}
	return i, time.Since(start).Seconds(), nil
}

// openDirect opens path for direct I/O. A file system that refuses
// O_DIRECT (tmpfs) gets buffered I/O instead, and the caller is told.
func openDirect(path string) (*os.File, bool, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_DIRECT, 0o600)
	if errors.Is(err, syscall.EINVAL) {
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, false, fmt.Errorf("probe: open %s: %w", path, err)
		}
		return f, true, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("probe: open %s for direct I/O: %w", path, err)
	}
	return f, false, nil
}

// alignedBuffer returns n bytes starting on an align boundary, as
// O_DIRECT requires.
func alignedBuffer(n int) []byte {
	raw := make([]byte, n+align)
	shift := 0
	if rem := int(uintptr(unsafe.Pointer(&raw[0])) % align); rem != 0 {
		shift = align - rem
	}
	return raw[shift : shift+n]
}

// FindDisk returns the block device of exactly size bytes under sysfs
// (normally /sys/block), waiting up to wait for it to appear: how the
// probe finds the scratch disk Lodge plugged in, whatever its bus,
// without udev or serial numbers.
func FindDisk(ctx context.Context, sysfs string, size int64, wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		entries, err := os.ReadDir(sysfs)
		if err != nil {
			return "", fmt.Errorf("probe: find disk of %d bytes: %w", size, err)
		}
		for _, e := range entries {
			raw, err := os.ReadFile(filepath.Join(sysfs, e.Name(), "size"))
			if err != nil {
				continue
			}
			sectors, err := strconv.ParseInt(strings.TrimSpace(string(raw)), 10, 64)
			if err == nil && sectors*512 == size {
				return "/dev/" + e.Name(), nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("probe: no disk of %d bytes appeared in %s within %s", size, sysfs, wait)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// EvictOthers kills every other process whose command name is name (as
// /proc/PID/comm has it, under proc) and waits up to wait for them to
// go. A probe that a killed daemon left running in a guest would skew
// the next run and hold the memory it needs; guests need not have pkill.
func EvictOthers(proc, name string, wait time.Duration) (int, error) {
	entries, err := os.ReadDir(proc)
	if err != nil {
		return 0, fmt.Errorf("probe: list processes: %w", err)
	}
	self := os.Getpid()
	var victims []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		comm, err := os.ReadFile(filepath.Join(proc, e.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != name {
			continue
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			victims = append(victims, pid)
		}
	}
	deadline := time.Now().Add(wait)
	for _, pid := range victims {
		// A killed child of someone else lingers as a zombie until reaped,
		// but has let go of its memory: gone enough.
		for alive(proc, pid) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
	}
	return len(victims), nil
}

func alive(proc string, pid int) bool {
	raw, err := os.ReadFile(filepath.Join(proc, strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	// The state follows the command name in brackets: "123 (name) Z ...".
	i := strings.LastIndexByte(string(raw), ')')
	return i < 0 || i+2 >= len(raw) || raw[i+2] != 'Z'
}
