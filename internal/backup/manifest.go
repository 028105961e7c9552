package backup

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

const manifestFormat = 1

// The kinds of backup.
const (
	KindFull        = "full"
	KindIncremental = "incremental"
)

// How consistent a backup's disks are with each other and with the
// guest's view of them.
const (
	ConsistencyStopped = "stopped" // the VM was not running
	ConsistencyFrozen  = "frozen"  // the guest agent froze the filesystems
	ConsistencyCrash   = "crash"   // as after a power cut
)

// Manifest describes one backup. Its file in backups/ is the backup: a
// backup exists once its manifest does.
type Manifest struct {
	Format      int             `json:"format"`
	ID          string          `json:"id"`
	VM          string          `json:"vm"`
	VMUUID      string          `json:"vm_uuid"`
	CreatedAt   time.Time       `json:"created_at"` // the point in time the backup holds
	Kind        string          `json:"kind"`
	Parent      string          `json:"parent,omitempty"` // the backup whose unchanged chunks this one reuses
	Reason      string          `json:"reason,omitempty"` // why a backup is full when an incremental was possible
	Consistency string          `json:"consistency"`
	Spec        json.RawMessage `json:"spec"` // the VM's settings, opaque here
	Disks       []DiskManifest  `json:"disks"`
	Stats       Stats           `json:"stats"`
}

// DiskManifest lists a disk's chunks in order. Every chunk is the
// repository's chunk size long except a short last one, and each is named
// by the digest of its real length.
type DiskManifest struct {
	Name   string   `json:"name"`
	Size   int64    `json:"size"`
	Chunks []Digest `json:"chunks"`
}

// Stats is what making a backup (or one of its disks) took.
type Stats struct {
	Read      int64         `json:"read"`   // bytes read from the VM
	Stored    int64         `json:"stored"` // compressed bytes newly written to the repository
	Data      int64         `json:"data"`   // logical bytes in non-zero chunks
	Duration  time.Duration `json:"duration"`
	Chunks    int           `json:"chunks"`     // non-zero chunks referenced
	NewChunks int           `json:"new_chunks"` // chunks newly written
	// Yielded is how long the reading paused for the guest's writes, a
	// part of Duration.
	Yielded time.Duration `json:"yielded,omitempty"`
}

// Add sums two Stats, as for a backup's disks.
func (s Stats) Add(o Stats) Stats {
	return Stats{
		Read:      s.Read + o.Read,
		Stored:    s.Stored + o.Stored,
		Data:      s.Data + o.Data,
		Duration:  s.Duration + o.Duration,
		Chunks:    s.Chunks + o.Chunks,
		NewChunks: s.NewChunks + o.NewChunks,
		Yielded:   s.Yielded + o.Yielded,
	}
}

// NewID makes a backup id for a backup taken at t. Ids sort by time, and
// the random tail keeps two backups in one second apart.
func NewID(t time.Time) string {
	return t.UTC().Format("20060102-150405") + "-" + randomHex(3)
}

// ValidID reports whether id has NewID's shape. Ids become file names,
// so this is checked before any file is touched.
func ValidID(id string) bool {
	// yyyymmdd-hhmmss-xxxxxx
	if len(id) != 22 || id[8] != '-' || id[15] != '-' {
		return false
	}
	for i, c := range []byte(id) {
		switch {
		case i == 8 || i == 15:
		case i < 15:
			if c < '0' || c > '9' {
				return false
			}
		default:
			if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
				return false
			}
		}
	}
	return true
}

// ParseManifest reads a manifest of a repository with the default chunk
// size and checks it thoroughly: whatever it accepts can be restored
// without surprises. Every failure wraps ErrInvalid.
func ParseManifest(b []byte) (Manifest, error) {
	return parseManifest(b, ChunkSize)
}

func parseManifest(b []byte, chunkSize int) (Manifest, error) {
	m, err := decodeManifest(b, chunkSize)
	if err != nil {
		what := "backup manifest"
		if ValidID(m.ID) {
			what += " " + m.ID
		}
		return Manifest{}, fmt.Errorf("%s: %w: %w", what, errdefs.ErrInvalid, err)
	}
	return m, nil
}

