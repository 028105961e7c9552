package pool

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/store"
)

func TestRegistry(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	r, err := New(ctx, home, store.NewMemory())
	if err != nil {
		t.Fatal(err)
	}
	def, err := r.Get(ctx, "default")
	if err != nil || def.Path != filepath.Join(home, "pools", "default") {
		t.Fatalf("default pool = %+v, %v", def, err)
	}
	used := map[string][]string{}
	r.Users = func(_ context.Context, p string) ([]string, error) { return used[p], nil }

	dir := t.TempDir()
	tests := []struct {
		name, pool, path string
		want             error
	}{
		{"ok", "fast", dir, nil},
		{"duplicate", "fast", dir, errdefs.ErrExists},
		{"relative path", "rel", "some/dir", errdefs.ErrInvalid},
		{"missing dir", "gone", filepath.Join(dir, "nope"), errdefs.ErrInvalid},
		{"bad name", "a/b", dir, errdefs.ErrInvalid},
	}
	for _, tt := range tests {
		_, err := r.Create(ctx, tt.pool, tt.path)
		if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
			t.Errorf("%s: Create(%q, %q) = %v, want %v", tt.name, tt.pool, tt.path, err, tt.want)
		}
	}
	if err := r.Delete(ctx, "default"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Delete(default) = %v", err)
	}
	used["fast"] = []string{"web"}
	if err := r.Delete(ctx, "fast"); !errors.Is(err, errdefs.ErrInUse) {
		t.Errorf("Delete(used pool) = %v", err)
	}
	used["fast"] = nil
	if err := r.Delete(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Get(ctx, "fast"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Get after delete = %v", err)
	}
	pools, _ := r.List(ctx)
	if len(pools) != 1 {
		t.Errorf("pools = %+v, want only default", pools)
	}
}
