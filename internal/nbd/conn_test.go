package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func dialFake(t *testing.T, f *fake, size int, opts Options) *Conn {
	t.Helper()
	sock := f.start(t, size)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", sock, opts)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// pattern is n bytes of non-zero noise, different for every seed.
func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.IntN(255) + 1)
	}
	return b
}

// within fails the test if fn does not return in d: nothing here may hang.
func within(t *testing.T, d time.Duration, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("did not return within %v", d)
	}
}

var allocOpts = Options{MetaContexts: []string{ContextAllocation}}

func TestDialInfo(t *testing.T) {
	f := &fake{export: "disk", structured: true, readOnly: true, contexts: []string{ContextAllocation}}
	c := dialFake(t, f, 1<<20, Options{Export: "disk", MetaContexts: []string{ContextAllocation}})
	if c.Size() != 1<<20 {
		t.Errorf("Size = %d, want %d", c.Size(), 1<<20)
	}
	if !c.ReadOnly() {
		t.Errorf("ReadOnly = false for a read-only export")
	}
	if c.maxPayload != defaultMaxPayload {
		t.Errorf("max payload %d without block size information, want %d", c.maxPayload, defaultMaxPayload)
	}
	if _, err := c.WriteAt(make([]byte, 512), 0); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("WriteAt on a read-only export: %v", err)
	}
	if err := c.Trim(t.Context(), 0, 512); err == nil {
		t.Errorf("Trim on a read-only export succeeded")
	}
}

func TestDialErrors(t *testing.T) {
	tests := []struct {
		name      string
		f         *fake
		opts      Options
		wantErr   string
		wantProto bool
	}{
		{
			name:    "unknown export",
			f:       &fake{export: "a", structured: true},
			opts:    Options{Export: "b"},
			wantErr: "no such export: no export named b",
		},
		{
			name:    "context not offered",
			f:       &fake{structured: true, contexts: []string{ContextAllocation}},
			opts:    Options{MetaContexts: []string{ContextAllocation, "qemu:dirty-bitmap:x"}},
			wantErr: `does not offer meta context "qemu:dirty-bitmap:x"`,
		},
		{
			name:    "contexts without structured replies",
			f:       &fake{contexts: []string{ContextAllocation}},
			opts:    allocOpts,
			wantErr: "lacks structured replies",
		},
		{
			name:      "minimum block size not a power of two",
			f:         &fake{structured: true, blockSize: [3]uint32{3, 4096, 1 << 20}},
			wantProto: true,
		},
		{
			name:      "maximum block size below minimum",
			f:         &fake{structured: true, blockSize: [3]uint32{4096, 4096, 512}},
			wantProto: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := tt.f.start(t, 4096)
			c, err := Dial(t.Context(), "unix", sock, tt.opts)
			if err == nil {
				_ = c.Close()
				t.Fatalf("Dial succeeded")
			}
			if tt.wantErr != "" && !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
			if tt.wantProto != errors.Is(err, ErrProtocol) {
				t.Errorf("errors.Is(%q, ErrProtocol) = %v, want %v", err, !tt.wantProto, tt.wantProto)
			}
		})
	}
}

func TestDialNotNBD(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "http.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = nc.Write([]byte("HTTP/1.0 400 Bad Request\r\n\r\n"))
		_ = nc.Close()
	}()
	_, err = Dial(t.Context(), "unix", sock, Options{})
	if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "not an NBD server") {
		t.Errorf("Dial to an HTTP server: %v", err)
	}
}

func TestDialContext(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "silent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer func() { _ = nc.Close() }()
		time.Sleep(2 * time.Second) // never greets
	}()
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	within(t, time.Second, func() {
		_, err = Dial(ctx, "unix", sock, Options{})
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Dial to a silent server: %v, want a deadline error", err)
	}
}

