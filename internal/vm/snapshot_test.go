package vm

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/store"
)

func treeOf(t *testing.T, f *fixture, vm string) string {
	t.Helper()
	snaps, err := f.svc.ListSnapshots(context.Background(), vm)
	if err != nil {
		t.Fatal(err)
	}
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

// Snapshots of a stopped VM: the tree, revert to an older one, a clone
// that inherits none, deletes that keep shared layers and free the rest.
func TestSnapshotsOfStoppedVM(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	a := f.create(t, "a")
	writeData(t, a.Disks[0].Path)
	s1, err := f.svc.CreateSnapshot(ctx, "a", api.CreateSnapshot{Name: "s1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s1.Memory || !s1.Current {
		t.Fatalf("snapshot of a stopped VM = %+v: want disks only, current", s1)
	}
	l1 := a.Disks[0].Path // frozen into s1's layer
	a, _ = f.svc.Get(ctx, "a")
	if a.Disks[0].Backing != l1 {
		t.Fatalf("after s1 the disk is on %q, want s1's layer %q", a.Disks[0].Backing, l1)
	}
	writeData(t, a.Disks[0].Path)
	if _, err := f.svc.CreateSnapshot(ctx, "a", api.CreateSnapshot{Name: "s2"}, nil); err != nil {
		t.Fatal(err)
	}
	l2 := a.Disks[0].Path
	if got := treeOf(t, f, "a"); got != "s1<> s2<s1>*" {
		t.Fatalf("tree = %q", got)
	}
	if _, err := f.svc.CreateSnapshot(ctx, "a", api.CreateSnapshot{Name: "s2"}, nil); !errors.Is(err, errdefs.ErrExists) {
		t.Fatalf("second s2: %v, want ErrExists", err)
	}

	topBefore := func() string { v, _ := f.svc.Get(ctx, "a"); return v.Disks[0].Path }()
	v, err := f.svc.RevertSnapshot(ctx, "a", "s1", api.RevertSnapshot{})
	if err != nil {
		t.Fatal(err)
	}
	if v.State != api.StateStopped || v.Disks[0].Backing != l1 || v.CurrentSnapshot != "s1" {
		t.Fatalf("after revert to s1: state %s, disk on %q, current %q", v.State, v.Disks[0].Backing, v.CurrentSnapshot)
	}
	if _, err := os.Stat(topBefore); err == nil {
		t.Errorf("the dropped top %s is still there", topBefore)
	}

	b, err := f.svc.Clone(ctx, "a", api.CloneVM{Name: "b"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b.CurrentSnapshot != "" || len(b.Snapshots) != 0 || treeOf(t, f, "b") != "" {
		t.Fatalf("clone inherited snapshots: current %q, %v", b.CurrentSnapshot, b.Snapshots)
	}

	// s1's layer backs s2's layer and a's top (and b's chain): it stays.
	if err := f.svc.DeleteSnapshot(ctx, "a", "s1", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(l1); err != nil {
		t.Fatalf("a layer still in use was removed: %v", err)
	}
	if got := treeOf(t, f, "a"); got != "s2<>" {
		t.Fatalf("tree after deleting s1 = %q", got)
	}
	// Nothing is layered on s2's layer: deleting s2 frees it.
	if err := f.svc.DeleteSnapshot(ctx, "a", "s2", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(l2); err == nil {
		t.Errorf("s2's unused layer %s was kept", l2)
	}
	if err := f.svc.DeleteSnapshot(ctx, "a", "s2", nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("deleting s2 twice: %v, want ErrNotFound", err)
	}
}

// Deleting a snapshot whose layer backs only the VM's top merges the
// layer into the top (qemu-img rebase while stopped) and frees it.
func TestSnapshotDeleteMerges(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	a := f.create(t, "a")
	image := a.Disks[0].Backing
	writeData(t, a.Disks[0].Path)
	if _, err := f.svc.CreateSnapshot(ctx, "a", api.CreateSnapshot{Name: "s"}, nil); err != nil {
		t.Fatal(err)
	}
	layer := a.Disks[0].Path
	if err := f.svc.DeleteSnapshot(ctx, "a", "s", nil); err != nil {
		t.Fatal(err)
	}
	v, _ := f.svc.Get(ctx, "a")
	if v.Disks[0].Backing != image {
		t.Fatalf("after the merge the top is on %q, want the image %q", v.Disks[0].Backing, image)
	}
	if _, err := os.Stat(layer); err == nil {
		t.Errorf("merged layer %s was kept", layer)
	}
	b, _ := os.ReadFile(v.Disks[0].Path)
	if !strings.Contains(string(b), "data") {
		t.Errorf("the top lost the merged layer's data: %q", b)
	}
}

// A snapshot cut short by a crash is gone after Recover, and its VM's
// intent is cleared.
func TestRecoverDropsInterruptedSnapshot(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "a")
	err := f.store.Update(ctx, func(tx store.Tx) error {
		var r record
		if err := store.GetJSON(tx, bucket, "a", &r); err != nil {
			return err
		}
		r.Intent = intentSnapshotting
		r.NextDisks = []string{r.Disks[0].Path + ".next"}
		sr := snapRecord{Snapshot: api.Snapshot{Name: "cut", VM: "a"}, Disks: r.Disks, State: snapCreating}
		if err := store.PutJSON(tx, snapBucket, snapKey("a", "cut"), sr); err != nil {
			return err
		}
		return store.PutJSON(tx, bucket, "a", r)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.svc.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if got := treeOf(t, f, "a"); got != "" {
		t.Fatalf("tree after recover = %q, want empty", got)
	}
	r, _ := f.svc.load(ctx, "a")
	if r.Intent != "" || r.NextDisks != nil {
		t.Fatalf("after recover: intent %q, next %v", r.Intent, r.NextDisks)
	}
}
