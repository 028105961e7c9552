package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// snapshots lists a VM's snapshot tree as "name<parent>*" words, * marking
// the current one, parents before children.
func (h *host) snapshots(vm string) string {
	h.t.Helper()
	var snaps []api.Snapshot
	mustJSON(h.t, h.must("snapshot", "list", vm, "-o", "json"), &snaps)
	var out []string
	for _, s := range snaps {
		w := s.Name + "<" + s.Parent + ">"
		if s.Current {
			w += "*"
		}
		out = append(out, w)
	}
	return strings.Join(out, " ")
}

func (h *host) snapshot(vm, name string, extra ...string) api.Snapshot {
	h.t.Helper()
	var s api.Snapshot
	mustJSON(h.t, h.must(append([]string{"snapshot", "create", vm, name, "-o", "json"}, extra...)...), &s)
	return s
}

// revert reverts and returns the VM as the command printed it.
func (h *host) revert(vm, snap string, extra ...string) api.VM {
	h.t.Helper()
	var v api.VM
	mustJSON(h.t, h.must(append([]string{"snapshot", "revert", vm, snap, "-o", "json"}, extra...)...), &v)
	return v
}

// TestSnapshotMemoryRevert walks a snapshot tree: memory snapshots bring
// back files, tmpfs contents and processes; branches are kept; deleting a
// snapshot in the middle, with the VM running, changes no other
// snapshot; everything survives a daemon crash.
func TestSnapshotMemoryRevert(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("snap")
	// A process, a file on disk and one in tmpfs (/tmp), all of which a
	// memory snapshot must bring back.
	pid := strings.TrimSpace(h.exec("snap", "sh", "-c",
		"echo one >/root/f && echo in-memory >/tmp/t && sync && sleep 100000 </dev/null >/dev/null 2>&1 & echo $!"))
	s1 := h.snapshot("snap", "s1")
	if !s1.Memory || !s1.Current || s1.Parent != "" || s1.Size <= 0 {
		t.Fatalf("snapshot s1 = %+v: want memory, current, a root, with a size", s1)
	}
	if v := h.show("snap"); v.State != api.StateRunning || v.CurrentSnapshot != "s1" || strings.Join(v.Snapshots, ",") != "s1" {
		t.Fatalf("after a memory snapshot: state %s, current %q, snapshots %v", v.State, v.CurrentSnapshot, v.Snapshots)
	}
	h.exec("snap", "sh", "-c", "echo two >/root/f && echo changed >/tmp/t && kill "+pid+" && sync")

	if v := h.revert("snap", "s1"); v.State != api.StateRunning {
		t.Fatalf("revert to a memory snapshot: state %s, want running", v.State)
	}
	if got := h.exec("snap", "sh", "-c", "cat /root/f /tmp/t; kill -0 "+pid+" && echo alive"); got != "one\nin-memory\nalive" {
		t.Fatalf("after revert to s1 the guest holds %q, want the file, the tmpfs file and the process back", got)
	}

	// Two branches from s1: b1 with memory, b2 disks only while running.
	h.exec("snap", "sh", "-c", "echo b1 >/root/f && sync")
	h.snapshot("snap", "b1")
	h.revert("snap", "s1")
	h.exec("snap", "sh", "-c", "echo b2 >/root/f && sync")
	if b2 := h.snapshot("snap", "b2", "--no-memory"); b2.Memory || b2.Parent != "s1" {
		t.Fatalf("snapshot b2 = %+v: want disks only, child of s1", b2)
	}
	if got := h.snapshots("snap"); got != "s1<> b1<s1> b2<s1>*" {
		t.Fatalf("tree = %q", got)
	}
	if v := h.revert("snap", "b1"); v.State != api.StateRunning || h.exec("snap", "cat", "/root/f") != "b1" {
		t.Fatalf("revert to b1: state %s", v.State)
	}
	if v := h.revert("snap", "b2"); v.State != api.StateStopped {
		t.Fatalf("revert to disk-only b2: state %s, want stopped", v.State)
	}
	h.revert("snap", "b2", "--start")
	h.waitAgent("snap")
	if got := h.exec("snap", "cat", "/root/f"); got != "b2" {
		t.Fatalf("after revert to b2 the file holds %q", got)
	}

	// A chain on the b2 branch; deleting its middle merges the layer into
	// its child while the VM runs.
	h.exec("snap", "sh", "-c", "echo x1 >/root/f && echo x1 >/root/only-x1 && sync")
	h.snapshot("snap", "x1")
	h.exec("snap", "sh", "-c", "echo x2 >/root/f && sync")
	h.snapshot("snap", "x2")
	h.exec("snap", "sh", "-c", "echo x3 >/root/f && sync")
	pool := filepath.Join(h.home, "pools", "default")
	before, _ := filepath.Glob(filepath.Join(pool, "*.qcow2"))
	h.must("snapshot", "delete", "snap", "x1")
	after, _ := filepath.Glob(filepath.Join(pool, "*.qcow2"))
	if len(after) != len(before)-1 {
		t.Errorf("deleting x1 left %d disk files of %d: its layer was not merged away", len(after), len(before))
	}
	if got := h.exec("snap", "cat", "/root/f"); got != "x3" {
		t.Fatalf("the running VM reads %q after the merge, want x3", got)
	}
	// And s1, which has two children, is deleted without touching them.
	h.must("snapshot", "delete", "snap", "s1")
	if got := h.snapshots("snap"); got != "b1<> b2<> x2<b2>*" {
		t.Fatalf("tree after deletes = %q", got)
	}

	// A crash of the daemon changes nothing.
	h.killDaemon()
	h.startDaemon()
	if got := h.snapshots("snap"); got != "b1<> b2<> x2<b2>*" {
		t.Fatalf("tree after a daemon crash = %q", got)
	}
	if v := h.revert("snap", "x2"); v.State != api.StateRunning {
		t.Fatalf("revert to x2 after the crash: state %s", v.State)
	}
	if got := h.exec("snap", "cat", "/root/f", "/root/only-x1"); got != "x2\nx1" {
		t.Fatalf("x2 holds %q after its parent was merged into it", got)
	}
	if v := h.revert("snap", "b1"); v.State != api.StateRunning || h.exec("snap", "cat", "/root/f") != "b1" {
		t.Fatalf("revert to b1 after all that: state %s", v.State)
	}
	v := h.show("snap")
	for _, d := range v.Disks {
		if out, err := exec.Command("qemu-img", "check", "-q", "--force-share", d.Path).CombinedOutput(); err != nil {
			t.Errorf("disk %s: %v: %s", d.Path, err, out)
		}
	}
	h.must("delete", "--force", "snap")
	if left, _ := filepath.Glob(filepath.Join(pool, "*")); len(left) != 0 {
		t.Errorf("deleting the VM left %v", left)
	}
}