func TestReadWrite(t *testing.T) {
	for _, structured := range []bool{true, false} {
		name := "simple"
		if structured {
			name = "structured"
		}
		t.Run(name, func(t *testing.T) {
			f := &fake{structured: structured}
			c := dialFake(t, f, 1<<20, Options{})
			writes := []struct {
				off int64
				n   int
			}{{0, 4096}, {5000, 10000}, {512 << 10, 64 << 10}, {1<<20 - 100, 100}}
			want := make([]byte, 1<<20)
			for i, w := range writes {
				p := pattern(w.n, uint64(i))
				n, err := c.WriteAt(p, w.off)
				if err != nil || n != w.n {
					t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", w.n, w.off, n, err)
				}
				copy(want[w.off:], p)
			}
			if !bytes.Equal(f.snapshot(), want) {
				t.Fatalf("server holds different data from what was written")
			}
			got := bytes.Repeat([]byte{0xff}, 1<<20) // holes must be zeroed, not left
			n, err := c.ReadAt(got, 0)
			if err != nil || n != len(got) {
				t.Fatalf("ReadAt = %d, %v", n, err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("read back different data")
			}
			small := make([]byte, 300)
			if _, err := c.ReadAt(small, 5100); err != nil || !bytes.Equal(small, want[5100:5400]) {
				t.Errorf("unaligned ReadAt: %v", err)
			}
		})
	}
}

func TestReadAtEnd(t *testing.T) {
	f := &fake{structured: true}
	c := dialFake(t, f, 8192, Options{})
	p := make([]byte, 4096)
	// io.ReaderAt callers compare with == io.EOF, so it must not be wrapped.
	if n, err := c.ReadAt(p, 6144); n != 2048 || err != io.EOF { //nolint:errorlint // see above
		t.Errorf("ReadAt across the end = %d, %v; want 2048, EOF", n, err)
	}
	if n, err := c.ReadAt(p, 8192); n != 0 || err != io.EOF { //nolint:errorlint // see above
		t.Errorf("ReadAt at the end = %d, %v; want 0, EOF", n, err)
	}
	if _, err := c.ReadAt(p, -1); err == nil {
		t.Errorf("ReadAt at -1 succeeded")
	}
	if _, err := c.WriteAt(p, 6144); err == nil || !strings.Contains(err.Error(), "past the export's end") {
		t.Errorf("WriteAt across the end: %v", err)
	}
}

func TestBlockSizeLimits(t *testing.T) {
	f := &fake{structured: true, blockSize: [3]uint32{512, 4096, 8192}}
	c := dialFake(t, f, 1<<20, Options{})
	p := pattern(20480, 1)
	if _, err := c.WriteAt(p, 4096); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	got := make([]byte, len(p))
	if _, err := c.ReadAt(got, 4096); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("ReadAt: %v", err)
	}
	f.mu.Lock()
	requests, maxLen := f.requests, f.maxLen
	f.mu.Unlock()
	if requests != 6 || maxLen != 8192 {
		t.Errorf("20 KiB written and read in %d requests of at most %d bytes; want 6 of at most 8192", requests, maxLen)
	}
	if _, err := c.ReadAt(got[:100], 4096); err == nil || !strings.Contains(err.Error(), "aligned") {
		t.Errorf("unaligned read with a 512-byte minimum block: %v", err)
	}
}

func TestWriteZeroesTrimFlush(t *testing.T) {
	for _, emulated := range []bool{false, true} {
		t.Run(map[bool]string{false: "native", true: "emulated"}[emulated], func(t *testing.T) {
			var mu sync.Mutex
			var zeroFlags []uint16
			var writes int
			f := &fake{structured: true, noZeroes: emulated, hook: func(_ *fakeConn, r fakeReq) bool {
				mu.Lock()
				defer mu.Unlock()
				switch r.typ {
				case cmdWriteZeroes:
					zeroFlags = append(zeroFlags, r.flags)
				case cmdWrite:
					writes++
				}
				return false
			}}
			c := dialFake(t, f, 1<<20, Options{})
			full := pattern(1<<20, 3)
			if _, err := c.WriteAt(full, 0); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			writes = 0
			mu.Unlock()
			ctx := t.Context()
			if err := c.WriteZeroes(ctx, 4096, 8192, false); err != nil {
				t.Fatalf("WriteZeroes: %v", err)
			}
			if err := c.WriteZeroes(ctx, 65536, 4096, true); err != nil {
				t.Fatalf("WriteZeroes: %v", err)
			}
			if err := c.Trim(ctx, 131072, 4096); err != nil {
				t.Fatalf("Trim: %v", err)
			}
			if err := c.Flush(ctx); err != nil {
				t.Fatalf("Flush: %v", err)
			}
			want := bytes.Clone(full)
			clear(want[4096 : 4096+8192])
			clear(want[65536 : 65536+4096])
			clear(want[131072 : 131072+4096])
			if !bytes.Equal(f.snapshot(), want) {
				t.Errorf("server data after zeroing differs")
			}
			mu.Lock()
			defer mu.Unlock()
			if emulated {
				if writes != 2 || len(zeroFlags) != 0 {
					t.Errorf("emulated zeroes sent %d writes and %d write-zeroes; want 2 and 0", writes, len(zeroFlags))
				}
			} else if !reflect.DeepEqual(zeroFlags, []uint16{cmdFlagNoHole, 0}) {
				t.Errorf("write-zeroes flags %v, want NO_HOLE then none", zeroFlags)
			}
			f.mu.Lock()
			if f.flushes != 1 {
				t.Errorf("%d flushes reached the server, want 1", f.flushes)
			}
			f.mu.Unlock()
		})
	}
}

