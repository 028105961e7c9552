package qcow2

// The reader below serves backups and exports of stopped VMs. Going
// through qemu-nbd costs a socket copy and caps throughput at one
// qemu-nbd thread; reading the files directly lets many goroutines pread
// from the page cache at once. The price is that every byte must come out
// as QEMU would produce it, so anything not fully understood is refused
// with ErrUnsupported and the caller reads through QEMU instead.

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/klauspost/compress/zstd"
)

// ErrUnsupported means the image uses a feature this reader does not read;
// the caller should read it through QEMU instead.
var ErrUnsupported = errors.New("not supported by the direct qcow2 reader")

// errCorrupt marks metadata that QEMU itself would refuse to read (it
// answers EIO): the image is damaged, and falling back to QEMU would not
// help.
var errCorrupt = errors.New("corrupt image")

// Extent is a range of guest bytes.
type Extent struct{ Offset, Length int64 }

// Reader reads a disk image and its backing chain straight from the files.
// It never writes to them.
type Reader struct {
	layers []*layer // the top image first, then its backing files in order
}

const (
	minClusterBits = 9
	maxClusterBits = 21
	// QEMU's limits on the L1 table, the refcount table and the number of
	// internal snapshots: an image beyond them does not open in QEMU.
	maxL1Bytes       = 32 << 20
	maxRefTableBytes = 8 << 20
	maxSnapshots     = 65536
	snapshotHdrBytes = 40
	// maxBackingName is QEMU's bound on the backing file name.
	maxBackingName = 1023
	// maxBackingFormat is QEMU's buffer for the backing format, NUL
	// included.
	maxBackingFormat = 16
	// l2CacheBytes bounds each layer's L2 table cache. At 64 KiB clusters
	// it covers 128 GiB of guest disk, far more than a sequential reader
	// revisits.
	l2CacheBytes = 16 << 20
	// zstdMaxWindow is libzstd's default decoder limit, which QEMU keeps.
	zstdMaxWindow = 1 << 27
)

const (
	incompatDirty       = 1 << 0
	incompatCorrupt     = 1 << 1
	incompatDataFile    = 1 << 2
	incompatCompression = 1 << 3
	incompatExtendedL2  = 1 << 4

	compressionDeflate = 0
	compressionZstd    = 1

	l2Compressed = uint64(1) << 62
	l2Zero       = uint64(1)
	// entryOffsetMask keeps bits 9-55: L1 entries and standard L2 entries
	// hold a host offset there. QEMU ignores the other bits when reading.
	entryOffsetMask = uint64(0x00fffffffffffe00)

	extEnd          = 0
	extCryptoHeader = 0x0537be77
)

// layer is one file of the chain: a qcow2 image or a raw file.
type layer struct {
	path     string
	f        *os.File
	info     os.FileInfo
	fileSize int64
	// size is the virtual size as QEMU computes it; reads at or past it
	// return zeros, which is what a backing file shorter than the image
	// above it must give.
	size    int64
	raw     bool
	backing *layer
	bitmaps []Bitmap

	version     uint32
	clusterBits uint
	clusterSize int64
	l2Mask      int64
	l1Shift     uint // log2 of the guest bytes one L1 entry maps
	l1          []uint64
	compression byte
	// A compressed cluster's descriptor: the host offset below csizeShift,
	// the count of extra 512-byte sectors above it.
	csizeShift uint
	csizeMask  uint64

	l2 l2Cache
	// unpacked keeps the last few decompressed clusters: reads smaller
	// than a cluster would otherwise decompress it again for each piece.
	unpacked unpackedCache
	// inBufs holds scratch buffers for compressed data: two clusters, the
	// most a descriptor can name.
	inBufs sync.Pool
}

// unpackedCache maps compressed cluster descriptors to their decompressed
// bytes. The slices are never written after they are added, so readers
// copy from them without holding the lock.
type unpackedCache struct {
	mu    sync.Mutex
	slots [4]struct {
		desc uint64
		data []byte
	}
	next int
}

func (c *unpackedCache) get(desc uint64) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.slots {
		if s.data != nil && s.desc == desc {
			return s.data
		}
	}
	return nil
}

