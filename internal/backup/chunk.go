package backup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"

	"github.com/lodge-vm/lodge/internal/chunkhash"
	"github.com/lodge-vm/lodge/internal/errdefs"
)

// ErrCorrupt is wrapped by every error about a chunk or manifest that
// fails its checks: missing, undecodable, or not what its name promises.
var ErrCorrupt = errors.New("corrupt")

func workers() int { return max(2, runtime.GOMAXPROCS(0)) }

// One encoder and one decoder serve every repository: EncodeAll and
// DecodeAll may be called from any number of goroutines, and a Repo has
// no Close that could free its own.
var codec = sync.OnceValues(func() (*zcodec, error) {
	enc, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(workers()),
		// Each chunk is named by its BLAKE3 and checked against it on
		// every read; zstd's own checksum would only cost time.
		zstd.WithEncoderCRC(false))
	if err != nil {
		return nil, fmt.Errorf("start zstd encoder: %w", err)
	}
	dec, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(workers()),
		zstd.WithDecoderMaxMemory(maxChunkSize),
		zstd.WithDecodeAllCapLimit(true),
		zstd.IgnoreChecksum(false))
	if err != nil {
		return nil, fmt.Errorf("start zstd decoder: %w", err)
	}
	return &zcodec{enc: enc, dec: dec}, nil
})

type zcodec struct {
	enc *zstd.Encoder
	dec *zstd.Decoder
}

// storedBound is the largest chunk file a chunk of n bytes can need:
// zstd's worst case for data it cannot compress, with room to spare.
func storedBound(n int) int { return n + n/64 + 1024 }

var zeros [64 << 10]byte

func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeros))
		if !bytes.Equal(b[:n], zeros[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

func (r *Repo) getRaw() []byte { return r.raw.Get().([]byte)[:r.chunkSize] }

func (r *Repo) putRaw(b []byte) {
	if cap(b) >= r.chunkSize {
		r.raw.Put(b[:r.chunkSize]) //nolint:staticcheck // the pool hands out capacity; a slice header is fine
	}
}

// Chunk reads the chunk named d and checks that it is what its name says.
// A chunk that is missing, undecodable or not matching fails with
// ErrCorrupt. The zero Digest has no chunk (callers know it is zeros) and
// fails with ErrInvalid.
func (r *Repo) Chunk(ctx context.Context, d Digest) ([]byte, error) {
	if d.IsZero() {
		return nil, fmt.Errorf("read chunk: %w: the zero digest stands for zeros and is never stored", errdefs.ErrInvalid)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("read chunk %s: %w", d, err)
	}
	out, err := r.loadChunk(d, make([]byte, 0, r.chunkSize), nil)
	if err != nil {
		return nil, fmt.Errorf("read chunk %s: %w", d, err)
	}
	return out, nil
}

// loadChunk reads chunk d into dst (whose capacity bounds the result) and
// verifies it. scratch, if big enough, holds the compressed bytes.
func (r *Repo) loadChunk(d Digest, dst []byte, scratch []byte) ([]byte, error) {
	stored, err := readChunkFile(r.chunkPath(d), storedBound(r.chunkSize), scratch)
	if err != nil {
		return nil, err
	}
	return r.decodeChunk(d, stored, dst)
}

// readChunkFile reads a chunk file of at most limit bytes into buf
// (reallocated if too small). A missing file is corruption: something
// names the chunk, or nobody would ask for it.
func readChunkFile(path string, limit int, buf []byte) ([]byte, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: chunk file missing", ErrCorrupt)
	}
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := fi.Size()
	if size <= 0 || size > int64(limit) {
		return nil, fmt.Errorf("%w: chunk file is %d bytes, outside 1-%d", ErrCorrupt, size, limit)
	}
	if int64(cap(buf)) < size {
		buf = make([]byte, size)
	}
	buf = buf[:size]
	if _, err := io.ReadFull(f, buf); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%w: chunk file shrank while read", ErrCorrupt)
		}
		return nil, err
	}
	return buf, nil
}

// decodeChunk decompresses stored into dst, whose capacity bounds the
// output, and checks the result against d.
func (r *Repo) decodeChunk(d Digest, stored, dst []byte) ([]byte, error) {
	c, err := codec()
	if err != nil {
		return nil, err
	}
	var h zstd.Header
	if err := h.Decode(stored); err != nil {
		return nil, fmt.Errorf("%w: not a zstd frame: %w", ErrCorrupt, err)
	}
	// The encoder leaves the size out of frames under 256 bytes; then
	// dst's capacity is the only bound, which is enough.
	if h.HasFCS && (h.FrameContentSize == 0 || h.FrameContentSize > uint64(r.chunkSize)) {
		return nil, fmt.Errorf("%w: zstd frame declares %d bytes, want 1-%d", ErrCorrupt, h.FrameContentSize, r.chunkSize)
	}
	if cap(dst) < r.chunkSize {
		dst = make([]byte, 0, r.chunkSize)
	}
	out, err := c.dec.DecodeAll(stored, dst[:0])
	if err != nil {
		return nil, fmt.Errorf("%w: decompress: %w", ErrCorrupt, err)
	}
	if h.HasFCS && uint64(len(out)) != h.FrameContentSize {
		return nil, fmt.Errorf("%w: decompressed to %d bytes, the frame declares %d", ErrCorrupt, len(out), h.FrameContentSize)
	}
	if Digest(chunkhash.Sum256(out)) != d {
		return nil, fmt.Errorf("%w: content does not match its digest", ErrCorrupt)
	}
	return out, nil
}