func TestServerErrors(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name       string
		simple     bool
		cmd        uint16
		reply      func(r fakeReq) []byte
		op         func(c *Conn) error
		wantIs     error
		wantErr    string
		wantOffset bool
	}{
		{
			name:    "write ENOSPC in an error chunk",
			cmd:     cmdWrite,
			reply:   func(r fakeReq) []byte { return errorChunkMsg(r.cookie, errNOSPC, "disk full") },
			op:      func(c *Conn) error { _, err := c.WriteAt(make([]byte, 4096), 0); return err },
			wantIs:  ErrNoSpace,
			wantErr: "nbd write 4096 bytes at 0: no space left on device (ENOSPC): disk full",
		},
		{
			name:    "write ENOSPC in a simple reply",
			simple:  true,
			cmd:     cmdWrite,
			reply:   func(r fakeReq) []byte { return simpleReplyMsg(r.cookie, errNOSPC) },
			op:      func(c *Conn) error { _, err := c.WriteAt(make([]byte, 512), 1024); return err },
			wantIs:  syscall.ENOSPC,
			wantErr: "nbd write 512 bytes at 1024: no space left on device (ENOSPC)",
		},
		{
			name:    "read EIO",
			cmd:     cmdRead,
			reply:   func(r fakeReq) []byte { return errorChunkMsg(r.cookie, errIO, "bad sector") },
			op:      func(c *Conn) error { _, err := c.ReadAt(make([]byte, 4096), 8192); return err },
			wantIs:  syscall.EIO,
			wantErr: "nbd read 4096 bytes at 8192: input/output error (EIO): bad sector",
		},
		{
			name:   "read error at an offset after some data",
			cmd:    cmdRead,
			wantIs: syscall.EIO,
			reply: func(r fakeReq) []byte {
				out := chunkMsg(0, chunkOffsetData, r.cookie, append(be.AppendUint64(nil, r.off), make([]byte, 2048)...))
				pl := be.AppendUint32(nil, errIO)
				pl = be.AppendUint16(pl, 0)
				pl = be.AppendUint64(pl, r.off+2048)
				out = append(out, chunkMsg(0, chunkErrorOffset, r.cookie, pl)...)
				return append(out, chunkMsg(replyFlagDone, chunkNone, r.cookie, nil)...)
			},
			op:      func(c *Conn) error { _, err := c.ReadAt(make([]byte, 4096), 0); return err },
			wantErr: "input/output error (EIO) at offset 2048",
		},
		{
			name:    "read error in a simple reply",
			simple:  true,
			cmd:     cmdRead,
			reply:   func(r fakeReq) []byte { return simpleReplyMsg(r.cookie, errPERM) },
			op:      func(c *Conn) error { _, err := c.ReadAt(make([]byte, 4096), 0); return err },
			wantIs:  syscall.EPERM,
			wantErr: "operation not permitted (EPERM)",
		},
		{
			name: "error type from a later extension",
			cmd:  cmdFlush,
			reply: func(r fakeReq) []byte {
				pl := be.AppendUint32(nil, 99)
				pl = be.AppendUint16(pl, 3)
				pl = append(pl, "odd\x1b[2J"...)
				return chunkMsg(replyFlagDone, chunkErrBit+77, r.cookie, pl)
			},
			op:      func(c *Conn) error { return c.Flush(ctx) },
			wantErr: "nbd flush: server error 99: odd",
		},
		{
			name:    "message with control characters",
			cmd:     cmdFlush,
			reply:   func(r fakeReq) []byte { return errorChunkMsg(r.cookie, errNOTSUP, "no\nflush\x1b") },
			op:      func(c *Conn) error { return c.Flush(ctx) },
			wantIs:  syscall.ENOTSUP,
			wantErr: "operation not supported (ENOTSUP): no?flush?",
		},
		{
			name:    "block status EINVAL",
			cmd:     cmdBlockStatus,
			reply:   func(r fakeReq) []byte { return errorChunkMsg(r.cookie, errINVAL, "") },
			op:      func(c *Conn) error { _, err := c.BlockStatus(ctx, ContextAllocation, 0, 4096); return err },
			wantIs:  syscall.EINVAL,
			wantErr: "nbd block status base:allocation 4096 bytes at 0: invalid argument (EINVAL)",
		},
		{
			name:    "trim ENOMEM",
			cmd:     cmdTrim,
			reply:   func(r fakeReq) []byte { return simpleReplyMsg(r.cookie, errNOMEM) },
			op:      func(c *Conn) error { return c.Trim(ctx, 0, 4096) },
			wantIs:  syscall.ENOMEM,
			wantErr: "nbd trim 4096 bytes at 0: server out of memory (ENOMEM)",
		},
		{
			name:    "write zeroes EOVERFLOW",
			cmd:     cmdWriteZeroes,
			reply:   func(r fakeReq) []byte { return simpleReplyMsg(r.cookie, errOVERFLOW) },
			op:      func(c *Conn) error { return c.WriteZeroes(ctx, 0, 4096, true) },
			wantIs:  syscall.EOVERFLOW,
			wantErr: "value too large (EOVERFLOW)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fake{structured: !tt.simple, hook: func(fc *fakeConn, r fakeReq) bool {
				if r.typ != tt.cmd {
					return false
				}
				fc.write(tt.reply(r))
				return true
			}}
			opts := Options{}
			if !tt.simple {
				f.contexts = []string{ContextAllocation}
				opts = allocOpts
			}
			c := dialFake(t, f, 1<<20, opts)
			var err error
			within(t, 5*time.Second, func() { err = tt.op(c) })
			if err == nil {
				t.Fatalf("no error")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("errors.Is(%q, %v) = false", err, tt.wantIs)
			}
			if errors.Is(err, ErrProtocol) {
				t.Errorf("a server's error reply counted as a protocol violation: %v", err)
			}
			// An error reply leaves the connection usable.
			if tt.cmd != cmdRead {
				if _, err := c.ReadAt(make([]byte, 512), 0); err != nil {
					t.Errorf("ReadAt after the error: %v", err)
				}
			} else if err := c.Flush(ctx); err != nil {
				t.Errorf("Flush after the error: %v", err)
			}
		})
	}
}