func (c *unpackedCache) put(desc uint64, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.slots[c.next].desc, c.slots[c.next].data = desc, data
	c.next = (c.next + 1) % len(c.slots)
}

// l2Cache keeps decoded L2 tables by their host offset.
type l2Cache struct {
	mu  sync.Mutex
	m   map[int64][]uint64
	max int
}

func (c *l2Cache) get(off int64) []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[off]
}

func (c *l2Cache) put(off int64, t []uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[int64][]uint64{}
	}
	if len(c.m) >= c.max {
		// Evict an arbitrary table: reads sweep the disk in order, so no
		// table is more likely than another to be wanted again.
		for k := range c.m {
			delete(c.m, k)
			break
		}
	}
	c.m[off] = t
}

// OpenReader opens the image at path (qcow2 or raw: a file that does not
// start with the qcow2 magic is read as raw) and every backing file its
// chain names.
func OpenReader(path string) (*Reader, error) {
	r := &Reader{}
	name, format := path, ""
	for {
		l, backing, err := openLayer(name, format, len(r.layers) == 0)
		if err != nil {
			_ = r.Close()
			if n := len(r.layers); n > 0 {
				return nil, fmt.Errorf("qcow2 %s: backing file: %w", r.layers[n-1].path, err)
			}
			return nil, err
		}
		for _, prev := range r.layers {
			if os.SameFile(prev.info, l.info) {
				_ = l.f.Close()
				_ = r.Close()
				return nil, fmt.Errorf("qcow2 %s: backing chain loops at %s", path, name)
			}
		}
		if n := len(r.layers); n > 0 {
			r.layers[n-1].backing = l
		}
		r.layers = append(r.layers, l)
		if backing.File == "" {
			return r, nil
		}
		if len(r.layers) > MaxChain {
			_ = r.Close()
			return nil, fmt.Errorf("qcow2 %s: backing chain deeper than %d", path, MaxChain)
		}
		// A colon before any slash makes QEMU read the name as a protocol
		// or a json: description, not as a file.
		if i := strings.IndexAny(backing.File, ":/"); i >= 0 && backing.File[i] == ':' {
			_ = r.Close()
			return nil, fmt.Errorf("qcow2 %s: backing file %q: %w: not a plain file name", name, backing.File, ErrUnsupported)
		}
		name, format = backingPath(name, backing.File), backing.Format
	}
}

// backingPath resolves a backing file name the way QEMU does: relative to
// the directory part of the image's name as given, without cleaning it,
// so that ".." follows symlinks as the kernel does.
func backingPath(image, name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	if i := strings.LastIndexByte(image, '/'); i >= 0 {
		return image[:i+1] + name
	}
	return name
}

// openLayer opens one file of the chain. format is what the image above
// names ("" if nothing, or for the top image). It returns what the file
// names as its own backing file.
func openLayer(path, format string, top bool) (*layer, Backing, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, Backing{}, fmt.Errorf("qcow2: %w", err)
	}
	l := &layer{path: path, f: f}
	b, err := l.open(format, top)
	if err != nil {
		_ = f.Close()
		return nil, Backing{}, err
	}
	return l, b, nil
}

func (l *layer) open(format string, top bool) (Backing, error) {
	info, err := l.f.Stat()
	if err != nil {
		return Backing{}, fmt.Errorf("qcow2 %s: %w", l.path, err)
	}
	if !info.Mode().IsRegular() {
		return Backing{}, fmt.Errorf("qcow2 %s: %w: not a regular file", l.path, ErrUnsupported)
	}
	l.info, l.fileSize = info, info.Size()
	if format == "" {
		head := make([]byte, 4096)
		n, err := l.f.ReadAt(head, 0)
		if err != nil && !errors.Is(err, io.EOF) {
			return Backing{}, fmt.Errorf("qcow2 %s: %w", l.path, err)
		}
		head = head[:n]
		switch {
		case bytes.HasPrefix(head, []byte(qcow2Magic)):
			format = "qcow2"
		case !top:
			// QEMU probes a backing file whose format is not named, and
			// would read one of these as its own format, not as raw.
			if other := probeOther(head, l.path); other != "" {
				return Backing{}, fmt.Errorf("qcow2 %s: %w: backing file without a named format looks like %s", l.path, ErrUnsupported, other)
			}
			format = "raw"
		default:
			format = "raw"
		}
	}
	switch format {
	case "raw":
		l.raw = true
		// QEMU counts a raw file's size in whole sectors, the last one
		// padded with zeros.
		l.size = (l.fileSize + 511) &^ 511
		return Backing{}, nil
	case "qcow2":
		return l.parseHeader()
	default:
		return Backing{}, fmt.Errorf("qcow2 %s: %w: backing format %q", l.path, ErrUnsupported, format)
	}
}

