package integration

import (
	"context"
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

// backup makes one backup and returns it.
func (h *host) backup(vm string, args ...string) api.Backup {
	h.t.Helper()
	var b api.Backup
	mustJSON(h.t, h.must(append([]string{"backup", "create", vm, "-o", "json"}, args...)...), &b)
	return b
}

// regionSum is the sha256 of the 120 MiB the backup tests write to,
// straight to the disk past the guest's partitions.
func (h *host) regionSum(name string) string {
	h.t.Helper()
	return strings.Fields(h.exec(name, "sh", "-c", "dd if=/dev/vda bs=1M skip=1024 count=120 2>/dev/null | sha256sum"))[0]
}

// TestBackupRunning backs up a running VM fully, then incrementally
// after 50 MiB were written, then again after the VM and the daemon were
// restarted; restores the first two points as new VMs and finds in each
// exactly what the guest held at that point. A QEMU killed outright loses
// its change tracking: the next backup is full and says why.
func TestBackupRunning(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("db", "--disk", "4G", "--data-disk", "64M")
	if got := h.exec("db", "cat", "/sys/block/vdb/size"); got != "131072" {
		t.Fatalf("the guest's data disk has %s sectors, want 131072 (64 MiB)", got)
	}
	h.exec("db", "sh", "-c", "echo point-one >/root/one && dd if=/dev/urandom of=/dev/vda bs=1M seek=1024 count=20 conv=fsync 2>/dev/null && printf data-one | dd of=/dev/vdb conv=fsync 2>/dev/null && sync")
	sumA := h.regionSum("db")

	b1 := h.backup("db")
	if b1.Kind != "full" || b1.Consistency != "frozen" || b1.VM != "db" || b1.Repo != "default" {
		t.Fatalf("first backup: %+v", b1)
	}
	if v := h.show("db"); v.State != api.StateRunning {
		t.Fatalf("db after a backup: %s", v.State)
	}

	h.exec("db", "sh", "-c", "echo point-two >/root/two && dd if=/dev/urandom of=/dev/vda bs=1M seek=1060 count=50 conv=fsync 2>/dev/null && printf data-two | dd of=/dev/vdb bs=1M seek=32 conv=fsync 2>/dev/null && sync")
	sumB := h.regionSum("db")
	b2 := h.backup("db")
	if b2.Kind != "incremental" || b2.Parent != b1.ID {
		t.Fatalf("second backup: kind %s parent %s (reason %q), want incremental on %s", b2.Kind, b2.Parent, b2.Reason, b1.ID)
	}
	// 50 MiB written, in 4 MiB chunks, and the few the filesystem touched.
	if b2.Read < 50<<20 || b2.Read > 120<<20 {
		t.Errorf("incremental backup after 50 MiB written read %d MiB", b2.Read>>20)
	}
	if b2.NewData < 45<<20 {
		t.Errorf("incremental backup stored %d MiB new, want the 50 MiB of random data", b2.NewData>>20)
	}
	if b2.Size < b1.Size+45<<20 {
		t.Errorf("the second backup holds %d MiB, the first %d MiB: it is not logically full", b2.Size>>20, b1.Size>>20)
	}

	// Change tracking lives in the disk file: neither a snapshot, a VM
	// restart nor a daemon restart loses it.
	h.must("snapshot", "create", "db", "mid", "--no-memory")
	h.must("restart", "db")
	h.waitAgent("db")
	h.killDaemon()
	h.startDaemon()
	h.exec("db", "sh", "-c", "dd if=/dev/urandom of=/dev/vda bs=1M seek=1200 count=10 conv=fsync 2>/dev/null && sync")
	b3 := h.backup("db")
	if b3.Kind != "incremental" || b3.Parent != b2.ID || b3.Read > 60<<20 {
		t.Fatalf("backup after a VM and daemon restart: kind %s parent %s read %d MiB (reason %q), want incremental on %s", b3.Kind, b3.Parent, b3.Read>>20, b3.Reason, b2.ID)
	}
	var shown api.Backup
	mustJSON(t, h.must("backup", "show", b3.ID, "-o", "json"), &shown)
	if strings.Join(shown.Chain, ",") != b2.ID+","+b1.ID {
		t.Errorf("chain of %s: %v, want [%s %s]", b3.ID, shown.Chain, b2.ID, b1.ID)
	}
	var list []api.Backup
	mustJSON(t, h.must("backup", "list", "db", "-o", "json"), &list)
	if len(list) != 3 || list[0].ID != b1.ID || list[2].ID != b3.ID {
		t.Fatalf("backup list: %+v", list)
	}

	for _, tc := range []struct {
		id, as, sum string
		two         bool
	}{{b1.ID, "p1", sumA, false}, {b2.ID, "p2", sumB, true}} {
		h.must("backup", "restore", "db", tc.id, "--as", tc.as, "--start")
		h.waitAgent(tc.as)
		if got := h.exec(tc.as, "cat", "/root/one"); got != "point-one" {
			t.Errorf("%s: /root/one is %q", tc.as, got)
		}
		_, _, code := h.lodge("exec", tc.as, "--", "test", "-e", "/root/two")
		if has := code == 0; has != tc.two {
			t.Errorf("%s: /root/two exists: %v, want %v", tc.as, has, tc.two)
		}
		if got := h.regionSum(tc.as); got != tc.sum {
			t.Errorf("%s: data sha256 %s, want %s", tc.as, got, tc.sum)
		}
		// The data disk is restored too, each point with what it held.
		want := "data-one|"
		if tc.two {
			want += "data-two"
		}
		if got := h.exec(tc.as, "sh", "-c", "head -c 8 /dev/vdb; printf '|'; dd if=/dev/vdb bs=1M skip=32 count=1 2>/dev/null | head -c 8 | tr -d '\\000'"); got != want {
			t.Errorf("%s: data disk holds %q, want %q", tc.as, got, want)
		}
		if v := h.show(tc.as); v.UUID == h.show("db").UUID {
			t.Errorf("%s kept the uuid of db", tc.as)
		}
		h.must("delete", tc.as, "--force")
	}
	// Single files come out of any point without a restore.
	if got := h.must("backup", "cat", b1.ID, "/root/one"); got != "point-one\n" {
		t.Errorf("backup cat %s /root/one: %q", b1.ID, got)
	}
	var files []api.BackupFile
	mustJSON(t, h.must("backup", "files", b2.ID, "/root", "-o", "json"), &files)
	names := map[string]string{}
	for _, f := range files {
		names[f.Name] = f.Type
	}
	if names["one"] != "file" || names["two"] != "file" {
		t.Errorf("backup files %s /root: %+v", b2.ID, files)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"backup", "cat", b1.ID, "/root/two"}, "not found"},
		{[]string{"backup", "cat", b1.ID, "/root"}, "not a regular file"},
		{[]string{"backup", "cat", b1.ID, "root/one"}, "must be absolute"},
		{[]string{"backup", "cat", b1.ID, "/root/one", "--partition", "1"}, "only ext2/3/4"},
		{[]string{"backup", "cat", b1.ID, "/root/one", "--disk", "nope"}, `disk "nope"`},
	} {
		out, errOut, code := h.lodge(tc.args...)
		if code != 1 || out != "" || !strings.Contains(errOut, tc.want) {
			t.Errorf("lodge %s: exit %d, stdout %q, stderr %q; want exit 1 and %q", strings.Join(tc.args, " "), code, out, errOut, tc.want)
		}
	}

	var vr api.VerifyResult
	mustJSON(t, h.must("backup", "verify", "-o", "json"), &vr)
	if vr.Backups != 3 || len(vr.Bad) != 0 || vr.Chunks == 0 {
		t.Errorf("verify: %+v", vr)
	}

	// A QEMU killed outright cannot save its bitmaps.
	pid, err := os.ReadFile(filepath.Join(h.home, "run", "db", "pid"))
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(pid)))
	_ = syscall.Kill(n, syscall.SIGKILL)
	eventually(t, 30*time.Second, "db seen stopped", func() bool { return h.show("db").State != api.StateRunning })
	h.must("start", "db")
	h.waitAgent("db")
	b4 := h.backup("db")
	if b4.Kind != "full" || !strings.Contains(b4.Reason, "lost") {
		t.Errorf("backup after QEMU was killed: kind %s, reason %q; want full, saying tracking was lost", b4.Kind, b4.Reason)
	}
}

