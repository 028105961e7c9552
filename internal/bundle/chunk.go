package bundle

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"

	"github.com/lodge-vm/lodge/internal/chunkhash"
)

// Compression is how hard the writer compresses.
type Compression string

// The compression levels a user may choose.
const (
	CompressNone Compression = "none"
	CompressFast Compression = "fast"
	CompressBest Compression = "best"
)

// ParseCompression checks a user's --compression value.
func ParseCompression(s string) (Compression, error) {
	switch c := Compression(s); c {
	case "":
		return CompressFast, nil
	case CompressNone, CompressFast, CompressBest:
		return c, nil
	}
	return "", fmt.Errorf("compression %q: want none, fast or best", s)
}

func workers() int { return max(2, runtime.GOMAXPROCS(0)) }

// job is one chunk on its way through the workers; done closes when out
// or err is set, and the ordered writer waits on it.
type job struct {
	// barrier, when set, marks a point the caller waits for: every chunk
	// before it has been written.
	barrier chan struct{}
	hdr     chunkHeader
	raw     []byte
	out     []byte
	err     error
	done    chan struct{}
}

// encoder cuts a tar stream into chunks, compresses them on every core
// and writes them in order.
type encoder struct {
	out   io.Writer
	level Compression
	zenc  *zstd.Encoder
	// skip: chunks before this one were delivered by an earlier attempt.
	// They are still compressed, since the end record's digest covers
	// them and compression is deterministic, but not written.
	skip uint64

	buf    []byte
	seq    uint64
	offset uint64
	total  uint64
	root   rootHash

	jobs    chan *job
	order   chan *job
	werr    chan error
	wg      sync.WaitGroup
	pool    sync.Pool
	written int64
	onChunk func(rawDone uint64)
	closed  bool

	mu   sync.Mutex
	sums [][32]byte // each written chunk's digest, by sequence number
	fail error      // the first write error, which stops the export early
}

// newEncoder starts a bundle on out. total is the exact length of the tar
// stream that will be written, which readers use for progress and to
// check nothing is missing.
func newEncoder(out io.Writer, level Compression, total uint64, skip uint64, onChunk func(uint64)) (*encoder, error) {
	e := &encoder{out: out, level: level, total: total, skip: skip, root: newRootHash(), onChunk: onChunk}
	if level != CompressNone {
		zl := zstd.SpeedFastest
		if level == CompressBest {
			zl = zstd.SpeedBestCompression
		}
		z, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zl), zstd.WithEncoderConcurrency(workers()), zstd.WithEncoderCRC(true))
		if err != nil {
			return nil, fmt.Errorf("start zstd: %w", err)
		}
		e.zenc = z
	}
	e.pool.New = func() any { return make([]byte, 0, ChunkSize) }
	e.buf = e.pool.Get().([]byte)
	if _, err := out.Write(startHeader{Version: FormatVersion, TotalRaw: total, ChunkSize: ChunkSize}.marshal()); err != nil {
		return nil, fmt.Errorf("write bundle header: %w", err)
	}
	e.written = 8 + startLen
	n := workers()
	e.jobs = make(chan *job, 2*n)
	e.order = make(chan *job, 4*n)
	e.werr = make(chan error, 1)
	for range n {
		e.wg.Add(1)
		go e.work()
	}
	go e.writeOrdered()
	return e, nil
}

// incompressible samples a chunk: encrypted or already compressed data
// (most of a real disk's bulk) is stored as is, at copying speed, rather
// than run through the compressor to gain nothing.
func (e *encoder) incompressible(raw []byte) bool {
	const sample = 64 << 10
	if e.level == CompressBest || len(raw) < 4*sample {
		return false
	}
	// Two samples, a quarter and three quarters in, so one run of zeros
	// or text at the start does not decide for the whole chunk.
	for _, at := range []int{len(raw) / 4, len(raw) * 3 / 4} {
		out := e.zenc.EncodeAll(raw[at:at+sample], make([]byte, 0, sample+1024))
		if len(out) < sample*31/32 {
			return false
		}
	}
	return true
}

