package bench

import (
	"math"
	"slices"

	"github.com/lodge-vm/lodge/api"
)

// Summary is what repeated samples of one test come to.
type Summary struct {
	Median, Min, Max float64
	// Spread is half the range as a percentage of the median: the "±"
	// a reader should put on the median.
	Spread float64
	N      int
}

// Summarize reduces samples to their median and spread. No samples give
// a zero Summary.
func Summarize(values []float64) Summary {
	if len(values) == 0 {
		return Summary{}
	}
	v := slices.Clone(values)
	slices.Sort(v)
	s := Summary{Min: v[0], Max: v[len(v)-1], N: len(v)}
	if mid := len(v) / 2; len(v)%2 == 1 {
		s.Median = v[mid]
	} else {
		s.Median = (v[mid-1] + v[mid]) / 2
	}
	if s.Median != 0 {
		s.Spread = (s.Max - s.Min) / 2 / math.Abs(s.Median) * 100
	}
	return s
}

// Percent is the guest's value as a percentage of the host's, the right
// way up: for a test where lower is better (latency), a guest twice as
// slow scores 50 as it does for throughput. It is 0 when either value is
// missing.
func Percent(host, guest float64, lower bool) float64 {
	if host <= 0 || guest <= 0 {
		return 0
	}
	if lower {
		return host / guest * 100
	}
	return guest / host * 100
}

// series gathers the samples of one test on one side.
type series struct {
	test, unit, bus string
	lower, buffered bool
	values          []float64
}

// collector keeps samples by test and disk bus, in the order first seen.
type collector struct {
	order []string
	byKey map[string]*series
}

func newCollector() *collector { return &collector{byKey: map[string]*series{}} }

func (c *collector) add(bus string, r ProbeResult) {
	for _, s := range r.Samples {
		b := ""
		if isDisk(s.Test) {
			b = bus
		}
		key := s.Test + "\x00" + b
		se := c.byKey[key]
		if se == nil {
			se = &series{test: s.Test, unit: s.Unit, bus: b, lower: s.Lower}
			c.byKey[key] = se
			c.order = append(c.order, key)
		}
		se.values = append(se.values, s.Value)
		se.buffered = se.buffered || s.Buffered
	}
}

func isDisk(test string) bool { return len(test) > 5 && test[:5] == "disk." }

// Rows pairs the guest's series with the host's. Disk rows of every bus
// compare with the one host disk series; a test the host lacks keeps a
// zero host value and percentage rather than vanishing.
func Rows(host, guest *collector) []api.BenchRow {
	var rows []api.BenchRow
	for _, key := range guest.order {
		g := guest.byKey[key]
		row := api.BenchRow{Test: g.test, Bus: g.bus, Unit: g.unit, LowerIsBetter: g.lower}
		gs := Summarize(g.values)
		row.Guest, row.GuestSpread, row.Repeats = gs.Median, gs.Spread, gs.N
		if h := host.byKey[g.test+"\x00"]; h != nil {
			hs := Summarize(h.values)
			row.Host, row.HostSpread = hs.Median, hs.Spread
			row.HostBuffered = h.buffered
		}
		row.Percent = math.Round(Percent(row.Host, row.Guest, g.lower)*10) / 10
		rows = append(rows, row)
	}
	return rows
}
