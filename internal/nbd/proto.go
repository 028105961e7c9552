package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
)

// Wire constants, from the NBD protocol specification (doc/proto.md in
// the NetworkBlockDevice/nbd repository). All integers are big-endian.
const (
	magicInit      uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt       uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOldstyle  uint64 = 0x00420281861253
	magicOptReply  uint64 = 0x3e889045565a9
	magicRequest   uint32 = 0x25609513
	magicSimple    uint32 = 0x67446698
	magicStructure uint32 = 0x668e33ef

	// Handshake flags (server) and client flags share these bits.
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	optExportName     uint32 = 1
	optAbort          uint32 = 2
	optGo             uint32 = 7
	optStructuredRepl uint32 = 8
	optSetMetaContext uint32 = 10

	repAck         uint32 = 1
	repInfo        uint32 = 3
	repMetaContext uint32 = 4
	repErrBit      uint32 = 1 << 31

	infoExport    uint16 = 0
	infoBlockSize uint16 = 3

	// Transmission flags.
	tfHasFlags        uint16 = 1 << 0
	tfReadOnly        uint16 = 1 << 1
	tfSendFlush       uint16 = 1 << 2
	tfSendTrim        uint16 = 1 << 5
	tfSendWriteZeroes uint16 = 1 << 6

	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7

	cmdFlagNoHole uint16 = 1 << 1

	replyFlagDone uint16 = 1 << 0

	chunkNone        uint16 = 0
	chunkOffsetData  uint16 = 1
	chunkOffsetHole  uint16 = 2
	chunkBlockStatus uint16 = 5
	chunkErrBit      uint16 = 1 << 15
	chunkError       uint16 = chunkErrBit + 1
	chunkErrorOffset uint16 = chunkErrBit + 2

	requestLen       = 28
	simpleReplyLen   = 16
	structuredHdrLen = 20
	optReplyHdrLen   = 20
)

// Limits that keep a hostile server from making the client allocate or
// loop without bound.
const (
	// defaultMaxPayload is the largest read or write the spec promises
	// every server accepts when it does not say otherwise (32 MiB).
	defaultMaxPayload = 32 << 20
	// maxRangeLen bounds one trim, write-zeroes or block-status request.
	// It is a multiple of every legal minimum block size, so splitting a
	// range at it keeps the pieces aligned.
	maxRangeLen = 1 << 31
	// maxOptReply bounds one option reply in the handshake.
	maxOptReply = 64 << 10
	// maxOptReplies bounds how many replies one option may draw.
	maxOptReplies = 1024
	// maxErrorChunk bounds an error chunk: a 6-byte header, a message of
	// at most 4096 bytes and room for fields a later extension may add.
	maxErrorChunk = 6 + maxErrString + 1024
	// maxExtentsPerChunk is the spec's ceiling on descriptors in one
	// block status chunk.
	maxExtentsPerChunk = 1 << 20
	// maxReadFragments bounds how many disjoint pieces one read reply may
	// arrive in before they join up; real servers send them in order.
	maxReadFragments = 1024
)

var be = binary.BigEndian

// putRequest frames a request header into b, which must hold requestLen
// bytes.
func putRequest(b []byte, flags, typ uint16, cookie, off uint64, length uint32) {
	be.PutUint32(b[0:], magicRequest)
	be.PutUint16(b[4:], flags)
	be.PutUint16(b[6:], typ)
	be.PutUint64(b[8:], cookie)
	be.PutUint64(b[16:], off)
	be.PutUint32(b[24:], length)
}

