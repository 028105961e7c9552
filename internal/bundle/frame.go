package bundle

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"lukechampine.com/blake3"
)

// ChunkSize is how much of the tar stream one chunk holds at most.
const ChunkSize = 4 << 20

// maxChunk bounds what a reader accepts, whatever a header claims, so a
// crafted bundle cannot make it allocate more.
const maxChunk = 16 << 20

// FormatVersion is the bundle format this code writes. Readers refuse
// newer versions rather than misread them.
const FormatVersion = 1

const (
	skippableMagic = 0x184D2A5D
	zstdMagic      = 0xFD2FB528
)

var (
	tagStart = [4]byte{'L', 'D', 'G', 'B'}
	tagChunk = [4]byte{'L', 'D', 'G', 'C'}
	tagEnd   = [4]byte{'L', 'D', 'G', 'E'}
)

const (
	startLen = 4 + 2 + 2 + 8 + 4
	chunkLen = 4 + 8 + 8 + 4 + 4 + 32
	endLen   = 4 + 8 + 8 + 32
)

// ErrCorrupt is wrapped by every error that is the bundle's fault: damage,
// truncation, or content that breaks the format's rules.
var ErrCorrupt = errors.New("bad bundle")

// ErrTruncated is wrapped (with ErrCorrupt) by errors for a bundle that
// ends early: a transfer cut off by the network, which resuming fixes.
var ErrTruncated = errors.New("truncated")

func truncated(format string, args ...any) error {
	return fmt.Errorf("%w: %w: %s", ErrCorrupt, ErrTruncated, fmt.Sprintf(format, args...))
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// startHeader opens a bundle.
type startHeader struct {
	Version   uint16
	Flags     uint16
	TotalRaw  uint64 // length of the whole tar stream
	ChunkSize uint32
}

// chunkHeader precedes each chunk's zstd frame.
type chunkHeader struct {
	Seq       uint64
	Offset    uint64 // where the chunk starts in the tar stream
	RawLen    uint32
	StoredLen uint32
	Sum       [32]byte // BLAKE3 of the stored (compressed) frame
}

// endHeader closes a bundle: a truncated one lacks it.
type endHeader struct {
	Chunks   uint64
	TotalRaw uint64
	Root     [32]byte // BLAKE3 over every chunk's digest, in order
}

func putSkippable(dst []byte, tag [4]byte, payloadLen int) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, skippableMagic)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(payloadLen))
	return append(dst, tag[:]...)
}

func (h startHeader) marshal() []byte {
	b := putSkippable(make([]byte, 0, 8+startLen), tagStart, startLen)
	b = binary.LittleEndian.AppendUint16(b, h.Version)
	b = binary.LittleEndian.AppendUint16(b, h.Flags)
	b = binary.LittleEndian.AppendUint64(b, h.TotalRaw)
	return binary.LittleEndian.AppendUint32(b, h.ChunkSize)
}

func (h chunkHeader) marshal() []byte {
	b := putSkippable(make([]byte, 0, 8+chunkLen), tagChunk, chunkLen)
	b = binary.LittleEndian.AppendUint64(b, h.Seq)
	b = binary.LittleEndian.AppendUint64(b, h.Offset)
	b = binary.LittleEndian.AppendUint32(b, h.RawLen)
	b = binary.LittleEndian.AppendUint32(b, h.StoredLen)
	return append(b, h.Sum[:]...)
}

func (h endHeader) marshal() []byte {
	b := putSkippable(make([]byte, 0, 8+endLen), tagEnd, endLen)
	b = binary.LittleEndian.AppendUint64(b, h.Chunks)
	b = binary.LittleEndian.AppendUint64(b, h.TotalRaw)
	return append(b, h.Root[:]...)
}

// record is one parsed skippable frame of ours.
type record struct {
	tag   [4]byte
	start startHeader
	chunk chunkHeader
	end   endHeader
}

// readRecord reads one of Lodge's skippable frames. at is the bundle
// offset, for messages.
func readRecord(r io.Reader, at int64) (record, error) {
	var hdr [12]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return record{}, truncated("the bundle ends at byte %d, before its end marker", at)
		}
		return record{}, err
	}
	magic := binary.LittleEndian.Uint32(hdr[0:])
	size := binary.LittleEndian.Uint32(hdr[4:])
	var rec record
	copy(rec.tag[:], hdr[8:])
	if magic != skippableMagic {
		if at == 0 && magic == zstdMagic {
			return record{}, corrupt("a plain zstd stream, not a lodge bundle")
		}
		return record{}, corrupt("byte %d: expected a chunk header, found %#08x", at, magic)
	}
	var want uint32
	switch rec.tag {
	case tagStart:
		want = startLen
	case tagChunk:
		want = chunkLen
	case tagEnd:
		want = endLen
	default:
		return record{}, corrupt("byte %d: unknown record %q", at, rec.tag[:])
	}
	if size != want {
		return record{}, corrupt("byte %d: record %q is %d bytes, want %d", at, rec.tag[:], size, want)
	}
	body := make([]byte, want-4)
	if _, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return record{}, truncated("the bundle ends at byte %d, inside a chunk header", at)
		}
		return record{}, err
	}
	le := binary.LittleEndian
	switch rec.tag {
	case tagStart:
		rec.start = startHeader{Version: le.Uint16(body[0:]), Flags: le.Uint16(body[2:]), TotalRaw: le.Uint64(body[4:]), ChunkSize: le.Uint32(body[12:])}
	case tagChunk:
		rec.chunk = chunkHeader{Seq: le.Uint64(body[0:]), Offset: le.Uint64(body[8:]), RawLen: le.Uint32(body[16:]), StoredLen: le.Uint32(body[20:])}
		copy(rec.chunk.Sum[:], body[24:])
	case tagEnd:
		rec.end = endHeader{Chunks: le.Uint64(body[0:]), TotalRaw: le.Uint64(body[8:])}
		copy(rec.end.Root[:], body[16:])
	}
	return rec, nil
}

// storedBound is the most a chunk of n raw bytes may take compressed:
// zstd's own bound, with room for a stored (uncompressed) frame.
func storedBound(n uint32) uint32 {
	return n + n/128 + 1024
}

// rawFrame wraps p in a zstd frame of uncompressed blocks, for
// --compression none: still a valid zstd stream, at 3 bytes per 128 KiB.
func rawFrame(dst, p []byte) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, zstdMagic)
	// Single segment, 4-byte content size, no checksum (the chunk's BLAKE3
	// covers it).
	dst = append(dst, 0xA0)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(p)))
	const maxBlock = 128 << 10
	if len(p) == 0 {
		return append(dst, 1, 0, 0) // one empty last raw block
	}
	for len(p) > 0 {
		n := min(len(p), maxBlock)
		h := uint32(n) << 3
		if n == len(p) {
			h |= 1
		}
		dst = append(dst, byte(h), byte(h>>8), byte(h>>16))
		dst = append(dst, p[:n]...)
		p = p[n:]
	}
	return dst
}

// rootHash folds the chunk digests, in order, into one.
type rootHash struct{ h *blake3.Hasher }

func newRootHash() rootHash { return rootHash{h: blake3.New(32, nil)} }

func (r rootHash) add(sum [32]byte) { _, _ = r.h.Write(sum[:]) }

func (r rootHash) sum() [32]byte {
	var out [32]byte
	copy(out[:], r.h.Sum(nil))
	return out
}
