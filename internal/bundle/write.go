package bundle

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"sync"

	"lukechampine.com/blake3"

	"github.com/lodge-vm/lodge/internal/priority"
)

// Source is one entry to export: a disk (Name, Bus) in a bundle without
// snapshots; with them, the base, layer or memory entry named by Entry.
// Extents are where its data is, Data how to read it.
type Source struct {
	Name    string
	Bus     string
	Entry   string
	Size    int64
	Extents []Extent
	Data    io.ReaderAt
}

// WriteOptions tune Write.
type WriteOptions struct {
	Compression Compression
	// Skip leaves out the first Skip chunks, which a resumed transfer's
	// receiver already has.
	Skip uint64
	// Progress gets the archive bytes done and the total.
	Progress func(done, total int64)
}

// Stats describes a written bundle.
type Stats struct {
	Archive int64 // tar stream length
	Data    int64 // disk bytes stored
	Chunks  uint64
	Written int64 // bytes written to the output
}

// sumsLine is one line of lodge.sums: fixed width, so the archive's
// length is known before any digest is.
func sumsLine(sum [32]byte, name string) string {
	return "blake3-chunks:" + hex.EncodeToString(sum[:]) + "  " + name + "\n"
}

// Write writes a bundle of m's machine with the given disks to w. m's
// Disks are filled in from disks. Nothing is written after an error
// that would let the output pass for a whole bundle.
func Write(ctx context.Context, w io.Writer, m Manifest, disks []Source, opts WriteOptions) (Stats, error) {
	if opts.Compression == "" {
		opts.Compression = CompressFast
	}
	m.Format = FormatVersion
	if len(m.Layers) == 0 {
		m.Disks = nil
		for i, d := range disks {
			m.Disks = append(m.Disks, Disk{Name: d.Name, Bus: d.Bus, Size: d.Size, Entry: DiskEntry(d.Name), Data: dataLen(d.Extents)})
			disks[i].Entry = DiskEntry(d.Name)
		}
	}
	for _, d := range disks {
		m.setData(d.Entry, dataLen(d.Extents))
	}
	if err := m.Validate(); err != nil {
		return Stats{}, fmt.Errorf("export: %w", err)
	}
	want := m.Entries()
	if len(want) != len(disks) {
		return Stats{}, fmt.Errorf("export: %d entries given, the manifest has %d", len(disks), len(want))
	}
	for i, d := range disks {
		if d.Entry != want[i].Name || d.Size != want[i].RealSize {
			return Stats{}, fmt.Errorf("export: entry %d is %q (%d bytes), the manifest wants %q (%d bytes)", i, d.Entry, d.Size, want[i].Name, want[i].RealSize)
		}
		if err := checkExtents(d.Extents, d.Size); err != nil {
			return Stats{}, fmt.Errorf("export %s: %w", d.Entry, err)
		}
	}
	man, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return Stats{}, err
	}
	man = append(man, '\n')
	names := []string{ManifestName}
	total := fileEntrySize(ManifestName, int64(len(man)))
	for _, d := range disks {
		total += sparseEntrySize(d.Entry, d.Extents, d.Size)
		names = append(names, d.Entry)
	}
	var sumsLen int64
	for _, n := range names {
		sumsLen += int64(len(sumsLine([32]byte{}, n)))
	}
	total += fileEntrySize(SumsName, sumsLen) + int64(len(endOfArchive))

	var onChunk func(uint64)
	if opts.Progress != nil {
		onChunk = func(done uint64) { opts.Progress(int64(done), total) }
	}
	enc, err := newEncoder(w, opts.Compression, uint64(total), opts.Skip, onChunk)
	if err != nil {
		return Stats{}, err
	}
	ok := false
	defer func() {
		if !ok {
			enc.abort()
		}
	}()
	starts := []uint64{}
	// Each entry starts a chunk, so a chunk's digest belongs to one entry.
	beginEntry := func() {
		enc.boundary()
		starts = append(starts, enc.seq)
	}
	beginEntry()
	_, _ = enc.Write(entryHeader(ManifestName, int64(len(man)), nil))
	_, _ = enc.Write(man)
	_, _ = enc.Write(make([]byte, padLen(int64(len(man)))))
	for _, d := range disks {
		beginEntry()
		mp := sparseMap(d.Extents, d.Size)
		content := int64(len(mp)) + dataLen(d.Extents)
		_, _ = enc.Write(entryHeader(d.Entry, content, sparsePax(d.Entry, d.Size)))
		_, _ = enc.Write(mp)
		if err := copyExtents(ctx, enc, d); err != nil {
			return Stats{}, fmt.Errorf("export %s: %w", d.Entry, err)
		}
		_, _ = enc.Write(make([]byte, padLen(content)))
	}
	enc.boundary()
	starts = append(starts, enc.seq)
	sums, err := enc.digests()
	if err != nil {
		return Stats{}, err
	}
	var text []byte
	for i, n := range names {
		text = append(text, sumsLine(entryDigest(sums[starts[i]:starts[i+1]]), n)...)
	}
	_, _ = enc.Write(entryHeader(SumsName, int64(len(text)), nil))
	_, _ = enc.Write(text)
	_, _ = enc.Write(make([]byte, padLen(int64(len(text)))))
	_, _ = enc.Write(endOfArchive)
	if err := enc.Close(); err != nil {
		return Stats{}, err
	}
	ok = true
	return Stats{Archive: total, Data: dataLenAll(disks), Chunks: enc.seq, Written: enc.written}, nil
}

