package ovf

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// blockSize is the unit of sparse detection and of cancellation checks:
// small enough to find the holes of a freshly installed guest, large enough
// that the per-block overhead is negligible.
const blockSize = 64 << 10

var zeroBlock [blockSize]byte

// errTruncated reports a member that ends before its declared size.
var errTruncated = errors.New("the data ends early")

// ReadOVA unpacks the OVA archive at path into dir, which must exist and be
// empty, and returns the descriptor and the paths of the disk files in
// Descriptor.Disks order. Only disk files are written; other referenced
// files are read, size-checked and verified, then dropped. No member may be
// larger than maxBytes. On error nothing it wrote is left in dir. Any refusal
// of the archive wraps ErrInvalid; cancellation returns ctx.Err().
func ReadOVA(ctx context.Context, path, dir string, maxBytes int64) (Descriptor, []string, error) {
	if maxBytes <= 0 {
		return Descriptor{}, nil, fmt.Errorf("ovf: maxBytes must be positive, not %d", maxBytes)
	}
	absDir, err := filepath.Abs(dir)
	if err != nil {
		return Descriptor{}, nil, fmt.Errorf("ovf: %w", err)
	}
	entries, err := os.ReadDir(absDir)
	if err != nil {
		return Descriptor{}, nil, fmt.Errorf("ovf: %w", err)
	}
	if len(entries) > 0 {
		return Descriptor{}, nil, fmt.Errorf("ovf: %s is not empty", absDir)
	}
	// Writing through a Root means no member name, however it slipped past
	// the checks, can land outside dir.
	root, err := os.OpenRoot(absDir)
	if err != nil {
		return Descriptor{}, nil, fmt.Errorf("ovf: %w", err)
	}
	defer func() { _ = root.Close() }()
	f, err := os.Open(path)
	if err != nil {
		return Descriptor{}, nil, fmt.Errorf("ovf: %w", err)
	}
	defer func() { _ = f.Close() }()

	u := &unpacker{
		ctx:      ctx,
		tr:       tar.NewReader(f),
		root:     root,
		maxBytes: maxBytes,
		seen:     map[string]bool{},
		sums:     map[string]map[string][]byte{},
	}
	d, err := u.run()
	if err != nil {
		u.removeWritten()
		return Descriptor{}, nil, err
	}
	paths := make([]string, len(d.Disks))
	for i, disk := range d.Disks {
		paths[i] = filepath.Join(absDir, disk.File)
	}
	return d, paths, nil
}

type unpacker struct {
	ctx      context.Context
	tr       *tar.Reader
	root     *os.Root
	maxBytes int64

	descName string
	files    map[string]*fileRef // by href
	seen     map[string]bool     // member names
	sums     map[string]map[string][]byte
	manifest map[string]Digest
	cert     bool
	written  []string
}

