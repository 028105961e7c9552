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

func FuzzParseSchedule(f *testing.F) {
	for _, s := range []string{
		"30m", "1h", "1d", "1d12h", "90s", "0 3 * * *", "*/15 * * * *", "0 9-17/2 * * 1-5",
		"0,30 8,20 1,15 1-12 0,7", "@hourly", "@daily", "@weekly", "@monthly", "0 0 29 2 *",
		"0 0 13 * 5", "", "60 * * * *", "5/2 * * * *", "1d-5m", "*/0 * * * *", "0 0 30 2 *",
	} {
		f.Add(s)
	}
	last := time.Date(2026, 12, 1, 19, 1, 2, 0, time.UTC)
	f.Fuzz(func(t *testing.T, in string) {
		s, err := ParseSchedule(in)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalid) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("parse %q: error %q is not one line wrapping ErrInvalid", in, err)
			}
			return
		}
		again, err := ParseSchedule(s.String())
		if err != nil || again != s {
			t.Fatalf("parse %q, then %q: got %+v %v, want %+v", in, s.String(), again, err, s)
		}
		if next := s.Next(last, last); !next.After(last) {
			t.Fatalf("%q: next after %v is %v", in, last, next)
		}
	})
}

func FuzzParseManifest(f *testing.F) {
	f.Add([]byte(validManifest()))
	f.Add([]byte(strings.Replace(validManifest(), `"kind":"incremental","parent":"20261130-190102-000000"`, `"kind":"full","reason":"new disk"`, 1)))
	f.Add([]byte(`{"format":1,"id":"20261201-190102-a1b2c3","vm":"x","vm_uuid":"","created_at":"2026-12-01T19:01:02+05:30","kind":"full","consistency":"crash","spec":{},"disks":[],"stats":{}}`))
	f.Add([]byte(`{"format":1,"id":"20261201-190102-a1b2c3","vm":"x","vm_uuid":"","created_at":"0000-01-01T00:00:00+01:00","kind":"full","consistency":"crash","spec":{},"disks":null,"stats":{}}`))
	f.Add([]byte(`{"format":1,"disks":[{"name":"a","size":0,"chunks":null}]}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, in []byte) {
		m, err := ParseManifest(in)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalid) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q is not one line wrapping ErrInvalid", err)
			}
			return
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatalf("marshal an accepted manifest: %v", err)
		}
		m2, err := ParseManifest(b)
		if err != nil {
			t.Fatalf("parse a written manifest: %v\n%s", err, b)
		}
		b2, err := json.Marshal(m2)
		if err != nil || !bytes.Equal(b, b2) {
			t.Fatalf("round trip:\n got %s\nwant %s", b2, b)
		}
	})
}