func TestBlockStatus(t *testing.T) {
	const bitmap = "qemu:dirty-bitmap:b"
	for _, maxExtents := range []int{0, 1} {
		t.Run("max extents "+string(rune('0'+maxExtents)), func(t *testing.T) {
			f := &fake{structured: true, contexts: []string{ContextAllocation, bitmap}, maxExtents: maxExtents}
			c := dialFake(t, f, 1<<20, Options{MetaContexts: []string{ContextAllocation, bitmap}})
			for _, w := range []struct{ off, n int64 }{{65536, 65536}, {200 << 10, 5000}, {1<<20 - 4096, 4096}} {
				if _, err := c.WriteAt(pattern(int(w.n), 9), w.off); err != nil {
					t.Fatal(err)
				}
			}
			ctx := t.Context()
			ext, err := c.BlockStatus(ctx, ContextAllocation, 0, 1<<20)
			if err != nil {
				t.Fatalf("BlockStatus: %v", err)
			}
			if len(ext) == 0 || ext[0].Offset != 0 {
				t.Fatalf("extents %v do not start at 0", ext)
			}
			for i := 1; i < len(ext); i++ {
				if ext[i].Offset != ext[i-1].Offset+ext[i-1].Length || ext[i].Length <= 0 {
					t.Fatalf("extents %v are not contiguous", ext)
				}
			}
			if maxExtents == 0 && ext[0] != (Extent{0, 65536, StateHole | StateZero}) {
				t.Errorf("first extent %+v, want a 64 KiB hole", ext[0])
			}
			bm, err := c.BlockStatus(ctx, bitmap, 4096, 8192)
			if err != nil || !reflect.DeepEqual(bm, []Extent{{4096, 8192, 1}}) {
				t.Errorf("BlockStatus(%s) = %v, %v", bitmap, bm, err)
			}

			got, err := c.DataExtents(ctx, 0, 1<<20)
			if err != nil {
				t.Fatalf("DataExtents: %v", err)
			}
			want := []Extent{{65536, 65536, 0}, {200 << 10, 8192, 0}, {1<<20 - 4096, 4096, 0}}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("DataExtents = %v, want %v", got, want)
			}
			got, err = c.DataExtents(ctx, 70000, 1<<30)
			want = []Extent{{70000, 131072 - 70000, 0}, {200 << 10, 8192, 0}, {1<<20 - 4096, 4096, 0}}
			if err != nil || !reflect.DeepEqual(got, want) {
				t.Errorf("DataExtents from 70000 = %v, %v; want %v", got, err, want)
			}
		})
	}
	t.Run("not negotiated", func(t *testing.T) {
		f := &fake{structured: true}
		c := dialFake(t, f, 4096, Options{})
		if _, err := c.BlockStatus(t.Context(), ContextAllocation, 0, 4096); err == nil || !strings.Contains(err.Error(), "not negotiated") {
			t.Errorf("BlockStatus without the context: %v", err)
		}
	})
	t.Run("last extent clipped", func(t *testing.T) {
		f := &fake{structured: true, contexts: []string{ContextAllocation}, hook: func(fc *fakeConn, r fakeReq) bool {
			if r.typ != cmdBlockStatus {
				return false
			}
			pl := be.AppendUint32(nil, 10)
			pl = be.AppendUint32(pl, 1024)
			pl = be.AppendUint32(pl, 0)
			pl = be.AppendUint32(pl, 1<<20)
			pl = be.AppendUint32(pl, 3)
			fc.write(chunkMsg(replyFlagDone, chunkBlockStatus, r.cookie, pl))
			return true
		}}
		c := dialFake(t, f, 1<<20, allocOpts)
		got, err := c.BlockStatus(t.Context(), ContextAllocation, 4096, 8192)
		want := []Extent{{4096, 1024, 0}, {5120, 7168, 3}}
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("BlockStatus = %v, %v; want %v", got, err, want)
		}
	})
}