const qcow2Magic = "QFI\xfb"

// probeOther names the format QEMU's probing would pick for a file that
// does not start with the qcow2 magic (qcow version 1 does, and is refused
// by its version), or "" when it would settle on raw.
func probeOther(head []byte, path string) string {
	has := func(off int, magic string) bool {
		return len(head) >= off+len(magic) && string(head[off:off+len(magic)]) == magic
	}
	switch {
	case has(0, "QED\x00"):
		return "qed"
	case has(0, "KDMV"), has(0, "COWD"), vmdkDescriptor(head):
		return "vmdk"
	case has(0, "vhdxfile"):
		return "vhdx"
	case has(0, "conectix"):
		return "vpc"
	case has(0, "LUKS\xba\xbe"):
		return "luks"
	case has(0x40, "\x7f\x10\xda\xbe"):
		return "vdi"
	case has(0, "Bochs Virtual HD Image"):
		return "bochs"
	case has(0, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop"):
		return "cloop"
	case has(0, "WithoutFreeSpace"), has(0, "WithouFreSpacExt"):
		return "parallels"
	case strings.HasSuffix(path, ".dmg"):
		return "dmg"
	}
	return ""
}

// vmdkDescriptor reports whether head is a VMDK text descriptor: comment
// and blank lines, then a version line.
func vmdkDescriptor(head []byte) bool {
	for len(head) > 0 {
		line, rest, _ := bytes.Cut(head, []byte("\n"))
		switch t := bytes.TrimRight(bytes.TrimLeft(line, " "), "\r"); {
		case bytes.HasPrefix(line, []byte("#")), len(t) == 0:
			head = rest
			continue
		default:
			return bytes.HasPrefix(line, []byte("version="))
		}
	}
	return false
}

// parseHeader reads and checks a qcow2 header and the active L1 table.
func (l *layer) parseHeader() (Backing, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("qcow2 %s: %w: %s", l.path, ErrNotQcow2, fmt.Sprintf(format, a...))
	}
	unsupported := func(format string, a ...any) error {
		return fmt.Errorf("qcow2 %s: %w: %s", l.path, ErrUnsupported, fmt.Sprintf(format, a...))
	}
	be := binary.BigEndian
	h := make([]byte, 112)
	n, err := l.f.ReadAt(h, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return Backing{}, fmt.Errorf("qcow2 %s: read header: %w", l.path, err)
	}
	if n < 4 || string(h[:4]) != qcow2Magic {
		return Backing{}, bad("no qcow2 magic")
	}
	if n < 72 {
		return Backing{}, bad("header truncated to %d bytes", n)
	}
	l.version = be.Uint32(h[4:])
	if l.version != 2 && l.version != 3 {
		return Backing{}, unsupported("version %d", l.version)
	}
	cb := be.Uint32(h[20:])
	if cb < minClusterBits || cb > maxClusterBits {
		return Backing{}, bad("cluster_bits %d: want %d to %d", cb, minClusterBits, maxClusterBits)
	}
	l.clusterBits = uint(cb)
	cs := int64(1) << cb
	l.clusterSize = cs
	hdrLen := uint32(72)
	var incompat, autoclear uint64
	refcountOrder := uint32(4)
	if l.version == 3 {
		if n < 104 {
			return Backing{}, bad("version 3 header truncated to %d bytes", n)
		}
		incompat = be.Uint64(h[72:])
		autoclear = be.Uint64(h[88:])
		refcountOrder = be.Uint32(h[96:])
		hdrLen = be.Uint32(h[100:])
		if hdrLen < 104 {
			return Backing{}, bad("header_length %d: want at least 104", hdrLen)
		}
	}
	if int64(hdrLen) > cs {
		return Backing{}, bad("header_length %d exceeds the %d-byte cluster", hdrLen, cs)
	}
	if int64(hdrLen) > l.fileSize {
		return Backing{}, bad("header_length %d: file is only %d bytes", hdrLen, l.fileSize)
	}
	if hdrLen > 104 {
		l.compression = h[104]
	}

	// Refuse what we do not read before anything else, so that a valid
	// image with an unknown feature is reported as unsupported.
	known := uint64(incompatDirty | incompatCorrupt | incompatDataFile | incompatCompression | incompatExtendedL2)
	switch {
	case incompat&^known != 0:
		return Backing{}, unsupported("unknown incompatible features %#x", incompat&^known)
	case incompat&incompatDirty != 0:
		return Backing{}, unsupported("dirty bit set: refcounts may be stale")
	case incompat&incompatCorrupt != 0:
		return Backing{}, unsupported("corrupt bit set")
	case incompat&incompatDataFile != 0:
		return Backing{}, unsupported("external data file")
	case incompat&incompatExtendedL2 != 0:
		return Backing{}, unsupported("extended L2 entries (subclusters)")
	}
	switch l.compression {
	case compressionDeflate:
		if incompat&incompatCompression != 0 {
			return Backing{}, bad("compression type bit set with compression_type 0")
		}
	case compressionZstd:
		if incompat&incompatCompression == 0 {
			return Backing{}, bad("compression_type %d without the compression type bit", l.compression)
		}
	default:
		return Backing{}, unsupported("compression_type %d", l.compression)
	}
	if crypt := be.Uint32(h[32:]); crypt != 0 {
		return Backing{}, unsupported("encryption (crypt_method %d)", crypt)
	}
	if refcountOrder > 6 {
		return Backing{}, bad("refcount_order %d: want at most 6", refcountOrder)
	}

	// Tables must be cluster-aligned and lie within the file: QEMU would
	// read zeros past its end, but a table there means the file is
	// damaged or not what it claims.
	table := func(field string, off, entries uint64, entrySize, maxBytes int64) error {
		if entries > uint64(maxBytes/entrySize) {
			return bad("%s: %d entries exceed %d bytes", field, entries, maxBytes)
		}
		if off&uint64(cs-1) != 0 {
			return bad("%s %d is not cluster-aligned", field, off)
		}
		if entries > 0 && (off > uint64(l.fileSize) || entries*uint64(entrySize) > uint64(l.fileSize)-off) {
			return bad("%s %d: %d-byte table ends past the %d-byte file", field, off, entries*uint64(entrySize), l.fileSize)
		}
		return nil
	}
	rtClusters := uint64(be.Uint32(h[56:]))
	if rtClusters == 0 {
		return Backing{}, bad("refcount_table_clusters is 0")
	}
	if err := table("refcount_table_offset", be.Uint64(h[48:]), rtClusters, cs, maxRefTableBytes); err != nil {
		return Backing{}, err
	}
	if err := table("snapshots_offset", be.Uint64(h[64:]), uint64(be.Uint32(h[60:])), snapshotHdrBytes, maxSnapshots*snapshotHdrBytes); err != nil {
		return Backing{}, err
	}
	l1Off, l1Size := be.Uint64(h[40:]), uint64(be.Uint32(h[36:]))
	if err := table("l1_table_offset", l1Off, l1Size, 8, maxL1Bytes); err != nil {
		return Backing{}, err
	}
	size := be.Uint64(h[24:])
	l2Bits := uint(cb) - 3
	l.l2Mask = int64(1)<<l2Bits - 1
	l.l1Shift = uint(cb) + l2Bits
	needed := size >> l.l1Shift
	if size&(uint64(1)<<l.l1Shift-1) != 0 {
		needed++
	}
	if needed > l1Size {
		return Backing{}, bad("l1_size %d: a %d-byte disk needs %d entries", l1Size, size, needed)
	}
	// QEMU counts the virtual size in whole sectors, rounding down.
	l.size = int64(size &^ 511)
	l.csizeShift = 62 - (uint(cb) - 8)
	l.csizeMask = uint64(1)<<(cb-8) - 1

	// Header extensions and the backing file name live in cluster 0.
	c0 := make([]byte, min(cs, l.fileSize))
	if _, err := l.f.ReadAt(c0, 0); err != nil {
		return Backing{}, fmt.Errorf("qcow2 %s: read header: %w", l.path, err)
	}
	var b Backing
	var bitmaps []byte
	nameOff, nameLen := be.Uint64(h[8:]), uint64(be.Uint32(h[16:]))
	if nameOff > uint64(cs) {
		return Backing{}, bad("backing_file_offset %d is past the first cluster", nameOff)
	}
	extLimit := uint64(cs)
	if nameOff != 0 {
		extLimit = nameOff
	}
	err = headerExtensions(c0, uint64(hdrLen), extLimit, func(typ uint32, data []byte) error {
		switch typ {
		case extBackingFormat:
			if len(data) >= maxBackingFormat {
				return bad("backing format extension of %d bytes", len(data))
			}
			b.Format = cString(data)
		case extCryptoHeader:
			return unsupported("encryption header extension")
		case extBitmaps:
			bitmaps = data
		}
		return nil
	})
	switch {
	case errors.Is(err, ErrUnsupported), errors.Is(err, ErrNotQcow2):
		return Backing{}, err
	case err != nil:
		return Backing{}, bad("%v", err)
	}
	if nameOff != 0 && nameLen > 0 {
		if nameLen > min(maxBackingName, uint64(cs)-nameOff) {
			return Backing{}, bad("backing_file_size %d: name too long", nameLen)
		}
		if nameOff+nameLen > uint64(len(c0)) {
			return Backing{}, bad("backing file name at %d: past the end of the file", nameOff)
		}
		// QEMU keeps the name as a C string.
		b.File = cString(c0[nameOff : nameOff+nameLen])
	}
	if b.File == "" {
		b.Format = ""
	}
	if bitmaps != nil && autoclear&autoclearBitmaps != 0 {
		if err := l.parseBitmaps(bitmaps); err != nil {
			return Backing{}, err
		}
	}

	l.l1 = make([]uint64, l1Size)
	if l1Size > 0 {
		buf := make([]byte, l1Size*8)
		if _, err := l.f.ReadAt(buf, int64(l1Off)); err != nil {
			return Backing{}, fmt.Errorf("qcow2 %s: l1 table at %d: %w", l.path, l1Off, err)
		}
		for i := range l.l1 {
			l.l1[i] = be.Uint64(buf[i*8:])
		}
	}
	l.l2.max = max(4, int(l2CacheBytes/cs))
	l.inBufs.New = func() any {
		b := make([]byte, 2*cs)
		return &b
	}
	return b, nil
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func (l *layer) corrupt(format string, a ...any) error {
	return fmt.Errorf("qcow2 %s: %w: %s", l.path, errCorrupt, fmt.Sprintf(format, a...))
}

// l2Table returns the L2 table L1 entry i points to, nil if none.
func (l *layer) l2Table(i int64) ([]uint64, error) {
	if i >= int64(len(l.l1)) {
		// The header check guarantees the L1 table covers the disk.
		return nil, l.corrupt("l1 index %d past the %d-entry table", i, len(l.l1))
	}
	off := int64(l.l1[i] & entryOffsetMask)
	if off == 0 {
		return nil, nil
	}
	if off&(l.clusterSize-1) != 0 {
		return nil, l.corrupt("l2 table at %d (l1 index %d): not cluster-aligned", off, i)
	}
	if t := l.l2.get(off); t != nil {
		return t, nil
	}
	if off > l.fileSize-l.clusterSize {
		return nil, l.corrupt("l2 table at %d (l1 index %d): past the end of the %d-byte file", off, i, l.fileSize)
	}
	buf := make([]byte, l.clusterSize)
	if _, err := l.f.ReadAt(buf, off); err != nil {
		return nil, fmt.Errorf("qcow2 %s: l2 table at %d: %w", l.path, off, err)
	}
	t := make([]uint64, len(buf)/8)
	for j := range t {
		t[j] = binary.BigEndian.Uint64(buf[j*8:])
	}
	l.l2.put(off, t)
	return t, nil
}

// What a guest cluster reads as.
type clusterKind uint8

const (
	unallocated clusterKind = iota // from the backing file, or zeros
	zeroed
	data
	compressed
)

// classify decodes an L2 entry as QEMU does. For data clusters it returns
// the host offset of the cluster.
func (l *layer) classify(e uint64, guest int64) (clusterKind, int64, error) {
	if e&l2Compressed != 0 {
		return compressed, 0, nil
	}
	host := int64(e & entryOffsetMask)
	if host&(l.clusterSize-1) != 0 {
		return 0, 0, l.corrupt("guest offset %d: cluster offset %d is not cluster-aligned", guest, host)
	}
	if e&l2Zero != 0 {
		if l.version < 3 {
			// Version 2 has no zero flag; QEMU answers EIO.
			return 0, 0, l.corrupt("guest offset %d: zero flag in a version 2 image", guest)
		}
		return zeroed, 0, nil
	}
	if host == 0 {
		return unallocated, 0, nil
	}
	return data, host, nil
}

// span is a run of guest bytes that read the same way: data clusters
// adjacent in the file, zero or unallocated clusters, or part of one
// compressed cluster.
type span struct {
	kind   clusterKind
	off, n int64
	host   int64  // data: where off lives in the file
	entry  uint64 // compressed: the L2 entry
}

// walk calls fn for the spans making up guest range [off, end), which must
// lie below l.size, in order.
func (l *layer) walk(off, end int64, fn func(span) error) error {
	cs := l.clusterSize
	for off < end {
		i := off >> l.l1Shift
		stop := min(end, (i+1)<<l.l1Shift)
		t, err := l.l2Table(i)
		if err != nil {
			return err
		}
		if t == nil {
			if err := fn(span{kind: unallocated, off: off, n: stop - off}); err != nil {
				return err
			}
			off = stop
			continue
		}
		for off < stop {
			e := t[(off>>l.clusterBits)&l.l2Mask]
			kind, host, err := l.classify(e, off)
			if err != nil {
				return err
			}
			start := off &^ (cs - 1)
			next := start + cs
			if kind != compressed {
				for next < stop {
					k, h, err := l.classify(t[(next>>l.clusterBits)&l.l2Mask], next)
					if err != nil || k != kind || (kind == data && h != host+(next-start)) {
						// A bad entry is reported when the walk reaches it.
						break
					}
					next += cs
				}
			}
			n := min(next, stop) - off
			s := span{kind: kind, off: off, n: n, entry: e}
			if kind == data {
				s.host = host + off - start
			}
			if err := fn(s); err != nil {
				return err
			}
			off += n
		}
	}
	return nil
}

// readAt fills p with guest bytes from off. Bytes at or past l.size read
// as zeros.
func (l *layer) readAt(p []byte, off int64) error {
	if off >= l.size {
		clear(p)
		return nil
	}
	if rest := l.size - off; int64(len(p)) > rest {
		clear(p[rest:])
		p = p[:rest]
	}
	if l.raw {
		return l.pread(p, off)
	}
	base := off
	return l.walk(off, off+int64(len(p)), func(s span) error {
		b := p[s.off-base : s.off-base+s.n]
		switch s.kind {
		case data:
			return l.pread(b, s.host)
		case unallocated:
			if l.backing != nil {
				return l.backing.readAt(b, s.off)
			}
			clear(b)
		case zeroed:
			clear(b)
		case compressed:
			return l.readCompressed(b, s.entry, s.off)
		}
		return nil
	})
}

// pread reads file bytes at off. Bytes past the end of the file read as
// zeros, as they do in QEMU: the last cluster of an image may legitimately
// extend past it.
func (l *layer) pread(p []byte, off int64) error {
	if off >= l.fileSize {
		clear(p)
		return nil
	}
	n, err := l.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		return nil
	}
	if err != nil {
		return fmt.Errorf("qcow2 %s: read at %d: %w", l.path, off, err)
	}
	return nil
}

