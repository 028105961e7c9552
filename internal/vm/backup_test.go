package vm

import (
	"slices"
	"strings"
	"testing"
)

func TestBackupPlan(t *testing.T) {
	for _, tc := range []struct {
		name      string
		opts      BackupOptions
		have, bad []string
		full      bool
		reason    string
		stale     []string
	}{
		{name: "first backup", opts: BackupOptions{ID: "n"}, full: true},
		{name: "tracked since the parent", opts: BackupOptions{ID: "n", Parent: "p"}, have: []string{"lodge-bk-p"}},
		{name: "bitmap gone", opts: BackupOptions{ID: "n", Parent: "p"}, full: true, reason: "has no bitmap"},
		{name: "bitmap not saved", opts: BackupOptions{ID: "n", Parent: "p"}, have: []string{"lodge-bk-p"}, bad: []string{"lodge-bk-p"},
			full: true, reason: "was not saved", stale: []string{"lodge-bk-p"}},
		{name: "leftovers of failed backups go, other repositories' stay, foreign bitmaps are not ours",
			opts: BackupOptions{ID: "n", Parent: "p", Keep: []string{"k"}},
			have: []string{"lodge-bk-p", "lodge-bk-dead", "lodge-bk-k", "user-bitmap"}, stale: []string{"lodge-bk-dead"}},
		{name: "a full backup keeps no parent bitmap", opts: BackupOptions{ID: "n"}, have: []string{"lodge-bk-old"}, full: true, stale: []string{"lodge-bk-old"}},
		{name: "an unsaved bitmap another repository tracks from goes too", opts: BackupOptions{ID: "n", Keep: []string{"k"}},
			have: []string{"lodge-bk-k"}, bad: []string{"lodge-bk-k"}, full: true, stale: []string{"lodge-bk-k"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &BackupPoint{opts: tc.opts, Disks: make([]BackupDisk, 1)}
			p.Disks[0].Name = "root"
			stale := p.plan(0, []layerBitmaps{{have: tc.have, bad: tc.bad}})
			d := p.Disks[0]
			if d.Full != tc.full || !strings.Contains(d.Reason, tc.reason) || (tc.reason == "" && d.Reason != "") {
				t.Fatalf("full %v reason %q: want full %v, reason with %q", d.Full, d.Reason, tc.full, tc.reason)
			}
			if !slices.Equal(stale, tc.stale) {
				t.Fatalf("stale %v: want %v", stale, tc.stale)
			}
		})
	}
}

// TestBackupPlanLayers: a parent's bitmap in a layer under the active
// one (a snapshot or clone put new layers on it) still makes the backup
// incremental, reading what the newer layers hold too; the bitmap there
// is read-only and stays.
func TestBackupPlanLayers(t *testing.T) {
	p := &BackupPoint{opts: BackupOptions{ID: "n", Parent: "p"}, Disks: make([]BackupDisk, 1)}
	stale := p.plan(0, []layerBitmaps{{have: []string{"lodge-bk-old"}}, {}, {have: []string{"lodge-bk-p"}}, {have: []string{"lodge-bk-older"}}})
	d := p.Disks[0]
	if d.Full || d.above != 2 || d.parentOnTop {
		t.Fatalf("full %v above %d on top %v: want incremental over the 2 newer layers", d.Full, d.above, d.parentOnTop)
	}
	if !slices.Equal(stale, []string{"lodge-bk-old"}) {
		t.Fatalf("stale %v: want only the active layer's unused bitmap", stale)
	}
}
