package nbd

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
)

// export is what the handshake settled.
type export struct {
	size       uint64
	flags      uint16
	structured bool
	// contexts maps the meta contexts the server agreed to to the ids its
	// block status chunks will carry.
	contexts map[string]uint32
	// Block size constraints; zero when the server sent none.
	minBlock, prefBlock, maxBlock uint32
}

// readGreeting reads the server's opening and returns its handshake
// flags, refusing servers that cannot do fixed newstyle negotiation
// (which NBD_OPT_GO and structured replies need).
func readGreeting(r io.Reader) (uint16, error) {
	var g [18]byte
	if _, err := io.ReadFull(r, g[:]); err != nil {
		return 0, fmt.Errorf("reading greeting: %w", err)
	}
	if m := be.Uint64(g[0:]); m != magicInit {
		return 0, protoErr("greeting magic %#x: not an NBD server", m)
	}
	switch m := be.Uint64(g[8:]); m {
	case magicOpt:
	case magicOldstyle:
		return 0, errors.New("server speaks only oldstyle negotiation")
	default:
		return 0, protoErr("greeting option magic %#x", m)
	}
	flags := be.Uint16(g[16:])
	if flags&flagFixedNewstyle == 0 {
		return 0, errors.New("server lacks fixed newstyle negotiation")
	}
	return flags, nil
}

// negotiate runs the client side of the handshake on r and w, leaving
// the connection in the transmission phase. It only reads through r, so
// it can be fed arbitrary bytes.
func negotiate(r *bufio.Reader, w io.Writer, opts Options) (*export, error) {
	if len(opts.Export) > maxErrString {
		return nil, fmt.Errorf("export name of %d bytes is too long", len(opts.Export))
	}
	for _, q := range opts.MetaContexts {
		if len(q) > maxErrString || q == "" {
			return nil, fmt.Errorf("meta context name %q: empty or too long", q)
		}
	}
	hflags, err := readGreeting(r)
	if err != nil {
		return nil, err
	}
	cflags := flagFixedNewstyle
	if hflags&flagNoZeroes != 0 {
		cflags |= flagNoZeroes
	}
	if _, err := w.Write(be.AppendUint32(nil, uint32(cflags))); err != nil {
		return nil, fmt.Errorf("sending client flags: %w", err)
	}

	ex := &export{}
	if ex.structured, err = optStructured(r, w); err != nil {
		return nil, err
	}
	if len(opts.MetaContexts) > 0 {
		if !ex.structured {
			return nil, errors.New("server lacks structured replies, which meta contexts need")
		}
		if ex.contexts, err = optMetaContexts(r, w, opts); err != nil {
			return nil, err
		}
	}
	if err := selectExport(r, w, opts.Export, ex, cflags&flagNoZeroes != 0); err != nil {
		return nil, err
	}
	return ex, nil
}

// optStructured asks for structured replies, which carry read errors and
// holes and are needed for block status. An old server's refusal is not
// fatal: reads then come back as plain data.
func optStructured(r io.Reader, w io.Writer) (bool, error) {
	if _, err := w.Write(appendOption(nil, optStructuredRepl, nil)); err != nil {
		return false, fmt.Errorf("sending option: %w", err)
	}
	rep, err := readOptReply(r, optStructuredRepl)
	if err != nil {
		return false, fmt.Errorf("structured replies: %w", err)
	}
	switch {
	case rep.typ == repAck:
		if rep.length != 0 {
			return false, protoErr("structured replies acknowledged with %d bytes of data", rep.length)
		}
		return true, nil
	case rep.typ&repErrBit != 0:
		return false, discard(r, int64(rep.length))
	default:
		return false, protoErr("reply type %d to structured replies", rep.typ)
	}
}

// optMetaContexts selects the requested meta contexts and learns their
// ids.
func optMetaContexts(r io.Reader, w io.Writer, opts Options) (map[string]uint32, error) {
	data := appendString(nil, opts.Export)
	data = be.AppendUint32(data, uint32(len(opts.MetaContexts)))
	wanted := make(map[string]bool, len(opts.MetaContexts))
	for _, q := range opts.MetaContexts {
		data = appendString(data, q)
		wanted[q] = true
	}
	if _, err := w.Write(appendOption(nil, optSetMetaContext, data)); err != nil {
		return nil, fmt.Errorf("sending option: %w", err)
	}
	got := make(map[string]uint32)
	ids := make(map[uint32]bool)
	for range maxOptReplies {
		rep, err := readOptReply(r, optSetMetaContext)
		if err != nil {
			return nil, fmt.Errorf("meta contexts: %w", err)
		}
		switch {
		case rep.typ == repAck:
			if rep.length != 0 {
				return nil, protoErr("meta contexts acknowledged with %d bytes of data", rep.length)
			}
			for _, q := range opts.MetaContexts {
				if _, ok := got[q]; !ok {
					return nil, fmt.Errorf("server does not offer meta context %q", q)
				}
			}
			return got, nil
		case rep.typ == repMetaContext:
			if rep.length < 4 || rep.length > 4+maxErrString {
				return nil, protoErr("meta context reply of %d bytes", rep.length)
			}
			buf := make([]byte, rep.length)
			if _, err := io.ReadFull(r, buf); err != nil {
				return nil, fmt.Errorf("meta contexts: %w", err)
			}
			id, name := be.Uint32(buf), string(buf[4:])
			if ids[id] {
				return nil, protoErr("meta context id %d given twice", id)
			}
			ids[id] = true
			// Contexts nobody asked for are ignored: the id is still
			// remembered above, so a duplicate is caught.
			if wanted[name] {
				got[name] = id
			}
		case rep.typ&repErrBit != 0:
			msg, err := readMessage(r, rep.length)
			if err != nil {
				return nil, fmt.Errorf("meta contexts: %w", err)
			}
			return nil, fmt.Errorf("meta contexts: %w", optReplyError(optSetMetaContext, rep.typ, msg))
		default:
			return nil, protoErr("reply type %d to meta contexts", rep.typ)
		}
	}
	return nil, protoErr("more than %d replies to meta contexts", maxOptReplies)
}

