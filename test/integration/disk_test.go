package integration

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// TestDiskAddResize adds data disks to a VM and grows them, running and
// stopped, and checks what the guest sees, that its data stays, and that
// bad requests change nothing.
func TestDiskAddResize(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	v := h.vm("dk")
	sectors := func(dev string) string {
		out, _, _ := h.lodge("exec", "dk", "--", "cat", "/sys/block/"+dev+"/size")
		return strings.TrimSpace(out)
	}
	see := func(dev, want string) {
		t.Helper()
		eventually(t, 20*time.Second, "dk sees "+dev+" at "+want+" sectors", func() bool { return sectors(dev) == want })
	}

	// Hot-plugged, then grown while the guest runs; the guest's data on
	// it survives the growth.
	h.must("disk", "add", "dk", "32M")
	see("vdb", "65536")
	h.exec("dk", "sh", "-c", "echo lodge-disk-marker | dd of=/dev/vdb conv=fsync 2>/dev/null")
	// 64 MiB and a sector: the last backup chunk of it is cut short.
	h.must("disk", "resize", "dk", "data1", strconv.Itoa(64<<20+512))
	see("vdb", "131073")
	rootSectors := v.Disks[0].Size/512 + 2<<20/512
	h.must("disk", "resize", "dk", "root", strconv.FormatInt(v.Disks[0].Size+2<<20, 10))
	see("vda", strconv.FormatInt(rootSectors, 10))
	if got := h.show("dk"); len(got.Disks) != 2 || got.Disks[1].Name != "data1" || got.Disks[1].Size != 64<<20+512 || got.Disks[0].Size != v.Disks[0].Size+2<<20 || got.StartedAt == nil || !got.StartedAt.Equal(*v.StartedAt) {
		t.Fatalf("after add and resize: disks %+v, started %v (was %v)", got.Disks, got.StartedAt, v.StartedAt)
	}

	// Bad requests: one line each, nothing changed.
	for _, tc := range []struct {
		args []string
		want string
		code int
	}{
		{[]string{"disk", "resize", "dk", "data1", "32M"}, "a disk only grows", 1},
		{[]string{"disk", "resize", "dk", "data7", "1G"}, `disk "data7" of vm "dk"`, 1},
		{[]string{"disk", "resize", "dk", "data1", "64M1"}, "size", 2},
		{[]string{"disk", "add", "dk", "100K"}, "at least 1M", 1},
		{[]string{"disk", "add", "dk", "lots"}, `size: "lots": not a size`, 2},
		{[]string{"disk", "add", "ghost", "1G"}, `vm "ghost"`, 1},
		{[]string{"disk", "add", "dk"}, "accepts 2 arg", 2},
	} {
		_, errOut, code := h.lodge(tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("lodge %s: exit %d, stderr %q; want exit %d and one line with %q", strings.Join(tc.args, " "), code, errOut, tc.code, tc.want)
		}
	}
	h.must("snapshot", "create", "dk", "s1", "--no-memory")
	if _, errOut, code := h.lodge("disk", "add", "dk", "16M"); code != 1 || !strings.Contains(errOut, "it has snapshots (s1)") {
		t.Errorf("disk add to a VM with snapshots: exit %d, %q", code, errOut)
	}
	h.must("snapshot", "delete", "dk", "s1")
	if got := h.show("dk"); len(got.Disks) != 2 || got.Disks[1].Size != 64<<20+512 {
		t.Fatalf("after refused requests: disks %+v", got.Disks)
	}

	// Stopped: added and grown in the files; the next boot has all the
	// disks in their places, and the marker where it was written.
	h.must("stop", "dk")
	data1 := h.show("dk").Disks[1].Path
	qemuIO(t, data1, "write -P 0x5a 64M 512") // the short chunk's sector
	b0 := h.backup("dk")
	h.must("disk", "add", "dk", "16M")
	h.must("disk", "resize", "dk", "data1", "96M")
	qemuIO(t, data1, "write -P 0x6b 80M 4k")

	// The backup after stays incremental: the new disk is read whole
	// and says why, the grown one reads its new writes and the chunk
	// its old end cut short. A restore of it holds what the disks do.
	b1 := h.backup("dk")
	if b1.Kind != "incremental" || !strings.Contains(b1.Reason, `disk "data2" is new since backup `+b0.ID) || strings.Contains(b1.Reason, "data1") || b1.Read > 4<<20 {
		t.Errorf("backup after a disk was added and another grown: %s, read %d, reason %q", b1.Kind, b1.Read, b1.Reason)
	}
	h.must("backup", "verify", b1.ID)
	h.must("backup", "restore", "dk", b1.ID, "--as", "dk-r")
	restored := h.show("dk-r").Disks
	for i, d := range h.show("dk").Disks {
		sameDisk(t, d.Path, restored[i].Path)
	}
	h.must("delete", "dk-r")
	h.must("start", "dk")
	h.waitAgent("dk")
	see("vdb", "196608")
	see("vdc", "32768")
	if got := h.exec("dk", "sh", "-c", "head -c 17 /dev/vdb"); got != "lodge-disk-marker" {
		t.Errorf("data1 after growth and a restart holds %q", got)
	}
	if got := h.show("dk"); got.State != api.StateRunning || len(got.Disks) != 3 || got.Disks[2].Name != "data2" {
		t.Errorf("after a stopped add: %s, disks %+v", got.State, got.Disks)
	}
}
