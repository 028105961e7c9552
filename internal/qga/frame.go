package qga

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// delimiter is the byte the agent sends ahead of its reply to
// guest-sync-delimited, and that makes its parser start afresh when we
// send it. It can never occur in JSON text, which is UTF-8.
const delimiter = 0xFF

// maxFrame bounds a single reply. The largest legitimate one is a
// guest-exec-status carrying two streams of up to 16 MiB each, base64
// encoded; anything much bigger is a misbehaving guest that would
// otherwise make the host buffer without limit.
const maxFrame = 64 << 20

var errFrameTooLarge = errors.New("reply too large")

// errMalformed marks replies that are JSON objects but not replies; it
// means the stream cannot be trusted and must be resynchronised.
var errMalformed = errors.New("malformed reply")

// readFrame returns the next top-level JSON object from r, without
// checking that it is valid JSON inside. Bytes outside an object are
// skipped: whitespace between replies, or leftovers from an exchange
// that was abandoned. A delimiter byte anywhere discards what has been
// read of the current object, since it can only come from a sync reply
// that follows it.
func readFrame(r io.ByteReader, limit int) ([]byte, error) {
	var buf []byte
	depth := 0
	inString, escaped := false, false
	for {
		b, err := r.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) && len(buf) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		if b == delimiter {
			buf, depth, inString, escaped = buf[:0], 0, false, false
			continue
		}
		if depth == 0 && b != '{' {
			continue
		}
		if len(buf) >= limit {
			return nil, errFrameTooLarge
		}
		buf = append(buf, b)
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case b == '\\':
				escaped = true
			case b == '"':
				inString = false
			}
		case b == '"':
			inString = true
		case b == '{' || b == '[':
			depth++
		case b == '}' || b == ']':
			depth--
			if depth == 0 {
				return buf, nil
			}
		}
	}
}

// decodeReply splits a reply into its "return" member or an *Error.
func decodeReply(frame []byte) (json.RawMessage, error) {
	var m struct {
		Return json.RawMessage `json:"return"`
		Error  json.RawMessage `json:"error"`
	}
	if err := json.Unmarshal(frame, &m); err != nil {
		return nil, fmt.Errorf("%w: %w", errMalformed, err)
	}
	if m.Error != nil {
		var e Error
		if err := json.Unmarshal(m.Error, &e); err != nil {
			return nil, fmt.Errorf("%w: error member: %w", errMalformed, err)
		}
		return nil, &e
	}
	if m.Return == nil {
		return nil, fmt.Errorf("%w: neither return nor error in %.100q", errMalformed, frame)
	}
	return m.Return, nil
}

// isSyncReply reports whether frame answers the guest-sync-delimited
// carrying id.
func isSyncReply(frame []byte, id int64) bool {
	var m struct {
		Return json.RawMessage `json:"return"`
	}
	if json.Unmarshal(frame, &m) != nil || m.Return == nil {
		return false
	}
	var got int64
	return json.Unmarshal(m.Return, &got) == nil && got == id
}