func TestConcurrentReads(t *testing.T) {
	t.Run("many goroutines", func(t *testing.T) {
		f := &fake{structured: true, barrier: 4}
		data := pattern(4<<20, 5)
		for i := 1 << 20; i < 2<<20; i++ {
			data[i] = 0 // a hole, read as hole chunks
		}
		f.data = data
		c := dialFake(t, f, len(data), Options{})
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(g), 1))
				for range 50 {
					n := r.IntN(128<<10) + 1
					off := r.Int64N(int64(len(data) - n))
					p := make([]byte, n)
					if _, err := c.ReadAt(p, off); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(p, data[off:off+int64(n)]) {
						errs <- errors.New("wrong data")
						return
					}
				}
			}()
		}
		within(t, 20*time.Second, wg.Wait)
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		if !f.barrierHit {
			t.Errorf("never had 4 reads in flight at once (max %d): requests are not pipelined", f.maxInflight)
		}
	})
	t.Run("one large read", func(t *testing.T) {
		f := &fake{structured: true, barrier: 16, blockSize: [3]uint32{1, 4096, 4096}}
		f.data = pattern(1<<20, 6)
		c := dialFake(t, f, len(f.data), Options{})
		p := make([]byte, 64<<10)
		within(t, 5*time.Second, func() {
			if _, err := c.ReadAt(p, 4096); err != nil || !bytes.Equal(p, f.data[4096:4096+len(p)]) {
				t.Errorf("ReadAt: %v", err)
			}
		})
		f.mu.Lock()
		defer f.mu.Unlock()
		if !f.barrierHit {
			t.Errorf("the 16 pieces of one read were not all in flight at once (max %d)", f.maxInflight)
		}
	})
}

