// Package identity makes the things that must be unique per machine: SMBIOS
// UUIDs, MAC addresses and cloud-init instance-ids, and the NoCloud seed
// that hands the guest its hostname and instance-id. Uniqueness across VMs
// is checked by the caller against the store; this package only draws.
package identity

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// NewUUID returns a random (version 4) UUID.
func NewUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// NewMAC returns a random MAC in QEMU's locally administered 52:54:00 range.
func NewMAC() string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2])
}

var hostnameRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`)

// ValidHostname reports whether s is a valid single-label hostname.
func ValidHostname(s string) bool { return hostnameRE.MatchString(s) }

// Seed is the NoCloud data for one boot identity.
type Seed struct {
	InstanceID string
	Hostname   string
	// UserData is passed through as the user's cloud-init file.
	UserData []byte
}

// WriteSeedISO writes a NoCloud seed (an ISO 9660 volume labelled cidata,
// with Joliet and Rock Ridge names) to path, atomically. It uses
// genisoimage, as cloud-localds does, or xorriso where genisoimage is
// missing; genisoimage starts in 5 ms where xorriso takes 100 ms, which is
// most of what `lodge create` costs.
func WriteSeedISO(ctx context.Context, path string, s Seed) error {
	if !ValidHostname(s.Hostname) {
		return fmt.Errorf("seed %s: hostname %q is not a valid hostname", path, s.Hostname)
	}
	if s.InstanceID == "" || strings.ContainsAny(s.InstanceID, "\n\r") {
		return fmt.Errorf("seed %s: bad instance-id %q", path, s.InstanceID)
	}
	tool, args, err := isoTool()
	if err != nil {
		return fmt.Errorf("seed %s: %w", path, err)
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".seed-*")
	if err != nil {
		return fmt.Errorf("seed %s: %w", path, err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	meta := fmt.Sprintf("instance-id: %s\nlocal-hostname: %s\n", s.InstanceID, s.Hostname)
	user := s.UserData
	if len(user) == 0 {
		user = []byte("#cloud-config\n{}\n")
	}
	files := map[string][]byte{"meta-data": []byte(meta), "user-data": user}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return fmt.Errorf("seed %s: %w", path, err)
		}
	}
	tmp := path + ".tmp"
	cmd := exec.CommandContext(ctx, tool, append(args, "-quiet", "-V", "cidata", "-J", "-r", "-o", tmp, dir)...)
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("seed %s: %s: %s: %w", path, filepath.Base(tool), strings.TrimSpace(stderr.String()), err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("seed %s: %w", path, err)
	}
	return nil
}

func isoTool() (string, []string, error) {
	if p, err := exec.LookPath("genisoimage"); err == nil {
		return p, nil, nil
	}
	if p, err := exec.LookPath("xorriso"); err == nil {
		return p, []string{"-as", "mkisofs"}, nil
	}
	return "", nil, errors.New("neither genisoimage nor xorriso is installed (apt-get install genisoimage)")
}