// readCompressed fills p with the guest bytes from guest offset off that
// live in the compressed cluster L2 entry e describes.
func (l *layer) readCompressed(p []byte, e uint64, off int64) error {
	cs := l.clusterSize
	// Bits 62 and 63 are flags; the rest describe the data.
	desc := e &^ (3 << 62)
	out := l.unpacked.get(desc)
	if out == nil {
		host := int64(desc & (uint64(1)<<l.csizeShift - 1))
		sectors := int64((desc>>l.csizeShift)&l.csizeMask) + 1
		// The data starts mid-sector and runs to the end of the last
		// sector the descriptor counts: at most two clusters.
		n := sectors*512 - host&511
		bp := l.inBufs.Get().(*[]byte)
		defer l.inBufs.Put(bp)
		in := (*bp)[:n]
		if err := l.pread(in, host); err != nil {
			return err
		}
		out = make([]byte, cs)
		var err error
		if l.compression == compressionZstd {
			err = unzstd(out, in)
		} else {
			err = inflate(out, in)
		}
		if err != nil {
			return l.corrupt("compressed cluster for guest offset %d at %d, %d bytes: %v", off&^(cs-1), host, n, err)
		}
		l.unpacked.put(desc, out)
	}
	copy(p, out[off&(cs-1):])
	return nil
}