// TestBackupKill kills the daemon in the middle of a backup of a running
// VM: the VM keeps running, the repository still verifies, and the next
// backups work, the one after incrementally.
func TestBackupKill(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("app", "--disk", "4G")
	h.exec("app", "sh", "-c", "dd if=/dev/urandom of=/dev/vda bs=1M seek=1024 count=300 conv=fsync 2>/dev/null && sync")
	ctx := context.Background()
	// Cancelled half-way (what Ctrl-C does): nothing stays behind.
	op, err := h.c.CreateBackup(ctx, "app", api.CreateBackup{})
	if err != nil {
		t.Fatal(err)
	}
	waitReading(t, h, op)
	if err := h.c.CancelOperation(ctx, op.ID); err != nil {
		t.Fatal(err)
	}
	if done, err := h.c.Wait(ctx, op, nil); done.State != api.OpCancelled {
		t.Fatalf("cancelled backup: %s, %v", done.State, err)
	}
	var none []api.Backup
	mustJSON(t, h.must("backup", "list", "-o", "json"), &none)
	if len(none) != 0 {
		t.Fatalf("a cancelled backup is listed: %+v", none)
	}

	// Killed half-way.
	op, err = h.c.CreateBackup(ctx, "app", api.CreateBackup{})
	if err != nil {
		t.Fatal(err)
	}
	waitReading(t, h, op)
	h.killDaemon()
	h.startDaemon()
	if v := h.show("app"); v.State != api.StateRunning {
		t.Fatalf("app after the daemon was killed mid-backup: %s", v.State)
	}
	h.must("backup", "verify")
	b1 := h.backup("app")
	if b1.Kind != "full" {
		t.Errorf("first completed backup: %s", b1.Kind)
	}
	h.exec("app", "sh", "-c", "dd if=/dev/urandom of=/dev/vda bs=1M seek=1400 count=8 conv=fsync 2>/dev/null && sync")
	b2 := h.backup("app")
	if b2.Kind != "incremental" || b2.Read > 40<<20 {
		t.Errorf("backup after the interrupted one: kind %s read %d MiB (reason %q)", b2.Kind, b2.Read>>20, b2.Reason)
	}
	leftovers, _ := filepath.Glob(filepath.Join(h.home, "pools", "default", "*.fleece.qcow2"))
	if len(leftovers) > 0 {
		t.Errorf("backups left %v behind", leftovers)
	}
	var vr api.VerifyResult
	mustJSON(t, h.must("backup", "verify", "-o", "json"), &vr)
	if vr.Backups != 2 || len(vr.Bad) != 0 {
		t.Errorf("verify after the kill: %+v", vr)
	}
}

