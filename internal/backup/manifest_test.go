package backup

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

const goodDigest = "6f3c0a8d1b2e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8"

// validManifest is a manifest of the default chunk size: a disk of two
// chunks and a bit, one of them zeros.
func validManifest() string {
	return `{"format":1,"id":"20261201-190102-a1b2c3","vm":"web","vm_uuid":"0b7c1d1e",` +
		`"created_at":"2026-12-01T19:01:02Z","kind":"incremental","parent":"20261130-190102-000000",` +
		`"consistency":"frozen","spec":{"cpus": 2},` +
		`"disks":[{"name":"root","size":2097153,"chunks":["` + goodDigest + `","","` + goodDigest + `"]}],` +
		`"stats":{"read":4194304,"stored":1000,"data":4194305,"duration":1500000000,"chunks":2,"new_chunks":1}}`
}

func TestParseManifest(t *testing.T) {
	m, err := ParseManifest([]byte(validManifest()))
	if err != nil {
		t.Fatalf("parse a valid manifest: %v", err)
	}
	if got, want := string(m.Spec), `{"cpus":2}`; got != want {
		t.Fatalf("spec: got %s, want %s", got, want)
	}
	if !m.Disks[0].Chunks[1].IsZero() || m.Disks[0].Chunks[0].String() != goodDigest {
		t.Fatalf("chunks: got %v", m.Disks[0].Chunks)
	}
	if m.Stats.Duration != 1500*time.Millisecond {
		t.Fatalf("duration: got %v, want 1.5s", m.Stats.Duration)
	}

	swap := func(old, repl string) string {
		if !strings.Contains(validManifest(), old) {
			t.Fatalf("test bug: %q not in the manifest", old)
		}
		return strings.Replace(validManifest(), old, repl, 1)
	}
	for _, tc := range []struct {
		name, in, says string
	}{
		{"format", swap(`"format":1`, `"format":2`), "format 2"},
		{"kind", swap(`"kind":"incremental"`, `"kind":"partial"`), "kind"},
		{"no parent", swap(`,"parent":"20261130-190102-000000"`, ``), "parent"},
		{"full with parent", swap(`"kind":"incremental"`, `"kind":"full"`), "no parent"},
		{"own parent", swap(`"parent":"20261130-190102-000000"`, `"parent":"20261201-190102-a1b2c3"`), "own parent"},
		{"too many chunks", swap(`"size":2097153`, `"size":2097152`), "3 chunks for 2097152 bytes"},
		{"too few chunks", swap(`"size":2097153`, `"size":3145729`), "3 chunks"},
		{"negative size", swap(`"size":2097153`, `"size":-1`), "negative size"},
		{"upper-case digest", swap(`"chunks":["`+goodDigest, `"chunks":["`+strings.ToUpper(goodDigest)), "digest"},
		{"short digest", swap(`"chunks":["`+goodDigest, `"chunks":["abc`), "digest"},
		{"zeros spelled out", swap(`"chunks":["`+goodDigest, `"chunks":["`+strings.Repeat("0", 64)), "zeros"},
		{"bad id", swap(`"id":"20261201-190102-a1b2c3"`, `"id":"../../etc/passwd"`), "id"},
		{"unknown field", swap(`"vm":"web"`, `"vm":"web","colour":"red"`), "colour"},
		{"data after", validManifest() + `{}`, "after"},
		{"no vm", swap(`"vm":"web"`, `"vm":""`), "vm name"},
		{"control character", swap(`"vm":"web"`, `"vm":"we\u0007b"`), "vm name"},
		{"no time", swap(`"created_at":"2026-12-01T19:01:02Z",`, ``), "created_at"},
		{"consistency", swap(`"consistency":"frozen"`, `"consistency":"maybe"`), "consistency"},
		{"no spec", swap(`"spec":{"cpus": 2},`, ``), "spec"},
		{"spec not an object", swap(`"spec":{"cpus": 2}`, `"spec":[1]`), "spec"},
		{"negative stats", swap(`"stored":1000`, `"stored":-1`), "negative"},
		{"two disks one name", swap(`}],"stats"`, `},{"name":"root","size":0,"chunks":[]}],"stats"`), "twice"},
		{"not json", `{"format":1,`, "unexpected EOF"},
	} {
		_, err := ParseManifest([]byte(tc.in))
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), tc.says) {
			t.Fatalf("%s: got %v, want ErrInvalid saying %q", tc.name, err, tc.says)
		}
	}
}

func TestManifestRoundTrip(t *testing.T) {
	m, err := ParseManifest([]byte(validManifest()))
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	m2, err := ParseManifest(b)
	if err != nil {
		t.Fatalf("parse what was written: %v", err)
	}
	b2, _ := json.Marshal(m2)
	if !bytes.Equal(b, b2) {
		t.Fatalf("round trip:\n got %s\nwant %s", b2, b)
	}
	if !strings.Contains(string(b), `"chunks":["`+goodDigest+`","",`) {
		t.Fatalf("zero digest not written as \"\": %s", b)
	}
}

func TestIDs(t *testing.T) {
	id := NewID(time.Date(2026, 12, 1, 20, 1, 2, 0, time.FixedZone("+01", 3600)))
	if !strings.HasPrefix(id, "20261201-190102-") || !ValidID(id) {
		t.Fatalf("new id: got %q, want 20261201-190102-xxxxxx in UTC", id)
	}
	if other := NewID(clock); other == NewID(clock) {
		t.Fatalf("two ids in one second are equal: %q", other)
	}
	for _, tc := range []struct {
		id   string
		want bool
	}{
		{"20261201-190102-a1b2c3", true},
		{"20261201-190102-A1B2C3", false},
		{"20261201-190102-a1b2c", false},
		{"20261201-190102-a1b2c3d", false},
		{"20261201_190102-a1b2c3", false},
		{"2026120x-190102-a1b2c3", false},
		{"../../../../etc/passwd", false},
		{"20261201-190102-a1b2/3", false},
		{"", false},
	} {
		if got := ValidID(tc.id); got != tc.want {
			t.Fatalf("valid id %q: got %v, want %v", tc.id, got, tc.want)
		}
	}
}

func TestDigestText(t *testing.T) {
	var d Digest
	if err := d.UnmarshalText([]byte(goodDigest)); err != nil {
		t.Fatal(err)
	}
	b, _ := d.MarshalText()
	if string(b) != goodDigest || d.String() != goodDigest {
		t.Fatalf("digest text: got %s / %s, want %s", b, d, goodDigest)
	}
	b, _ = (Digest{}).MarshalText()
	if len(b) != 0 || (Digest{}).String() != strings.Repeat("0", 64) {
		t.Fatalf("zero digest text: got %q / %q", b, (Digest{}).String())
	}
	if err := d.UnmarshalText(nil); err != nil || !d.IsZero() {
		t.Fatalf("empty text: got %v %v, want the zero digest", d, err)
	}
}
