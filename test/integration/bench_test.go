package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// TestBench runs lodge bench on the tiny guest with short tests: every
// row has a host value, a guest value and a percentage; the scratch disks,
// the probe and the busy company are gone afterwards; bad requests change
// nothing; a cancelled run cleans up too.
func TestBench(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	v := h.vm("b", "--cpus", "2")
	pool := filepath.Dir(v.Disks[0].Path)

	h.must("create", "cold", "--image", "tiny")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"bench", "nosuch"}, `vm "nosuch": not found`},
		{[]string{"bench", "b", "--disk-bus", "ide"}, "cannot hot-plug an IDE disk"},
		{[]string{"bench", "b", "--disk-bus", "virtio,usb"}, `disk bus "usb"`},
		{[]string{"bench", "b", "--duration", "fast"}, `duration "fast"`},
		{[]string{"bench", "b", "--repeats", "99"}, "repeats 99"},
		{[]string{"bench", "b", "--disk-size", "1M"}, "disk size 1M"},
		{[]string{"bench", "b", "--disk-size", "lots"}, "--disk-size"},
	} {
		_, errOut, code := h.lodge(tc.args...)
		if code == 0 || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("lodge %s: exit %d, stderr %q; want one line with %q", strings.Join(tc.args, " "), code, errOut, tc.want)
		}
	}

	out := h.must("bench", "b", "--duration", "100ms", "--repeats", "2", "--disk-size", "16M",
		"--disk-bus", "virtio,scsi,nvme", "--save", "-o", "json")
	var rep api.BenchReport
	mustJSON(t, out, &rep)
	if rep.Accel != probed.Accel || rep.CPUs != 2 || rep.Repeats != 2 || !rep.Saved || rep.ID == "" {
		t.Fatalf("report header: %+v", rep)
	}
	tests := map[string]int{}
	for _, r := range rep.Rows {
		tests[r.Test+"/"+r.Bus]++
		if !(r.Host > 0) || !(r.Guest > 0) || !(r.Percent > 0) || r.Unit == "" || r.Repeats != 2 {
			t.Errorf("row without a value or a percentage: %+v", r)
		}
	}
	for _, want := range []string{"cpu.int.single/", "cpu.int.all/", "cpu.float.single/", "cpu.float.all/",
		"mem.read/", "mem.write/", "mem.copy/", "mem.latency/"} {
		if tests[want] != 1 {
			t.Errorf("no row %s: %v", want, tests)
		}
	}
	for _, bus := range []string{"virtio", "scsi", "nvme"} {
		for _, d := range []string{"disk.seq_write", "disk.seq_read", "disk.rand_write_4k", "disk.rand_read_4k"} {
			if tests[d+"/"+bus] != 1 {
				t.Errorf("no row %s on %s: %v", d, bus, tests)
			}
		}
	}
	if len(rep.Rows) != 8+3*4 {
		t.Errorf("%d rows, want 20", len(rep.Rows))
	}
	if rep.Accel == "tcg" && !strings.Contains(strings.Join(rep.Notes, " "), "software emulation") {
		t.Errorf("a TCG report does not say so: %v", rep.Notes)
	}
	checkBenchCleanedUp(t, h, "b", pool)

	var hist []api.BenchReport
	mustJSON(t, h.must("bench", "history", "b", "-o", "json"), &hist)
	if len(hist) != 1 || hist[0].ID != rep.ID || len(hist[0].Rows) != len(rep.Rows) {
		t.Fatalf("history = %+v, want the saved report %s", hist, rep.ID)
	}

	// The table, with one busy VM alongside that is gone afterwards.
	table := h.must("bench", "b", "--duration", "50ms", "--repeats", "1", "--disk-size", "16M", "--with", "1")
	for _, want := range []string{"GUEST/HOST", "cpu.float.all", "disk.rand_read_4k", "1 extra VMs", "Guest/host (geometric mean)"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	vms, err := h.c.ListVMs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(vms) != 2 {
		t.Errorf("busy VMs left behind: %+v", vms)
	}
	mustJSON(t, h.must("bench", "history", "b", "-o", "json"), &hist)
	if len(hist) != 1 {
		t.Errorf("an unsaved run went into the history: %d reports", len(hist))
	}

	// A cancelled run unplugs its scratch disk and removes the probe.
	ctx := context.Background()
	op, err := h.c.Bench(ctx, "b", api.BenchRequest{Duration: "2s", Repeats: 5, DiskSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	cancelled := false
	done, err := h.c.Wait(ctx, op, func(o api.Operation) {
		if !cancelled && strings.HasPrefix(o.Stage, "round") {
			cancelled = true
			if err := h.c.CancelOperation(ctx, op.ID); err != nil {
				t.Error(err)
			}
		}
	})
	if !cancelled || err == nil || done.State == api.OpSucceeded {
		t.Fatalf("cancelled bench (cancel sent: %v) ended %s, %v", cancelled, done.State, err)
	}
	checkBenchCleanedUp(t, h, "b", pool)

	// A stopped VM is booted for the run with its scratch disks attached,
	// IDE included, and stopped again after.
	mustJSON(t, h.must("bench", "cold", "--duration", "50ms", "--repeats", "1", "--disk-size", "16M", "--disk-bus", "virtio,ide", "-o", "json"), &rep)
	buses := map[string]int{}
	for _, r := range rep.Rows {
		buses[r.Bus]++
		if !(r.Percent > 0) {
			t.Errorf("cold run: row without a percentage: %+v", r)
		}
	}
	if buses["ide"] != 4 || buses["virtio"] != 4 || !rep.Booted {
		t.Errorf("cold run over virtio and ide: rows per bus %v, booted %v", buses, rep.Booted)
	}
	if st := h.show("cold").State; st != api.StateStopped {
		t.Errorf("cold VM left %s after its run", st)
	}
	if left, _ := filepath.Glob(filepath.Join(pool, ".bench-*")); len(left) > 0 {
		t.Errorf("scratch files left after the cold run: %v", left)
	}
	h.must("pause", "b")
	if _, errOut, code := h.lodge("bench", "b"); code == 0 || !strings.Contains(errOut, "it is paused") {
		t.Errorf("bench of a paused VM: exit %d, %q", code, errOut)
	}
	h.must("resume", "b")

	// A daemon killed mid-run leaves its scratch disk plugged into the
	// running QEMU; the next run clears it away and succeeds.
	op, err = h.c.Bench(ctx, "b", api.BenchRequest{Duration: "2s", Repeats: 5, DiskSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = h.c.Wait(ctx, op, func(o api.Operation) {
		if strings.HasPrefix(o.Stage, "round") {
			h.killDaemon()
		}
	})
	h.startDaemon()
	// The guest may still be taking in the hot-plug.
	eventually(t, time.Minute, "the scratch disk of the killed run to show in the guest", func() bool {
		return strings.Contains(h.exec("b", "ls", "/sys/block"), "vdb")
	})
	mustJSON(t, h.must("bench", "b", "--duration", "50ms", "--repeats", "1", "--disk-size", "16M", "-o", "json"), &rep)
	if len(rep.Rows) != 12 {
		t.Fatalf("bench after a killed one: %d rows", len(rep.Rows))
	}
	checkBenchCleanedUp(t, h, "b", pool)
}

// checkBenchCleanedUp: no scratch file beside the disks, no extra disk
// in the guest, no probe left in it.
func checkBenchCleanedUp(t *testing.T, h *host, vm, pool string) {
	t.Helper()
	left, _ := filepath.Glob(filepath.Join(pool, ".bench-*"))
	if len(left) > 0 {
		t.Errorf("scratch files left: %v", left)
	}
	eventually(t, time.Minute, "the guest to lose its scratch disks", func() bool {
		blocks := h.exec(vm, "ls", "/sys/block")
		return !strings.Contains(blocks, "nvme") && !strings.Contains(blocks, "sd") && !strings.Contains(blocks, "vdb")
	})
	if _, _, code := h.lodge("exec", vm, "--", "test", "-e", "/run/lodge-probe"); code != 1 {
		t.Errorf("probe left in the guest (test -e exit %d)", code)
	}
	if _, err := os.Stat(filepath.Join(pool, ".bench-host-"+vm)); err == nil {
		t.Error("host scratch file left")
	}
}