func (u *unpacker) run() (Descriptor, error) {
	hdr, err := u.next()
	if err != nil {
		return Descriptor{}, err
	}
	if hdr == nil {
		return Descriptor{}, invalid("archive is empty")
	}
	if err := u.checkMember(hdr); err != nil {
		return Descriptor{}, err
	}
	// The OVF specification puts the descriptor first so that a reader can
	// decide what to accept before streaming any disk data.
	if !strings.EqualFold(filepath.Ext(hdr.Name), ".ovf") {
		return Descriptor{}, invalid("first member %q is not an .ovf descriptor", hdr.Name)
	}
	data, err := u.readSmall(hdr, maxDescriptor)
	if err != nil {
		return Descriptor{}, err
	}
	d, files, err := parseDescriptor(data)
	if err != nil {
		return Descriptor{}, err
	}
	u.descName = hdr.Name
	all := newDigester(allAlgorithms)
	_, _ = all.writer().Write(data)
	u.sums[hdr.Name] = all.sums()
	u.files = map[string]*fileRef{}
	for _, f := range files {
		if f.href == u.descName {
			return Descriptor{}, invalid("file %q: href %q names the descriptor itself", f.id, f.href)
		}
		u.files[f.href] = f
	}

	for {
		if err := u.ctx.Err(); err != nil {
			return Descriptor{}, err
		}
		hdr, err := u.next()
		if err != nil {
			return Descriptor{}, err
		}
		if hdr == nil {
			break
		}
		if err := u.checkMember(hdr); err != nil {
			return Descriptor{}, err
		}
		ext := strings.ToLower(filepath.Ext(hdr.Name))
		switch {
		case u.files[hdr.Name] != nil:
			err = u.extract(hdr, u.files[hdr.Name])
		case ext == ".mf":
			err = u.readManifest(hdr)
		case ext == ".cert":
			// The certificate signs the manifest, but Lodge has no trust
			// store to check it against; the manifest alone still catches
			// corruption.
			if u.cert {
				return Descriptor{}, invalid("member %q: the archive has more than one certificate", hdr.Name)
			}
			u.cert = true
			_, err = u.readSmall(hdr, maxManifest)
		default:
			return Descriptor{}, invalid("member %q is not referenced by the descriptor", hdr.Name)
		}
		if err != nil {
			return Descriptor{}, err
		}
	}

	for _, f := range files {
		if !u.seen[f.href] {
			return Descriptor{}, invalid("%s: file %q is missing from the archive", f.href, f.id)
		}
	}
	if u.manifest != nil {
		if err := verify(u.manifest, files, func(name, alg string) ([]byte, bool, error) {
			s, ok := u.sums[name]
			if !ok {
				return nil, false, nil
			}
			sum, ok := s[alg]
			return sum, ok, nil
		}); err != nil {
			return Descriptor{}, err
		}
	}
	return d, nil
}

// next returns the next header, or nil at the end of the archive. A damaged
// archive is the appliance's fault; a failing disk is not.
func (u *unpacker) next() (*tar.Header, error) {
	hdr, err := u.tr.Next()
	switch {
	case errors.Is(err, io.EOF):
		return nil, nil
	case errors.Is(err, tar.ErrHeader), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, tar.ErrFieldTooLong), errors.Is(err, tar.ErrInsecurePath):
		return nil, invalid("damaged archive: %v", err)
	case err != nil:
		return nil, fmt.Errorf("ovf: read archive: %w", err)
	}
	return hdr, nil
}

func (u *unpacker) checkMember(hdr *tar.Header) error {
	if !isPlainName(hdr.Name) {
		return invalid("member %q is not a plain file name", hdr.Name)
	}
	if hdr.Typeflag != tar.TypeReg {
		return invalid("member %q is a %s, not a regular file", hdr.Name, typeName(hdr.Typeflag))
	}
	if u.seen[hdr.Name] {
		return invalid("member %q appears twice", hdr.Name)
	}
	u.seen[hdr.Name] = true
	if hdr.Size > u.maxBytes {
		return invalid("member %q is %d bytes, more than the limit of %d", hdr.Name, hdr.Size, u.maxBytes)
	}
	return nil
}

func typeName(flag byte) string {
	switch flag {
	case tar.TypeSymlink:
		return "symbolic link"
	case tar.TypeLink:
		return "hard link"
	case tar.TypeDir:
		return "directory"
	case tar.TypeChar, tar.TypeBlock:
		return "device"
	case tar.TypeFifo:
		return "FIFO"
	default:
		return fmt.Sprintf("member of type %q", flag)
	}
}

// readSmall reads a member that is needed in memory and is small by nature.
func (u *unpacker) readSmall(hdr *tar.Header, limit int64) ([]byte, error) {
	if hdr.Size > limit {
		return nil, invalid("member %q is %d bytes, more than the %d allowed for it", hdr.Name, hdr.Size, limit)
	}
	data := make([]byte, hdr.Size)
	if _, err := io.ReadFull(u.tr, data); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, invalid("member %q: %v", hdr.Name, errTruncated)
		}
		return nil, fmt.Errorf("ovf: read %s: %w", hdr.Name, err)
	}
	return data, nil
}

func (u *unpacker) readManifest(hdr *tar.Header) error {
	if u.manifest != nil {
		return invalid("member %q: the archive has more than one manifest", hdr.Name)
	}
	data, err := u.readSmall(hdr, maxManifest)
	if err != nil {
		return err
	}
	m, err := ParseManifest(bytes.NewReader(data))
	if err != nil {
		return err
	}
	u.manifest = m
	return nil
}

