package identity

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"testing"
)

func TestNewUUIDAndMAC(t *testing.T) {
	uuidRE := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	macRE := regexp.MustCompile(`^52:54:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}$`)
	seen := map[string]bool{}
	for range 1000 {
		u := NewUUID()
		if !uuidRE.MatchString(u) {
			t.Fatalf("NewUUID() = %q: not a v4 UUID", u)
		}
		if seen[u] {
			t.Fatalf("NewUUID() repeated %q", u)
		}
		seen[u] = true
		if m := NewMAC(); !macRE.MatchString(m) {
			t.Fatalf("NewMAC() = %q", m)
		}
	}
}

func TestValidHostname(t *testing.T) {
	for s, want := range map[string]bool{
		"web": true, "web-1": true, "A1": true, "-web": false, "web-": false, "a/b": false,
		"..": false, "": false, "a.b": false, string(make([]byte, 64)): false,
	} {
		if got := ValidHostname(s); got != want {
			t.Errorf("ValidHostname(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestWriteSeedISO(t *testing.T) {
	if _, _, err := isoTool(); err != nil {
		t.Skip(err.Error())
	}
	path := filepath.Join(t.TempDir(), "seed.iso")
	s := Seed{InstanceID: "i-123", Hostname: "web", UserData: []byte("#!/bin/sh\necho hi\n")}
	if err := WriteSeedISO(context.Background(), path, s); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// The primary volume descriptor sits at sector 16; its volume id at
	// offset 40 must be the label NoCloud looks for.
	if got := string(bytes.TrimRight(raw[16*2048+40:16*2048+72], " ")); got != "cidata" {
		t.Fatalf("volume id = %q, want cidata", got)
	}
	for _, want := range []string{"instance-id: i-123", "local-hostname: web", "echo hi"} {
		if !bytes.Contains(raw, []byte(want)) {
			t.Errorf("seed lacks %q", want)
		}
	}
	if err := WriteSeedISO(context.Background(), path, Seed{InstanceID: "x", Hostname: "bad/name"}); err == nil {
		t.Fatal("bad hostname accepted")
	}
}