// TestHostileServer feeds replies that break the protocol: each must fail
// the request promptly, drop the connection, and fail later requests.
func TestHostileServer(t *testing.T) {
	readOp := func(c *Conn) error { _, err := c.ReadAt(make([]byte, 4096), 4096); return err }
	statusOp := func(c *Conn) error {
		_, err := c.BlockStatus(context.Background(), ContextAllocation, 0, 8192)
		return err
	}
	data := func(r fakeReq, off uint64, n int, flags uint16) []byte {
		return chunkMsg(flags, chunkOffsetData, r.cookie, append(be.AppendUint64(nil, off), make([]byte, n)...))
	}
	hole := func(r fakeReq, off uint64, n uint32) []byte {
		return chunkMsg(replyFlagDone, chunkOffsetHole, r.cookie, be.AppendUint32(be.AppendUint64(nil, off), n))
	}
	status := func(r fakeReq, id uint32, ext ...uint32) []byte {
		pl := be.AppendUint32(nil, id)
		for _, e := range ext {
			pl = be.AppendUint32(pl, e)
		}
		return chunkMsg(replyFlagDone, chunkBlockStatus, r.cookie, pl)
	}
	tests := []struct {
		name    string
		cmd     uint16
		reply   func(r fakeReq) []byte
		hangUp  bool // close the connection after the reply
		op      func(c *Conn) error
		wantErr error
	}{
		{name: "data chunk claiming 2 GiB", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte {
				return append(chunkHeader(0, chunkOffsetData, r.cookie, 1<<31), be.AppendUint64(nil, r.off)...)
			}},
		{name: "data chunk a byte too long", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return data(r, r.off, 4097, replyFlagDone) }},
		{name: "data before the request", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return data(r, r.off-1, 4096, replyFlagDone) }},
		{name: "data past the request", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return data(r, r.off+4000, 200, replyFlagDone) }},
		{name: "data at a huge offset", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return data(r, 1<<64-100, 200, replyFlagDone) }},
		{name: "hole past the request", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return hole(r, r.off+4000, 200) }},
		{name: "hole of wrapping size", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return hole(r, r.off+1, 1<<32-1) }},
		{name: "empty hole", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return hole(r, r.off, 0) }},
		{name: "overlapping chunks", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte {
				return append(data(r, r.off, 2048, 0), data(r, r.off+1024, 3072, replyFlagDone)...)
			}},
		{name: "reply ends early", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return data(r, r.off, 2048, replyFlagDone) }},
		{name: "none chunk not final", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return chunkMsg(0, chunkNone, r.cookie, nil) }},
		{name: "none chunk with payload", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return chunkMsg(replyFlagDone, chunkNone, r.cookie, []byte{1}) }},
		{name: "unknown chunk type", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return chunkMsg(replyFlagDone, 42, r.cookie, nil) }},
		{name: "unknown cookie", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return simpleReplyMsg(r.cookie+1000, 0) }},
		{name: "simple reply to a read", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return simpleReplyMsg(r.cookie, 0) }},
		{name: "bad magic", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return be.AppendUint32(nil, 0xdeadbeef) }},
		{name: "error chunk without an error", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return errorChunkMsg(r.cookie, 0, "fine") }},
		{name: "error message longer than its chunk", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte {
				return chunkMsg(replyFlagDone, chunkError, r.cookie, []byte{0, 0, 0, 5, 0, 100, 'a', 'b'})
			}},
		{name: "error chunk claiming 1 GiB", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return chunkHeader(replyFlagDone, chunkError, r.cookie, 1<<30) }},
		{name: "error offset outside the request", cmd: cmdRead, op: readOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte {
				pl := be.AppendUint64(be.AppendUint16(be.AppendUint32(nil, errIO), 0), r.off+4096)
				return chunkMsg(replyFlagDone, chunkErrorOffset, r.cookie, pl)
			}},
		{name: "truncated chunk header", cmd: cmdRead, op: readOp, wantErr: io.ErrUnexpectedEOF, hangUp: true,
			reply: func(r fakeReq) []byte { return data(r, r.off, 4096, replyFlagDone)[:10] }},
		{name: "truncated data", cmd: cmdRead, op: readOp, wantErr: io.ErrUnexpectedEOF, hangUp: true,
			reply: func(r fakeReq) []byte { return data(r, r.off, 4096, replyFlagDone)[:1000] }},
		{name: "hang up", cmd: cmdRead, op: readOp, wantErr: io.EOF, hangUp: true,
			reply: func(fakeReq) []byte { return nil }},
		{name: "data chunk for block status", cmd: cmdBlockStatus, op: statusOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return data(r, 0, 10, replyFlagDone) }},
		{name: "simple success for block status", cmd: cmdBlockStatus, op: statusOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return simpleReplyMsg(r.cookie, 0) }},
		{name: "zero-length extent", cmd: cmdBlockStatus, op: statusOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return status(r, 10, 4096, 0, 0, 0) }},
		{name: "extent past the end before the last", cmd: cmdBlockStatus, op: statusOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return status(r, 10, 16384, 0, 4096, 1) }},
		{name: "extent for an unknown context", cmd: cmdBlockStatus, op: statusOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return status(r, 99, 8192, 0) }},
		{name: "context given twice", cmd: cmdBlockStatus, op: statusOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte {
				first := status(r, 10, 4096, 0)
				be.PutUint16(first[4:], 0)
				return append(first, status(r, 10, 4096, 0)...)
			}},
		{name: "more extents than bytes", cmd: cmdBlockStatus, op: statusOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return chunkHeader(replyFlagDone, chunkBlockStatus, r.cookie, 4+8*8193) }},
		{name: "block status chunk of odd length", cmd: cmdBlockStatus, op: statusOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return chunkMsg(replyFlagDone, chunkBlockStatus, r.cookie, make([]byte, 13)) }},
		{name: "block status without the context", cmd: cmdBlockStatus, op: statusOp, wantErr: ErrProtocol,
			reply: func(r fakeReq) []byte { return chunkMsg(replyFlagDone, chunkNone, r.cookie, nil) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fake{structured: true, contexts: []string{ContextAllocation}, hook: func(fc *fakeConn, r fakeReq) bool {
				if r.typ != tt.cmd {
					return false
				}
				fc.write(tt.reply(r))
				if tt.hangUp {
					_ = fc.nc.Close()
				}
				return true
			}}
			c := dialFake(t, f, 1<<20, allocOpts)
			var err error
			within(t, 5*time.Second, func() { err = tt.op(c) })
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("error %v, want one wrapping %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), "connection lost") {
				t.Errorf("error %q does not say the connection was lost", err)
			}
			// The connection is gone for good: later requests fail fast.
			within(t, 5*time.Second, func() {
				if _, err := c.ReadAt(make([]byte, 512), 0); !errors.Is(err, tt.wantErr) {
					t.Errorf("ReadAt after the violation: %v", err)
				}
				if err := c.Flush(context.Background()); err == nil {
					t.Errorf("Flush after the violation succeeded")
				}
			})
		})
	}
}