// extract copies one referenced member, hashing it on the way. Disks go to
// dir; other referenced files (ISO images, NVRAM) are only verified, since
// nothing in Lodge would use them.
func (u *unpacker) extract(hdr *tar.Header, ref *fileRef) (err error) {
	if ref.hasSize && ref.size != hdr.Size {
		return invalid("%s: member is %d bytes, but the descriptor says %d", hdr.Name, hdr.Size, ref.size)
	}
	algs := allAlgorithms
	if u.manifest != nil {
		dg, ok := u.manifest[hdr.Name]
		if !ok {
			return invalid("%s: not listed in the manifest", hdr.Name)
		}
		algs = []string{dg.Algorithm}
	}
	dig := newDigester(algs)
	var out *os.File
	if ref.disk {
		out, err = u.root.OpenFile(hdr.Name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return fmt.Errorf("ovf: %w", err)
		}
		u.written = append(u.written, hdr.Name)
		defer func() {
			if cerr := out.Close(); cerr != nil && err == nil {
				err = fmt.Errorf("ovf: %w", cerr)
			}
		}()
	}
	if err := copyBlocks(u.ctx, u.tr, out, hdr.Size, dig.writer()); err != nil {
		if errors.Is(err, errTruncated) {
			return invalid("member %q: %v", hdr.Name, err)
		}
		return err
	}
	u.sums[hdr.Name] = dig.sums()
	return nil
}

// removeWritten is best effort: the caller is already reporting the error
// that made the files useless.
func (u *unpacker) removeWritten() {
	for _, name := range u.written {
		_ = u.root.Remove(name)
	}
}

// copyBlocks copies exactly size bytes from r to h and, if out is not nil,
// to out, seeking over all-zero blocks so that the holes of a mostly empty
// disk stay holes on the host.
func copyBlocks(ctx context.Context, r io.Reader, out *os.File, size int64, h io.Writer) error {
	buf := make([]byte, blockSize)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		b := buf[:min(size-off, blockSize)]
		if _, err := io.ReadFull(r, b); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return errTruncated
			}
			return fmt.Errorf("ovf: read: %w", err)
		}
		_, _ = h.Write(b) // hashes never fail
		if out != nil {
			var err error
			if bytes.Equal(b, zeroBlock[:len(b)]) {
				_, err = out.Seek(int64(len(b)), io.SeekCurrent)
			} else {
				_, err = out.Write(b)
			}
			if err != nil {
				return fmt.Errorf("ovf: %w", err)
			}
		}
		off += int64(len(b))
	}
	if out != nil {
		// A trailing hole is only a seek; the truncate gives the file its
		// full length.
		if err := out.Truncate(size); err != nil {
			return fmt.Errorf("ovf: %w", err)
		}
	}
	return nil
}

