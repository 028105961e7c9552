package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// fake is an in-process NBD server over a unix socket. It serves an
// in-memory export and can be told to misbehave through hook.
type fake struct {
	export     string
	structured bool // offer structured replies
	readOnly   bool
	noZeroes   bool      // leave out NBD_FLAG_SEND_WRITE_ZEROES
	blockSize  [3]uint32 // sent when [0] is non-zero
	contexts   []string  // meta contexts offered, ids 10, 11, ...
	maxExtents int       // extents per block status chunk; 0 for all
	// barrier holds read replies until that many reads are in flight at
	// once (or a second passes), to prove the client pipelines.
	barrier int
	// hook may answer a request itself, returning true if it did.
	hook func(fc *fakeConn, r fakeReq) bool

	mu          sync.Mutex
	data        []byte
	requests    int
	maxLen      uint32
	inflight    int
	maxInflight int
	barrierHit  bool
	flushes     int
	disc        bool
}

type fakeReq struct {
	flags, typ  uint16
	cookie, off uint64
	length      uint32
	payload     []byte
}

type fakeConn struct {
	f        *fake
	nc       net.Conn
	br       *bufio.Reader
	wmu      sync.Mutex
	ids      map[uint32]string
	structed bool
}

const fakeGranule = 4096

// start serves f on a fresh socket until the test ends and returns the
// socket's path.
func (f *fake) start(t testing.TB, size int) string {
	t.Helper()
	if f.data == nil {
		f.data = make([]byte, size)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var wg sync.WaitGroup
	var cmu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		_ = ln.Close()
		cmu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		cmu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			cmu.Lock()
			conns = append(conns, nc)
			cmu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { _ = nc.Close() }()
				fc := &fakeConn{f: f, nc: nc, br: bufio.NewReader(nc), ids: map[uint32]string{}}
				if fc.handshake() {
					fc.serve(&wg)
				}
			}()
		}
	}()
	return sock
}

func (f *fake) snapshot() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Clone(f.data)
}

func (fc *fakeConn) write(b []byte) {
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	_, _ = fc.nc.Write(b)
}

func optReplyMsg(opt, typ uint32, data []byte) []byte {
	b := be.AppendUint64(nil, magicOptReply)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, typ)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func (fc *fakeConn) handshake() bool {
	f := fc.f
	g := be.AppendUint64(nil, magicInit)
	g = be.AppendUint64(g, magicOpt)
	g = be.AppendUint16(g, flagFixedNewstyle|flagNoZeroes)
	fc.write(g)
	var b [16]byte
	if _, err := io.ReadFull(fc.br, b[:4]); err != nil {
		return false
	}
	for {
		if _, err := io.ReadFull(fc.br, b[:16]); err != nil {
			return false
		}
		if be.Uint64(b[:]) != magicOpt {
			return false
		}
		opt, n := be.Uint32(b[8:]), be.Uint32(b[12:])
		if n > 1<<20 {
			return false
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(fc.br, data); err != nil {
			return false
		}
		switch opt {
		case optStructuredRepl:
			if f.structured {
				fc.structed = true
				fc.write(optReplyMsg(opt, repAck, nil))
			} else {
				fc.write(optReplyMsg(opt, repErrBit+1, nil))
			}
		case optSetMetaContext:
			nameLen := be.Uint32(data)
			rest := data[4+nameLen:]
			count := be.Uint32(rest)
			rest = rest[4:]
			for range count {
				ql := be.Uint32(rest)
				q := string(rest[4 : 4+ql])
				rest = rest[4+ql:]
				for i, c := range f.contexts {
					if c == q {
						id := uint32(10 + i)
						fc.ids[id] = q
						fc.write(optReplyMsg(opt, repMetaContext, append(be.AppendUint32(nil, id), q...)))
					}
				}
			}
			fc.write(optReplyMsg(opt, repAck, nil))
		case optGo:
			nameLen := be.Uint32(data)
			name := string(data[4 : 4+nameLen])
			if name != f.export {
				fc.write(optReplyMsg(opt, repErrBit+6, []byte("no export named "+name)))
				continue
			}
			flags := tfHasFlags | tfSendFlush | tfSendTrim
			if !f.noZeroes {
				flags |= tfSendWriteZeroes
			}
			if f.readOnly {
				flags |= tfReadOnly
			}
			f.mu.Lock()
			size := len(f.data)
			f.mu.Unlock()
			info := be.AppendUint16(nil, infoExport)
			info = be.AppendUint64(info, uint64(size))
			info = be.AppendUint16(info, flags)
			fc.write(optReplyMsg(opt, repInfo, info))
			if f.blockSize[0] != 0 {
				bs := be.AppendUint16(nil, infoBlockSize)
				for _, v := range f.blockSize {
					bs = be.AppendUint32(bs, v)
				}
				fc.write(optReplyMsg(opt, repInfo, bs))
			}
			fc.write(optReplyMsg(opt, repAck, nil))
			return true
		case optAbort:
			fc.write(optReplyMsg(opt, repAck, nil))
			return false
		default:
			fc.write(optReplyMsg(opt, repErrBit+1, nil))
		}
	}
}

func (fc *fakeConn) serve(wg *sync.WaitGroup) {
	f := fc.f
	var h [requestLen]byte
	for {
		if _, err := io.ReadFull(fc.br, h[:]); err != nil {
			return
		}
		r := fakeReq{
			flags: be.Uint16(h[4:]), typ: be.Uint16(h[6:]),
			cookie: be.Uint64(h[8:]), off: be.Uint64(h[16:]), length: be.Uint32(h[24:]),
		}
		if be.Uint32(h[:]) != magicRequest {
			return
		}
		if r.typ == cmdWrite {
			r.payload = make([]byte, r.length)
			if _, err := io.ReadFull(fc.br, r.payload); err != nil {
				return
			}
		}
		f.mu.Lock()
		if r.typ == cmdDisc {
			f.disc = true
			f.mu.Unlock()
			return
		}
		f.requests++
		f.maxLen = max(f.maxLen, r.length)
		f.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			fc.handle(r)
		}()
	}
}

