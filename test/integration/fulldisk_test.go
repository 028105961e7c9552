package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// mountTmpfs mounts a tmpfs of the given size, or skips.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount tmpfs here: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	return dir
}

// TestFullPool: a full pool fails create cleanly; a guest that fills its
// pool is paused, with the reason, instead of losing writes; once the pool
// has room, resume lets the write finish and the disk checks clean.
func TestFullPool(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.importGuest()
	dir := mountTmpfs(t, "24m")
	h.must("pool", "create", "small", dir)

	fill := filepath.Join(dir, "fill")
	if out, err := exec.Command("dd", "if=/dev/zero", "of="+fill, "bs=1M", "count=30").CombinedOutput(); err == nil {
		t.Fatalf("filling the pool did not fill it: %s", out)
	}
	_, errOut, code := h.lodge("create", "full", "--image", "tiny", "--pool", "small")
	if code != 1 || !strings.Contains(errOut, `vm "full"`) || !strings.Contains(errOut, "No space left") {
		t.Fatalf("create on a full pool: exit %d %q", code, errOut)
	}
	if files, _ := filepath.Glob(filepath.Join(dir, "*")); len(files) != 1 {
		t.Fatalf("failed create left files: %v", files)
	}
	if _, _, code := h.lodge("show", "full"); code != 1 {
		t.Fatal("failed create left a VM")
	}
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}

	v := h.vm("full", "--pool", "small")
	h.exec("full", "sh", "-c", "setsid sh -c 'dd if=/dev/urandom of=/root/big bs=1M count=40 conv=fsync 2>/root/dd.err; sync; echo done > /root/done' >/dev/null 2>&1 &")
	eventually(t, 120*time.Second, "the guest to pause on the full pool", func() bool {
		return h.show("full").State == api.StatePaused
	})
	if r := h.show("full").StateReason; !strings.Contains(r, "no space left") {
		t.Fatalf("paused without the reason: %q", r)
	}
	if out, err := exec.Command("mount", "-o", "remount,size=256m", dir).CombinedOutput(); err != nil {
		t.Fatalf("grow the pool: %v: %s", err, out)
	}
	h.must("resume", "full")
	eventually(t, 120*time.Second, "the guest's write to finish", func() bool {
		out, _, code := h.lodge("exec", "full", "--", "cat", "/root/done")
		return code == 0 && strings.TrimSpace(out) == "done"
	})
	if got := h.exec("full", "stat", "-c", "%s", "/root/big"); got != "41943040" {
		t.Fatalf("/root/big is %s bytes after the pause, want 41943040 (dd: %s)", got, h.exec("full", "cat", "/root/dd.err"))
	}
	h.must("stop", "full")
	if out, err := exec.Command("qemu-img", "check", v.Disks[0].Path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check after the full pool: %v\n%s", err, out)
	}
}