var flateReaders sync.Pool

// inflate decompresses raw deflate data into out, which it must fill.
// Like QEMU, it accepts a stream that goes on past out or whose input
// ends with unused bytes: the descriptor only counts whole sectors.
func inflate(out, in []byte) error {
	src := bytes.NewReader(in)
	fr, _ := flateReaders.Get().(io.ReadCloser)
	if fr == nil {
		fr = flate.NewReader(src)
	} else if err := fr.(flate.Resetter).Reset(src, nil); err != nil {
		return err
	}
	defer flateReaders.Put(fr)
	if _, err := io.ReadFull(fr, out); err != nil {
		return fmt.Errorf("deflate: %w", err)
	}
	return nil
}

// zstdDecoder is shared: DecodeAll is safe for concurrent use, and its
// limits do not depend on the image.
var zstdDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxWindow(zstdMaxWindow),
		zstd.WithDecoderMaxMemory(zstdMaxWindow),
		// Output is bounded by the cluster buffer handed in, so a hostile
		// frame cannot make the decoder allocate more.
		zstd.WithDecodeAllCapLimit(true))
})

// unzstd decompresses zstd frames into out until it is full. As in QEMU,
// the frame that fills it must end exactly there, and whatever follows it
// in the last sector is ignored.
func unzstd(out, in []byte) error {
	dec, err := zstdDecoder()
	if err != nil {
		return err
	}
	out = out[:len(out):len(out)]
	dst := out[:0]
	for len(dst) < len(out) {
		n, skippable, err := zstdFrameLen(in)
		if err != nil {
			return fmt.Errorf("zstd: after %d of %d bytes: %w", len(dst), len(out), err)
		}
		if !skippable {
			dst, err = dec.DecodeAll(in[:n], dst)
			if err != nil {
				return fmt.Errorf("zstd: %w", err)
			}
			// The cap limit makes the decoder fail rather than grow dst;
			// make sure, since the caller reads the result from out.
			if len(dst) > len(out) || (len(dst) > 0 && &dst[0] != &out[0]) {
				return errors.New("zstd: frame decodes past the cluster")
			}
		}
		in = in[n:]
	}
	return nil
}

