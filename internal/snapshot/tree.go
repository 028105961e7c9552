// Package snapshot holds the shape of a VM's snapshot tree and moves a
// running guest's memory state to and from files. The VM service owns the
// records and the disks; this package knows nothing of the store.
package snapshot

import (
	"sort"

	"github.com/lodge-vm/lodge/api"
)

// Sort orders a VM's snapshots depth first, parents before children and
// siblings oldest first, and fills in Depth. A snapshot whose parent is
// missing is treated as a root, so a damaged tree still lists everything.
func Sort(snaps []api.Snapshot) []api.Snapshot {
	byName := make(map[string]bool, len(snaps))
	for _, s := range snaps {
		byName[s.Name] = true
	}
	kids := map[string][]api.Snapshot{}
	for _, s := range snaps {
		p := s.Parent
		if !byName[p] {
			p = ""
		}
		kids[p] = append(kids[p], s)
	}
	for _, k := range kids {
		sort.Slice(k, func(i, j int) bool {
			if !k[i].CreatedAt.Equal(k[j].CreatedAt) {
				return k[i].CreatedAt.Before(k[j].CreatedAt)
			}
			return k[i].Name < k[j].Name
		})
	}
	out := make([]api.Snapshot, 0, len(snaps))
	seen := map[string]bool{}
	var walk func(parent string, depth int)
	walk = func(parent string, depth int) {
		for _, s := range kids[parent] {
			if seen[s.Name] {
				continue
			}
			seen[s.Name] = true
			s.Depth = depth
			out = append(out, s)
			walk(s.Name, depth+1)
		}
	}
	walk("", 0)
	// A cycle (which Lodge never writes) would hide its members: list
	// them at the root rather than lose them.
	for _, s := range snaps {
		if !seen[s.Name] {
			seen[s.Name] = true
			s.Depth = 0
			out = append(out, s)
		}
	}
	return out
}

// Children names the direct children of a snapshot ("" for the roots).
func Children(snaps []api.Snapshot, name string) []string {
	var out []string
	for _, s := range snaps {
		if s.Parent == name {
			out = append(out, s.Name)
		}
	}
	return out
}
