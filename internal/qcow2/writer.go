// Package qcow2 writes new qcow2 images directly, without QEMU, for the
// one case where that pays: filling a fresh, standalone disk from a
// stream (a bundle import). Going through qemu-nbd costs a socket copy
// and a metadata update per cluster, and caps the write rate at what one
// qemu-nbd thread manages; here data goes straight to the file and the
// metadata is written once, at the end.
//
// The image is a plain qcow2 version 3 with 64 KiB clusters and 16-bit
// refcounts: no backing file, no compression, no encryption, no
// snapshots. QEMU reads it like any other.
package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

const (
	clusterBits = 16
	clusterSize = 1 << clusterBits
	l2Entries   = clusterSize / 8
	// refcountOrder 4: 16-bit refcounts, QEMU's default.
	refcountOrder     = 4
	refcountsPerBlock = clusterSize * 8 / (1 << refcountOrder)
	headerLength      = 104
	copiedFlag        = uint64(1) << 63
	// MaxSize bounds the virtual size: far beyond any disk Lodge makes,
	// and small enough that the L1 table fits in memory.
	MaxSize = 64 << 40
)

// Writer fills a new qcow2 image. WriteAt may be called from several
// goroutines at once, at any offsets, as often as wanted; Close writes the
// metadata and syncs. Until Close the file is not a valid image.
type Writer struct {
	f    *os.File
	size int64

	mu     sync.Mutex
	l2     map[int64][]uint64 // L1 index → the L2 table's entries
	next   int64              // next free host cluster
	closed bool
	// dirty counts bytes written since writeback was last started.
	dirty atomic.Int64
}

// writebackEvery is how much is written before the kernel is asked to
// start writing it out, so that the sync in Close has little left to do.
const writebackEvery = 64 << 20

// Create makes a new image file at path (which must not exist) for a
// disk of size bytes.
func Create(path string, size int64) (*Writer, error) {
	if size <= 0 || size > MaxSize || size%512 != 0 {
		return nil, fmt.Errorf("qcow2 %s: size %d is not a positive multiple of 512 up to %d", path, size, int64(MaxSize))
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	// Cluster 0 holds the header, written last.
	return &Writer{f: f, size: size, l2: map[int64][]uint64{}, next: 1}, nil
}

// Size is the disk's virtual size.
func (w *Writer) Size() int64 { return w.size }

// hostClusters returns where guest clusters first..last live in the
// file, giving those without a place the next free clusters, in order, so
// that a run of new guest clusters is a run in the file too.
func (w *Writer) hostClusters(first, last int64) ([]int64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil, errors.New("qcow2: write after close")
	}
	out := make([]int64, 0, last-first+1)
	for c := first; c <= last; c++ {
		t := w.l2[c/l2Entries]
		if t == nil {
			t = make([]uint64, l2Entries)
			w.l2[c/l2Entries] = t
		}
		if t[c%l2Entries] == 0 {
			t[c%l2Entries] = uint64(w.next*clusterSize) | copiedFlag
			w.next++
		}
		out = append(out, int64(t[c%l2Entries]&^copiedFlag))
	}
	return out, nil
}

// WriteAt writes guest data at guest offset off. Regions never written
// read as zeros.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > w.size-int64(len(p)) {
		return 0, fmt.Errorf("qcow2 %s: write of %d bytes at %d is outside the %d-byte disk", w.f.Name(), len(p), off, w.size)
	}
	if len(p) == 0 {
		return 0, nil
	}
	first, last := off/clusterSize, (off+int64(len(p))-1)/clusterSize
	hosts, err := w.hostClusters(first, last)
	if err != nil {
		return 0, err
	}
	// One write per run of clusters that are adjacent in the file.
	done := 0
	for i := 0; i < len(hosts); {
		j := i + 1
		for j < len(hosts) && hosts[j] == hosts[j-1]+clusterSize {
			j++
		}
		at := off + int64(done)
		end := min(off+int64(len(p)), (first+int64(j))*clusterSize)
		n := int(end - at)
		if _, err := w.f.WriteAt(p[done:done+n], hosts[i]+at%clusterSize); err != nil {
			return done, fmt.Errorf("qcow2 %s: %w", w.f.Name(), err)
		}
		done += n
		i = j
	}
	if w.dirty.Add(int64(done)) >= writebackEvery {
		w.dirty.Store(0)
		// Start writeback of everything dirty without waiting for it;
		// a filesystem that cannot is simply left to Close's sync.
		_ = unix.SyncFileRange(int(w.f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
	return done, nil
}

// Close writes the L2 tables, the L1 table, the refcounts and the header,
// and syncs the file. Only then is it a valid image.
func (w *Writer) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	w.mu.Unlock()
	err := w.finish()
	if cerr := w.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("qcow2 %s: %w", w.f.Name(), cerr)
	}
	return err
}

