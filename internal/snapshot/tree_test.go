package snapshot

import (
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

func TestSort(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(m int) time.Time { return t0.Add(time.Duration(m) * time.Minute) }
	tests := []struct {
		name  string
		snaps []api.Snapshot
		want  string // name:depth in order
	}{
		{"empty", nil, ""},
		{"chain given backwards", []api.Snapshot{
			{Name: "c", Parent: "b", CreatedAt: at(3)},
			{Name: "b", Parent: "a", CreatedAt: at(2)},
			{Name: "a", CreatedAt: at(1)},
		}, "a:0 b:1 c:2"},
		{"two branches, older first", []api.Snapshot{
			{Name: "root", CreatedAt: at(1)},
			{Name: "late", Parent: "root", CreatedAt: at(5)},
			{Name: "early", Parent: "root", CreatedAt: at(2)},
			{Name: "early2", Parent: "early", CreatedAt: at(3)},
		}, "root:0 early:1 early2:2 late:1"},
		{"missing parent becomes a root", []api.Snapshot{
			{Name: "orphan", Parent: "gone", CreatedAt: at(2)},
			{Name: "a", CreatedAt: at(1)},
		}, "a:0 orphan:0"},
		{"cycle is still listed", []api.Snapshot{
			{Name: "x", Parent: "y", CreatedAt: at(1)},
			{Name: "y", Parent: "x", CreatedAt: at(2)},
		}, "x:0 y:0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, s := range Sort(tt.snaps) {
				got = append(got, s.Name+":"+string(rune('0'+s.Depth)))
			}
			if g := strings.Join(got, " "); g != tt.want {
				t.Fatalf("Sort = %q, want %q", g, tt.want)
			}
		})
	}
}

func TestChildren(t *testing.T) {
	snaps := []api.Snapshot{{Name: "a"}, {Name: "b", Parent: "a"}, {Name: "c", Parent: "a"}, {Name: "d", Parent: "b"}}
	if got := strings.Join(Children(snaps, "a"), ","); got != "b,c" {
		t.Fatalf("Children(a) = %q, want b,c", got)
	}
	if got := Children(snaps, "d"); len(got) != 0 {
		t.Fatalf("Children(d) = %v, want none", got)
	}
}