func (e *encoder) work() {
	defer e.wg.Done()
	for j := range e.jobs {
		if e.zenc == nil || e.incompressible(j.raw) {
			j.out = rawFrame(make([]byte, 0, len(j.raw)+len(j.raw)/(128<<10)*3+16), j.raw)
		} else {
			j.out = e.zenc.EncodeAll(j.raw, make([]byte, 0, len(j.raw)/2+1024))
		}
		j.hdr.StoredLen = uint32(len(j.out))
		j.hdr.Sum = chunkhash.Sum256(j.out)
		e.pool.Put(j.raw[:0]) //nolint:staticcheck // a slice header is fine here: the pool only hands out capacity
		j.raw = nil
		close(j.done)
	}
}

func (e *encoder) writeOrdered() {
	var err error
	for j := range e.order {
		<-j.done
		if j.barrier != nil {
			close(j.barrier)
			continue
		}
		if err != nil {
			continue
		}
		e.root.add(j.hdr.Sum)
		e.mu.Lock()
		e.sums = append(e.sums, j.hdr.Sum)
		e.mu.Unlock()
		if j.hdr.Seq < e.skip {
			continue
		}
		if _, err = e.out.Write(j.hdr.marshal()); err == nil {
			_, err = e.out.Write(j.out)
		}
		if err != nil {
			err = fmt.Errorf("write chunk %d: %w", j.hdr.Seq, err)
			e.mu.Lock()
			e.fail = err
			e.mu.Unlock()
			continue
		}
		e.written += int64(8+chunkLen) + int64(len(j.out))
		if e.onChunk != nil {
			e.onChunk(j.hdr.Offset + uint64(j.hdr.RawLen))
		}
	}
	e.werr <- err
}

// err is the first failure to write the output, if any.
func (e *encoder) err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.fail
}

// digests waits until every chunk sent so far is written and returns
// their digests.
func (e *encoder) digests() ([][32]byte, error) {
	e.boundary()
	j := &job{barrier: make(chan struct{}), done: make(chan struct{})}
	close(j.done)
	e.order <- j
	<-j.barrier
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.fail != nil {
		return nil, e.fail
	}
	return append([][32]byte(nil), e.sums...), nil
}

// Write adds tar bytes, sending each full chunk on its way.
func (e *encoder) Write(p []byte) (int, error) {
	if err := e.err(); err != nil {
		return 0, err
	}
	n := len(p)
	for len(p) > 0 {
		k := min(len(p), ChunkSize-len(e.buf))
		e.buf = append(e.buf, p[:k]...)
		p = p[k:]
		if len(e.buf) == ChunkSize {
			e.flush()
		}
	}
	return n, nil
}

// room returns the free tail of the current chunk, for a reader to fill
// in place (saving a copy of every disk byte); commit(n) takes n of it.
func (e *encoder) room() []byte {
	if len(e.buf) == ChunkSize {
		e.flush()
	}
	return e.buf[len(e.buf):ChunkSize]
}

func (e *encoder) commit(n int) {
	e.buf = e.buf[:len(e.buf)+n]
	if len(e.buf) == ChunkSize {
		e.flush()
	}
}

// boundary ends the current chunk early, so that each tar entry starts a
// chunk of its own and a chunk's damage names one entry.
func (e *encoder) boundary() {
	if len(e.buf) > 0 {
		e.flush()
	}
}

func (e *encoder) flush() {
	j := &job{hdr: chunkHeader{Seq: e.seq, Offset: e.offset, RawLen: uint32(len(e.buf))}, done: make(chan struct{})}
	e.seq++
	e.offset += uint64(len(e.buf))
	j.raw = e.buf
	e.buf = e.pool.Get().([]byte)
	e.order <- j
	e.jobs <- j
}

// Close sends the last chunk, waits for all to be written and writes the
// end record. It fails if the tar stream was not exactly as long as
// promised.
func (e *encoder) Close() error {
	if e.closed {
		return nil
	}
	e.closed = true
	e.boundary()
	close(e.jobs)
	close(e.order)
	e.wg.Wait()
	err := <-e.werr
	if e.zenc != nil {
		_ = e.zenc.Close()
	}
	if err != nil {
		return err
	}
	if e.offset != e.total {
		return fmt.Errorf("bundle writer: wrote %d bytes of tar stream, promised %d", e.offset, e.total)
	}
	if _, err := e.out.Write(endHeader{Chunks: e.seq, TotalRaw: e.total, Root: e.root.sum()}.marshal()); err != nil {
		return fmt.Errorf("write bundle end: %w", err)
	}
	e.written += 8 + endLen
	return nil
}