// decodeManifest is parseManifest with bare reasons for errors, which
// readers of stored manifests wrap as corruption instead. On failure m is
// what could be decoded, for the id to name.
func decodeManifest(b []byte, chunkSize int) (m Manifest, err error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return m, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return m, errors.New("data after the manifest")
	}
	return m, checkManifest(&m, chunkSize)
}

// checkManifest validates m and puts it in its one canonical form, so
// that a manifest that parses writes back byte for byte.
func checkManifest(m *Manifest, chunkSize int) error {
	bad := fmt.Errorf
	switch {
	case m.Format != manifestFormat:
		return bad("format %d; this lodge reads format %d", m.Format, manifestFormat)
	case !ValidID(m.ID):
		return bad("id %q is not of the form yyyymmdd-hhmmss-xxxxxx", m.ID)
	case !validText(m.VM, 255) || m.VM == "":
		return bad("vm name %q: want 1-255 printable characters", m.VM)
	case !validText(m.VMUUID, 64):
		return bad("vm uuid %q: want at most 64 printable characters", m.VMUUID)
	case m.CreatedAt.IsZero():
		return bad("no created_at")
	case m.CreatedAt.UTC().Year() < 1970 || m.CreatedAt.UTC().Year() > 9999:
		return bad("created_at %s out of range", m.CreatedAt.UTC().Format(time.RFC3339))
	case m.Kind != KindFull && m.Kind != KindIncremental:
		return bad("kind %q: want %s or %s", m.Kind, KindFull, KindIncremental)
	case m.Kind == KindFull && m.Parent != "":
		return bad("a full backup has no parent, this one names %q", m.Parent)
	case m.Kind == KindIncremental && !ValidID(m.Parent):
		return bad("an incremental backup needs a parent backup id, not %q", m.Parent)
	case m.Parent == m.ID:
		return bad("the backup is its own parent")
	case !validText(m.Reason, 1024):
		return bad("reason: want at most 1024 printable characters")
	case m.Consistency != ConsistencyStopped && m.Consistency != ConsistencyFrozen && m.Consistency != ConsistencyCrash:
		return bad("consistency %q: want %s, %s or %s", m.Consistency, ConsistencyStopped, ConsistencyFrozen, ConsistencyCrash)
	case m.Stats.Read < 0 || m.Stats.Stored < 0 || m.Stats.Data < 0 || m.Stats.Duration < 0 || m.Stats.Chunks < 0 || m.Stats.NewChunks < 0:
		return bad("negative stats")
	}
	var spec bytes.Buffer
	if err := json.Compact(&spec, m.Spec); err != nil || spec.Len() == 0 || spec.Bytes()[0] != '{' {
		return bad("spec: want the VM's settings as a JSON object")
	}
	m.Spec = json.RawMessage(spec.Bytes())
	m.CreatedAt = m.CreatedAt.UTC()

	names := make(map[string]bool, len(m.Disks))
	for i := range m.Disks {
		d := &m.Disks[i]
		switch {
		case d.Name == "" || !validText(d.Name, 255):
			return bad("disk %d: name %q: want 1-255 printable characters", i, d.Name)
		case names[d.Name]:
			return bad("disk %q appears twice", d.Name)
		case d.Size < 0:
			return bad("disk %q: negative size %d", d.Name, d.Size)
		}
		names[d.Name] = true
		if want := chunkCount(d.Size, chunkSize); int64(len(d.Chunks)) != want {
			return bad("disk %q: %d chunks for %d bytes, want %d of %d bytes", d.Name, len(d.Chunks), d.Size, want, chunkSize)
		}
		if d.Chunks == nil {
			d.Chunks = []Digest{}
		}
	}
	if m.Disks == nil {
		m.Disks = []DiskManifest{}
	}
	return nil
}

// validText accepts printable UTF-8 of at most limit bytes: these strings
// end up in error messages and tables, where control characters would
// let a damaged manifest mislead.
func validText(s string, limit int) bool {
	if len(s) > limit || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

func encodeManifest(m *Manifest) ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("backup %s: encode manifest: %w", m.ID, err)
	}
	return append(b, '\n'), nil
}
