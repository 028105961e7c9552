package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// ErrNotQcow2 means a file does not start with a qcow2 header.
var ErrNotQcow2 = errors.New("not a qcow2 image")

// MaxChain bounds how deep Chain follows backing files.
const MaxChain = 256

// Backing is what a qcow2 header says an image stands on.
type Backing struct {
	// File is the backing file as the header names it; Path is it
	// resolved against the image's directory, as QEMU does. Both are
	// empty for a standalone image.
	File, Path string
	// Format is the backing file's format from the header extension,
	// "" if the header does not say.
	Format string
}

// backing extension type in a version 3 header.
const extBackingFormat = 0xe2792aca

// ReadBacking reads the backing file an image's header names.
func ReadBacking(path string) (Backing, error) {
	f, err := os.Open(path)
	if err != nil {
		return Backing{}, err
	}
	defer func() { _ = f.Close() }()
	b, err := parseBacking(io.NewSectionReader(f, 0, clusterSize))
	if err != nil {
		return Backing{}, fmt.Errorf("qcow2 %s: %w", path, err)
	}
	if b.File != "" {
		b.Path = b.File
		if !filepath.IsAbs(b.Path) {
			b.Path = filepath.Join(filepath.Dir(path), b.Path)
		}
	}
	return b, nil
}

// Chain lists the files an image stands on, nearest first, each with the
// format its header names. It fails on a chain deeper than MaxChain, one
// that loops, or a backing file whose format is not given or not qcow2 or
// raw (a raw file ends the chain).
func Chain(path string) ([]Backing, error) {
	var out []Backing
	seen := map[string]bool{path: true}
	for cur := path; ; {
		b, err := ReadBacking(cur)
		if err != nil {
			return nil, err
		}
		if b.File == "" {
			return out, nil
		}
		switch {
		case len(out) >= MaxChain:
			return nil, fmt.Errorf("qcow2 %s: backing chain deeper than %d", path, MaxChain)
		case seen[b.Path]:
			return nil, fmt.Errorf("qcow2 %s: backing chain loops at %s", path, b.Path)
		case b.Format != "qcow2" && b.Format != "raw":
			return nil, fmt.Errorf("qcow2 %s: backing file %s: format %q: want qcow2 or raw", cur, b.Path, b.Format)
		}
		seen[b.Path] = true
		out = append(out, b)
		if b.Format == "raw" {
			return out, nil
		}
		cur = b.Path
	}
}

// parseBacking reads the backing file name and format from a header,
// which must lie within the first cluster.
func parseBacking(r io.ReaderAt) (Backing, error) {
	hdr := make([]byte, clusterSize)
	n, err := r.ReadAt(hdr, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return Backing{}, err
	}
	hdr = hdr[:n]
	if len(hdr) < 72 || string(hdr[:4]) != "QFI\xfb" {
		return Backing{}, ErrNotQcow2
	}
	version := binary.BigEndian.Uint32(hdr[4:])
	if version != 2 && version != 3 {
		return Backing{}, fmt.Errorf("%w: version %d", ErrNotQcow2, version)
	}
	off := binary.BigEndian.Uint64(hdr[8:])
	size := uint64(binary.BigEndian.Uint32(hdr[16:]))
	var b Backing
	if off != 0 {
		if size == 0 || size > 1023 || off > uint64(len(hdr)) || size > uint64(len(hdr))-off {
			return Backing{}, fmt.Errorf("backing file name at %d, %d bytes: outside the header", off, size)
		}
		b.File = string(hdr[off : off+size])
	}
	if b.File == "" {
		return b, nil
	}
	// Version 2 headers carry extensions too, right after their 72
	// bytes; QEMU writes the backing format there as in version 3.
	start := uint64(72)
	if version == 3 {
		if len(hdr) < 104 {
			return Backing{}, fmt.Errorf("%w: version 3 header of %d bytes", ErrNotQcow2, len(hdr))
		}
		start = uint64(binary.BigEndian.Uint32(hdr[100:]))
	}
	// The extensions end where the name starts.
	err = headerExtensions(hdr, start, off, func(typ uint32, data []byte) error {
		if typ == extBackingFormat {
			b.Format = string(data)
		}
		return nil
	})
	if err != nil {
		return Backing{}, err
	}
	return b, nil
}

// headerExtensions calls fn with each header extension's type and data,
// from start (the end of the fixed header) up to limit (where the backing
// file name starts, or the end of the first cluster), until the end
// marker. c0 is as much of the first cluster as the file holds.
func headerExtensions(c0 []byte, start, limit uint64, fn func(typ uint32, data []byte) error) error {
	be := binary.BigEndian
	for pos := start; pos < limit; {
		if pos+8 > limit {
			return fmt.Errorf("header extension at %d: too large", pos)
		}
		if pos+8 > uint64(len(c0)) {
			return fmt.Errorf("header extension at %d: past the end of the file", pos)
		}
		typ, n := be.Uint32(c0[pos:]), uint64(be.Uint32(c0[pos+4:]))
		pos += 8
		if n > limit-pos {
			return fmt.Errorf("header extension %#x at %d: %d bytes too large", typ, pos-8, n)
		}
		if typ == extEnd {
			return nil
		}
		if pos+n > uint64(len(c0)) {
			return fmt.Errorf("header extension %#x at %d: past the end of the file", typ, pos-8)
		}
		if err := fn(typ, c0[pos:pos+n]); err != nil {
			return err
		}
		pos += (n + 7) &^ 7
	}
	return nil
}
