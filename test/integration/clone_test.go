package integration

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// guestIdentity is what makes a guest one machine, as seen from inside.
type guestIdentity struct {
	hostname, machineID, sshKey, uuid, mac, before string
}

func (h *host) identity(name string) guestIdentity {
	h.t.Helper()
	f := strings.Split(h.exec(name, "sh", "-c",
		"hostname; cat /etc/machine-id; cat /etc/ssh/ssh_host_ed25519_key.pub; cat /sys/class/dmi/id/product_uuid; cat /sys/class/net/eth0/address; cat /root/before"), "\n")
	if len(f) != 6 {
		h.t.Fatalf("identity of %s: got %q", name, f)
	}
	return guestIdentity{f[0], f[1], f[2], strings.ToLower(f[3]), f[4], f[5]}
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	sum := sha256.New()
	if _, err := io.Copy(sum, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sum.Sum(nil))
}

// TestCloneIdentity clones a running VM (linked) and a stopped one (full),
// runs all three at once and checks, inside each guest, that the data
// came along and the identity did not.
func TestCloneIdentity(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("src")
	h.exec("src", "sh", "-c", "echo written-before-cloning >/root/before && sync")

	live := h.show("src")
	h.must("clone", "src", "linked")
	after := h.show("src")
	if after.State != api.StateRunning {
		t.Fatalf("src after a live clone: state %s", after.State)
	}
	if after.Disks[0].Path == live.Disks[0].Path || after.Disks[0].Backing != live.Disks[0].Path {
		t.Fatalf("src's disk after a live clone = %+v; want a new top on its old one %s", after.Disks[0], live.Disks[0].Path)
	}
	linked := h.show("linked")
	if linked.Disks[0].Backing != live.Disks[0].Path || linked.ClonedFrom != "src" {
		t.Fatalf("linked clone's disk = %+v, cloned from %q; want it on %s", linked.Disks[0], linked.ClonedFrom, live.Disks[0].Path)
	}
	// The guest kept running and writing through the switch.
	h.exec("src", "sh", "-c", "echo after >/root/after && sync")

	h.must("stop", "src")
	h.must("clone", "src", "full", "--full")
	full := h.show("full")
	if full.Disks[0].Backing != "" {
		t.Fatalf("full clone's disk has backing file %q; want a standalone copy", full.Disks[0].Backing)
	}

	layer := linked.Disks[0].Backing
	layerSum := fileSum(t, layer)
	h.must("start", "src", "linked", "full")
	// The first command the agent runs, as early as it can, already sees
	// the new name: exec waits while a clone's identity is pending.
	if got := strings.TrimSpace(h.must("exec", "linked", "--wait", "180s", "--", "hostname")); got != "linked" {
		t.Errorf("first exec in the linked clone: hostname %q, want linked", got)
	}
	ids := map[string]guestIdentity{}
	for _, name := range []string{"src", "linked", "full"} {
		h.waitAgent(name)
		ids[name] = h.identity(name)
		if ids[name].hostname != name {
			t.Errorf("%s: guest hostname %q", name, ids[name].hostname)
		}
		if ids[name].before != "written-before-cloning" {
			t.Errorf("%s: /root/before = %q; want the file written before cloning", name, ids[name].before)
		}
		v := h.show(name)
		if ids[name].uuid != v.UUID || ids[name].mac != v.NICs[0].MAC {
			t.Errorf("%s: guest sees UUID %s MAC %s; lodge says %s %s", name, ids[name].uuid, ids[name].mac, v.UUID, v.NICs[0].MAC)
		}
	}
	seen := map[string]string{}
	for name, id := range ids {
		for what, v := range map[string]string{"machine-id": id.machineID, "ssh host key": id.sshKey, "uuid": id.uuid, "mac": id.mac} {
			if v == "" {
				t.Errorf("%s: empty %s", name, what)
			}
			if other, dup := seen[what+v]; dup {
				t.Errorf("%s and %s share %s %s", name, other, what, v)
			}
			seen[what+v] = name
		}
	}
	if got := h.exec("full", "cat", "/root/after"); got != "after" {
		t.Errorf("full clone of stopped src: /root/after = %q", got)
	}

	// A linked clone writes to its own top: neither src nor the layer
	// they share changes.
	h.exec("linked", "sh", "-c", "dd if=/dev/urandom of=/root/big bs=1M count=8 2>/dev/null && echo mine >/root/only-linked && sync")
	if _, _, code := h.lodge("exec", "src", "--", "test", "-e", "/root/only-linked"); code == 0 {
		t.Error("a file written in the linked clone shows up in src")
	}
	if got := fileSum(t, layer); got != layerSum {
		t.Errorf("shared layer %s changed while the linked clone wrote", layer)
	}
	if st, err := os.Stat(layer); err != nil || st.Mode().Perm()&0o222 != 0 {
		t.Errorf("shared layer %s: %v, mode %v; want read-only", layer, err, st.Mode())
	}

	// A copy that keeps the identity may exist but not run beside src.
	h.must("clone", "src", "twin", "--keep-identity")
	twin := h.show("twin")
	if twin.UUID != ids["src"].uuid || twin.NICs[0].MAC != ids["src"].mac || twin.Hostname != "src" {
		t.Errorf("--keep-identity clone = uuid %s mac %s hostname %s; want src's", twin.UUID, twin.NICs[0].MAC, twin.Hostname)
	}
	_, errOut, code := h.lodge("start", "twin")
	if code != 1 || !strings.Contains(errOut, `"twin"`) || !strings.Contains(errOut, `"src"`) || strings.Count(errOut, "\n") != 1 {
		t.Errorf("start of an identical twin beside src: exit %d, stderr %q; want one line naming both", code, errOut)
	}
	if v := h.show("twin"); v.State != api.StateStopped {
		t.Errorf("refused twin is %s", v.State)
	}

	// Deleting the source leaves its clones working; deleting everything
	// leaves an empty pool, layers included.
	h.must("delete", "--force", "src")
	if !exists(layer) {
		t.Fatalf("layer %s went with src while clones use it", layer)
	}
	if got := h.exec("linked", "cat", "/root/before"); got != "written-before-cloning" {
		t.Errorf("linked clone after src was deleted reads %q", got)
	}
	h.must("delete", "--force", "linked", "full", "twin")
	left, _ := filepath.Glob(filepath.Join(h.home, "pools", "default", "*"))
	if len(left) != 0 {
		t.Errorf("pool after deleting every VM still holds %v", left)
	}
}