// abort stops the workers without writing an end record, so that what
// was written cannot pass for a whole bundle.
func (e *encoder) abort() {
	if e.closed {
		return
	}
	e.closed = true
	close(e.jobs)
	close(e.order)
	e.wg.Wait()
	<-e.werr
	if e.zenc != nil {
		_ = e.zenc.Close()
	}
}

// Decoder checks and decompresses a bundle's chunks in order, using every
// core. It keeps its place across input streams, so a transfer cut off
// mid-way can resume at the chunk after the last one delivered.
type Decoder struct {
	zdec    *zstd.Decoder
	started bool
	start   startHeader
	next    uint64
	offset  uint64
	root    rootHash
	done    bool
}

// NewDecoder makes a decoder for one bundle.
func NewDecoder() (*Decoder, error) {
	z, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(workers()), zstd.WithDecoderMaxMemory(maxChunk), zstd.IgnoreChecksum(false))
	if err != nil {
		return nil, fmt.Errorf("start zstd: %w", err)
	}
	return &Decoder{zdec: z, root: newRootHash()}, nil
}

// Close frees the decoder's workers.
func (d *Decoder) Close() { d.zdec.Close() }

// Next is the sequence number of the next chunk the decoder needs: where
// a resumed stream must start.
func (d *Decoder) Next() uint64 { return d.next }

// Done reports whether the end record has been read and checked.
func (d *Decoder) Done() bool { return d.done }

// Total is the tar stream's length the bundle announced (0 before the
// first stream).
func (d *Decoder) Total() uint64 { return d.start.TotalRaw }

// Position is how many bytes of the tar stream have been delivered.
func (d *Decoder) Position() uint64 { return d.offset }

// ChunkError reports a chunk that failed its checks, with the range of
// the tar stream it held.
type ChunkError struct {
	Seq        uint64
	Start, End uint64
	Err        error
}

func (e *ChunkError) Error() string {
	return fmt.Sprintf("chunk %d (bytes %d-%d of the archive): %v", e.Seq, e.Start, e.End, e.Err)
}

func (e *ChunkError) Unwrap() error { return e.Err }

