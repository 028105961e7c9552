package nbd

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"testing"
)

var writeCorpus = flag.Bool("nbd.write-fuzz-corpus", false, "rewrite the seed corpus in testdata/fuzz/FuzzReply")

// fuzzCalls are the requests the fuzzed replies answer, keyed by cookie.
func fuzzCalls() map[uint64]*call {
	calls := []*call{
		{cookie: 1, cmd: cmdRead, off: 0, length: 4096, buf: make([]byte, 4096)},
		{cookie: 2, cmd: cmdRead, off: 1 << 20, length: 512, buf: make([]byte, 512)},
		{cookie: 3, cmd: cmdBlockStatus, off: 0, length: 1 << 20, want: 10},
		{cookie: 4, cmd: cmdBlockStatus, off: 4096, length: 8192, want: 11},
		{cookie: 5, cmd: cmdWrite, off: 0, length: 512, buf: make([]byte, 512)},
		{cookie: 6, cmd: cmdFlush},
		{cookie: 7, cmd: cmdTrim, off: 1 << 30, length: 1 << 20},
	}
	m := make(map[uint64]*call, len(calls))
	for _, c := range calls {
		m[c.cookie] = c
	}
	return m
}

// FuzzReply feeds arbitrary bytes as the server's side of a connection.
// The first byte picks the mode: bit 1 runs the handshake first, bit 0
// (without a handshake) turns structured replies off. The parser must
// never panic, and what it accepts must keep its promises: complete reads
// are fully covered, extents lie inside the request and are never empty.
func FuzzReply(f *testing.F) {
	for _, seed := range fuzzSeeds() {
		f.Add(seed.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		mode := data[0]
		r := bufio.NewReaderSize(bytes.NewReader(data[1:]), 4096)
		structured := mode&1 == 0
		contexts := map[uint32]bool{10: true, 11: true}
		if mode&2 != 0 {
			ex, err := negotiate(r, io.Discard, Options{MetaContexts: []string{ContextAllocation, "qemu:dirty-bitmap:b"}})
			if err != nil {
				return
			}
			if ex.size > math.MaxInt64 || ex.flags&tfHasFlags == 0 || len(ex.contexts) != 2 {
				t.Fatalf("handshake accepted %+v", ex)
			}
			if p := ex.maxPayload(); p == 0 || p > defaultMaxPayload || p%ex.align() != 0 {
				t.Fatalf("max payload %d with alignment %d", p, ex.align())
			}
			structured = ex.structured
			contexts = map[uint32]bool{}
			for _, id := range ex.contexts {
				contexts[id] = true
			}
		}
		pending := fuzzCalls()
		rr := &replyReader{r: r, structured: structured, contexts: contexts}
		for range 256 {
			c, done, err := rr.next(func(cookie uint64) *call { return pending[cookie] })
			if err != nil {
				return
			}
			if !done {
				continue
			}
			delete(pending, c.cookie)
			if c.err != nil {
				continue
			}
			switch c.cmd {
			case cmdRead:
				if c.cover.total != uint64(c.length) {
					t.Fatalf("read completed with %d of %d bytes", c.cover.total, c.length)
				}
			case cmdBlockStatus:
				pos := int64(c.off)
				if len(c.extents) == 0 {
					t.Fatalf("block status completed without extents")
				}
				for _, e := range c.extents {
					if e.Offset != pos || e.Length <= 0 || e.Offset+e.Length > int64(c.off)+int64(c.length) {
						t.Fatalf("extent %+v at %d for request [%d, +%d)", e, pos, c.off, c.length)
					}
					pos += e.Length
				}
			}
		}
	})
}

type fuzzSeed struct {
	name string
	data []byte
}

