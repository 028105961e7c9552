package stack

import (
	"strings"
	"testing"
)

func TestDiff(t *testing.T) {
	src := `name: shop
networks:
  back: {}
vms:
  dc: {image: tiny, memory: 1G, cpus: 2, networks: [back]}
  db: {image: tiny, disks: [1G, 2G]}
  seed: {image: tiny, oneshot: true}
  app: {image: tiny, count: 2}
`
	upToDate := []Existing{
		{Name: "shop-dc", Image: "tiny", CPUs: 2, Memory: 1 << 30, Networks: []string{"back"}, Running: true},
		{Name: "shop-db", Image: "tiny", CPUs: 1, Memory: 512 << 20, DataDisks: []int64{1 << 30, 2 << 30}, Running: true},
		{Name: "shop-seed", Image: "tiny", CPUs: 1, Memory: 512 << 20, Completed: true},
		{Name: "shop-app-1", Image: "tiny", CPUs: 1, Memory: 512 << 20, Running: true},
		{Name: "shop-app-2", Image: "tiny", CPUs: 1, Memory: 512 << 20, Running: true},
	}
	with := func(change func([]Existing) []Existing) []Existing {
		c := append([]Existing(nil), upToDate...)
		return change(c)
	}
	tests := []struct {
		name     string
		existing []Existing
		want     string
	}{
		{"nothing yet", nil,
			"shop-dc create (not created yet); shop-db create (not created yet); shop-seed create (not created yet); " +
				"shop-app-1 create (not created yet); shop-app-2 create (not created yet)"},
		{"up to date", upToDate,
			"shop-dc none; shop-db none; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"stopped", with(func(e []Existing) []Existing { e[1].Running = false; return e }),
			"shop-dc none; shop-db start (stopped); shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"oneshot that never completed", with(func(e []Existing) []Existing { e[2].Completed = false; return e }),
			"shop-dc none; shop-db none; shop-seed start (stopped); shop-app-1 none; shop-app-2 none"},
		{"data disk added", with(func(e []Existing) []Existing { e[1].DataDisks = []int64{1 << 30}; return e }),
			"shop-dc none; shop-db update (data disks [1G] -> [1G 2G]); shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"data disk grown, VM stopped", with(func(e []Existing) []Existing {
			e[1].DataDisks, e[1].Running = []int64{512 << 20, 2 << 30}, false
			return e
		}),
			"shop-dc none; shop-db update (data disks [512M 2G] -> [1G 2G]; then start it); shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"data disk would shrink", with(func(e []Existing) []Existing { e[1].DataDisks = []int64{1 << 30, 4 << 30}; return e }),
			"shop-dc none; shop-db none refused: data disks [1G 4G] -> [1G 2G]: data2 would shrink, cutting off the guest's data; up only grows disks; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"data disk would go", with(func(e []Existing) []Existing { e[1].DataDisks = []int64{1 << 30, 2 << 30, 3 << 30}; return e }),
			"shop-dc none; shop-db none refused: data disks [1G 2G 3G] -> [1G 2G]: up adds and grows disks but never removes one (its data would be lost); delete the VM and run up again to remake it; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"other image", with(func(e []Existing) []Existing { e[0].Image = "old"; return e }),
			`shop-dc recreate (image "old" -> "tiny"); shop-db none; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none`},
		{"memory, cpus and networks", with(func(e []Existing) []Existing {
			e[0].Memory, e[0].CPUs, e[0].Networks = 512<<20, 1, nil
			return e
		}),
			"shop-dc update (cpus 1 -> 2, memory 512M -> 1G, networks [] -> [back]; stop it for its new NICs, then start it); shop-db none; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"networks of a stopped VM", with(func(e []Existing) []Existing { e[0].Networks, e[0].Running = []string{"default"}, false; return e }),
			"shop-dc update (networks [default] -> [back]; then start it); shop-db none; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"update of a stopped VM", with(func(e []Existing) []Existing { e[0].CPUs, e[0].Running = 4, false; return e }),
			"shop-dc update (cpus 4 -> 2; then start it); shop-db none; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"unset fields are not compared", with(func(e []Existing) []Existing { e[1].CPUs, e[1].Memory = 8, 8<<30; return e }),
			"shop-dc none; shop-db none; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none"},
		{"count lowered", append(with(func(e []Existing) []Existing { return e }),
			Existing{Name: "shop-app-4", Image: "tiny", Running: true}, Existing{Name: "shop-app-3", Image: "tiny"}),
			"shop-dc none; shop-db none; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none; " +
				`shop-app-3 delete (vm "app" now has a count of 2); shop-app-4 delete (vm "app" now has a count of 2)`},
		{"count raised from 1", []Existing{{Name: "shop-app", Image: "tiny", Running: true}},
			"shop-dc create (not created yet); shop-db create (not created yet); shop-seed create (not created yet); " +
				"shop-app-1 create (not created yet); shop-app-2 create (not created yet); " +
				`shop-app delete (vm "app" now has a count of 2: its VMs are shop-app-1 to shop-app-2)`},
		{"member removed", append(with(func(e []Existing) []Existing { return e }), Existing{Name: "shop-cache", Image: "tiny"}),
			"shop-dc none; shop-db none; shop-seed none (oneshot, completed); shop-app-1 none; shop-app-2 none; shop-cache delete (no longer in the file)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, c := range mustParse(t, src).Diff(tt.existing) {
				s := c.Instance + " " + c.Action
				if c.Why != "" {
					s += " (" + c.Why + ")"
				}
				if c.Refused != "" {
					s += " refused: " + c.Refused
				}
				got = append(got, s)
			}
			if got, want := strings.Join(got, "; "), tt.want; got != want {
				t.Fatalf("diff: got %v, want %v", got, want)
			}
		})
	}
}
