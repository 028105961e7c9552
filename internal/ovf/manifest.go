package ovf

import (
	"crypto/sha1" // OVF 1.x manifests use it; the manifest guards against corruption, not forgery
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"regexp"
	"strings"
	"unicode/utf8"
)

// maxManifest bounds the manifest and certificate, which list a handful of
// files and so are a few hundred bytes in practice.
const maxManifest = 1 << 20

// Digest is one manifest entry's expected digest.
type Digest struct {
	Algorithm string // "SHA1", "SHA256" or "SHA512"
	Sum       []byte
}

// algorithms are the digests OVF manifests use, from OVF 1.0 (SHA1) to 2.x
// (SHA256, SHA512). Anything weaker or unknown is refused, not skipped, so
// that a manifest cannot disable verification by naming an algorithm Lodge
// ignores.
var algorithms = map[string]func() hash.Hash{
	"SHA1":   sha1.New,
	"SHA256": sha256.New,
	"SHA512": sha512.New,
}

// allAlgorithms is used when a member must be hashed before the manifest
// has been read (OVF 2.x allows the manifest at the end of the archive).
var allAlgorithms = []string{"SHA1", "SHA256", "SHA512"}

var manifestLine = regexp.MustCompile(`^([A-Za-z0-9]+)\((.*)\)[ \t]*=[ \t]*([0-9A-Fa-f]+)$`)

// ParseManifest reads an OVF manifest (lines of the form
// "SHA256(disk1.vmdk)= 0123…"), keyed by file name. Any refusal wraps
// ErrInvalid.
func ParseManifest(r io.Reader) (map[string]Digest, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxManifest+1))
	if err != nil {
		return nil, fmt.Errorf("ovf: read manifest: %w", err)
	}
	if len(data) > maxManifest {
		return nil, invalid("manifest is larger than %d MiB", maxManifest>>20)
	}
	if !utf8.Valid(data) {
		return nil, invalid("manifest is not UTF-8 text")
	}
	out := map[string]Digest{}
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		m := manifestLine.FindStringSubmatch(line)
		if m == nil {
			return nil, invalid("manifest line %d: not of the form ALGORITHM(file)= digest", i+1)
		}
		alg := strings.ToUpper(m[1])
		newHash, ok := algorithms[alg]
		if !ok {
			return nil, invalid("manifest line %d: unsupported digest algorithm %q", i+1, m[1])
		}
		name := m[2]
		if !isPlainName(name) {
			return nil, invalid("manifest line %d: %q is not a plain file name", i+1, name)
		}
		if _, dup := out[name]; dup {
			return nil, invalid("manifest line %d: %s is listed twice", i+1, name)
		}
		size := newHash().Size()
		if len(m[3]) != 2*size {
			return nil, invalid("manifest line %d: %s digest of %s has %d hex digits, want %d", i+1, alg, name, len(m[3]), 2*size)
		}
		sum, err := hex.DecodeString(m[3])
		if err != nil {
			return nil, invalid("manifest line %d: digest of %s is not hexadecimal", i+1, name)
		}
		out[name] = Digest{Algorithm: alg, Sum: sum}
	}
	return out, nil
}

// digester computes, in one pass, every digest a member may be checked
// against.
type digester struct {
	algs   []string
	hashes []hash.Hash
}

func newDigester(algs []string) *digester {
	d := &digester{algs: algs}
	for _, a := range algs {
		d.hashes = append(d.hashes, algorithms[a]())
	}
	return d
}

func (d *digester) writer() io.Writer {
	w := make([]io.Writer, len(d.hashes))
	for i, h := range d.hashes {
		w[i] = h
	}
	return io.MultiWriter(w...)
}

func (d *digester) sums() map[string][]byte {
	out := make(map[string][]byte, len(d.algs))
	for i, a := range d.algs {
		out[a] = d.hashes[i].Sum(nil)
	}
	return out
}
