package bundle

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
)

// The archive inside a bundle is POSIX tar (pax), which GNU tar, bsdtar
// and Go read. Disks are GNU sparse 1.0 entries: only their data regions
// are stored, and `tar -xS` recreates the holes. Lodge writes its own tar
// rather than use archive/tar because Go's writer cannot write sparse
// entries and its reader hides the sparse map Lodge needs to keep holes
// as holes. The reader accepts only what the writer makes: regular files
// and pax headers, nothing that could name a link or a device.

const block = 512

// Extent is a data region of a disk or file.
type Extent struct{ Offset, Length int64 }

func padLen(n int64) int64 { return (block - n%block) % block }

// paxRecords encodes pax extended-header records in a stable order.
func paxRecords(kv map[string]string) []byte {
	keys := make([]string, 0, len(kv))
	for k := range kv {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b bytes.Buffer
	for _, k := range keys {
		rec := " " + k + "=" + kv[k] + "\n"
		// The length field counts itself.
		n := len(rec) + 1
		for len(strconv.Itoa(n))+len(rec) != n {
			n++
		}
		b.WriteString(strconv.Itoa(n) + rec)
	}
	return b.Bytes()
}

// ustarHeader makes one 512-byte header block.
func ustarHeader(name string, size int64, typ byte) []byte {
	h := make([]byte, block)
	copy(h[0:100], name)
	copy(h[100:108], "0000644\x00")
	copy(h[108:116], "0000000\x00")
	copy(h[116:124], "0000000\x00")
	if size >= 1<<33 {
		size = 0 // the pax size record carries it
	}
	copy(h[124:136], fmt.Sprintf("%011o\x00", size))
	copy(h[136:148], "00000000000\x00")
	h[156] = typ
	copy(h[257:265], "ustar\x0000")
	copy(h[148:156], "        ")
	var sum int64
	for _, c := range h {
		sum += int64(c)
	}
	copy(h[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return h
}

// entryHeader is the header blocks (pax, then ustar) of one regular
// file whose stored content is size bytes.
func entryHeader(name string, size int64, pax map[string]string) []byte {
	var b bytes.Buffer
	ustarName := name
	if pax == nil {
		pax = map[string]string{}
	}
	if size >= 1<<33 {
		pax["size"] = strconv.FormatInt(size, 10)
	}
	if _, sparse := pax["GNU.sparse.name"]; sparse {
		ustarName = "GNUSparseFile.0/" + name
	}
	if len(ustarName) > 99 {
		pax["path"] = name
		ustarName = ustarName[:99]
	}
	if len(pax) > 0 {
		recs := paxRecords(pax)
		b.Write(ustarHeader("PaxHeaders.0/"+strings.TrimPrefix(ustarName, "GNUSparseFile.0/"), int64(len(recs)), 'x'))
		b.Write(recs)
		b.Write(make([]byte, padLen(int64(len(recs)))))
	}
	b.Write(ustarHeader(ustarName, size, '0'))
	return b.Bytes()
}

// sparseMap is the text a GNU sparse 1.0 entry's data starts with,
// padded to a block.
func sparseMap(extents []Extent, realSize int64) []byte {
	ext := extents
	if len(ext) == 0 || ext[len(ext)-1].Offset+ext[len(ext)-1].Length < realSize {
		// A closing empty region tells tar the file's full length.
		ext = append(append([]Extent(nil), ext...), Extent{Offset: realSize})
	}
	var b bytes.Buffer
	b.WriteString(strconv.Itoa(len(ext)) + "\n")
	for _, e := range ext {
		b.WriteString(strconv.FormatInt(e.Offset, 10) + "\n" + strconv.FormatInt(e.Length, 10) + "\n")
	}
	b.Write(make([]byte, padLen(int64(b.Len()))))
	return b.Bytes()
}

func dataLen(extents []Extent) int64 {
	var n int64
	for _, e := range extents {
		n += e.Length
	}
	return n
}

// sparseEntrySize is the whole size of a sparse entry in the archive.
func sparseEntrySize(name string, extents []Extent, realSize int64) int64 {
	m := int64(len(sparseMap(extents, realSize)))
	content := m + dataLen(extents)
	return int64(len(entryHeader(name, content, sparsePax(name, realSize)))) + content + padLen(content)
}

func sparsePax(name string, realSize int64) map[string]string {
	return map[string]string{
		"GNU.sparse.major":    "1",
		"GNU.sparse.minor":    "0",
		"GNU.sparse.name":     name,
		"GNU.sparse.realsize": strconv.FormatInt(realSize, 10),
	}
}

func fileEntrySize(name string, n int64) int64 {
	return int64(len(entryHeader(name, n, nil))) + n + padLen(n)
}

// endOfArchive is the two zero blocks that end a tar archive.
var endOfArchive = make([]byte, 2*block)

// Limits the reader holds any archive to.
const (
	maxPax         = 64 << 10
	maxSparseMap   = 1 << 20 // regions in one entry
	maxSmallEntry  = 4 << 20 // manifest and sums
	maxNameLen     = 255
	maxRealSize    = 64 << 40
	sparseMapLimit = 32 << 20 // bytes of map text
)

// tarEntry is one file the reader found.
type tarEntry struct {
	Name     string
	Size     int64 // stored content length
	Sparse   bool
	RealSize int64
	Extents  []Extent
	mapLen   int64
}

// tarReader reads the archive strictly: each refusal names the entry.
type tarReader struct {
	r       io.Reader
	pos     int64 // archive offset
	left    int64 // content bytes of the current entry not yet read
	pad     int64
	current string
}

func (t *tarReader) read(p []byte) error {
	n, err := io.ReadFull(t.r, p)
	t.pos += int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return corrupt("archive ends at byte %d, in the middle of %s", t.pos, t.where())
		}
		return err
	}
	return nil
}

func (t *tarReader) where() string {
	if t.current == "" {
		return "the archive"
	}
	return "entry " + strconv.Quote(t.current)
}

func (t *tarReader) skipRest() error {
	n := t.left + t.pad
	t.left, t.pad = 0, 0
	if n == 0 {
		return nil
	}
	m, err := io.CopyN(io.Discard, t.r, n)
	t.pos += m
	if err != nil {
		if errors.Is(err, io.EOF) {
			return corrupt("archive ends at byte %d, in the middle of %s", t.pos, t.where())
		}
		return err
	}
	return nil
}

// next reads the next entry's headers (and a sparse entry's map). It
// returns io.EOF at the archive's end marker.
func (t *tarReader) next() (*tarEntry, error) {
	if err := t.skipRest(); err != nil {
		return nil, err
	}
	t.current = ""
	var pax map[string]string
	hdr := make([]byte, block)
	for {
		if err := t.read(hdr); err != nil {
			return nil, err
		}
		if bytes.Equal(hdr, endOfArchive[:block]) {
			if pax != nil {
				return nil, corrupt("archive ends after a pax header with no entry")
			}
			// The end marker is two zero blocks.
			if err := t.read(hdr); err != nil {
				return nil, err
			}
			if !bytes.Equal(hdr, endOfArchive[:block]) {
				return nil, corrupt("a zero block at byte %d is followed by data", t.pos-2*block)
			}
			return nil, io.EOF
		}
		if err := checkSum(hdr); err != nil {
			return nil, corrupt("header at byte %d: %v", t.pos-block, err)
		}
		if string(hdr[257:263]) != "ustar\x00" {
			return nil, corrupt("header at byte %d is not a pax/ustar header", t.pos-block)
		}
		size, err := octal(hdr[124:136])
		if err != nil {
			return nil, corrupt("header at byte %d: size: %v", t.pos-block, err)
		}
		name := cstr(hdr[0:100])
		if prefix := cstr(hdr[345:500]); prefix != "" {
			name = prefix + "/" + name
		}
		switch typ := hdr[156]; typ {
		case 'x':
			if pax != nil {
				return nil, corrupt("two pax headers in a row at byte %d", t.pos-block)
			}
			if size > maxPax {
				return nil, corrupt("pax header of %d bytes at byte %d", size, t.pos-block)
			}
			raw := make([]byte, size+padLen(size))
			if err := t.read(raw); err != nil {
				return nil, err
			}
			if pax, err = parsePax(raw[:size]); err != nil {
				return nil, corrupt("pax header at byte %d: %v", t.pos-int64(len(raw))-block, err)
			}
			continue
		case '0', 0:
		default:
			if p, ok := pax["path"]; ok {
				name = p
			}
			return nil, corrupt("entry %q is a %s; a bundle holds only regular files", name, typeName(typ))
		}
		e := &tarEntry{Name: name, Size: size}
		if v, ok := pax["size"]; ok {
			if e.Size, err = strconv.ParseInt(v, 10, 64); err != nil || e.Size < 0 {
				return nil, corrupt("entry %q: bad pax size %q", name, v)
			}
		}
		if p, ok := pax["path"]; ok {
			e.Name = p
		}
		if sn, ok := pax["GNU.sparse.name"]; ok {
			e.Name, e.Sparse = sn, true
			if pax["GNU.sparse.major"] != "1" || pax["GNU.sparse.minor"] != "0" {
				return nil, corrupt("entry %q: sparse format %s.%s; only 1.0 is read", sn, pax["GNU.sparse.major"], pax["GNU.sparse.minor"])
			}
			if e.RealSize, err = strconv.ParseInt(pax["GNU.sparse.realsize"], 10, 64); err != nil || e.RealSize < 0 || e.RealSize > maxRealSize {
				return nil, corrupt("entry %q: bad sparse size %q", sn, pax["GNU.sparse.realsize"])
			}
		}
		if len(e.Name) > maxNameLen || e.Name == "" {
			return nil, corrupt("entry at byte %d has an empty or overlong name", t.pos-block)
		}
		t.current = e.Name
		t.left, t.pad = e.Size, padLen(e.Size)
		if e.Sparse {
			if err := t.readSparseMap(e); err != nil {
				return nil, err
			}
		}
		return e, nil
	}
}

// readSparseMap reads and checks the region list at the start of a
// sparse entry's content.
func (t *tarReader) readSparseMap(e *tarEntry) error {
	var text []byte
	lines := 0
	want := -1
	var nums []int64
	buf := make([]byte, block)
	for want < 0 || len(nums) < 1+2*want {
		if int64(len(text)) >= sparseMapLimit || t.left < block {
			return corrupt("entry %q: sparse map too long or cut short", e.Name)
		}
		if err := t.read(buf); err != nil {
			return err
		}
		t.left -= block
		e.mapLen += block
		text = append(text, buf...)
		for {
			i := bytes.IndexByte(text, '\n')
			if i < 0 || (want >= 0 && len(nums) >= 1+2*want) {
				break
			}
			v, err := strconv.ParseInt(string(text[:i]), 10, 64)
			if err != nil || v < 0 {
				return corrupt("entry %q: sparse map line %d is not a number", e.Name, lines+1)
			}
			text = text[i+1:]
			lines++
			nums = append(nums, v)
			if want < 0 {
				if v > maxSparseMap {
					return corrupt("entry %q: %d sparse regions", e.Name, v)
				}
				want = int(v)
			}
		}
	}
	var end, data int64
	for i := 0; i < want; i++ {
		off, n := nums[1+2*i], nums[2+2*i]
		if off < end || n > e.RealSize || off > e.RealSize-n {
			return corrupt("entry %q: sparse region %d (%d+%d) overlaps or lies outside the %d-byte file", e.Name, i, off, n, e.RealSize)
		}
		if off%block != 0 || n%block != 0 {
			return corrupt("entry %q: sparse region %d (%d+%d) is not aligned to %d bytes", e.Name, i, off, n, block)
		}
		end = off + n
		data += n
		if n > 0 {
			e.Extents = append(e.Extents, Extent{Offset: off, Length: n})
		}
	}
	if data != t.left {
		return corrupt("entry %q: sparse regions hold %d bytes, the entry %d", e.Name, data, t.left)
	}
	return nil
}

// Read reads the current entry's content (for a sparse entry, its data
// regions one after another).
func (t *tarReader) Read(p []byte) (int, error) {
	if t.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > t.left {
		p = p[:t.left]
	}
	n, err := t.r.Read(p)
	t.pos += int64(n)
	t.left -= int64(n)
	if err != nil && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
		if t.left > 0 {
			err = corrupt("archive ends at byte %d, in the middle of %s", t.pos, t.where())
		}
	}
	return n, err
}