// TestSnapshotCrash kills the daemon while a memory snapshot is written:
// after a restart the snapshot is gone, the guest runs, and a new
// snapshot and revert work.
func TestSnapshotCrash(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("crash")
	// Hold memory so that the state takes a while to write.
	h.exec("crash", "sh", "-c", "dd if=/dev/urandom of=/tmp/fill bs=1M count=120 2>/dev/null; echo kept >/root/f; sync")
	snaps := filepath.Join(h.home, "vms", "crash", "snapshots")
	create := exec.Command(h.bin, "snapshot", "create", "crash", "cut")
	create.Env = h.env
	if err := create.Start(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "the memory state to be written", func() bool { return exists(filepath.Join(snaps, "cut.mem.part")) })
	h.killDaemon()
	_ = create.Wait()
	h.startDaemon()

	if got := h.snapshots("crash"); got != "" {
		t.Errorf("snapshots after a crash mid-snapshot: %q, want none", got)
	}
	if left, _ := filepath.Glob(filepath.Join(snaps, "*")); len(left) != 0 {
		t.Errorf("crashed snapshot left %v", left)
	}
	v := h.show("crash")
	if v.State != api.StateRunning {
		t.Fatalf("after the crash the VM is %s (%s), want running", v.State, v.StateReason)
	}
	if got := h.exec("crash", "cat", "/root/f"); got != "kept" {
		t.Fatalf("guest reads %q", got)
	}
	h.snapshot("crash", "again")
	h.exec("crash", "sh", "-c", "echo lost >/root/f; sync")
	h.revert("crash", "again")
	if got := h.exec("crash", "cat", "/root/f"); got != "kept" {
		t.Fatalf("after revert the guest reads %q, want kept", got)
	}
}

