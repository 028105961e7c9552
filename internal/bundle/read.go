package bundle

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
)

// Target receives an imported machine. Begin comes first, with the
// checked manifest, before any disk data; a Target that returns an error
// from Begin has created nothing. After Read fails the caller undoes
// whatever Begin made.
type Target interface {
	Begin(ctx context.Context, m Manifest) error
	// Entry returns where the named entry's data goes (see
	// Manifest.Entries). Regions never written read as zeros.
	Entry(name string) (io.WriterAt, error)
}

// Stream is the archive a Decoder delivers, as an io.Reader, keeping each
// chunk's digest so entries can be checked against lodge.sums. Feed it
// from Decoder.Feed with Deliver and end it with Close.
type Stream struct {
	ch     chan delivered
	cur    []byte
	buf    []byte // the chunk cur is in, recycled once read
	sums   [][32]byte
	done   chan struct{}
	once   sync.Once
	mu     sync.Mutex
	endErr error
}

type delivered struct {
	raw []byte
	sum [32]byte
}

// NewStream makes an empty stream.
func NewStream() *Stream {
	return &Stream{ch: make(chan delivered), done: make(chan struct{})}
}

// Deliver hands the reader one chunk; it waits until the reader takes it,
// so a chunk counts as delivered only once the import has it.
func (s *Stream) Deliver(ctx context.Context, raw []byte, sum [32]byte) error {
	select {
	case s.ch <- delivered{raw, sum}:
		return nil
	case <-s.done:
		return errors.New("the import has stopped")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close ends the stream: the reader sees err, or io.EOF if err is nil.
func (s *Stream) Close(err error) {
	s.once.Do(func() {
		s.mu.Lock()
		s.endErr = err
		s.mu.Unlock()
		close(s.done)
	})
}

// Read implements io.Reader.
func (s *Stream) Read(p []byte) (int, error) {
	if len(s.cur) == 0 && s.buf != nil {
		putBuf(s.buf)
		s.buf = nil
	}
	if len(s.cur) == 0 {
		select {
		case d := <-s.ch:
			s.cur, s.buf = d.raw, d.raw
			s.sums = append(s.sums, d.sum)
		case <-s.done:
			// Take a chunk that raced with Close.
			select {
			case d := <-s.ch:
				s.cur, s.buf = d.raw, d.raw
				s.sums = append(s.sums, d.sum)
			default:
				s.mu.Lock()
				err := s.endErr
				s.mu.Unlock()
				if err == nil {
					err = io.EOF
				}
				return 0, err
			}
		}
	}
	n := copy(p, s.cur)
	s.cur = s.cur[n:]
	return n, nil
}

// mark is where an entry starts among the chunks.
func (s *Stream) mark() int {
	if len(s.cur) > 0 {
		// An entry that does not start a chunk shares it; its digest then
		// cannot match one Lodge wrote, which is the point.
		return len(s.sums) - 1
	}
	return len(s.sums)
}

// ReadOptions tune Read.
type ReadOptions struct {
	// Total is the archive's announced length, to bound it by what the
	// manifest declares.
	Total func() uint64
	// Progress gets disk bytes written and the total to write.
	Progress func(done, total int64)
}

// Read imports the archive in s into t. It checks every entry against the
// manifest and lodge.sums; errors name the disk and the offset reached.
func Read(ctx context.Context, s *Stream, t Target, opts ReadOptions) (Manifest, error) {
	tr := &tarReader{r: s}
	digests := map[string][32]byte{}
	entryStart := s.mark()
	e, err := tr.next()
	if err != nil {
		return Manifest{}, fmt.Errorf("read manifest: %w", noEOF(err, "the archive is empty"))
	}
	if e.Name != ManifestName || e.Sparse {
		return Manifest{}, corrupt("the first entry is %q, not %s", e.Name, ManifestName)
	}
	if e.Size > maxManifest {
		return Manifest{}, corrupt("manifest is %d bytes, over %d", e.Size, maxManifest)
	}
	raw := make([]byte, e.Size)
	if _, err := io.ReadFull(tr, raw); err != nil {
		return Manifest{}, fmt.Errorf("read manifest: %w", err)
	}
	m, err := ParseManifest(raw)
	if err != nil {
		return Manifest{}, err
	}
	if err := tr.skipRest(); err != nil {
		return m, err
	}
	digests[ManifestName] = entryDigest(s.sums[entryStart:])
	if opts.Total != nil {
		if bound := archiveBound(m, len(raw)); opts.Total() > uint64(bound) {
			return m, corrupt("the archive announces %d bytes; its manifest's disks account for at most %d", opts.Total(), bound)
		}
	}
	if err := t.Begin(ctx, m); err != nil {
		return m, err
	}
	var total, done int64
	entries := m.Entries()
	for _, d := range entries {
		total += d.Data
	}
	for _, d := range entries {
		what := entryWhat(m, d.Name)
		entryStart = s.mark()
		e, err := tr.next()
		if err != nil {
			return m, fmt.Errorf("%s: %w", what, noEOF(err, "the archive ends before it"))
		}
		switch {
		case e.Name != d.Name:
			return m, corrupt("entry %q where %s (%q) belongs", e.Name, what, d.Name)
		case !e.Sparse:
			return m, corrupt("%s: entry %q is not a sparse entry", what, e.Name)
		case e.RealSize != d.RealSize:
			return m, corrupt("%s: the entry holds %d bytes, the manifest says %d", what, e.RealSize, d.RealSize)
		case dataLen(e.Extents) != d.Data:
			return m, corrupt("%s: the entry stores %d bytes, the manifest says %d", what, dataLen(e.Extents), d.Data)
		}
		w, err := t.Entry(d.Name)
		if err != nil {
			return m, err
		}
		if err := writeExtents(ctx, tr, w, e.Extents, func(n int64) {
			done += n
			if opts.Progress != nil {
				opts.Progress(done, total)
			}
		}); err != nil {
			// writeExtents's errors start with where they happened.
			return m, fmt.Errorf("%s %w", what, err)
		}
		if err := tr.skipRest(); err != nil {
			return m, fmt.Errorf("%s: %w", what, err)
		}
		digests[d.Name] = entryDigest(s.sums[entryStart:])
	}
	e, err = tr.next()
	if err != nil {
		return m, fmt.Errorf("read %s: %w", SumsName, noEOF(err, "the archive ends without it"))
	}
	if e.Name != SumsName || e.Sparse || e.Size > maxSmallEntry {
		return m, corrupt("entry %q where %s belongs", e.Name, SumsName)
	}
	text := make([]byte, e.Size)
	if _, err := io.ReadFull(tr, text); err != nil {
		return m, fmt.Errorf("read %s: %w", SumsName, err)
	}
	if err := checkSums(text, digests); err != nil {
		return m, err
	}
	if _, err := tr.next(); !errors.Is(err, io.EOF) {
		if err == nil {
			return m, corrupt("entry %q after %s", tr.current, SumsName)
		}
		return m, err
	}
	return m, nil
}

// entryWhat names an entry for messages: `disk "root"` for a disk's
// data, which is what a user knows it by.
func entryWhat(m Manifest, entry string) string {
	for _, d := range m.Disks {
		if d.Entry == entry || d.Base == entry {
			return fmt.Sprintf("disk %q", d.Name)
		}
	}
	for _, l := range m.Layers {
		if l.Entry == entry {
			return fmt.Sprintf("disk %q layer %q", l.Disk, l.ID)
		}
	}
	return fmt.Sprintf("entry %q", entry)
}

func noEOF(err error, msg string) error {
	if errors.Is(err, io.EOF) {
		return corrupt("%s", msg)
	}
	return err
}

// archiveBound is the most an archive with manifest m can honestly hold:
// its entries' data, with room for headers and sparse maps.
func archiveBound(m Manifest, manifestLen int) int64 {
	n := fileEntrySize(ManifestName, int64(manifestLen)) + fileEntrySize(SumsName, maxSmallEntry) + int64(len(endOfArchive))
	for _, d := range m.Entries() {
		// A sparse map line is at most two 20-digit numbers; regions are
		// at least one block, so there are at most Data/512 of them, and
		// with cluster-sized data far fewer, but the bound must hold for
		// any.
		regions := min(d.Data/block, maxSparseMap) + 1
		n += 4*block + d.Data + min(regions*42+block, sparseMapLimit+block)
	}
	return n
}

func checkSums(text []byte, digests map[string][32]byte) error {
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		alg, rest, ok := strings.Cut(line, ":")
		hexSum, name, ok2 := strings.Cut(rest, "  ")
		if !ok || !ok2 || alg != "blake3-chunks" {
			return corrupt("%s: unreadable line %q", SumsName, line)
		}
		want, ok := digests[name]
		if !ok || seen[name] {
			return corrupt("%s: lists %q, which is not an entry, or lists it twice", SumsName, name)
		}
		seen[name] = true
		if got := hex.EncodeToString(want[:]); got != hexSum {
			return corrupt("entry %q: checksum %s, %s says %s", name, got, SumsName, hexSum)
		}
	}
	for name := range digests {
		if !seen[name] {
			return corrupt("%s has no checksum for %q", SumsName, name)
		}
	}
	return nil
}

// zeroGranule is the unit below which zeros are written anyway: a qcow2
// cluster, so skipped zeros leave whole clusters unallocated.
const zeroGranule = 64 << 10

var zeros = make([]byte, zeroGranule)

// writeExtents copies the entry's data regions to w, skipping runs of
// zeros so the new disk stays sparse. Writes overlap with reading.
func writeExtents(ctx context.Context, r io.Reader, w io.WriterAt, extents []Extent, progress func(int64)) error {
	const piece = 1 << 20
	const inFlight = 4
	sem := make(chan struct{}, inFlight)
	var (
		mu    sync.Mutex
		werr  error
		wg    sync.WaitGroup
		pool  = sync.Pool{New: func() any { return make([]byte, piece) }}
		setEr = func(err error) {
			mu.Lock()
			if werr == nil {
				werr = err
			}
			mu.Unlock()
		}
		getEr = func() error {
			mu.Lock()
			defer mu.Unlock()
			return werr
		}
	)
	defer wg.Wait()
	for _, e := range extents {
		for off := e.Offset; off < e.Offset+e.Length; {
			if err := getEr(); err != nil {
				return err
			}
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("cancelled at offset %d: %w", off, err)
			}
			n := min(int64(piece), e.Offset+e.Length-off)
			// Keep pieces aligned to the granule so zero runs are found.
			if rem := off % zeroGranule; rem != 0 {
				n = min(n, zeroGranule-rem)
			}
			buf := pool.Get().([]byte)[:n]
			if _, err := io.ReadFull(r, buf); err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					err = corrupt("the archive ends inside the disk's data")
				}
				return fmt.Errorf("at offset %d: %w", off, err)
			}
			sem <- struct{}{}
			wg.Add(1)
			go func(off int64, buf []byte) {
				defer wg.Done()
				defer func() { <-sem }()
				if err := writeNonZero(w, buf, off); err != nil {
					setEr(fmt.Errorf("at offset %d: write: %w", off, err))
				}
				mu.Lock()
				progress(int64(len(buf)))
				mu.Unlock()
				pool.Put(buf[:cap(buf)]) //nolint:staticcheck // the pool hands out capacity
			}(off, buf)
			off += n
		}
	}
	wg.Wait()
	return getEr()
}