// fuzzSeeds are well-formed (and a few deliberately broken) server
// streams, so the fuzzer starts from inputs that reach deep.
func fuzzSeeds() []fuzzSeed {
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	dataChunk := func(flags uint16, cookie, off uint64, n int) []byte {
		return chunkMsg(flags, chunkOffsetData, cookie, append(be.AppendUint64(nil, off), bytes.Repeat([]byte{0xab}, n)...))
	}
	holeChunk := func(flags uint16, cookie, off uint64, n uint32) []byte {
		return chunkMsg(flags, chunkOffsetHole, cookie, be.AppendUint32(be.AppendUint64(nil, off), n))
	}
	status := func(flags uint16, cookie uint64, id uint32, ext ...uint32) []byte {
		pl := be.AppendUint32(nil, id)
		for _, e := range ext {
			pl = be.AppendUint32(pl, e)
		}
		return chunkMsg(flags, chunkBlockStatus, cookie, pl)
	}
	errOffset := func(cookie uint64, errno uint32, msg string, off uint64) []byte {
		pl := be.AppendUint16(be.AppendUint32(nil, errno), uint16(len(msg)))
		pl = be.AppendUint64(append(pl, msg...), off)
		return chunkMsg(replyFlagDone, chunkErrorOffset, cookie, pl)
	}
	info := func(typ uint16, fields ...any) []byte {
		b := be.AppendUint16(nil, typ)
		for _, f := range fields {
			switch v := f.(type) {
			case uint64:
				b = be.AppendUint64(b, v)
			case uint32:
				b = be.AppendUint32(b, v)
			case uint16:
				b = be.AppendUint16(b, v)
			}
		}
		return optReplyMsg(optGo, repInfo, b)
	}
	greeting := cat(be.AppendUint64(nil, magicInit), be.AppendUint64(nil, magicOpt), be.AppendUint16(nil, flagFixedNewstyle|flagNoZeroes))
	handshake := cat(
		greeting,
		optReplyMsg(optStructuredRepl, repAck, nil),
		optReplyMsg(optSetMetaContext, repMetaContext, append(be.AppendUint32(nil, 10), ContextAllocation...)),
		optReplyMsg(optSetMetaContext, repMetaContext, append(be.AppendUint32(nil, 11), "qemu:dirty-bitmap:b"...)),
		optReplyMsg(optSetMetaContext, repAck, nil),
		info(infoExport, uint64(1<<30), tfHasFlags|tfSendFlush|tfSendTrim|tfSendWriteZeroes),
		info(infoBlockSize, uint32(1), uint32(4096), uint32(32<<20)),
		optReplyMsg(optGo, repAck, nil),
	)
	return []fuzzSeed{
		{"read-data-and-holes", cat([]byte{0},
			dataChunk(0, 1, 0, 1024), holeChunk(0, 1, 1024, 2048), dataChunk(0, 1, 3072, 1024),
			chunkMsg(replyFlagDone, chunkNone, 1, nil))},
		{"read-out-of-order", cat([]byte{0},
			holeChunk(0, 2, 1<<20+256, 256), dataChunk(replyFlagDone, 2, 1<<20, 256))},
		{"simple-replies", cat([]byte{1},
			simpleReplyMsg(2, 0), bytes.Repeat([]byte{1}, 512), simpleReplyMsg(5, 0), simpleReplyMsg(6, errIO))},
		{"block-status", cat([]byte{0},
			status(0, 3, 11, 1<<20, 1), status(replyFlagDone, 3, 10, 65536, 3, 65536, 0, 1<<20, 3),
			status(replyFlagDone, 4, 11, 4096, 0, 4096, 1))},
		{"errors", cat([]byte{0},
			errOffset(1, errIO, "bad sector", 2048), errorChunkMsg(5, errNOSPC, "full"),
			errorChunkMsg(6, errSHUTDOWN, ""), simpleReplyMsg(7, errPERM))},
		{"handshake-then-replies", cat([]byte{2}, handshake,
			dataChunk(replyFlagDone, 1, 0, 4096), status(0, 3, 10, 1<<20, 0), status(replyFlagDone, 3, 11, 4096, 1))},
		{"handshake-without-structured", cat([]byte{2}, greeting, optReplyMsg(optStructuredRepl, repErrBit+1, nil))},
		{"handshake-go-refused", cat([]byte{2},
			greeting, optReplyMsg(optStructuredRepl, repAck, nil),
			optReplyMsg(optSetMetaContext, repErrBit+3, []byte("bad query")))},
		{"over-long-chunk", cat([]byte{0}, chunkHeader(0, chunkOffsetData, 1, 1<<31), be.AppendUint64(nil, 0))},
	}
}

// TestWriteFuzzCorpus regenerates testdata/fuzz/FuzzReply from
// fuzzSeeds when run with -nbd.write-fuzz-corpus.
func TestWriteFuzzCorpus(t *testing.T) {
	if !*writeCorpus {
		t.Skip("run with -nbd.write-fuzz-corpus to rewrite the seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzReply")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, s := range fuzzSeeds() {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s.data)
		if err := os.WriteFile(filepath.Join(dir, s.name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