// Feed reads one input stream: a bundle, or the resumed part of one that
// starts at chunk Next(). Each verified chunk's tar bytes go to deliver,
// in order, with the chunk's digest; deliver may keep the slice. It returns nil once the bundle's
// end record has been checked, and an error wrapping ErrCorrupt for
// damage.
func (d *Decoder) Feed(ctx context.Context, in io.Reader, deliver func(raw []byte, sum [32]byte) error) error {
	if d.done {
		return nil
	}
	cr := &countingReader{r: in}
	rec, err := readRecord(cr, 0)
	if err != nil {
		return err
	}
	if rec.tag != tagStart {
		return corrupt("the bundle does not start with a bundle header")
	}
	s := rec.start
	switch {
	case s.Version == 0 || s.Version > FormatVersion:
		return corrupt("format version %d; this lodge reads up to %d", s.Version, FormatVersion)
	case s.ChunkSize == 0 || s.ChunkSize > maxChunk:
		return corrupt("chunk size %d out of range", s.ChunkSize)
	case d.started && s != d.start:
		return corrupt("a resumed stream belongs to another bundle")
	}
	d.start, d.started = s, true

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	n := workers()
	jobs := make(chan *job, n)
	order := make(chan *job, 2*n)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				j.out, j.err = d.unpack(j)
				close(j.done)
			}
		}()
	}
	var tail *record
	readErr := make(chan error, 1)
	go func() {
		defer close(jobs)
		defer close(order)
		seq, off := d.next, d.offset
		for {
			at := cr.n
			rec, err := readRecord(cr, at)
			if err != nil {
				readErr <- err
				return
			}
			switch rec.tag {
			case tagEnd:
				tail = &rec
				var one [1]byte
				if n, _ := io.ReadFull(cr, one[:]); n > 0 {
					readErr <- corrupt("byte %d: data after the end record", cr.n-1)
					return
				}
				readErr <- nil
				return
			case tagStart:
				readErr <- corrupt("byte %d: a second bundle header", at)
				return
			}
			h := rec.chunk
			switch {
			case h.Seq != seq:
				readErr <- corrupt("byte %d: chunk %d where chunk %d belongs", at, h.Seq, seq)
				return
			case h.Offset != off:
				readErr <- corrupt("byte %d: chunk %d claims archive offset %d, want %d", at, h.Seq, h.Offset, off)
				return
			case h.RawLen == 0 || h.RawLen > s.ChunkSize:
				readErr <- corrupt("byte %d: chunk %d holds %d bytes, above the bundle's chunk size %d", at, h.Seq, h.RawLen, s.ChunkSize)
				return
			case h.StoredLen > storedBound(h.RawLen):
				readErr <- corrupt("byte %d: chunk %d stores %d bytes for %d", at, h.Seq, h.StoredLen, h.RawLen)
				return
			case off+uint64(h.RawLen) > s.TotalRaw:
				readErr <- corrupt("byte %d: chunk %d runs past the announced archive length %d", at, h.Seq, s.TotalRaw)
				return
			}
			j := &job{hdr: h, raw: getBuf(int(h.StoredLen)), done: make(chan struct{})}
			if _, err := io.ReadFull(cr, j.raw); err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					err = truncated("the bundle ends at byte %d, inside chunk %d", cr.n, h.Seq)
				}
				readErr <- &ChunkError{Seq: h.Seq, Start: h.Offset, End: h.Offset + uint64(h.RawLen), Err: err}
				return
			}
			seq++
			off += uint64(h.RawLen)
			select {
			case order <- j:
			case <-ctx.Done():
				readErr <- ctx.Err()
				return
			}
			select {
			case jobs <- j:
			case <-ctx.Done():
				readErr <- ctx.Err()
				return
			}
		}
	}()
	var derr error
	for j := range order {
		select {
		case <-j.done:
		case <-ctx.Done():
			derr = ctx.Err()
		}
		if derr != nil {
			break
		}
		if j.err != nil {
			derr = &ChunkError{Seq: j.hdr.Seq, Start: j.hdr.Offset, End: j.hdr.Offset + uint64(j.hdr.RawLen), Err: j.err}
			break
		}
		if derr = deliver(j.out, j.hdr.Sum); derr != nil {
			break
		}
		d.root.add(j.hdr.Sum)
		d.next++
		d.offset += uint64(j.hdr.RawLen)
	}
	cancel()
	for range order { //nolint:revive // drain so the reader goroutine can end
	}
	wg.Wait()
	rerr := <-readErr
	if derr != nil {
		return derr
	}
	if rerr != nil {
		return rerr
	}
	e := tail.end
	switch {
	case e.Chunks != d.next:
		return corrupt("the end record counts %d chunks, the bundle holds %d", e.Chunks, d.next)
	case e.TotalRaw != s.TotalRaw || d.offset != s.TotalRaw:
		return corrupt("archive is %d bytes, the bundle announced %d", d.offset, s.TotalRaw)
	case e.Root != d.root.sum():
		return corrupt("the digest over all chunks does not match the end record")
	}
	d.done = true
	return nil
}

func (d *Decoder) unpack(j *job) ([]byte, error) {
	if chunkhash.Sum256(j.raw) != j.hdr.Sum {
		return nil, corrupt("digest mismatch")
	}
	var h zstd.Header
	if err := h.Decode(j.raw); err != nil {
		return nil, corrupt("bad zstd frame: %v", err)
	}
	if !h.HasFCS || h.FrameContentSize != uint64(j.hdr.RawLen) {
		return nil, corrupt("zstd frame declares %d bytes, the chunk %d", h.FrameContentSize, j.hdr.RawLen)
	}
	out, err := d.zdec.DecodeAll(j.raw, getBuf(int(j.hdr.RawLen))[:0])
	putBuf(j.raw)
	j.raw = nil
	if err != nil {
		return nil, corrupt("decompress: %v", err)
	}
	if len(out) != int(j.hdr.RawLen) {
		return nil, corrupt("decompressed to %d bytes, want %d", len(out), j.hdr.RawLen)
	}
	return out, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// Chunk buffers are recycled: a fresh 4 MiB slice per chunk is zeroed
// by the runtime first, which cost a sixth of an import's CPU.
var bufPool = sync.Pool{New: func() any { return make([]byte, 0, storedBound(ChunkSize)) }}

// getBuf returns a buffer of length n (its contents undefined).
func getBuf(n int) []byte {
	b := bufPool.Get().([]byte)
	if cap(b) < n {
		return make([]byte, n)
	}
	return b[:n]
}

func putBuf(b []byte) {
	if cap(b) >= int(storedBound(ChunkSize)) {
		bufPool.Put(b[:0]) //nolint:staticcheck // the pool hands out capacity; a slice header is fine
	}
}
