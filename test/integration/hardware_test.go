package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/client"
)

// TestDiskBuses boots the guest from each non-default disk bus and checks
// which device the root filesystem sits on.
func TestDiskBuses(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.importGuest()
	want := map[string]string{"scsi": "/dev/sda2", "ide": "/dev/sda2", "nvme": "/dev/nvme0n1p2"}
	var wg sync.WaitGroup
	for bus := range want {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.must("create", "bus-"+bus, "--image", "tiny", "--memory", "256M", "--disk-bus", bus, "--start")
		}()
	}
	wg.Wait()
	for bus, dev := range want {
		name := "bus-" + bus
		h.waitAgent(name)
		root := h.exec(name, "sh", "-c", "awk '$2==\"/\"{print $1}' /proc/mounts | tail -1")
		if root != dev {
			t.Errorf("bus %s: root on %q, want %s", bus, root, dev)
		}
		if v := h.show(name); v.Disks[0].Bus != bus {
			t.Errorf("bus %s: show says %q", bus, v.Disks[0].Bus)
		}
		// A data disk is hot-plugged on the same bus, except on IDE,
		// which QEMU cannot hot-plug.
		_, errOut, code := h.lodge("disk", "add", name, "16M")
		if bus == "ide" {
			if code != 1 || !strings.Contains(errOut, "cannot hot-plug an IDE disk") || len(h.show(name).Disks) != 1 {
				t.Errorf("disk add to a running IDE VM: exit %d, %q", code, errOut)
			}
		} else {
			dev := map[string]string{"scsi": "sdb", "nvme": "nvme1n1"}[bus]
			if code != 0 {
				t.Errorf("disk add to a running %s VM: exit %d, %q", bus, code, errOut)
			}
			eventually(t, 20*time.Second, name+" sees "+dev, func() bool {
				out, _, _ := h.lodge("exec", name, "--", "cat", "/sys/block/"+dev+"/size")
				return strings.TrimSpace(out) == "32768"
			})
		}
		h.must("delete", "--force", name)
	}
}

// TestPoolOnAnotherDirectory puts a VM's disk in a second pool.
func TestPoolOnAnotherDirectory(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	dir := t.TempDir()
	h.must("pool", "create", "fast", dir)
	v := h.vm("pooled", "--pool", "fast")
	if filepath.Dir(v.Disks[0].Path) != dir || v.Disks[0].Pool != "fast" {
		t.Fatalf("disk %s in pool %s, want in %s", v.Disks[0].Path, v.Disks[0].Pool, dir)
	}
	if _, errOut, code := h.lodge("pool", "delete", "fast"); code != 1 || !strings.Contains(errOut, "pooled") {
		t.Fatalf("deleting a used pool: exit %d %q", code, errOut)
	}
	h.must("delete", "--force", "pooled")
	if files, _ := filepath.Glob(filepath.Join(dir, "*")); len(files) != 0 {
		t.Fatalf("pool dir after delete: %v", files)
	}
	h.must("pool", "delete", "fast")
}

// TestConflictingOperations: a second operation on a busy VM is refused
// with a message naming the one in progress.
func TestConflictingOperations(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.importGuest()
	h.must("create", "busy", "--image", "tiny", "--memory", "256M")
	ctx := context.Background()
	op1, err := h.c.StartVM(ctx, "busy")
	if err != nil {
		t.Fatal(err)
	}
	op2, err := h.c.StartVM(ctx, "busy")
	if err != nil {
		t.Fatal(err)
	}
	_, err1 := h.c.Wait(ctx, op1, nil)
	_, err2 := h.c.Wait(ctx, op2, nil)
	if (err1 == nil) == (err2 == nil) {
		t.Fatalf("two starts: errors %v and %v; want exactly one to fail", err1, err2)
	}
	failed := err1
	if failed == nil {
		failed = err2
	}
	if !strings.Contains(failed.Error(), "in progress") && !strings.Contains(failed.Error(), "already running") {
		t.Fatalf("refusal = %q", failed)
	}
	if st := h.show("busy").State; st != api.StateRunning {
		t.Fatalf("state = %s", st)
	}
}

// TestUnprivilegedDaemon runs the daemon as an ordinary user with the
// default home under that user's $HOME and boots a VM.
func TestUnprivilegedDaemon(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root to switch to an unprivileged user")
	}
	bin, guest := requireQEMU(t)
	waitProbe(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv not installed")
	}
	userHome, err := os.MkdirTemp("", "lodge-user-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(userHome, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	// The unprivileged user must read the binary and the guest; copy both
	// into its home rather than loosen this checkout.
	for _, f := range []string{bin, guest} {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(userHome, filepath.Base(f))
		if err := os.WriteFile(dst, raw, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	h := &host{t: t, bin: setpriv, guest: filepath.Join(userHome, filepath.Base(guest)), home: filepath.Join(userHome, ".local", "share", "lodge")}
	env := []string{"HOME=" + userHome, "PATH=" + os.Getenv("PATH"), "LODGE_ACCEL_CACHE=" + os.Getenv("LODGE_ACCEL_CACHE")}
	h.env = env
	lodgeBin := filepath.Join(userHome, filepath.Base(bin))
	h.binArgs = []string{"--reuid=65534", "--regid=65534", "--clear-groups", lodgeBin}
	h.c = client.New(filepath.Join(h.home, "lodge.sock"))
	h.startDaemon()
	t.Cleanup(func() { h.cleanup(); _ = os.RemoveAll(userHome) })
	info := h.must("host", "info", "-o", "json")
	if !strings.Contains(info, `"home": "`+h.home+`"`) {
		t.Fatalf("unprivileged default home: %s", info)
	}
	v := h.vm("mine")
	if got := h.exec("mine", "hostname"); got != "mine" {
		t.Fatalf("hostname %q", got)
	}
	st, err := os.Stat(v.Disks[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	if uid := statUID(st); uid != 65534 {
		t.Fatalf("disk owned by uid %d, want 65534", uid)
	}
	// A private network without root is a switch in the daemon: VMs on
	// it get their addresses and reach each other by name. NAT needs a
	// bridge, so it is refused in one line, with nothing made.
	if _, errOut, code := h.lodge("net", "create", "out", "--nat"); code == 0 || !strings.Contains(errOut, "need root") || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
		t.Errorf("net create --nat by an unprivileged daemon: exit %d, %q", code, errOut)
	}
	if out := h.must("net", "list", "-o", "json"); strings.Contains(out, `"out"`) {
		t.Errorf("a refused net create left a network: %s", out)
	}
	h.must("net", "create", "back")
	if n := h.network("back"); n.Mode != "user" || n.Bridge != "" {
		t.Errorf("network back of an unprivileged daemon: mode %q bridge %q, want user and none", n.Mode, n.Bridge)
	}
	h.must("stop", "mine")
	h.must("delete", "mine")
	h.vm("mine", "--net", "back", "--net", "nat")
	h.vm("peer", "--net", "back")
	if got, want := h.guestIP("peer", "eth0"), h.show("peer").NICs[0].IP; got != want {
		t.Errorf("peer has %s on back; its lease is %s", got, want)
	}
	h.guestIP("mine", "eth0")
	if !h.reaches("mine", "peer") || !h.reaches("peer", "mine") {
		t.Error("mine and peer do not reach each other by name on a user-mode network")
	}
	// The switch lives in the daemon; a new daemon serves the running
	// VMs again at the same sockets.
	h.killDaemon()
	h.startDaemon()
	if !h.reaches("peer", "mine") {
		t.Error("after a daemon restart peer no longer reaches mine")
	}
}