func dataLenAll(disks []Source) int64 {
	var n int64
	for _, d := range disks {
		n += dataLen(d.Extents)
	}
	return n
}

// entryDigest is an entry's checksum: BLAKE3 over the digests of the
// chunks that hold it, in order.
func entryDigest(sums [][32]byte) [32]byte {
	h := blake3.New(32, nil)
	for _, s := range sums {
		_, _ = h.Write(s[:])
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

func checkExtents(ext []Extent, size int64) error {
	var end int64
	for _, e := range ext {
		if e.Offset < end || e.Length <= 0 || e.Offset > size-e.Length {
			return fmt.Errorf("data region %d+%d overlaps or lies outside the %d-byte disk", e.Offset, e.Length, size)
		}
		// GNU tar reads each region from a block boundary of the archive.
		if e.Offset%block != 0 || e.Length%block != 0 {
			return fmt.Errorf("data region %d+%d is not aligned to %d bytes", e.Offset, e.Length, block)
		}
		end = e.Offset + e.Length
	}
	return nil
}

// readPiece is how much one read asks the disk for; several are in flight
// so a source with latency (an NBD socket) keeps streaming.
const (
	readPiece    = 2 << 20
	readInFlight = 8
)

type piece struct {
	off  int64
	buf  []byte
	err  error
	done chan struct{}
}

// copyExtents streams d's data regions into the archive, reading ahead.
func copyExtents(ctx context.Context, enc *encoder, d Source) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer priority.Background()()
	order := make(chan *piece, readInFlight)
	sem := make(chan struct{}, readInFlight)
	pool := sync.Pool{New: func() any { return make([]byte, readPiece) }}
	go func() {
		defer close(order)
		for _, e := range d.Extents {
			for off := e.Offset; off < e.Offset+e.Length; off += readPiece {
				n := min(int64(readPiece), e.Offset+e.Length-off)
				p := &piece{off: off, buf: pool.Get().([]byte)[:n], done: make(chan struct{})}
				select {
				case sem <- struct{}{}:
				case <-ctx.Done():
					return
				}
				go func() {
					_, p.err = d.Data.ReadAt(p.buf, p.off)
					close(p.done)
				}()
				select {
				case order <- p:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	var err error
	for p := range order {
		<-p.done
		<-sem
		if err == nil && p.err != nil {
			err = fmt.Errorf("read at offset %d: %w", p.off, p.err)
		}
		if err == nil {
			if err = ctx.Err(); err != nil {
				err = fmt.Errorf("cancelled at offset %d: %w", p.off, err)
			} else {
				err = enc.err()
			}
		}
		if err == nil {
			buf := p.buf
			for len(buf) > 0 {
				n := copy(enc.room(), buf)
				enc.commit(n)
				buf = buf[n:]
			}
		}
		pool.Put(p.buf[:cap(p.buf)]) //nolint:staticcheck // the pool hands out capacity; a slice header is fine
		if err != nil {
			cancel()
		}
	}
	return err
}