// TestHostileLengthsDoNotAllocate checks that lengths a server claims
// are never used to size buffers.
func TestHostileLengthsDoNotAllocate(t *testing.T) {
	tests := []struct {
		name  string
		cmd   uint16
		reply func(r fakeReq) []byte
		op    func(c *Conn) error
	}{
		{"data chunk", cmdRead, func(r fakeReq) []byte {
			return append(chunkHeader(0, chunkOffsetData, r.cookie, 0xfffffff0), be.AppendUint64(nil, r.off)...)
		}, func(c *Conn) error { _, err := c.ReadAt(make([]byte, 4096), 0); return err }},
		{"block status chunk", cmdBlockStatus, func(r fakeReq) []byte {
			// A million extents promised, and the first one is empty.
			b := append(chunkHeader(replyFlagDone, chunkBlockStatus, r.cookie, 4+8*(1<<20)), be.AppendUint32(nil, 10)...)
			return append(b, make([]byte, 8)...)
		}, func(c *Conn) error {
			_, err := c.BlockStatus(context.Background(), ContextAllocation, 0, 1<<20)
			return err
		}},
		{"error chunk", cmdFlush, func(r fakeReq) []byte {
			return chunkHeader(replyFlagDone, chunkError, r.cookie, 0xffffffff)
		}, func(c *Conn) error { return c.Flush(context.Background()) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fake{structured: true, contexts: []string{ContextAllocation}, hook: func(fc *fakeConn, r fakeReq) bool {
				if r.typ != tt.cmd {
					return false
				}
				fc.write(tt.reply(r)) // and then stall
				return true
			}}
			c := dialFake(t, f, 1<<20, allocOpts)
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			var err error
			within(t, 5*time.Second, func() { err = tt.op(c) })
			runtime.ReadMemStats(&after)
			if !errors.Is(err, ErrProtocol) {
				t.Errorf("error %v, want a protocol error", err)
			}
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 4<<20 {
				t.Errorf("allocated %d bytes while refusing the reply", grew)
			}
		})
	}
}