// TestImageChain builds base → +layer1 (generalized) → +layer2, boots the
// top, and checks dependents, flatten and delete.
func TestImageChain(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("l0")
	l0 := h.show("l0")
	h.exec("l0", "sh", "-c", "echo one >/root/layer1 && sync")
	h.must("stop", "l0")
	h.must("image", "publish", "l0", "--name", "img1", "--generalize")

	h.must("create", "l1", "--image", "img1", "--memory", "256M", "--start")
	h.waitAgent("l1")
	l1 := h.show("l1")
	// A generalized image has no instance of its own: the clone's first
	// boot is a new instance from nothing, not from l0's.
	if log := h.exec("l1", "cat", "/var/log/lodge-boot.log"); !strings.Contains(log, "new instance: '' -> '"+l1.InstanceID+"'") || strings.Contains(log, l0.InstanceID) {
		t.Errorf("boot log of a VM from a generalized image:\n%s\nwant a new instance from '' (not from %s)", log, l0.InstanceID)
	}
	h.exec("l1", "sh", "-c", "echo two >/root/layer2 && sync")
	h.must("stop", "l1")
	h.must("image", "publish", "l1", "--name", "img2")

	h.must("create", "l2", "--image", "img2", "--memory", "256M", "--start")
	h.waitAgent("l2")
	if got := h.exec("l2", "cat", "/root/layer1", "/root/layer2"); got != "one\ntwo" {
		t.Errorf("VM on a three-layer chain reads %q", got)
	}
	// Not generalized: the new VM follows on from l1's instance.
	if log := h.exec("l2", "cat", "/var/log/lodge-boot.log"); !strings.Contains(log, "new instance: '"+l1.InstanceID+"'") {
		t.Errorf("boot log of a VM from a plain published image:\n%s\nwant a new instance from l1's %s", log, l1.InstanceID)
	}

	var img2 api.Image
	mustJSON(t, h.must("image", "show", "img2", "-o", "json"), &img2)
	if strings.Join(img2.Chain, " ") != "img2 img1 tiny" || img2.Parent != "img1" || img2.PublishedFrom != "l1" {
		t.Errorf("img2 = chain %v parent %q from %q", img2.Chain, img2.Parent, img2.PublishedFrom)
	}
	if img2.ActualSize > 32<<20 {
		t.Errorf("img2 takes %d bytes: want only what differs from img1", img2.ActualSize)
	}
	_, errOut, code := h.lodge("image", "delete", "img1")
	if code != 1 || !strings.Contains(errOut, "vm l1") || !strings.Contains(errOut, "image img2") {
		t.Errorf("delete of an image with dependents: exit %d, stderr %q; want both named", code, errOut)
	}

	h.must("image", "flatten", "img2")
	var flat api.Image
	mustJSON(t, h.must("image", "show", "img2", "-o", "json"), &flat)
	if len(flat.Chain) != 1 || flat.Parent != "" {
		t.Errorf("flattened img2: chain %v parent %q", flat.Chain, flat.Parent)
	}
	h.must("delete", "l1")
	h.must("image", "delete", "img1")
	h.must("restart", "l2")
	h.waitAgent("l2")
	if got := h.exec("l2", "cat", "/root/layer1", "/root/layer2"); got != "one\ntwo" {
		t.Errorf("VM on flattened img2, img1 deleted, reads %q", got)
	}
}

