package store

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
)

func stores(t *testing.T) map[string]Store {
	t.Helper()
	b, err := OpenBolt(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return map[string]Store{"bolt": b, "memory": NewMemory()}
}

func TestStoreSemantics(t *testing.T) {
	ctx := context.Background()
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			if err := s.Update(ctx, func(tx Tx) error {
				for _, k := range []string{"b", "a", "ab", "c"} {
					if err := tx.Put("vms", k, []byte("v-"+k)); err != nil {
						return err
					}
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			// A failed transaction must leave nothing behind.
			boom := errors.New("boom")
			err := s.Update(ctx, func(tx Tx) error {
				if err := tx.Put("vms", "zz", []byte("x")); err != nil {
					return err
				}
				if err := tx.Delete("vms", "a"); err != nil {
					return err
				}
				return boom
			})
			if !errors.Is(err, boom) {
				t.Fatalf("Update error = %v, want boom", err)
			}
			err = s.View(ctx, func(tx Tx) error {
				if _, err := tx.Get("vms", "zz"); !errors.Is(err, ErrNotFound) {
					t.Errorf("rolled-back key zz: err = %v, want ErrNotFound", err)
				}
				v, err := tx.Get("vms", "a")
				if err != nil || string(v) != "v-a" {
					t.Errorf("Get a = %q, %v; want v-a", v, err)
				}
				kvs, err := tx.List("vms", "a")
				if err != nil {
					return err
				}
				if len(kvs) != 2 || kvs[0].Key != "a" || kvs[1].Key != "ab" {
					t.Errorf("List prefix a = %+v, want [a ab]", kvs)
				}
				all, _ := tx.List("vms", "")
				if len(all) != 4 {
					t.Errorf("List all = %d entries, want 4", len(all))
				}
				if _, err := tx.Get("nobucket", "x"); !errors.Is(err, ErrNotFound) {
					t.Errorf("missing bucket: err = %v, want ErrNotFound", err)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestJSONHelpers(t *testing.T) {
	ctx := context.Background()
	s := NewMemory()
	type rec struct{ Name string }
	if err := s.Update(ctx, func(tx Tx) error {
		if err := PutJSON(tx, "r", "x", rec{"x"}); err != nil {
			return err
		}
		return PutJSON(tx, "r", "y", rec{"y"})
	}); err != nil {
		t.Fatal(err)
	}
	_ = s.View(ctx, func(tx Tx) error {
		var r rec
		if err := GetJSON(tx, "r", "y", &r); err != nil || r.Name != "y" {
			t.Errorf("GetJSON = %+v, %v", r, err)
		}
		all, err := ListJSON[rec](tx, "r")
		if err != nil || len(all) != 2 || all[0].Name != "x" {
			t.Errorf("ListJSON = %+v, %v", all, err)
		}
		if err := tx.Put("r", "bad", []byte("{")); err != nil {
			t.Fatal(err)
		}
		if _, err := ListJSON[rec](tx, "r"); err == nil {
			t.Error("ListJSON of corrupt value: want error")
		}
		return nil
	})
}

func TestBoltLockedByOtherProcess(t *testing.T) {
	// bbolt's flock is per open file description, so a second Open in the
	// same process sees the lock as another daemon would.
	path := filepath.Join(t.TempDir(), "state.db")
	a, err := OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = a.Close() }()
	if _, err := OpenBolt(path); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: err = %v, want ErrLocked", err)
	}
}