func TestContextEndsWhileWaiting(t *testing.T) {
	late := make(chan struct{})
	f := &fake{structured: true, hook: func(fc *fakeConn, r fakeReq) bool {
		if r.typ != cmdFlush {
			return false
		}
		go func() {
			time.Sleep(300 * time.Millisecond)
			fc.write(simpleReplyMsg(r.cookie, 0))
			close(late)
		}()
		return true
	}}
	c := dialFake(t, f, 1<<20, Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if err := c.Flush(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Flush with a short deadline: %v", err)
	}
	if _, err := c.ReadAt(make([]byte, 512), 0); err != nil {
		t.Errorf("ReadAt after an abandoned Flush: %v", err)
	}
	<-late
	if _, err := c.ReadAt(make([]byte, 512), 0); err != nil {
		t.Errorf("ReadAt after the abandoned Flush's reply came: %v", err)
	}

	canceled, cancel2 := context.WithCancel(t.Context())
	cancel2()
	if err := c.Trim(canceled, 0, 4096); !errors.Is(err, context.Canceled) {
		t.Errorf("Trim with a canceled context: %v", err)
	}
}

func TestCloseFailsPending(t *testing.T) {
	got := make(chan struct{}, 1)
	f := &fake{structured: true, hook: func(_ *fakeConn, r fakeReq) bool {
		if r.typ != cmdRead {
			return false
		}
		got <- struct{}{} // and never answer
		return true
	}}
	c := dialFake(t, f, 1<<20, Options{})
	errc := make(chan error, 1)
	go func() {
		_, err := c.ReadAt(make([]byte, 4096), 0)
		errc <- err
	}()
	<-got
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("pending ReadAt after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("pending ReadAt still waiting after Close")
	}
	if _, err := c.ReadAt(make([]byte, 4096), 0); !errors.Is(err, net.ErrClosed) {
		t.Errorf("ReadAt after Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestCloseSaysGoodbye(t *testing.T) {
	f := &fake{structured: true}
	sock := f.start(t, 4096)
	c, err := Dial(t.Context(), "unix", sock, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	waitFor(t, func() bool { f.mu.Lock(); defer f.mu.Unlock(); return f.disc })
}

func TestServerShutdown(t *testing.T) {
	f := &fake{structured: true, hook: func(fc *fakeConn, r fakeReq) bool {
		if r.typ != cmdRead {
			return false
		}
		fc.write(errorChunkMsg(r.cookie, errSHUTDOWN, "bye"))
		return true
	}}
	c := dialFake(t, f, 1<<20, Options{})
	if _, err := c.ReadAt(make([]byte, 512), 0); !errors.Is(err, syscall.ESHUTDOWN) {
		t.Fatalf("ReadAt: %v", err)
	}
	// The client must disconnect by itself, and take no more requests.
	waitFor(t, func() bool { f.mu.Lock(); defer f.mu.Unlock(); return f.disc })
	if err := c.Flush(t.Context()); err == nil || !strings.Contains(err.Error(), "shutting down") {
		t.Errorf("Flush after ESHUTDOWN: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("condition not met within 5s")
}

func TestServerErrorText(t *testing.T) {
	tests := []struct {
		err  *serverError
		want string
		is   []error
		not  []error
	}{
		{&serverError{errno: errNOSPC, offset: -1}, "no space left on device (ENOSPC)", []error{ErrNoSpace, syscall.ENOSPC}, []error{syscall.EIO, ErrProtocol}},
		{&serverError{errno: errIO, msg: "bad", offset: 512}, "input/output error (EIO) at offset 512: bad", []error{syscall.EIO}, []error{ErrNoSpace}},
		{&serverError{errno: errSHUTDOWN, offset: -1}, "server is shutting down (ESHUTDOWN)", []error{syscall.ESHUTDOWN}, nil},
		{&serverError{errno: 1234, offset: -1}, "server error 1234", nil, []error{ErrNoSpace, syscall.Errno(1234)}},
	}
	for _, tt := range tests {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
		for _, target := range tt.is {
			if !errors.Is(tt.err, target) {
				t.Errorf("errors.Is(%q, %v) = false", tt.err, target)
			}
		}
		for _, target := range tt.not {
			if errors.Is(tt.err, target) {
				t.Errorf("errors.Is(%q, %v) = true", tt.err, target)
			}
		}
	}
}

func TestCoverage(t *testing.T) {
	tests := []struct {
		name    string
		spans   [][2]uint64
		wantErr bool
		total   uint64
		pieces  int
	}{
		{"in order", [][2]uint64{{0, 10}, {10, 20}, {20, 30}}, false, 30, 1},
		{"reversed", [][2]uint64{{20, 30}, {10, 20}, {0, 10}}, false, 30, 1},
		{"gap filled", [][2]uint64{{0, 10}, {20, 30}, {10, 20}}, false, 30, 1},
		{"gap left", [][2]uint64{{0, 10}, {20, 30}}, false, 20, 2},
		{"overlap right", [][2]uint64{{0, 10}, {5, 15}}, true, 0, 0},
		{"overlap left", [][2]uint64{{10, 20}, {5, 15}}, true, 0, 0},
		{"inside", [][2]uint64{{0, 30}, {10, 20}}, true, 0, 0},
		{"covering", [][2]uint64{{10, 20}, {0, 30}}, true, 0, 0},
		{"join then overlap", [][2]uint64{{0, 10}, {15, 20}, {10, 16}}, true, 0, 0},
		{"same", [][2]uint64{{0, 10}, {0, 10}}, true, 0, 0},
	}
	for _, tt := range tests {
		var c coverage
		var err error
		for _, s := range tt.spans {
			if err = c.add(s[0], s[1]); err != nil {
				break
			}
		}
		if (err != nil) != tt.wantErr {
			t.Errorf("%s: error %v, want error %v", tt.name, err, tt.wantErr)
			continue
		}
		if !tt.wantErr && (c.total != tt.total || len(c.spans) != tt.pieces) {
			t.Errorf("%s: total %d in %d pieces, want %d in %d", tt.name, c.total, len(c.spans), tt.total, tt.pieces)
		}
	}
	var c coverage
	for i := range uint64(maxReadFragments) {
		if err := c.add(2*i, 2*i+1); err != nil {
			t.Fatalf("piece %d: %v", i, err)
		}
	}
	if err := c.add(1<<40, 1<<40+1); err == nil {
		t.Errorf("no error past %d disjoint pieces", maxReadFragments)
	}
}