// zstdFrameLen returns the length of the zstd frame at the start of b
// without decoding it, so that the decoder sees exactly one frame and not
// the bytes after it.
func zstdFrameLen(b []byte) (int, bool, error) {
	le := binary.LittleEndian
	if len(b) < 8 {
		return 0, false, io.ErrUnexpectedEOF
	}
	magic := le.Uint32(b)
	if magic&0xfffffff0 == 0x184d2a50 {
		n := 8 + uint64(le.Uint32(b[4:]))
		if n > uint64(len(b)) {
			return 0, false, io.ErrUnexpectedEOF
		}
		return int(n), true, nil
	}
	if magic != 0xfd2fb528 {
		return 0, false, fmt.Errorf("bad frame magic %#x", magic)
	}
	fhd := b[4]
	pos := 5
	single := fhd&0x20 != 0
	if !single {
		pos++ // window descriptor
	}
	pos += [4]int{0, 1, 2, 4}[fhd&3] // dictionary ID
	switch fhd >> 6 {
	case 0:
		if single {
			pos++
		}
	case 1:
		pos += 2
	case 2:
		pos += 4
	case 3:
		pos += 8
	}
	for {
		if pos+3 > len(b) {
			return 0, false, io.ErrUnexpectedEOF
		}
		h := int(b[pos]) | int(b[pos+1])<<8 | int(b[pos+2])<<16
		pos += 3
		switch (h >> 1) & 3 {
		case 0, 2: // raw, compressed
			pos += h >> 3
		case 1: // RLE: one byte repeated
			pos++
		default:
			return 0, false, errors.New("reserved block type")
		}
		if pos > len(b) {
			return 0, false, io.ErrUnexpectedEOF
		}
		if h&1 != 0 {
			break
		}
	}
	if fhd&4 != 0 {
		pos += 4 // content checksum
	}
	if pos > len(b) {
		return 0, false, io.ErrUnexpectedEOF
	}
	return pos, false, nil
}

