package backup

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// at reads "2026-03-01 12:00" (UTC) or a full RFC 3339 time.
func at(t *testing.T, s string) time.Time {
	t.Helper()
	if v, err := time.Parse(time.RFC3339, s); err == nil {
		return v
	}
	v, err := time.Parse("2006-01-02 15:04", s)
	if err != nil {
		t.Fatalf("bad test time %q: %v", s, err)
	}
	return v
}

func TestPrune(t *testing.T) {
	// days lists one backup a day at noon, from..to inclusive.
	days := func(from, to string) []string {
		var out []string
		a, _ := time.Parse("2006-01-02", from)
		b, _ := time.Parse("2006-01-02", to)
		for d := a; !d.After(b); d = d.AddDate(0, 0, 1) {
			out = append(out, d.Format("2006-01-02")+" 12:00")
		}
		return out
	}
	for _, tc := range []struct {
		name    string
		backups []string // "vm@time", vm "web" if left out
		keep    Keep
		want    []string // kept, in the order given
	}{
		{
			name:    "nothing set keeps all",
			backups: []string{"2026-03-01 12:00", "2026-03-02 12:00"},
			want:    []string{"2026-03-01 12:00", "2026-03-02 12:00"},
		},
		{
			name:    "negative counts are unset",
			backups: []string{"2026-03-01 12:00", "2026-03-02 12:00"},
			keep:    Keep{Last: -1},
			want:    []string{"2026-03-01 12:00", "2026-03-02 12:00"},
		},
		{
			name:    "last",
			backups: []string{"2026-03-01 12:00", "2026-03-03 12:00", "2026-03-02 12:00", "2026-03-05 12:00", "2026-03-04 12:00"},
			keep:    Keep{Last: 3},
			want:    []string{"2026-03-03 12:00", "2026-03-05 12:00", "2026-03-04 12:00"},
		},
		{
			name:    "last more than there are",
			backups: []string{"2026-03-01 12:00", "2026-03-02 12:00"},
			keep:    Keep{Last: 10},
			want:    []string{"2026-03-01 12:00", "2026-03-02 12:00"},
		},
		{
			name:    "hourly keeps the newest of each hour",
			backups: []string{"2026-03-01 10:05", "2026-03-01 10:50", "2026-03-01 11:10", "2026-03-01 12:00"},
			keep:    Keep{Hourly: 2},
			want:    []string{"2026-03-01 11:10", "2026-03-01 12:00"},
		},
		{
			name:    "daily",
			backups: []string{"2026-03-01 08:00", "2026-03-01 20:00", "2026-03-02 10:00", "2026-03-03 09:00", "2026-03-03 23:00", "2026-03-04 12:00"},
			keep:    Keep{Daily: 3},
			want:    []string{"2026-03-02 10:00", "2026-03-03 23:00", "2026-03-04 12:00"},
		},
		{
			name:    "daily skips days without backups",
			backups: []string{"2026-01-01 12:00", "2026-02-01 12:00", "2026-03-01 12:00"},
			keep:    Keep{Daily: 2},
			want:    []string{"2026-02-01 12:00", "2026-03-01 12:00"},
		},
		{
			// Days are UTC days: 23:30 at +02:00 on the 2nd is the 2nd
			// in UTC, 01:30 at +02:00 on the 3rd is still the 2nd.
			name:    "daily in UTC",
			backups: []string{"2026-03-02T23:30:00+02:00", "2026-03-03T01:30:00+02:00", "2026-03-03T12:00:00Z"},
			keep:    Keep{Daily: 2},
			want:    []string{"2026-03-03T01:30:00+02:00", "2026-03-03T12:00:00Z"},
		},
		{
			name: "last then daily: days last covers do not count",
			backups: []string{"2026-03-01 12:00", "2026-03-02 08:00", "2026-03-02 20:00",
				"2026-03-03 10:00", "2026-03-03 22:00", "2026-03-03 23:00"},
			keep: Keep{Last: 2, Daily: 2},
			want: []string{"2026-03-01 12:00", "2026-03-02 20:00", "2026-03-03 22:00", "2026-03-03 23:00"},
		},
		{
			// 2 March 2026 is a Monday.
			name:    "weekly by ISO week",
			backups: []string{"2026-03-02 12:00", "2026-03-08 12:00", "2026-03-09 12:00", "2026-03-18 12:00"},
			keep:    Keep{Weekly: 2},
			want:    []string{"2026-03-09 12:00", "2026-03-18 12:00"},
		},
		{
			// 31 December 2026 and 1 January 2027 are both in 2026-W53.
			name:    "weekly across new year",
			backups: []string{"2026-12-27 12:00", "2026-12-31 12:00", "2027-01-01 12:00"},
			keep:    Keep{Weekly: 2},
			want:    []string{"2026-12-27 12:00", "2027-01-01 12:00"},
		},
		{
			name:    "monthly",
			backups: []string{"2026-01-05 12:00", "2026-01-20 12:00", "2026-02-10 12:00", "2026-03-01 12:00", "2026-03-31 12:00"},
			keep:    Keep{Monthly: 2},
			want:    []string{"2026-02-10 12:00", "2026-03-31 12:00"},
		},
		{
			name:    "monthly in UTC",
			backups: []string{"2026-03-01T00:30:00+02:00", "2026-03-15 12:00"},
			keep:    Keep{Monthly: 2},
			want:    []string{"2026-03-01T00:30:00+02:00", "2026-03-15 12:00"},
		},
		{
			// Daily noon backups for a quarter. last: 31 Mar; daily: 30
			// and 29 Mar; weekly: the weeks of 31 and 29 Mar are covered,
			// so 22 and 15 Mar; monthly: March is covered, so 28 Feb and
			// 31 Jan.
			name:    "mixed",
			backups: days("2026-01-01", "2026-03-31"),
			keep:    Keep{Last: 1, Daily: 2, Weekly: 2, Monthly: 2},
			want:    []string{"2026-01-31 12:00", "2026-02-28 12:00", "2026-03-15 12:00", "2026-03-22 12:00", "2026-03-29 12:00", "2026-03-30 12:00", "2026-03-31 12:00"},
		},
		{
			name:    "each vm on its own",
			backups: []string{"web@2026-03-01 12:00", "db@2026-03-02 12:00", "web@2026-03-03 12:00", "db@2026-03-04 12:00", "web@2026-03-05 12:00"},
			keep:    Keep{Last: 1},
			want:    []string{"db@2026-03-04 12:00", "web@2026-03-05 12:00"},
		},
		{
			name:    "each vm on its own, daily",
			backups: []string{"web@2026-03-01 08:00", "db@2026-03-01 09:00", "web@2026-03-01 10:00", "db@2026-03-02 09:00"},
			keep:    Keep{Daily: 1},
			want:    []string{"web@2026-03-01 10:00", "db@2026-03-02 09:00"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var bs []Manifest
			for _, s := range tc.backups {
				vm, when, ok := strings.Cut(s, "@")
				if !ok {
					vm, when = "web", s
				}
				m := manifest(vm, at(t, when), "")
				m.Reason = s // the label, to compare by
				bs = append(bs, m)
			}
			keep, drop := Prune(bs, tc.keep)
			var got []string
			for _, m := range keep {
				got = append(got, m.Reason)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("kept: got %q, want %q", got, tc.want)
			}
			if len(keep)+len(drop) != len(bs) {
				t.Fatalf("kept %d and dropped %d of %d", len(keep), len(drop), len(bs))
			}
			for _, m := range drop {
				if slices.Contains(tc.want, m.Reason) {
					t.Fatalf("dropped %q, which is kept", m.Reason)
				}
			}
		})
	}
}

func TestKeepIsZero(t *testing.T) {
	for _, tc := range []struct {
		k    Keep
		want bool
	}{
		{Keep{}, true},
		{Keep{Last: -2}, true},
		{Keep{Last: 1}, false},
		{Keep{Monthly: 1}, false},
	} {
		if got := tc.k.IsZero(); got != tc.want {
			t.Fatalf("%+v IsZero: got %v, want %v", tc.k, got, tc.want)
		}
	}
}
