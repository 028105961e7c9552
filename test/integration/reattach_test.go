package integration

import (
	"strings"
	"syscall"
	"testing"

	"github.com/lodge-vm/lodge/api"
)

// TestDaemonKillReattach: VMs outlive a kill -9 of the daemon; a new
// daemon re-attaches to them, and reports the one that died meanwhile.
// It also runs two VMs at once and checks that their identities differ.
func TestDaemonKillReattach(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	a := h.vm("alpha")
	b := h.vm("beta")
	if a.UUID == b.UUID || a.NICs[0].MAC == b.NICs[0].MAC {
		t.Fatalf("two VMs share an identity: %s/%s %s/%s", a.UUID, b.UUID, a.NICs[0].MAC, b.NICs[0].MAC)
	}
	idA := h.exec("alpha", "cat", "/etc/machine-id")
	idB := h.exec("beta", "cat", "/etc/machine-id")
	if len(idA) != 32 || idA == idB {
		t.Fatalf("machine-ids %q and %q: want two different 32-hex ids", idA, idB)
	}
	if h.exec("beta", "hostname") != "beta" {
		t.Fatal("beta's hostname is wrong")
	}
	h.exec("alpha", "sh", "-c", "echo before-crash > /root/f")

	h.killDaemon()
	for _, v := range []api.VM{a, b} {
		if err := syscall.Kill(v.PID, 0); err != nil {
			t.Fatalf("QEMU of %s (pid %d) died with the daemon: %v", v.Name, v.PID, err)
		}
	}
	// beta dies while nobody watches.
	if err := syscall.Kill(b.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10e9, "beta's QEMU to exit", func() bool { return syscall.Kill(b.PID, 0) != nil })

	h.startDaemon()
	a2 := h.show("alpha")
	if a2.State != api.StateRunning || a2.PID != a.PID {
		t.Fatalf("after re-attach alpha = %s pid %d, want running pid %d", a2.State, a2.PID, a.PID)
	}
	b2 := h.show("beta")
	if b2.State != api.StateError || !strings.Contains(b2.StateReason, "while the daemon was not running") {
		t.Fatalf("beta after its QEMU died = %s (%s)", b2.State, b2.StateReason)
	}
	if got := h.exec("alpha", "cat", "/root/f"); got != "before-crash" {
		t.Fatalf("exec after re-attach = %q", got)
	}
	if log, err := h.consoleLog("alpha"); err != nil || !strings.Contains(log, "lodge-guest: ready") {
		t.Fatalf("console log after re-attach: %v", err)
	}
	h.must("stop", "alpha")
	if st := h.show("alpha").State; st != api.StateStopped {
		t.Fatalf("alpha after stop = %s", st)
	}
	// A VM in error can be started again.
	h.must("start", "beta")
	h.waitAgent("beta")
}

// TestQEMUDiesUnderDaemon: a QEMU killed while the daemon watches shows
// as error with the reason, at once.
func TestQEMUDiesUnderDaemon(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	v := h.vm("victim")
	if err := syscall.Kill(v.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15e9, "state error", func() bool { return h.show("victim").State == api.StateError })
	if r := h.show("victim").StateReason; !strings.Contains(r, "unexpectedly") {
		t.Fatalf("reason = %q", r)
	}
	// And a guest that powers itself off is stopped, not an error.
	h.must("start", "victim")
	h.waitAgent("victim")
	_, _, _ = h.lodge("exec", "victim", "--timeout", "5s", "--", "poweroff")
	eventually(t, 60e9, "guest power-off to show as stopped", func() bool { return h.show("victim").State == api.StateStopped })
	if r := h.show("victim").StateReason; !strings.Contains(r, "guest powered off") {
		t.Fatalf("reason after guest poweroff = %q", r)
	}
}