// appendOption frames one handshake option with its data.
func appendOption(b []byte, opt uint32, data []byte) []byte {
	b = be.AppendUint64(b, magicOpt)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// appendString frames a string with its 32-bit length, as options carry
// export names and meta context queries.
func appendString(b []byte, s string) []byte {
	b = be.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// optReply is the header of one option reply.
type optReply struct {
	typ    uint32
	length uint32
}

// readOptReply reads an option reply header and checks that it answers
// opt and is not too long to deal with.
func readOptReply(r io.Reader, opt uint32) (optReply, error) {
	var h [optReplyHdrLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return optReply{}, err
	}
	if m := be.Uint64(h[0:]); m != magicOptReply {
		return optReply{}, protoErr("option reply magic %#x", m)
	}
	if got := be.Uint32(h[8:]); got != opt {
		return optReply{}, protoErr("reply to option %d while waiting for option %d", got, opt)
	}
	rep := optReply{typ: be.Uint32(h[12:]), length: be.Uint32(h[16:])}
	if rep.length > maxOptReply {
		return optReply{}, protoErr("option reply of %d bytes", rep.length)
	}
	return rep, nil
}

// readMessage reads an n-byte human-readable string, keeping at most
// maxErrString bytes of it.
func readMessage(r io.Reader, n uint32) (string, error) {
	keep := min(n, maxErrString)
	buf := make([]byte, keep)
	if _, err := io.ReadFull(r, buf); err != nil {
		return "", err
	}
	if err := discard(r, int64(n-keep)); err != nil {
		return "", err
	}
	return cleanString(buf), nil
}

// discard skips n bytes without holding them.
func discard(r io.Reader, n int64) error {
	if n == 0 {
		return nil
	}
	got, err := io.CopyN(io.Discard, r, n)
	if errors.Is(err, io.EOF) && got < n {
		return io.ErrUnexpectedEOF
	}
	return err
}

// optReplyError describes an error reply to a handshake option.
func optReplyError(opt, typ uint32, msg string) error {
	name := map[uint32]string{
		repErrBit + 1:  "unsupported",
		repErrBit + 2:  "forbidden by server policy",
		repErrBit + 3:  "invalid",
		repErrBit + 4:  "not supported on the server's platform",
		repErrBit + 5:  "TLS required",
		repErrBit + 6:  "no such export",
		repErrBit + 7:  "server is shutting down",
		repErrBit + 8:  "block size negotiation required",
		repErrBit + 9:  "request too big",
		repErrBit + 10: "extended headers required",
	}[typ]
	if name == "" {
		name = fmt.Sprintf("error %#x", typ)
	}
	if msg != "" {
		return fmt.Errorf("option %d refused: %s: %s", opt, name, msg)
	}
	return fmt.Errorf("option %d refused: %s", opt, name)
}

// coverage records which byte ranges of a read reply have arrived, so
// that overlapping chunks are caught and a reply that ends early is not
// taken for a complete one (its missing bytes would be stale memory).
type coverage struct {
	spans [][2]uint64 // sorted, disjoint, non-adjacent [start, end)
	total uint64
}

// add records [start, end), refusing overlap and excessive fragmentation.
func (c *coverage) add(start, end uint64) error {
	i := sort.Search(len(c.spans), func(i int) bool { return c.spans[i][1] >= start })
	// spans[i] is the first that ends at or after start: the only one
	// that can overlap or touch on the left.
	if i < len(c.spans) && c.spans[i][0] < end && c.spans[i][1] > start {
		return protoErr("read reply chunks overlap at %d", max(start, c.spans[i][0]))
	}
	c.total += end - start
	joinLeft := i < len(c.spans) && c.spans[i][1] == start
	if joinLeft {
		c.spans[i][1] = end
		if i+1 < len(c.spans) && c.spans[i+1][0] < end {
			return protoErr("read reply chunks overlap at %d", c.spans[i+1][0])
		}
		if i+1 < len(c.spans) && c.spans[i+1][0] == end {
			c.spans[i][1] = c.spans[i+1][1]
			c.spans = append(c.spans[:i+1], c.spans[i+2:]...)
		}
		return nil
	}
	if i < len(c.spans) && c.spans[i][0] == end {
		c.spans[i][0] = start
		return nil
	}
	if len(c.spans) >= maxReadFragments {
		return protoErr("read reply split into more than %d disjoint pieces", maxReadFragments)
	}
	c.spans = append(c.spans, [2]uint64{})
	copy(c.spans[i+1:], c.spans[i:])
	c.spans[i] = [2]uint64{start, end}
	return nil
}