// writeNonZero writes buf at off, leaving out granule-aligned zero runs.
func writeNonZero(w io.WriterAt, buf []byte, off int64) error {
	start := -1
	flush := func(end int) error {
		if start < 0 {
			return nil
		}
		_, err := w.WriteAt(buf[start:end], off+int64(start))
		start = -1
		return err
	}
	for i := 0; i < len(buf); {
		n := min(zeroGranule-int((off+int64(i))%zeroGranule), len(buf)-i)
		if bytes.Equal(buf[i:i+n], zeros[:n]) {
			if err := flush(i); err != nil {
				return err
			}
		} else if start < 0 {
			start = i
		}
		i += n
	}
	return flush(len(buf))
}

// Import reads a whole bundle from in into t: the plain, one-stream case
// of Decoder and Read.
func Import(ctx context.Context, in io.Reader, t Target, opts ReadOptions) (Manifest, error) {
	dec, err := NewDecoder()
	if err != nil {
		return Manifest{}, err
	}
	defer dec.Close()
	s := NewStream()
	fed := make(chan error, 1)
	go func() {
		err := dec.Feed(ctx, in, func(raw []byte, sum [32]byte) error { return s.Deliver(ctx, raw, sum) })
		s.Close(err)
		fed <- err
	}()
	if opts.Total == nil {
		opts.Total = dec.Total
	}
	m, err := Finish(ctx, s, t, opts)
	s.Close(errors.New("import stopped"))
	ferr := <-fed
	if err != nil {
		return m, err
	}
	return m, ferr
}

// Finish runs Read and then checks that nothing follows the archive.
func Finish(ctx context.Context, s *Stream, t Target, opts ReadOptions) (Manifest, error) {
	m, err := Read(ctx, s, t, opts)
	if err != nil {
		return m, err
	}
	var one [1]byte
	if n, err := s.Read(one[:]); n > 0 {
		return m, corrupt("data after the end of the archive")
	} else if !errors.Is(err, io.EOF) {
		return m, err
	}
	return m, nil
}
