package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// TestLifecycle walks one VM through create, start, exec, console, pause,
// resume, graceful stop, start again and delete, checking inside the guest.
func TestLifecycle(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	v := h.vm("web", "--cpus", "2", "--disk", "2G")

	if v.State != api.StateRunning || v.UUID == "" || v.CPUs != 2 || v.Memory != 256<<20 || v.Hostname != "web" || v.StartedAt == nil {
		t.Fatalf("show after start = %+v", v)
	}
	if len(v.NICs) != 1 || !strings.HasPrefix(v.NICs[0].MAC, "52:54:00:") || len(v.Disks) != 1 || v.Disks[0].Size != 2<<30 {
		t.Fatalf("nics/disks = %+v %+v", v.NICs, v.Disks)
	}
	// The disk is a thin overlay on the image, not a copy.
	if st, err := os.Stat(v.Disks[0].Path); err != nil || st.Size() > 64<<20 {
		t.Fatalf("disk %s: %v, size %d: want a thin overlay", v.Disks[0].Path, err, st.Size())
	}
	img, err := h.c.GetImage(t.Context(), "tiny")
	if err != nil || v.Disks[0].Backing != img.Path {
		t.Fatalf("disk backing = %q, image path %q (%v)", v.Disks[0].Backing, img.Path, err)
	}

	// Inside the guest: the seed's hostname, the CPU count, the disk size.
	if got := h.exec("web", "hostname"); got != "web" {
		t.Errorf("guest hostname = %q, want web", got)
	}
	if got := h.exec("web", "sh", "-c", "grep -c ^processor /proc/cpuinfo"); got != "2" {
		t.Errorf("guest CPUs = %q, want 2", got)
	}
	if got := h.exec("web", "cat", "/sys/class/dmi/id/product_uuid"); !strings.EqualFold(got, v.UUID) {
		t.Errorf("guest SMBIOS UUID = %q, want %q", got, v.UUID)
	}

	// exec passes stdout, stderr and the exit code through.
	out, errOut, code := h.lodge("exec", "web", "--", "sh", "-c", "echo out; echo oops >&2; exit 3")
	if code != 3 || strings.TrimSpace(out) != "out" || strings.TrimSpace(errOut) != "oops" {
		t.Errorf("exec exit=%d stdout=%q stderr=%q; want 3, out, oops", code, out, errOut)
	}
	if _, _, code := h.lodge("exec", "web", "--", "sh", "-c", "kill -9 $$"); code != 137 {
		t.Errorf("exec of a command killed by SIGKILL: exit %d, want 137", code)
	}
	if out, _, code := h.lodgeIn("piped input\n", "exec", "web", "--", "cat"); code != 0 || out != "piped input\n" {
		t.Errorf("exec with stdin: exit %d, stdout %q", code, out)
	}
	if _, errOut, code := h.lodge("exec", "web", "--", "/no/such/program"); code == 0 || !strings.Contains(errOut, "no/such/program") {
		t.Errorf("exec of a missing program: exit %d, stderr %q", code, errOut)
	}

	log, err := h.consoleLog("web")
	if err != nil || !strings.Contains(log, "lodge-guest: ready") {
		t.Fatalf("console log lacks the ready marker (%v):\n%s", err, log)
	}

	// Pause freezes the guest: its clock does not advance while paused.
	h.exec("web", "sh", "-c", "echo persisted > /root/mark; sync")
	h.must("pause", "web")
	if st := h.show("web").State; st != api.StatePaused {
		t.Fatalf("state after pause = %s", st)
	}
	if _, errOut, code := h.lodge("pause", "web"); code != 1 || !strings.Contains(errOut, "already paused") {
		t.Errorf("pausing a paused VM: exit %d %q", code, errOut)
	}
	h.must("resume", "web")
	if st := h.show("web").State; st != api.StateRunning {
		t.Fatalf("state after resume = %s", st)
	}
	if got := h.exec("web", "cat", "/root/mark"); got != "persisted" {
		t.Fatalf("after resume: /root/mark = %q", got)
	}

	// A graceful stop goes through the guest's own power-off (the kernel
	// says so on the console), well before the forced fallback.
	begin := time.Now()
	h.must("stop", "web", "--timeout", "60s")
	took := time.Since(begin)
	v = h.show("web")
	if v.State != api.StateStopped || v.StartedAt != nil || v.PID != 0 {
		t.Fatalf("after stop: %+v", v)
	}
	log, _ = h.consoleLog("web")
	if !strings.Contains(log, "Power down") || took > 50*time.Second {
		t.Fatalf("stop took %s; console does not show a guest power-off:\n%s", took, tail(log, 10))
	}
	if _, errOut, code := h.lodge("stop", "web"); code != 1 || !strings.Contains(errOut, "stopped") {
		t.Errorf("stopping a stopped VM: exit %d %q", code, errOut)
	}

	// The disk keeps what the guest wrote across a restart.
	h.must("start", "web")
	h.waitAgent("web")
	if got := h.exec("web", "cat", "/root/mark"); got != "persisted" {
		t.Fatalf("after restart: /root/mark = %q", got)
	}
	if got := h.exec("web", "hostname"); got != "web" {
		t.Fatalf("after restart: hostname %q", got)
	}

	// Deleting a running VM needs --force; then disks and directories go.
	if _, errOut, code := h.lodge("delete", "web"); code != 1 || !strings.Contains(errOut, "--force") {
		t.Fatalf("delete of running VM: exit %d %q", code, errOut)
	}
	h.must("delete", "--force", "web")
	for _, p := range []string{v.Disks[0].Path, filepath.Join(h.home, "vms", "web"), filepath.Join(h.home, "run", "web")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s still exists after delete", p)
		}
	}
	if _, err := os.Stat(img.Path); err != nil {
		t.Errorf("image file gone after deleting its VM: %v", err)
	}
	if _, errOut, code := h.lodge("show", "web"); code != 1 || !strings.Contains(errOut, `vm "web"`) {
		t.Errorf("show after delete: exit %d %q", code, errOut)
	}
}