// Abort closes the file without making it an image; the caller removes it.
func (w *Writer) Abort() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	_ = w.f.Close()
}

func (w *Writer) finish() error {
	name := w.f.Name()
	l1Size := (w.size + clusterSize*l2Entries - 1) / (clusterSize * l2Entries)
	l1 := make([]uint64, l1Size)
	// L2 tables go after the data, in L1 order.
	buf := make([]byte, clusterSize)
	for i := int64(0); i < l1Size; i++ {
		t := w.l2[i]
		if t == nil {
			continue
		}
		for j, e := range t {
			binary.BigEndian.PutUint64(buf[j*8:], e)
		}
		at := w.next * clusterSize
		if _, err := w.f.WriteAt(buf, at); err != nil {
			return fmt.Errorf("qcow2 %s: write L2 table: %w", name, err)
		}
		l1[i] = uint64(at) | copiedFlag
		w.next++
	}
	l1Clusters := (l1Size*8 + clusterSize - 1) / clusterSize
	l1Off := w.next * clusterSize
	l1Buf := make([]byte, l1Clusters*clusterSize)
	for i, e := range l1 {
		binary.BigEndian.PutUint64(l1Buf[i*8:], e)
	}
	if _, err := w.f.WriteAt(l1Buf, l1Off); err != nil {
		return fmt.Errorf("qcow2 %s: write L1 table: %w", name, err)
	}
	w.next += l1Clusters

	// The refcount structures count themselves: grow them until they
	// cover every cluster, their own included.
	used := w.next
	var blocks, tableClusters int64
	for {
		total := used + blocks + tableClusters
		nb := (total + refcountsPerBlock - 1) / refcountsPerBlock
		nt := (nb*8 + clusterSize - 1) / clusterSize
		if nb == blocks && nt == tableClusters {
			break
		}
		blocks, tableClusters = nb, nt
	}
	total := used + blocks + tableClusters
	tableOff := used * clusterSize
	blocksOff := tableOff + tableClusters*clusterSize
	table := make([]byte, tableClusters*clusterSize)
	for b := int64(0); b < blocks; b++ {
		binary.BigEndian.PutUint64(table[b*8:], uint64(blocksOff+b*clusterSize))
	}
	if _, err := w.f.WriteAt(table, tableOff); err != nil {
		return fmt.Errorf("qcow2 %s: write refcount table: %w", name, err)
	}
	// Every cluster up to total is in use exactly once.
	for b := int64(0); b < blocks; b++ {
		clear(buf)
		for i := int64(0); i < refcountsPerBlock; i++ {
			if b*refcountsPerBlock+i >= total {
				break
			}
			binary.BigEndian.PutUint16(buf[i*2:], 1)
		}
		if _, err := w.f.WriteAt(buf, blocksOff+b*clusterSize); err != nil {
			return fmt.Errorf("qcow2 %s: write refcounts: %w", name, err)
		}
	}
	// The data and metadata must be on disk before the header that makes
	// them an image.
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("qcow2 %s: sync: %w", name, err)
	}
	h := make([]byte, clusterSize)
	be := binary.BigEndian
	copy(h, "QFI\xfb")
	be.PutUint32(h[4:], 3)
	be.PutUint32(h[20:], clusterBits)
	be.PutUint64(h[24:], uint64(w.size))
	be.PutUint32(h[36:], uint32(l1Size))
	be.PutUint64(h[40:], uint64(l1Off))
	be.PutUint64(h[48:], uint64(tableOff))
	be.PutUint32(h[56:], uint32(tableClusters))
	be.PutUint32(h[96:], refcountOrder)
	be.PutUint32(h[100:], headerLength)
	// An end-of-extensions marker (type 0, length 0) follows the header:
	// the cluster is already zero there.
	if _, err := w.f.WriteAt(h, 0); err != nil {
		return fmt.Errorf("qcow2 %s: write header: %w", name, err)
	}
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("qcow2 %s: sync: %w", name, err)
	}
	return nil
}