// TestIdentityThroughAgent clones a guest that ignores its seed, as a
// system without cloud-init would: Lodge sees the old hostname through
// the agent and applies the new identity through it.
func TestIdentityThroughAgent(t *testing.T) {
	t.Parallel()
	h := newHostWithConfig(t, "identity_grace: 3s\n")
	h.vm("seedless")
	h.exec("seedless", "sh", "-c", "printf '#!/bin/sh\\n' >/usr/local/sbin/lodge-identity && echo x >/root/before && sync")
	before := h.identity("seedless")
	h.must("clone", "seedless", "fresh", "--start")
	h.waitAgent("fresh")
	var got guestIdentity
	eventually(t, 90*time.Second, "the clone's hostname to become fresh", func() bool {
		got = h.identity("fresh")
		return got.hostname == "fresh"
	})
	if got.machineID == before.machineID || got.sshKey == before.sshKey || got.machineID == "" || got.sshKey == "" {
		t.Errorf("identity through the agent: machine-id %q (was %q), ssh key %q (was %q); want new ones", got.machineID, before.machineID, got.sshKey, before.sshKey)
	}
	if got := h.exec("fresh", "cat", "/etc/hostname"); got != "fresh" {
		t.Errorf("/etc/hostname = %q: the new name must survive a reboot", got)
	}
	// The seed-respecting original is untouched.
	if again := h.identity("seedless"); again != before {
		t.Errorf("source's identity changed: %+v, was %+v", again, before)
	}
}

// TestFullCloneCrash kills the daemon in the middle of a full clone: the
// next daemon removes the half-made copy, the source is intact, and the
// clone can be made again, identical to the source.
func TestFullCloneCrash(t *testing.T) {
	t.Parallel()
	h := newHostNoProbe(t)
	// An image with 2 GiB of data, so the copy takes a while.
	img := filepath.Join(t.TempDir(), "big.qcow2")
	for _, args := range [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", img, "4G"},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1G", "-c", "write -P 0xa5 1G 1G", img},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	h.must("image", "import", img, "--name", "big")
	h.must("create", "src", "--image", "big")
	src := h.show("src")

	clone := exec.Command(h.bin, "clone", "src", "copy", "--full")
	clone.Env = h.env
	if err := clone.Start(); err != nil {
		t.Fatal(err)
	}
	pool := filepath.Join(h.home, "pools", "default")
	eventually(t, 30*time.Second, "the copy to start", func() bool {
		m, _ := filepath.Glob(filepath.Join(pool, "copy-*.tmp"))
		return len(m) == 1
	})
	h.killDaemon()
	_ = clone.Wait()
	h.startDaemon()

	if _, _, code := h.lodge("show", "copy"); code == 0 {
		t.Error("a clone cut short by a crash is listed after restart")
	}
	if left, _ := filepath.Glob(filepath.Join(pool, "copy-*")); len(left) != 0 {
		t.Errorf("crashed clone left %v", left)
	}
	if out, err := exec.Command("qemu-img", "check", "-q", src.Disks[0].Path).CombinedOutput(); err != nil {
		t.Errorf("source disk after the crash: %v: %s", err, out)
	}

	h.must("clone", "src", "copy", "--full")
	cp := h.show("copy")
	if out, err := exec.Command("qemu-img", "compare", "-q", src.Disks[0].Path, cp.Disks[0].Path).CombinedOutput(); err != nil {
		t.Errorf("full clone differs from its source: %v: %s", err, out)
	}
	// Sparse: 2 GiB of data in a 4 GiB disk (8 GiB VM disk) stays ~2 GiB.
	var st syscall.Stat_t
	if err := syscall.Stat(cp.Disks[0].Path, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 2<<30+64<<20 {
		t.Errorf("full clone takes %d bytes on disk for 2 GiB of data: holes were filled", used)
	}
}

// TestPublishCrash kills the daemon while a generalize boot runs: the next
// daemon stops that boot and removes the half-made image.
func TestPublishCrash(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.importGuest()
	h.must("create", "src", "--image", "tiny")
	publish := exec.Command(h.bin, "image", "publish", "src", "--name", "half", "--generalize")
	publish.Env = h.env
	if err := publish.Start(); err != nil {
		t.Fatal(err)
	}
	var runDir string
	eventually(t, 60*time.Second, "the generalize boot to start", func() bool {
		m, _ := filepath.Glob(filepath.Join(h.home, "run", ".generalize-*", "pid"))
		if len(m) == 1 {
			runDir = filepath.Dir(m[0])
		}
		return runDir != ""
	})
	h.killDaemon()
	_ = publish.Wait()
	h.startDaemon()

	if _, _, code := h.lodge("image", "show", "half"); code == 0 {
		t.Error("an image cut short by a crash is listed after restart")
	}
	if exists(filepath.Join(h.home, "images", "half")) || exists(runDir) {
		t.Errorf("crashed publish left files: image dir %v, run dir %v", exists(filepath.Join(h.home, "images", "half")), exists(runDir))
	}
	if out, _ := exec.Command("pgrep", "-f", runDir).Output(); len(out) != 0 {
		t.Errorf("the generalize boot still runs: pids %s", out)
	}
	// The VM is free again and can be published.
	h.must("image", "publish", "src", "--name", "whole")
}
