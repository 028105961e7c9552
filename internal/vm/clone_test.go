package vm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
)

// writeData makes a fake disk hold data of its own (see fakeVolumes).
func writeData(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("data\n"); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func poolFiles(t *testing.T, f *fixture) []string {
	t.Helper()
	out, err := filepath.Glob(filepath.Join(f.home, "pools", "*"))
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestCloneStopped(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	a := f.create(t, "a")
	top := a.Disks[0].Path

	// Nothing written yet: the clone shares a's backing, and a is untouched.
	b, err := f.svc.Clone(ctx, "a", api.CloneVM{Name: "b"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b.Disks[0].Backing != a.Disks[0].Backing || b.Disks[0].Path == top {
		t.Fatalf("clone of an unwritten VM: disk %+v, want a new overlay on %s", b.Disks[0], a.Disks[0].Backing)
	}
	if got, _ := f.svc.Get(ctx, "a"); got.Disks[0].Path != top {
		t.Fatalf("source's disk moved to %s", got.Disks[0].Path)
	}

	// Once a's top holds data, it is frozen into a layer shared by both.
	writeData(t, top)
	c, err := f.svc.Clone(ctx, "a", api.CloneVM{Name: "c"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	a2, _ := f.svc.Get(ctx, "a")
	if a2.Disks[0].Backing != top || c.Disks[0].Backing != top || a2.Disks[0].Path == top {
		t.Fatalf("after clone: a %+v, c %+v; want both on the frozen %s", a2.Disks[0], c.Disks[0], top)
	}
	if st, err := os.Stat(top); err != nil || st.Mode().Perm()&0o222 != 0 {
		t.Fatalf("frozen layer %s: %v, mode %v; want read-only", top, err, st.Mode())
	}
	if layers, _ := f.svc.Layers(ctx); len(layers) != 1 || layers[0] != top {
		t.Fatalf("layers = %v, want [%s]", layers, top)
	}

	// Fresh identity for each clone, and the clone awaits its guest.
	for _, v := range []api.VM{b, c} {
		if v.UUID == a.UUID || v.NICs[0].MAC == a.NICs[0].MAC || v.InstanceID == a.InstanceID || v.CID == a.CID || v.Hostname != v.Name || v.ClonedFrom != "a" {
			t.Errorf("clone %s shares identity with a: %+v", v.Name, v)
		}
	}
	if b.CID == c.CID {
		t.Errorf("clones b and c share CID %d", b.CID)
	}
	if r, _ := f.svc.load(ctx, "c"); !r.IdentityPending {
		t.Error("a fresh clone is not marked to have its guest identity checked")
	}
	twin, err := f.svc.Clone(ctx, "a", api.CloneVM{Name: "twin", KeepIdentity: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if twin.UUID != a.UUID || twin.NICs[0].MAC != a.NICs[0].MAC || twin.InstanceID != a.InstanceID || twin.CID != a.CID || twin.Hostname != "a" {
		t.Errorf("--keep-identity clone = %+v, want a's identity", twin)
	}
	if r, _ := f.svc.load(ctx, "twin"); r.IdentityPending {
		t.Error("a --keep-identity clone is marked for a new guest identity")
	}

	// Deleting every user of the layer removes it; b never used it.
	for _, name := range []string{"a", "c", "twin"} {
		if err := f.svc.Delete(ctx, name, false); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(top); !os.IsNotExist(err) {
		t.Errorf("layer %s outlived its last user: %v", top, err)
	}
	if files := poolFiles(t, f); len(files) != 1 || files[0] != b.Disks[0].Path {
		t.Errorf("pool holds %v, want only b's disk", files)
	}
}

func TestCloneBadInput(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "a")
	f.create(t, "taken")
	before := poolFiles(t, f)
	tests := []struct {
		name, src string
		req       api.CloneVM
		err       error
		want      string
	}{
		{"bad name", "a", api.CloneVM{Name: "a/b"}, errdefs.ErrInvalid, `vm name "a/b"`},
		{"itself", "a", api.CloneVM{Name: "a"}, errdefs.ErrInvalid, "name of its own"},
		{"taken", "a", api.CloneVM{Name: "taken"}, errdefs.ErrExists, `vm "taken"`},
		{"no source", "ghost", api.CloneVM{Name: "x"}, errdefs.ErrNotFound, `vm "ghost"`},
		{"no pool", "a", api.CloneVM{Name: "x", Pool: "far"}, errdefs.ErrNotFound, `pool "far"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := f.svc.Clone(ctx, tt.src, tt.req, nil)
			if !errors.Is(err, tt.err) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Clone = %v, want %v mentioning %q", err, tt.err, tt.want)
			}
		})
	}
	if after := poolFiles(t, f); len(after) != len(before) {
		t.Errorf("refused clones changed the pool: %v -> %v", before, after)
	}
	if vms, _ := f.svc.List(ctx); len(vms) != 2 {
		t.Errorf("refused clones left %d VMs", len(vms))
	}
}

// stuckVolumes makes a full copy that only ends when cancelled, after
// writing part of its output.
type stuckVolumes struct{ fakeVolumes }

func (stuckVolumes) ConvertProgress(ctx context.Context, _, _, dst string, progress func(float64)) error {
	if err := os.WriteFile(dst, []byte("partial"), 0o600); err != nil {
		return err
	}
	progress(0.5)
	<-ctx.Done()
	return ctx.Err()
}

func TestFullCloneCancelledLeavesNothing(t *testing.T) {
	f := newFixture(t)
	f.create(t, "a")
	before := poolFiles(t, f)
	f.svc.cfg.Volumes = stuckVolumes{}
	ctx, cancel := context.WithCancel(context.Background())
	var seen int64
	_, err := f.svc.Clone(ctx, "a", api.CloneVM{Name: "copy", Full: true}, func(done, total int64) {
		seen = done
		if done > 0 {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) || seen != DefaultDiskSize/2 {
		t.Fatalf("cancelled full clone = %v after %d bytes; want context.Canceled after half of %d", err, seen, DefaultDiskSize)
	}
	if _, err := f.svc.Get(context.Background(), "copy"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("cancelled clone left a record: %v", err)
	}
	if after := poolFiles(t, f); len(after) != len(before) {
		t.Errorf("cancelled clone left files: %v -> %v", before, after)
	}
	if _, err := os.Stat(f.svc.vmDir("copy")); !os.IsNotExist(err) {
		t.Error("cancelled clone left its vm directory")
	}
}

// TestRecoverClone plays a daemon that died half-way through freezing a
// source's top: a new top that exists is kept (a running guest may have
// written to it), one that was never made is rolled back.
func TestRecoverClone(t *testing.T) {
	for _, made := range []bool{true, false} {
		f := newFixture(t)
		ctx := context.Background()
		a := f.create(t, "a")
		top := a.Disks[0].Path
		next := top + ".next.qcow2"
		if made {
			if err := (fakeVolumes{}).CreateOverlay(ctx, top, next, 0); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := f.svc.update(ctx, "a", func(r *record) error {
			r.Intent, r.NextDisks = intentCloning, []string{next}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if err := f.svc.Recover(ctx); err != nil {
			t.Fatal(err)
		}
		r, err := f.svc.load(ctx, "a")
		if err != nil {
			t.Fatal(err)
		}
		wantPath, wantBacking := top, a.Disks[0].Backing
		if made {
			wantPath, wantBacking = next, top
		}
		if r.Intent != "" || r.Disks[0].Path != wantPath || r.Disks[0].Backing != wantBacking {
			t.Errorf("made=%v: after recovery intent %q, disk %s on %s; want %s on %s", made, r.Intent, r.Disks[0].Path, r.Disks[0].Backing, wantPath, wantBacking)
		}
		layers, _ := f.svc.Layers(ctx)
		if made != (len(layers) == 1) {
			t.Errorf("made=%v: layers %v", made, layers)
		}
	}
}

func TestHostnameConflict(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "a")
	f.create(t, "b")
	if _, err := f.svc.update(ctx, "b", func(r *record) error { r.Hostname = "A"; return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.Start(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	_, err := f.svc.Start(ctx, "b")
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), `hostname "A" is in use on network "nat" by running vm "a"`) {
		t.Fatalf("start of a VM with a running VM's hostname = %v", err)
	}
}

var _ Volumes = fakeVolumes{}