// qemuIO writes to a stopped VM's disk as its guest would.
func qemuIO(t *testing.T, path, cmd string) {
	t.Helper()
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io %s %q: %v: %s", path, cmd, err, out)
	}
}

// snapshotDisk keeps a copy of what a disk holds now, to compare with a
// restore later.
func snapshotDisk(t *testing.T, path, dst string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", "convert", "-O", "qcow2", path, dst).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert %s: %v: %s", path, err, out)
	}
}

func sameDisk(t *testing.T, a, b string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", "compare", a, b).CombinedOutput(); err != nil {
		t.Errorf("%s and %s differ: %v: %s", a, b, err, out)
	}
}

// TestBackupRepository runs a stopped VM's backups through a
// repository's life: incrementals, a sync to a second repository and a
// restore from it, a mirror, pruning and garbage collection, a schedule
// the daemon runs, a corrupted chunk, and bad input.
func TestBackupRepository(t *testing.T) {
	t.Parallel()
	h := newHostWithConfig(t, "backup_tick: 500ms\n")
	h.importGuest()
	h.must("create", "vault", "--image", "tiny", "--memory", "256M", "--disk", "2G")
	disk := h.show("vault").Disks[0].Path
	refs := t.TempDir()

	var ids []string
	for i := 0; i < 4; i++ {
		if i == 2 {
			// A snapshot puts a new layer on top: the change tracking
			// of backup 1 stays in the layer under it, and backup 2 is
			// still incremental.
			h.must("snapshot", "create", "vault", "s1")
			disk = h.show("vault").Disks[0].Path
		}
		qemuIO(t, disk, "write -P "+strconv.Itoa(0x40+i)+" "+strconv.Itoa(512+i*16)+"M 6M")
		snapshotDisk(t, disk, filepath.Join(refs, strconv.Itoa(i)+".qcow2"))
		b := h.backup("vault")
		want := "incremental"
		if i == 0 {
			want = "full"
		}
		if b.Kind != want || b.Consistency != "stopped" {
			t.Fatalf("backup %d: kind %s consistency %s (reason %q), want %s", i, b.Kind, b.Consistency, b.Reason, want)
		}
		if i > 0 && b.Read > 12<<20 {
			t.Errorf("backup %d read %d MiB after 6 MiB were written", i, b.Read>>20)
		}
		ids = append(ids, b.ID)
	}

	// Bad input changes nothing.
	offsite := filepath.Join(t.TempDir(), "offsite")
	notRepo := t.TempDir()
	if err := os.WriteFile(filepath.Join(notRepo, "precious"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
		code int
	}{
		{[]string{"backup", "create", "ghost"}, `vm "ghost"`, 1},
		{[]string{"backup", "create", "vault", "--repo", "nowhere"}, `repository "nowhere"`, 1},
		{[]string{"backup", "show", "../../etc"}, `not a backup id`, 1},
		{[]string{"backup", "restore", "vault", "20200101-000000-abcdef"}, "not found", 1},
		{[]string{"backup", "restore", "vault", ids[0]}, `vm "vault" already exists`, 1},
		{[]string{"backup", "restore", "other", ids[0]}, `backup of vm "vault"`, 1},
		{[]string{"backup", "repo", "add", "junk", notRepo}, "not a lodge backup repository", 1},
		{[]string{"backup", "repo", "add", "bad name", offsite}, "backup repository name", 1},
		{[]string{"backup", "schedule", "vault", "--every", "10s"}, "schedule", 1},
		{[]string{"backup", "schedule", "vault", "--cron", "61 * * * *"}, "schedule", 1},
		{[]string{"backup", "schedule", "vault"}, "--every", 2},
		{[]string{"backup", "prune", "vault"}, "--keep", 1},
		{[]string{"backup", "sync", "default", "default"}, "itself", 1},
	} {
		_, errOut, code := h.lodge(tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("lodge %s: exit %d, stderr %q; want exit %d and one line with %q", strings.Join(tc.args, " "), code, errOut, tc.code, tc.want)
		}
	}
	if _, err := os.Stat(filepath.Join(notRepo, "precious")); err != nil {
		t.Errorf("a refused repo add touched the directory: %v", err)
	}

	// Sync copies only what the other side lacks; a restore from the
	// copy gives the disk exactly as it was at that point.
	h.must("backup", "repo", "add", "offsite", offsite)
	var sr api.SyncResult
	mustJSON(t, h.must("backup", "sync", "default", "offsite", "-o", "json"), &sr)
	if sr.Backups != 4 || sr.Chunks == 0 {
		t.Fatalf("first sync: %+v", sr)
	}
	mustJSON(t, h.must("backup", "sync", "default", "offsite", "-o", "json"), &sr)
	if sr.Backups != 0 || sr.Chunks != 0 {
		t.Errorf("second sync copied %+v", sr)
	}
	for _, i := range []int{1, 2} {
		as := "from-offsite-" + strconv.Itoa(i)
		h.must("backup", "restore", "vault", ids[i], "--as", as, "--repo", "offsite")
		sameDisk(t, h.show(as).Disks[0].Path, filepath.Join(refs, strconv.Itoa(i)+".qcow2"))
	}

	// Another host that mounts the same repository restores from it,
	// under the VM's own name and identity (the VM was lost here).
	other := newHostNoProbe(t)
	other.must("backup", "repo", "add", "offsite", offsite)
	other.must("backup", "restore", "vault", ids[2])
	moved := other.show("vault")
	if moved.UUID != h.show("vault").UUID {
		t.Errorf("restored on another host under its own name: uuid %s, want %s", moved.UUID, h.show("vault").UUID)
	}
	sameDisk(t, moved.Disks[0].Path, filepath.Join(refs, "2.qcow2"))

	// A mirror gets each new backup as it is made.
	mirror := filepath.Join(t.TempDir(), "mirror")
	h.must("backup", "repo", "add", "mirror", mirror, "--mirror-of", "default")
	qemuIO(t, disk, "write -P 0x55 900M 3M")
	b5 := h.backup("vault")
	var inMirror []api.Backup
	mustJSON(t, h.must("backup", "list", "vault", "--repo", "mirror", "-o", "json"), &inMirror)
	if len(inMirror) != 5 || inMirror[4].ID != b5.ID {
		t.Errorf("mirror holds %d backups, want all 5 with %s last", len(inMirror), b5.ID)
	}

	// Pruning keeps the newest two and frees the rest; what is kept still
	// verifies and restores.
	var pr api.PruneResult
	mustJSON(t, h.must("backup", "prune", "vault", "--keep-last", "2", "-o", "json"), &pr)
	if len(pr.Kept) != 2 || len(pr.Removed) != 3 {
		t.Fatalf("prune --keep-last 2: %+v", pr)
	}
	h.must("backup", "verify")
	h.must("backup", "restore", "vault", ids[3], "--as", "latest")
	sameDisk(t, h.show("latest").Disks[0].Path, filepath.Join(refs, "3.qcow2"))

	// The daemon runs a schedule at once, then prunes by it.
	h.must("backup", "schedule", "vault", "--every", "1h", "--keep-last", "1")
	eventually(t, 60*time.Second, "the scheduled backup", func() bool {
		var bs []api.Backup
		mustJSON(t, h.must("backup", "list", "vault", "--repo", "default", "-o", "json"), &bs)
		return len(bs) == 1 && bs[0].ID != ids[3] && bs[0].ID != b5.ID
	})
	var scheds []api.BackupSchedule
	mustJSON(t, h.must("backup", "schedule", "-o", "json"), &scheds)
	if len(scheds) != 1 || scheds[0].LastRun == nil || scheds[0].LastError != "" || scheds[0].NextRun == nil || scheds[0].NextRun.Sub(*scheds[0].LastRun) < 59*time.Minute {
		t.Errorf("schedule after its run: %+v", scheds)
	}
	h.must("backup", "schedule", "vault", "--off")

	// A damaged chunk is found by verify and refused by restore, which
	// leaves no VM behind.
	chunks, _ := filepath.Glob(filepath.Join(h.home, "backups", "chunks", "*", "*"))
	if len(chunks) == 0 {
		t.Fatal("no chunks in the default repository")
	}
	for _, c := range chunks {
		raw, err := os.ReadFile(c)
		if err != nil {
			t.Fatal(err)
		}
		raw[len(raw)/2] ^= 0xff
		if err := os.WriteFile(c, raw, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	_, errOut, code := h.lodge("backup", "verify")
	if code != 1 || !strings.Contains(errOut, "corrupt") || !strings.Contains(errOut, filepath.Base(chunks[0])[:12]) && !strings.Contains(errOut, "chunk") {
		t.Errorf("verify of a damaged repository: exit %d, %q", code, errOut)
	}
	var left []api.Backup
	mustJSON(t, h.must("backup", "list", "vault", "--repo", "default", "-o", "json"), &left)
	_, errOut, code = h.lodge("backup", "restore", "vault", left[0].ID, "--as", "broken", "--repo", "default")
	if code != 1 || !strings.Contains(errOut, "corrupt") {
		t.Errorf("restore from a damaged chunk: exit %d, %q", code, errOut)
	}
	if _, _, code := h.lodge("show", "broken"); code == 0 {
		t.Error("a failed restore left vm broken behind")
	}
}

// TestBackupFullRepository: a backup into a repository that fills up
// fails with one line and leaves the repository as it was (it verifies,
// its backups restore) and the VM's change tracking too: once there is
// room, the next backup is still incremental on the last good one.
func TestBackupFullRepository(t *testing.T) {
	t.Parallel()
	requireQEMU(t)
	waitProbe(t)
	dir := mountTmpfs(t, "32m")
	h := newHost(t)
	h.importGuest()
	h.must("create", "tight", "--image", "tiny", "--memory", "256M", "--disk", "2G")
	disk := h.show("tight").Disks[0].Path
	refs := t.TempDir()
	h.must("backup", "repo", "add", "small", dir)
	// The first backup holds the guest's files, which compress into the
	// 32 MiB; then 40 MiB of random data cannot fit.
	first := h.backup("tight", "--repo", "small")
	snapshotDisk(t, disk, filepath.Join(refs, "first.qcow2"))
	random := filepath.Join(refs, "random.bin")
	if out, err := exec.Command("dd", "if=/dev/urandom", "of="+random, "bs=1M", "count=40").CombinedOutput(); err != nil {
		t.Fatalf("dd: %v: %s", err, out)
	}
	qemuIO(t, disk, "write -s "+random+" 1G 40M")
	_, errOut, code := h.lodge("backup", "create", "tight", "--repo", "small")
	if code != 1 || !strings.Contains(errOut, `vm "tight"`) || !strings.Contains(errOut, "no space left") || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
		t.Fatalf("backup into a full repository: exit %d, %q", code, errOut)
	}
	if tmp, _ := filepath.Glob(filepath.Join(dir, "tmp", "*")); len(tmp) > 0 {
		t.Errorf("the failed backup left %v", tmp)
	}
	var vr api.VerifyResult
	mustJSON(t, h.must("backup", "verify", "--repo", "small", "-o", "json"), &vr)
	if vr.Backups != 1 || len(vr.Bad) != 0 {
		t.Errorf("verify after the failed backup: %+v", vr)
	}
	h.must("backup", "restore", "tight", first.ID, "--as", "back")
	sameDisk(t, h.show("back").Disks[0].Path, filepath.Join(refs, "first.qcow2"))

	if out, err := exec.Command("mount", "-o", "remount,size=200m", dir).CombinedOutput(); err != nil {
		t.Fatalf("grow the tmpfs: %v: %s", err, out)
	}
	next := h.backup("tight", "--repo", "small")
	if next.Kind != "incremental" || next.Parent != first.ID || next.Read > 48<<20 {
		t.Errorf("backup once there is room: kind %s parent %s read %d MiB (reason %q)", next.Kind, next.Parent, next.Read>>20, next.Reason)
	}
	h.must("backup", "restore", "tight", next.ID, "--as", "now")
	sameDisk(t, h.show("now").Disks[0].Path, disk)
}

// waitReading waits until a backup operation has read some of the disk.
// autogroupNice is the nice value of process pid's autogroup, and false
// on a kernel without autogroup scheduling.
func autogroupNice(t *testing.T, pid int) (string, bool) {
	t.Helper()
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/autogroup")
	if err != nil {
		t.Logf("no autogroup to check: %v", err)
		return "", false
	}
	// "/autogroup-42 nice 10"
	f := strings.Fields(string(raw))
	if len(f) != 3 || f[1] != "nice" {
		t.Fatalf("/proc/%d/autogroup: %q", pid, raw)
	}
	return f[2], true
}

func waitReading(t *testing.T, h *host, op api.Operation) {
	t.Helper()
	eventually(t, 60*time.Second, "the backup to be reading", func() bool {
		ops, err := h.c.Operations(context.Background())
		if err != nil {
			return false
		}
		for _, o := range ops {
			if o.ID != op.ID {
				continue
			}
			if o.State != api.OpRunning {
				t.Fatalf("the backup ended (%s: %s) before it could be interrupted", o.State, o.Error)
			}
			return o.Stage == "read" && o.Done > 0
		}
		return false
	})
}

// TestBackupFleeceLimit holds a backup of a running VM while its guest
// overwrites more than fleece_limit of data the backup has not read: the
// backup stops with the reason, the guest's writes all go through,
// nothing is left behind, and the next backup works.
func TestBackupFleeceLimit(t *testing.T) {
	t.Parallel()
	h := newHostWithConfig(t, "fleece_limit: 64M\n")
	h.vm("busy", "--disk", "4G")
	h.exec("busy", "sh", "-c", "dd if=/dev/urandom of=/dev/vda bs=1M seek=1024 count=200 conv=fsync 2>/dev/null && sync")
	// A little later the guest writes the same 200 MiB again.
	h.exec("busy", "sh", "-c", "(sleep 2; dd if=/dev/urandom of=/dev/vda bs=1M seek=1024 count=200 oflag=direct 2>/dev/null && echo ok >/root/dd-done) </dev/null >/dev/null 2>&1 &")
	ctx := context.Background()
	op, err := h.c.CreateBackup(ctx, "busy", api.CreateBackup{})
	if err != nil {
		t.Fatal(err)
	}
	waitReading(t, h, op)
	// A stopped daemon is a repository that takes nothing: QEMU keeps
	// copying what the guest overwrites into the fleecing file.
	fleece := filepath.Join(h.home, "pools", "default", "*.fleece.qcow2")
	held := func() int64 {
		files, _ := filepath.Glob(fleece)
		var n int64
		for _, f := range files {
			var st syscall.Stat_t
			if syscall.Stat(f, &st) == nil {
				n += st.Blocks * 512
			}
		}
		return n
	}
	if err := h.daemon.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// While it reads, the daemon's whole CPU group gives way to the VM's.
	groupNice, haveGroups := autogroupNice(t, h.daemon.Process.Pid)
	if haveGroups && groupNice != "10" {
		t.Errorf("the daemon's autogroup has nice %s while a backup reads, want 10", groupNice)
	}
	eventually(t, 120*time.Second, "the guest to overwrite 100 MiB the backup has not read", func() bool { return held() > 100<<20 })
	if err := h.daemon.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	done, err := h.c.Wait(ctx, op, nil)
	if done.State != api.OpFailed || !strings.Contains(done.Error, "fleece_limit") || !strings.Contains(done.Error, "not slowed") {
		t.Fatalf("backup held past fleece_limit: %s, %q (%v); want failed, naming fleece_limit", done.State, done.Error, err)
	}
	eventually(t, 120*time.Second, "the guest's writes to finish", func() bool {
		_, _, code := h.lodge("exec", "busy", "--", "test", "-f", "/root/dd-done")
		return code == 0
	})
	if haveGroups {
		eventually(t, 10*time.Second, "the daemon's autogroup to be back at nice 0", func() bool {
			n, _ := autogroupNice(t, h.daemon.Process.Pid)
			return n == "0"
		})
	}
	if files, _ := filepath.Glob(fleece); len(files) > 0 {
		t.Errorf("the stopped backup left %v", files)
	}
	var none []api.Backup
	mustJSON(t, h.must("backup", "list", "-o", "json"), &none)
	if len(none) != 0 {
		t.Fatalf("a stopped backup is listed: %+v", none)
	}
	if v := h.show("busy"); v.State != api.StateRunning {
		t.Fatalf("VM after its backup was stopped: %s (%s)", v.State, v.StateReason)
	}
	if b := h.backup("busy"); b.Kind != "full" {
		t.Errorf("next backup: %s", b.Kind)
	}
	h.must("backup", "verify")
}

// TestBackupYields backs up a running VM while its guest overwrites the
// data being read, fast: the backup pauses for the guest's writes, says
// how long, and still holds the data as it was at its point.
func TestBackupYields(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("busy", "--disk", "4G")
	// Half a gigabyte of allocated zeros past the checked region gives the
	// backup something to read for a while; /dev/shm/r is what the guest
	// writes during it, ready so that the writes are fast.
	h.exec("busy", "sh", "-c", "dd if=/dev/urandom of=/dev/vda bs=1M seek=1024 count=120 oflag=direct 2>/dev/null && dd if=/dev/zero of=/dev/vda bs=1M seek=1144 count=512 oflag=direct 2>/dev/null && dd if=/dev/urandom of=/dev/shm/r bs=1M count=64 2>/dev/null && sync")
	atPoint := h.regionSum("busy")
	ctx := context.Background()
	op, err := h.c.CreateBackup(ctx, "busy", api.CreateBackup{})
	if err != nil {
		t.Fatal(err)
	}
	waitReading(t, h, op)
	h.exec("busy", "sh", "-c", "for o in 1024 1088 1152 1216; do dd if=/dev/shm/r of=/dev/vda bs=1M seek=$o oflag=direct 2>/dev/null || exit 1; done")
	if done, err := h.c.Wait(ctx, op, nil); err != nil || done.State != api.OpSucceeded {
		t.Fatalf("backup while the guest wrote: %s, %q (%v)", done.State, done.Error, err)
	}
	var list []api.Backup
	mustJSON(t, h.must("backup", "list", "busy", "-o", "json"), &list)
	if len(list) != 1 {
		t.Fatalf("backup list: %+v", list)
	}
	b := list[0]
	t.Logf("the backup paused %.2f s of its %.2f s", b.Yielded, b.Duration)
	if b.Yielded <= 0 || b.Yielded >= b.Duration {
		t.Errorf("backup paused %.2f s of %.2f s while the guest wrote 256 MiB, want some and less than all", b.Yielded, b.Duration)
	}
	if out := h.must("backup", "show", b.ID); !strings.Contains(out, "paused while the guest wrote") {
		t.Errorf("backup show does not say the backup paused:\n%s", out)
	}
	if now := h.regionSum("busy"); now == atPoint {
		t.Fatal("the guest's writes did not change the checked region")
	}
	h.must("backup", "restore", "busy", b.ID, "--as", "back", "--start")
	h.waitAgent("back")
	if got := h.regionSum("back"); got != atPoint {
		t.Errorf("restored data sha256 %s, want %s, as at the backup's point", got, atPoint)
	}
}