// extents appends to out the ranges within [off, end) that may hold data.
func (l *layer) extents(off, end int64, out []Extent) ([]Extent, error) {
	end = min(end, l.size)
	if off >= end {
		return out, nil
	}
	if l.raw {
		return l.rawExtents(off, end, out), nil
	}
	err := l.walk(off, end, func(s span) error {
		switch s.kind {
		case data, compressed:
			out = addExtent(out, s.off, s.n)
		case unallocated:
			if l.backing != nil {
				var err error
				out, err = l.backing.extents(s.off, s.off+s.n, out)
				return err
			}
		}
		return nil
	})
	return out, err
}

// rawExtents asks the filesystem where the holes are; past the end of the
// file there is nothing but the zero padding of the last sector.
func (l *layer) rawExtents(off, end int64, out []Extent) []Extent {
	end = min(end, l.fileSize)
	for off < end {
		d, err := l.f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			return out // only a hole from off on
		}
		if err != nil {
			// No SEEK_DATA here: count it all as data.
			return addExtent(out, off, end-off)
		}
		if d >= end {
			return out
		}
		h, err := l.f.Seek(d, seekHole)
		if err != nil {
			h = end
		}
		h = min(max(h, d+1), end)
		out = addExtent(out, d, h-d)
		off = h
	}
	return out
}