func checkSum(h []byte) error {
	want, err := octal(h[148:156])
	if err != nil {
		return fmt.Errorf("checksum field: %w", err)
	}
	var sum int64
	for i, c := range h {
		if i >= 148 && i < 156 {
			c = ' '
		}
		sum += int64(c)
	}
	if sum != want {
		return errors.New("header checksum mismatch")
	}
	return nil
}

func octal(b []byte) (int64, error) {
	s := strings.Trim(string(b), " \x00")
	if s == "" {
		return 0, nil
	}
	v, err := strconv.ParseInt(s, 8, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("not an octal number: %q", s)
	}
	return v, nil
}

func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func parsePax(b []byte) (map[string]string, error) {
	kv := map[string]string{}
	for len(b) > 0 {
		sp := bytes.IndexByte(b, ' ')
		if sp <= 0 || sp > 10 {
			return nil, errors.New("bad record length")
		}
		n, err := strconv.Atoi(string(b[:sp]))
		if err != nil || n <= sp+1 || n > len(b) || b[n-1] != '\n' {
			return nil, errors.New("bad record length")
		}
		rec := string(b[sp+1 : n-1])
		eq := strings.IndexByte(rec, '=')
		if eq <= 0 {
			return nil, errors.New("record without a key")
		}
		k, v := rec[:eq], rec[eq+1:]
		if _, dup := kv[k]; dup {
			return nil, fmt.Errorf("record %q twice", k)
		}
		switch {
		case k == "path" || k == "size" || strings.HasPrefix(k, "GNU.sparse."):
			if k == "GNU.sparse.map" || k == "GNU.sparse.offset" || k == "GNU.sparse.numbytes" || k == "GNU.sparse.size" {
				return nil, fmt.Errorf("sparse format 0.x record %q is not read", k)
			}
			kv[k] = v
		case k == "linkpath":
			return nil, errors.New("a link target")
		default:
			// mtime, uid and the like carry nothing a bundle needs.
		}
		b = b[n:]
	}
	return kv, nil
}

func typeName(t byte) string {
	switch t {
	case '1':
		return "hard link"
	case '2':
		return "symbolic link"
	case '3':
		return "character device"
	case '4':
		return "block device"
	case '5':
		return "directory"
	case '6':
		return "FIFO"
	case 'g':
		return "global pax header"
	case 'L', 'K':
		return "GNU long name"
	case 'S':
		return "old GNU sparse file"
	}
	return fmt.Sprintf("entry of type %q", t)
}
