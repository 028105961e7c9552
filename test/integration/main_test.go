package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// probed is the accelerator verdict TestMain obtained.
var probed api.HostInfo

// TestMain runs the KVM probe once, for real, before the tests, and
// shares its verdict through a per-run cache file. Otherwise every test's
// daemon would probe at once, and on hosts where nested KVM stalls each
// probe burns a core for its whole timeout.
func TestMain(m *testing.M) {
	cache, err := os.MkdirTemp("", "lodge-accel-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Readable by the unprivileged daemon of TestUnprivilegedDaemon.
	_ = os.Chmod(cache, 0o755)
	if err := os.Setenv("LODGE_ACCEL_CACHE", filepath.Join(cache, "accel.json")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(cache)
	os.Exit(code)
}

var probeOnce = make(chan struct{})
var probeStarted = make(chan struct{}, 1)

// waitProbe makes sure the shared verdict exists: the first caller boots
// the probe (a daemon that imports the guest), the others wait for it.
func waitProbe(t *testing.T) {
	t.Helper()
	select {
	case probeStarted <- struct{}{}:
	default:
		<-probeOnce
		return
	}
	defer close(probeOnce)
	h := newHostNoProbe(t)
	h.importGuest()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		info, err := h.c.Host(context.Background())
		if err == nil && (info.AccelVerified && !strings.HasPrefix(info.AccelReason, "probing") || kvmMissing(info)) {
			probed = info
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("KVM probe gave no verdict in 3 minutes: %+v %v", info, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// kvmMissing tells a host without a usable /dev/kvm, where TCG is the
// only choice and there is nothing to boot a probe for.
func kvmMissing(info api.HostInfo) bool {
	return info.Accel == "tcg" && strings.HasPrefix(info.AccelReason, "KVM unavailable: ")
}

// TestAcceleratorProbe: the probe booted a real guest to decide, says why,
// and later daemons reuse the verdict. Without /dev/kvm there is no probe:
// every daemon says so at once.
func TestAcceleratorProbe(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	if probed.Accel != "kvm" && probed.Accel != "tcg" {
		t.Fatalf("probe verdict = %+v", probed)
	}
	if kvmMissing(probed) {
		info, err := h.c.Host(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if !kvmMissing(info) || info.AccelVerified {
			t.Fatalf("second daemon without /dev/kvm: %s (%s, verified %v), want tcg because KVM is unavailable", info.Accel, info.AccelReason, info.AccelVerified)
		}
		if out := h.must("host", "info"); !strings.Contains(out, "KVM unavailable") {
			t.Fatalf("host info does not say why it runs TCG:\n%s", out)
		}
		return
	}
	if probed.Accel == "kvm" && !strings.Contains(probed.AccelReason, "reached its agent") {
		t.Fatalf("kvm chosen without a successful boot: %s", probed.AccelReason)
	}
	if probed.Accel == "tcg" && !strings.Contains(probed.AccelReason, "KVM") {
		t.Fatalf("tcg chosen without saying why: %s", probed.AccelReason)
	}
	info, err := h.c.Host(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.Accel != probed.Accel || !strings.Contains(info.AccelReason, "cached from") {
		t.Fatalf("second daemon: %s (%s), want the cached %s", info.Accel, info.AccelReason, probed.Accel)
	}
	out := h.must("host", "info")
	if !strings.Contains(out, "Accelerator:") || !strings.Contains(out, probed.Accel) {
		t.Fatalf("host info:\n%s", out)
	}
}