const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
)

func addExtent(out []Extent, off, n int64) []Extent {
	if k := len(out) - 1; k >= 0 && out[k].Offset+out[k].Length == off {
		out[k].Length += n
		return out
	}
	return append(out, Extent{off, n})
}

// Size is the virtual size of the top image.
func (r *Reader) Size() int64 { return r.layers[0].size }

// ReadAt reads guest bytes as QEMU would present them, with io.ReaderAt
// semantics. It is safe for concurrent use.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	top := r.layers[0]
	if off < 0 {
		return 0, fmt.Errorf("qcow2 %s: read at negative offset %d", top.path, off)
	}
	if off >= top.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > top.size-off {
		p, eof = p[:top.size-off], io.EOF
	}
	if err := top.readAt(p, off); err != nil {
		return 0, err
	}
	return len(p), eof
}

// DataExtents returns the ranges within [off, off+length) that may hold
// non-zero data, merged, in order and clipped to the range. A range is
// data where the first layer, from the top down, that says anything about
// it holds an allocated or compressed cluster, or raw file data. The
// granularity is the cluster of that layer.
func (r *Reader) DataExtents(off, length int64) ([]Extent, error) {
	top := r.layers[0]
	if off < 0 || length < 0 {
		return nil, fmt.Errorf("qcow2 %s: data extents at %d, %d bytes: negative", top.path, off, length)
	}
	end := top.size
	if length < end-off {
		end = off + length
	}
	return top.extents(off, end, nil)
}

// Close closes every file of the chain.
func (r *Reader) Close() error {
	var first error
	for _, l := range r.layers {
		if err := l.f.Close(); err != nil && first == nil {
			first = fmt.Errorf("qcow2 %s: %w", l.path, err)
		}
	}
	return first
}