func (fc *fakeConn) handle(r fakeReq) {
	f := fc.f
	if f.hook != nil && f.hook(fc, r) {
		return
	}
	f.mu.Lock()
	size := uint64(len(f.data))
	f.mu.Unlock()
	if r.off > size || uint64(r.length) > size-r.off {
		fc.write(fc.errorReply(r.cookie, errINVAL, "out of range"))
		return
	}
	switch r.typ {
	case cmdRead:
		if f.barrier > 0 {
			f.mu.Lock()
			f.inflight++
			f.maxInflight = max(f.maxInflight, f.inflight)
			if f.inflight >= f.barrier {
				f.barrierHit = true
			}
			deadline := time.Now().Add(time.Second)
			for !f.barrierHit && time.Now().Before(deadline) {
				f.mu.Unlock()
				time.Sleep(time.Millisecond)
				f.mu.Lock()
			}
			f.inflight--
			f.mu.Unlock()
		}
		f.mu.Lock()
		data := bytes.Clone(f.data[r.off : r.off+uint64(r.length)])
		f.mu.Unlock()
		if !fc.structed {
			fc.write(append(simpleReplyMsg(r.cookie, 0), data...))
			return
		}
		fc.write(readChunks(r, data))
	case cmdWrite:
		f.mu.Lock()
		copy(f.data[r.off:], r.payload)
		f.mu.Unlock()
		fc.write(simpleReplyMsg(r.cookie, 0))
	case cmdTrim, cmdWriteZeroes:
		f.mu.Lock()
		clear(f.data[r.off : r.off+uint64(r.length)])
		f.mu.Unlock()
		fc.write(simpleReplyMsg(r.cookie, 0))
	case cmdFlush:
		f.mu.Lock()
		f.flushes++
		f.mu.Unlock()
		fc.write(simpleReplyMsg(r.cookie, 0))
	case cmdBlockStatus:
		fc.write(fc.blockStatus(r))
	default:
		fc.write(fc.errorReply(r.cookie, errINVAL, "unknown command"))
	}
}