// TestSnapshotDiskFull puts Lodge's home on a small tmpfs: a snapshot
// that cannot fit is refused before it starts and changes nothing; one
// that starts has its room set aside, so a disk filled meanwhile by
// someone else does not break it; the VM and its older snapshot are
// intact.
func TestSnapshotDiskFull(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	h := newHostNoDaemon(t)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=700M", "lodge-full", h.home).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", h.home).Run() })
	requireQEMU(t)
	waitProbe(t)
	h.startDaemon()
	t.Cleanup(h.cleanup)
	h.vm("full")
	h.exec("full", "sh", "-c", "echo old >/root/f; sync")
	h.snapshot("full", "old")
	h.exec("full", "sh", "-c", "echo new >/root/f; dd if=/dev/urandom of=/tmp/fill bs=1M count=100 2>/dev/null; sync")

	filler := filepath.Join(h.home, "filler")
	fill := func(leave int64) {
		t.Helper()
		_ = os.Remove(filler)
		var st syscall.Statfs_t
		if err := syscall.Statfs(h.home, &st); err != nil {
			t.Fatal(err)
		}
		free := int64(st.Bavail) * st.Bsize
		if free <= leave {
			return
		}
		if out, err := exec.Command("fallocate", "-l", strconv.FormatInt(free-leave, 10), filler).CombinedOutput(); err != nil {
			t.Fatalf("fallocate: %v: %s", err, out)
		}
	}
	pool := filepath.Join(h.home, "pools", "default")
	files := func() int { m, _ := filepath.Glob(filepath.Join(pool, "*")); return len(m) }
	n := files()

	// Too little room for the memory state (256 MiB): refused up front.
	fill(100 << 20)
	_, errOut, code := h.lodge("snapshot", "create", "full", "nope")
	if code == 0 || !strings.Contains(errOut, "not enough space") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Fatalf("snapshot on a full disk: exit %d, %q: want a one-line 'not enough space' error", code, errOut)
	}
	if files() != n || h.snapshots("full") != "old<>*" {
		t.Fatalf("a refused snapshot changed something: %d files (was %d), tree %q", files(), n, h.snapshots("full"))
	}

	// Room enough to start; then another process fills the disk while
	// the state is written. The room set aside for the state holds: the
	// snapshot completes, and the other process is the one left short.
	fill(330 << 20)
	create := exec.Command(h.bin, "snapshot", "create", "full", "half")
	create.Env = h.env
	var stderr strings.Builder
	create.Stderr = &stderr
	if err := create.Start(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "the memory state to be written", func() bool {
		return exists(filepath.Join(h.home, "vms", "full", "snapshots", "half.mem.part"))
	})
	out, ferr := exec.Command("fallocate", "-l", "330M", filler+"2").CombinedOutput()
	err := create.Wait()
	_ = os.Remove(filler + "2")
	_ = os.Remove(filler)
	if ferr == nil {
		t.Errorf("another process took 330M while the state was written: the room for it was not set aside")
	}
	t.Logf("the other process: %v: %s", ferr, out)
	if err != nil {
		t.Fatalf("a snapshot whose room was set aside failed: %v: %s", err, stderr.String())
	}
	if got := h.snapshots("full"); got != "old<> half<old>*" {
		t.Fatalf("tree after the snapshot = %q", got)
	}
	if v := h.show("full"); v.State != api.StateRunning {
		t.Fatalf("VM is %s after the snapshot", v.State)
	}
	if got := h.exec("full", "cat", "/root/f"); got != "new" {
		t.Fatalf("guest reads %q after the snapshot, want new", got)
	}
	h.revert("full", "old")
	if got := h.exec("full", "cat", "/root/f"); got != "old" {
		t.Fatalf("older snapshot holds %q, want old", got)
	}
}
