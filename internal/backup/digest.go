package backup

import (
	"encoding/hex"
	"fmt"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// Digest names a chunk: the BLAKE3-256 of its uncompressed bytes. The
// zero Digest stands for a chunk of zeros, which is never stored.
type Digest [32]byte

// IsZero reports whether d stands for a chunk of zeros.
func (d Digest) IsZero() bool { return d == Digest{} }

// String is the digest in lowercase hex. Unlike MarshalText it spells out
// the zero Digest too, so that an error message never shows an empty name.
func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// MarshalText writes 64 lowercase hex digits, or nothing for the zero
// Digest: manifests of mostly empty disks stay small.
func (d Digest) MarshalText() ([]byte, error) {
	if d.IsZero() {
		return []byte{}, nil
	}
	out := make([]byte, hex.EncodedLen(len(d)))
	hex.Encode(out, d[:])
	return out, nil
}

// UnmarshalText reads what MarshalText writes and nothing else: one
// spelling per digest keeps manifests byte-for-byte reproducible.
func (d *Digest) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		*d = Digest{}
		return nil
	}
	if len(b) != 2*len(d) {
		return fmt.Errorf("digest %q: %w: want 64 lowercase hex digits", b, errdefs.ErrInvalid)
	}
	for _, c := range b {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return fmt.Errorf("digest %q: %w: want 64 lowercase hex digits", b, errdefs.ErrInvalid)
		}
	}
	var v Digest
	if _, err := hex.Decode(v[:], b); err != nil {
		return fmt.Errorf("digest %q: %w: %w", b, errdefs.ErrInvalid, err)
	}
	if v.IsZero() {
		return fmt.Errorf("digest %q: %w: a chunk of zeros is written as \"\"", b, errdefs.ErrInvalid)
	}
	*d = v
	return nil
}