// selectExport picks the export and enters transmission, asking for block size
// constraints so that requests can honour them.
func selectExport(r io.Reader, w io.Writer, name string, ex *export, noZeroes bool) error {
	data := appendString(nil, name)
	data = be.AppendUint16(data, 1)
	data = be.AppendUint16(data, infoBlockSize)
	if _, err := w.Write(appendOption(nil, optGo, data)); err != nil {
		return fmt.Errorf("sending option: %w", err)
	}
	haveExport := false
	for range maxOptReplies {
		rep, err := readOptReply(r, optGo)
		if err != nil {
			return fmt.Errorf("selecting export %q: %w", name, err)
		}
		switch {
		case rep.typ == repAck:
			if rep.length != 0 {
				return protoErr("export acknowledged with %d bytes of data", rep.length)
			}
			if !haveExport {
				return protoErr("export acknowledged without its size and flags")
			}
			return checkExport(ex)
		case rep.typ == repInfo:
			if rep.length < 2 {
				return protoErr("export information of %d bytes", rep.length)
			}
			var t [2]byte
			if _, err := io.ReadFull(r, t[:]); err != nil {
				return fmt.Errorf("selecting export %q: %w", name, err)
			}
			switch be.Uint16(t[:]) {
			case infoExport:
				if rep.length != 12 {
					return protoErr("export size information of %d bytes", rep.length)
				}
				var b [10]byte
				if _, err := io.ReadFull(r, b[:]); err != nil {
					return fmt.Errorf("selecting export %q: %w", name, err)
				}
				ex.size, ex.flags = be.Uint64(b[0:]), be.Uint16(b[8:])
				haveExport = true
			case infoBlockSize:
				if rep.length != 14 {
					return protoErr("block size information of %d bytes", rep.length)
				}
				var b [12]byte
				if _, err := io.ReadFull(r, b[:]); err != nil {
					return fmt.Errorf("selecting export %q: %w", name, err)
				}
				ex.minBlock, ex.prefBlock, ex.maxBlock = be.Uint32(b[0:]), be.Uint32(b[4:]), be.Uint32(b[8:])
			default:
				// Information nobody asked for, such as a description.
				if err := discard(r, int64(rep.length-2)); err != nil {
					return fmt.Errorf("selecting export %q: %w", name, err)
				}
			}
		case rep.typ == repErrBit+1:
			// A server without NBD_OPT_GO: fall back to the old way.
			if err := discard(r, int64(rep.length)); err != nil {
				return fmt.Errorf("selecting export %q: %w", name, err)
			}
			return selectExportOld(r, w, name, ex, noZeroes)
		case rep.typ&repErrBit != 0:
			msg, err := readMessage(r, rep.length)
			if err != nil {
				return fmt.Errorf("selecting export %q: %w", name, err)
			}
			return fmt.Errorf("selecting export %q: %w", name, optReplyError(optGo, rep.typ, msg))
		default:
			return protoErr("reply type %d to selecting the export", rep.typ)
		}
	}
	return protoErr("more than %d replies to selecting the export", maxOptReplies)
}

// selectExportOld is the pre-NBD_OPT_GO way into transmission, for old servers.
func selectExportOld(r io.Reader, w io.Writer, name string, ex *export, noZeroes bool) error {
	if _, err := w.Write(appendOption(nil, optExportName, []byte(name))); err != nil {
		return fmt.Errorf("sending option: %w", err)
	}
	var b [10]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return fmt.Errorf("selecting export %q: %w", name, err)
	}
	ex.size, ex.flags = be.Uint64(b[0:]), be.Uint16(b[8:])
	if !noZeroes {
		if err := discard(r, 124); err != nil {
			return fmt.Errorf("selecting export %q: %w", name, err)
		}
	}
	return checkExport(ex)
}

// checkExport refuses sizes and constraints that make no sense, so the
// rest of the client can rely on them.
func checkExport(ex *export) error {
	if ex.flags&tfHasFlags == 0 {
		return protoErr("transmission flags %#x lack NBD_FLAG_HAS_FLAGS", ex.flags)
	}
	if ex.size > math.MaxInt64 {
		return protoErr("export size %d", ex.size)
	}
	if ex.minBlock == 0 && ex.prefBlock == 0 && ex.maxBlock == 0 {
		return nil
	}
	pow2 := func(v uint32) bool { return v != 0 && bits.OnesCount32(v) == 1 }
	switch {
	case !pow2(ex.minBlock) || ex.minBlock > 64<<10:
		return protoErr("minimum block size %d", ex.minBlock)
	case !pow2(ex.prefBlock) || ex.prefBlock < ex.minBlock:
		return protoErr("preferred block size %d", ex.prefBlock)
	case ex.maxBlock < ex.minBlock || (ex.maxBlock%ex.minBlock != 0 && ex.maxBlock != math.MaxUint32):
		return protoErr("maximum block size %d", ex.maxBlock)
	}
	return nil
}

// maxPayload is the largest read or write to send in one request.
func (ex *export) maxPayload() uint32 {
	n := uint32(defaultMaxPayload)
	if ex.maxBlock != 0 && ex.maxBlock < n {
		n = ex.maxBlock
	}
	if ex.minBlock > 1 {
		n -= n % ex.minBlock
	}
	return n
}

// align is the alignment requests must keep.
func (ex *export) align() uint32 {
	return max(ex.minBlock, 1)
}
