package bench

import (
	"math"
	"testing"

	"github.com/lodge-vm/lodge/api"
)

func TestSummarize(t *testing.T) {
	tests := []struct {
		in   []float64
		want Summary
	}{
		{nil, Summary{}},
		{[]float64{5}, Summary{Median: 5, Min: 5, Max: 5, N: 1}},
		{[]float64{3, 1, 2}, Summary{Median: 2, Min: 1, Max: 3, Spread: 50, N: 3}},
		{[]float64{4, 1, 3, 2}, Summary{Median: 2.5, Min: 1, Max: 4, Spread: 60, N: 4}},
		{[]float64{0, 0}, Summary{N: 2}},
	}
	for _, tt := range tests {
		got := Summarize(tt.in)
		if math.Abs(got.Spread-tt.want.Spread) > 1e-9 {
			t.Errorf("Summarize(%v).Spread = %v, want %v", tt.in, got.Spread, tt.want.Spread)
		}
		got.Spread = tt.want.Spread
		if got != tt.want {
			t.Errorf("Summarize(%v) = %+v, want %+v", tt.in, got, tt.want)
		}
	}
}

func TestSummarizeLeavesInputAlone(t *testing.T) {
	in := []float64{3, 1, 2}
	Summarize(in)
	if in[0] != 3 || in[1] != 1 || in[2] != 2 {
		t.Fatalf("Summarize sorted its input: %v", in)
	}
}

func TestPercent(t *testing.T) {
	tests := []struct {
		host, guest float64
		lower       bool
		want        float64
	}{
		{100, 50, false, 50},
		{100, 150, false, 150},
		{100, 200, true, 50}, // twice the latency is half as good
		{100, 50, true, 200},
		{0, 50, false, 0},
		{100, 0, true, 0},
	}
	for _, tt := range tests {
		if got := Percent(tt.host, tt.guest, tt.lower); got != tt.want {
			t.Errorf("Percent(%v, %v, lower=%v) = %v, want %v", tt.host, tt.guest, tt.lower, got, tt.want)
		}
	}
}

func TestRowsPairGuestBusesWithTheOneHostDisk(t *testing.T) {
	host, guest := newCollector(), newCollector()
	for _, v := range []float64{100, 110, 90} {
		host.add("", ProbeResult{Samples: []Sample{
			{Test: CPUIntSingle, Unit: "Mops/s", Value: v},
			{Test: MemLatency, Unit: "ns", Value: v, Lower: true},
			{Test: DiskSeqRead, Unit: "MB/s", Value: v * 10, Buffered: true},
		}})
	}
	for _, v := range []float64{50, 60, 40} {
		guest.add("virtio", ProbeResult{Samples: []Sample{
			{Test: CPUIntSingle, Unit: "Mops/s", Value: v},
			{Test: MemLatency, Unit: "ns", Value: v * 4, Lower: true},
			{Test: DiskSeqRead, Unit: "MB/s", Value: v * 10},
		}})
		guest.add("nvme", ProbeResult{Samples: []Sample{{Test: DiskSeqRead, Unit: "MB/s", Value: v * 20}}})
	}
	rows := Rows(host, guest)
	want := []api.BenchRow{
		{Test: CPUIntSingle, Unit: "Mops/s", Host: 100, Guest: 50, Percent: 50, HostSpread: 10, GuestSpread: 20, Repeats: 3},
		{Test: MemLatency, Unit: "ns", Host: 100, Guest: 200, Percent: 50, HostSpread: 10, GuestSpread: 20, Repeats: 3, LowerIsBetter: true},
		{Test: DiskSeqRead, Bus: "virtio", Unit: "MB/s", Host: 1000, Guest: 500, Percent: 50, HostSpread: 10, GuestSpread: 20, Repeats: 3, HostBuffered: true},
		{Test: DiskSeqRead, Bus: "nvme", Unit: "MB/s", Host: 1000, Guest: 1000, Percent: 100, HostSpread: 10, GuestSpread: 20, Repeats: 3, HostBuffered: true},
	}
	if len(rows) != len(want) {
		t.Fatalf("got %d rows, want %d: %+v", len(rows), len(want), rows)
	}
	for i := range want {
		if rows[i] != want[i] {
			t.Errorf("row %d = %+v, want %+v", i, rows[i], want[i])
		}
	}
}

func TestRowsKeepATestTheHostLacks(t *testing.T) {
	host, guest := newCollector(), newCollector()
	guest.add("virtio", ProbeResult{Samples: []Sample{{Test: CPUIntAll, Unit: "Mops/s", Value: 7}}})
	rows := Rows(host, guest)
	if len(rows) != 1 || rows[0].Guest != 7 || rows[0].Host != 0 || rows[0].Percent != 0 {
		t.Fatalf("rows = %+v, want one row with the guest's value and no percentage", rows)
	}
}

func TestSummarizeRows(t *testing.T) {
	rows := []api.BenchRow{
		{Test: CPUIntSingle, Percent: 50},
		{Test: CPUFloatSingle, Percent: 200},
		{Test: MemRead, Percent: 80},
		{Test: DiskSeqRead, Percent: 0}, // no host figure: left out
		{Test: DiskSeqWrite, Percent: 25},
	}
	got := SummarizeRows(rows)
	want := api.BenchSummary{CPU: 100, Memory: 80, Disk: 25}
	if got != want {
		t.Fatalf("SummarizeRows = %+v, want %+v", got, want)
	}
}