// verify checks the manifest against the package: every referenced file
// must be listed, every listed file must be part of the package, and every
// digest must match. sum returns the digest of a package file computed with
// the given algorithm, or false if the file is not part of the package.
func verify(m map[string]Digest, files []*fileRef, sum func(name, alg string) ([]byte, bool, error)) error {
	for _, f := range files {
		if _, ok := m[f.href]; !ok {
			return invalid("%s: not listed in the manifest", f.href)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(m)) {
		dg := m[name]
		got, ok, err := sum(name, dg.Algorithm)
		if err != nil {
			return err
		}
		if !ok {
			return invalid("manifest lists %s, which is not part of the package", name)
		}
		if !bytes.Equal(got, dg.Sum) {
			return invalid("%s: %s digest does not match the manifest", name, dg.Algorithm)
		}
	}
	return nil
}

// ReadOVF reads a loose descriptor whose files sit in the same directory and
// returns the descriptor and the absolute paths of its disks in
// Descriptor.Disks order. If a manifest with the descriptor's base name and
// the .mf extension sits next to it, every file is verified against it.
// Any refusal wraps ErrInvalid; cancellation returns ctx.Err().
func ReadOVF(ctx context.Context, path string) (Descriptor, []string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return Descriptor{}, nil, fmt.Errorf("ovf: %w", err)
	}
	// The caller chose this path, so a link to the descriptor is trusted;
	// its siblings are looked up next to the real file, where the exporter
	// put them.
	if abs, err = filepath.EvalSymlinks(abs); err != nil {
		return Descriptor{}, nil, fmt.Errorf("ovf: %w", err)
	}
	dir, base := filepath.Dir(abs), filepath.Base(abs)
	root, err := os.OpenRoot(dir)
	if err != nil {
		return Descriptor{}, nil, fmt.Errorf("ovf: %w", err)
	}
	defer func() { _ = root.Close() }()
	data, err := readRootFile(root, base, maxDescriptor)
	if errors.Is(err, fs.ErrNotExist) {
		return Descriptor{}, nil, fmt.Errorf("ovf: %w", err)
	}
	if err != nil {
		return Descriptor{}, nil, err
	}
	d, files, err := parseDescriptor(data)
	if err != nil {
		return Descriptor{}, nil, err
	}
	for _, f := range files {
		if f.href == base {
			return Descriptor{}, nil, invalid("file %q: href %q names the descriptor itself", f.id, f.href)
		}
		// Symbolic links are refused so that a package cannot smuggle in
		// a host file (say, a link to another user's disk) as its own.
		fi, err := root.Lstat(f.href)
		if errors.Is(err, fs.ErrNotExist) {
			return Descriptor{}, nil, invalid("%s: file %q is missing from %s", f.href, f.id, dir)
		}
		if err != nil {
			return Descriptor{}, nil, fmt.Errorf("ovf: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return Descriptor{}, nil, invalid("%s: not a regular file", f.href)
		}
		if f.hasSize && fi.Size() != f.size {
			return Descriptor{}, nil, invalid("%s: file is %d bytes, but the descriptor says %d", f.href, fi.Size(), f.size)
		}
	}

	mfName := strings.TrimSuffix(base, filepath.Ext(base)) + ".mf"
	switch mf, err := readRootFile(root, mfName, maxManifest); {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return Descriptor{}, nil, err
	default:
		m, err := ParseManifest(bytes.NewReader(mf))
		if err != nil {
			return Descriptor{}, nil, err
		}
		refs := map[string]bool{}
		for _, f := range files {
			refs[f.href] = true
		}
		err = verify(m, files, func(name, alg string) ([]byte, bool, error) {
			dig := newDigester([]string{alg})
			switch {
			case name == base:
				_, _ = dig.writer().Write(data)
			case refs[name]:
				if err := hashRootFile(ctx, root, name, dig.writer()); err != nil {
					return nil, false, err
				}
			default:
				return nil, false, nil
			}
			return dig.sums()[alg], true, nil
		})
		if err != nil {
			return Descriptor{}, nil, err
		}
	}

	paths := make([]string, len(d.Disks))
	for i, disk := range d.Disks {
		paths[i] = filepath.Join(dir, disk.File)
	}
	return d, paths, nil
}

// readRootFile reads a small regular file, refusing links and anything
// larger than limit. A missing file yields an error wrapping fs.ErrNotExist.
func readRootFile(root *os.Root, name string, limit int64) ([]byte, error) {
	fi, err := root.Lstat(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("ovf: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, invalid("%s: not a regular file", name)
	}
	f, err := root.Open(name)
	if err != nil {
		return nil, fmt.Errorf("ovf: %w", err)
	}
	defer func() { _ = f.Close() }()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("ovf: read %s: %w", name, err)
	}
	if int64(len(data)) > limit {
		return nil, invalid("%s: larger than the %d bytes allowed for it", name, limit)
	}
	return data, nil
}

func hashRootFile(ctx context.Context, root *os.Root, name string, h io.Writer) error {
	f, err := root.Open(name)
	if err != nil {
		return fmt.Errorf("ovf: %w", err)
	}
	defer func() { _ = f.Close() }()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("ovf: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return invalid("%s: not a regular file", name)
	}
	if err := copyBlocks(ctx, f, nil, fi.Size(), h); err != nil {
		if errors.Is(err, errTruncated) {
			return invalid("%s: the file shrank while it was being read", name)
		}
		return err
	}
	return nil
}
