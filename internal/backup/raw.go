package backup

import (
	"encoding/binary"
	"math"
)

// Data that does not compress (already compressed files, encrypted
// volumes, random data) still costs zstd most of its time to find that
// out. A chunk whose bytes look random is stored as a zstd frame of raw
// blocks instead, which any zstd decoder reads, so the chunk format stays
// one: plain zstd.

// incompressible guesses, from the byte histogram of a sample, whether
// data would not shrink: near 8 bits of entropy per byte leaves nothing
// for an entropy coder, and data that random has no repeats for LZ.
func incompressible(data []byte) bool {
	if len(data) < 4096 {
		return false
	}
	var hist [256]int
	stride := max(1, len(data)/65536)
	n := 0
	for i := 0; i < len(data); i += stride {
		hist[data[i]]++
		n++
	}
	h := 0.0
	for _, c := range hist {
		if c > 0 {
			p := float64(c) / float64(n)
			h -= p * math.Log2(p)
		}
	}
	return h > 7.9
}

const (
	zstdMagic    = 0xFD2FB528
	rawBlockSize = 128 << 10 // zstd's largest block
)

// rawFrame appends to dst a zstd frame holding data as raw blocks: a
// single-segment frame with a 4-byte content size, no checksum.
func rawFrame(dst, data []byte) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, zstdMagic)
	// Frame header descriptor: content size in 4 bytes (flag 2), single
	// segment (so no window descriptor), no checksum, no dictionary.
	dst = append(dst, 2<<6|1<<5)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(data)))
	for len(data) > 0 {
		n := min(len(data), rawBlockSize)
		last := uint32(0)
		if n == len(data) {
			last = 1
		}
		// Block header: size, type 0 (raw), last-block bit.
		hdr := uint32(n)<<3 | last
		dst = append(dst, byte(hdr), byte(hdr>>8), byte(hdr>>16))
		dst = append(dst, data[:n]...)
		data = data[n:]
	}
	return dst
}