// TestForcedStop: a guest that ignores the power button is stopped by
// force once --timeout passes.
func TestForcedStop(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("deaf")
	// Without acpid the guest ignores the power button.
	h.exec("deaf", "sh", "-c", "killall acpid; true")
	begin := time.Now()
	h.must("stop", "deaf", "--timeout", "3s")
	took := time.Since(begin)
	if took < 3*time.Second || took > 30*time.Second {
		t.Fatalf("stop --timeout 3s took %s", took)
	}
	if st := h.show("deaf").State; st != api.StateStopped {
		t.Fatalf("state = %s", st)
	}
	if log, _ := h.consoleLog("deaf"); strings.Contains(log, "Power down") {
		t.Fatal("guest powered itself down; the test needs a guest that ignores ACPI")
	}
	h.must("start", "deaf")
	h.waitAgent("deaf")
	begin = time.Now()
	h.must("stop", "--force", "deaf")
	if took := time.Since(begin); took > 15*time.Second {
		t.Fatalf("stop --force took %s", took)
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestConsoleAndNetwork: the interactive console reaches the guest's
// shell, a second session is refused, and the NAT network gives the guest
// an address that show reports.
func TestConsoleAndNetwork(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("talk")
	conn, err := h.c.Console(t.Context(), "talk")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	if _, errOut, code := h.lodge("console", "talk"); code != 1 || !strings.Contains(errOut, "another session") {
		t.Errorf("second console session: exit %d %q", code, errOut)
	}
	if _, err := conn.Write([]byte("\necho con$((6*7))sole\n")); err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	go func() {
		var seen strings.Builder
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			seen.Write(buf[:n])
			if strings.Contains(seen.String(), "con42sole") || err != nil {
				got <- seen.String()
				return
			}
		}
	}()
	select {
	case out := <-got:
		if !strings.Contains(out, "con42sole") {
			t.Fatalf("console output lacks the command's result: %q", out)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no answer on the console in 30s")
	}

	if addr := h.exec("talk", "sh", "-c", "ip -4 -o addr show eth0 | awk '{print $4}'"); addr != "10.0.2.15/24" {
		t.Errorf("guest address = %q, want QEMU NAT's 10.0.2.15/24", addr)
	}
	if v := h.show("talk"); v.NICs[0].IP != "10.0.2.15" {
		t.Errorf("show reports IP %q, want 10.0.2.15", v.NICs[0].IP)
	}
}
