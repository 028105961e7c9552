package backup

import (
	"fmt"
	"sort"
)

// Keep is a retention policy, with the keep-* options of Proxmox Backup
// Server. Zero (or negative) counts are unset; a Keep with none set keeps
// everything.
type Keep struct {
	Last    int `json:"last,omitempty"`
	Hourly  int `json:"hourly,omitempty"`
	Daily   int `json:"daily,omitempty"`
	Weekly  int `json:"weekly,omitempty"`
	Monthly int `json:"monthly,omitempty"`
}

// IsZero reports whether k sets no limit, and so keeps everything.
func (k Keep) IsZero() bool {
	return k.Last <= 0 && k.Hourly <= 0 && k.Daily <= 0 && k.Weekly <= 0 && k.Monthly <= 0
}

// Prune splits backups into those the policy keeps and those it drops,
// each VM's (by name) on their own, both in the order given.
//
// The rules run as in Proxmox Backup Server, last, then hourly, daily,
// weekly and monthly, each over a VM's backups newest first. A rule keeps
// the newest backup of each period (UTC hours, days, ISO weeks, months)
// until it has kept its count of periods. A period in which an earlier
// rule already kept a backup does not count, and the older backups of a
// period a rule counts are dropped for good, so later rules pass them
// over. Whatever no rule keeps is dropped.
func Prune(bs []Manifest, k Keep) (keep, drop []Manifest) {
	if k.IsZero() {
		return append([]Manifest(nil), bs...), nil
	}
	byVM := make(map[string][]int)
	for i, m := range bs {
		byVM[m.VM] = append(byVM[m.VM], i)
	}
	kept := make([]bool, len(bs))
	for _, idx := range byVM {
		sort.SliceStable(idx, func(a, b int) bool {
			ma, mb := bs[idx[a]], bs[idx[b]]
			if !ma.CreatedAt.Equal(mb.CreatedAt) {
				return ma.CreatedAt.After(mb.CreatedAt)
			}
			return ma.ID > mb.ID
		})
		mark := make(map[int]bool) // by index into bs: true keep, false drop
		rules := []struct {
			n      int
			period func(Manifest) string
		}{
			{k.Last, func(m Manifest) string { return m.ID }},
			{k.Hourly, func(m Manifest) string { return m.CreatedAt.UTC().Format("2006-01-02T15") }},
			{k.Daily, func(m Manifest) string { return m.CreatedAt.UTC().Format("2006-01-02") }},
			{k.Weekly, func(m Manifest) string {
				y, w := m.CreatedAt.UTC().ISOWeek()
				return fmt.Sprintf("%04d-W%02d", y, w)
			}},
			{k.Monthly, func(m Manifest) string { return m.CreatedAt.UTC().Format("2006-01") }},
		}
		for _, rule := range rules {
			if rule.n > 0 {
				selectPeriods(bs, idx, mark, rule.n, rule.period)
			}
		}
		for _, i := range idx {
			kept[i] = mark[i]
		}
	}
	for i, m := range bs {
		if kept[i] {
			keep = append(keep, m)
		} else {
			drop = append(drop, m)
		}
	}
	return keep, drop
}

// selectPeriods is one keep rule over one VM's backups, newest first.
func selectPeriods(bs []Manifest, newestFirst []int, mark map[int]bool, n int, period func(Manifest) string) {
	covered := make(map[string]bool)
	for _, i := range newestFirst {
		if mark[i] {
			covered[period(bs[i])] = true
		}
	}
	counted := make(map[string]bool)
	for _, i := range newestFirst {
		if _, decided := mark[i]; decided {
			continue
		}
		p := period(bs[i])
		if covered[p] {
			continue
		}
		if counted[p] {
			mark[i] = false
			continue
		}
		if len(counted) >= n {
			return
		}
		counted[p] = true
		mark[i] = true
	}
}