// readChunks answers a read with data and hole chunks, a hole for every
// all-zero granule.
func readChunks(r fakeReq, data []byte) []byte {
	var out []byte
	type piece struct {
		start, end int
		zero       bool
	}
	var pieces []piece
	for pos := 0; pos < len(data); {
		end := min(len(data), (int(r.off)+pos)/fakeGranule*fakeGranule+fakeGranule-int(r.off))
		zero := allZero(data[pos:end])
		if n := len(pieces); n > 0 && pieces[n-1].zero == zero {
			pieces[n-1].end = end
		} else {
			pieces = append(pieces, piece{pos, end, zero})
		}
		pos = end
	}
	for i, p := range pieces {
		var flags uint16
		if i == len(pieces)-1 && len(pieces) == 1 {
			flags = replyFlagDone
		}
		if p.zero {
			pl := be.AppendUint64(nil, r.off+uint64(p.start))
			pl = be.AppendUint32(pl, uint32(p.end-p.start))
			out = append(out, chunkMsg(flags, chunkOffsetHole, r.cookie, pl)...)
		} else {
			pl := be.AppendUint64(nil, r.off+uint64(p.start))
			pl = append(pl, data[p.start:p.end]...)
			out = append(out, chunkMsg(flags, chunkOffsetData, r.cookie, pl)...)
		}
	}
	if len(pieces) != 1 {
		out = append(out, chunkMsg(replyFlagDone, chunkNone, r.cookie, nil)...)
	}
	return out
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func (fc *fakeConn) blockStatus(r fakeReq) []byte {
	f := fc.f
	f.mu.Lock()
	data := f.data
	var out []byte
	i := 0
	for id, name := range fc.ids {
		i++
		pl := be.AppendUint32(nil, id)
		count := 0
		if name != ContextAllocation {
			pl = be.AppendUint32(pl, r.length)
			pl = be.AppendUint32(pl, 1)
		} else {
			var cur uint32
			var curLen uint32
			for pos := r.off; pos < r.off+uint64(r.length); {
				end := min(r.off+uint64(r.length), pos/fakeGranule*fakeGranule+fakeGranule)
				st := uint32(0)
				if allZero(data[pos:end]) {
					st = StateHole | StateZero
				}
				if curLen > 0 && st != cur {
					pl = be.AppendUint32(pl, curLen)
					pl = be.AppendUint32(pl, cur)
					count++
					curLen = 0
					if f.maxExtents > 0 && count == f.maxExtents {
						break
					}
				}
				cur = st
				curLen += uint32(end - pos)
				pos = end
			}
			if curLen > 0 && (f.maxExtents == 0 || count < f.maxExtents) {
				pl = be.AppendUint32(pl, curLen)
				pl = be.AppendUint32(pl, cur)
			}
		}
		var flags uint16
		if i == len(fc.ids) {
			flags = replyFlagDone
		}
		out = append(out, chunkMsg(flags, chunkBlockStatus, r.cookie, pl)...)
	}
	f.mu.Unlock()
	return out
}

func (fc *fakeConn) errorReply(cookie uint64, errno uint32, msg string) []byte {
	if !fc.structed {
		return simpleReplyMsg(cookie, errno)
	}
	return errorChunkMsg(cookie, errno, msg)
}

func simpleReplyMsg(cookie uint64, errno uint32) []byte {
	b := be.AppendUint32(nil, magicSimple)
	b = be.AppendUint32(b, errno)
	return be.AppendUint64(b, cookie)
}

func chunkMsg(flags, typ uint16, cookie uint64, payload []byte) []byte {
	b := be.AppendUint32(nil, magicStructure)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	b = be.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

func errorChunkMsg(cookie uint64, errno uint32, msg string) []byte {
	pl := be.AppendUint32(nil, errno)
	pl = be.AppendUint16(pl, uint16(len(msg)))
	pl = append(pl, msg...)
	return chunkMsg(replyFlagDone, chunkError, cookie, pl)
}

// chunkHeader is a structured chunk header claiming length bytes of
// payload, for servers that then lie about it.
func chunkHeader(flags, typ uint16, cookie uint64, length uint32) []byte {
	b := chunkMsg(flags, typ, cookie, nil)
	binary.BigEndian.PutUint32(b[16:], length)
	return b
}
