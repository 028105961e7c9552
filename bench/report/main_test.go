package main

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseRow(t *testing.T) {
	tests := []struct {
		in      string
		want    *Row
		wantErr string
	}{
		{"", nil, ""},
		{"# comment", nil, ""},
		{"startup\tto agent\ts\tlower\tlibvirt\tratio<=1.1\t1,2,3\t4,5",
			&Row{Scenario: "startup", Measure: "to agent", Unit: "s", Lower: true, Peer: "libvirt", Target: "ratio<=1.1", Lodge: []float64{1, 2, 3}, Other: []float64{4, 5}}, ""},
		{"export\tspeed\tMB/s\thigher\t-\t-\t100\t-",
			&Row{Scenario: "export", Measure: "speed", Unit: "MB/s", Peer: "-", Target: "-", Lodge: []float64{100}}, ""},
		{"a\tb\tc\tlower\tp\tt\t1", nil, "7 fields"},
		{"a\tb\tc\tsideways\tp\tt\t1\t2", nil, "lower or higher"},
		{"a\tb\tc\tlower\tp\tt\t1,x\t2", nil, `"x" is not a number`},
		{"a\tb\tc\tlower\tp\tt\t1\tNaN", nil, "not a number"},
		{"a\tb\tc\tlower\tp\tt\t\t2", nil, "no Lodge values"},
	}
	for _, tt := range tests {
		got, err := parseRow(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("parseRow(%q) = %v, want error %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseRow(%q): %v", tt.in, err)
			continue
		}
		if (got == nil) != (tt.want == nil) || got != nil && !rowEqual(*got, *tt.want) {
			t.Errorf("parseRow(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
	}
}

func rowEqual(a, b Row) bool {
	return a.Scenario == b.Scenario && a.Measure == b.Measure && a.Unit == b.Unit && a.Lower == b.Lower &&
		a.Peer == b.Peer && a.Target == b.Target && slices.Equal(a.Lodge, b.Lodge) && slices.Equal(a.Other, b.Other)
}

func TestRatioAdvantageVerdict(t *testing.T) {
	tests := []struct {
		row      Row
		ratio    float64
		adv      float64
		verdict  string
		errMatch string
	}{
		{Row{Lower: true, Target: "ratio<=1.1", Lodge: []float64{10}, Other: []float64{20}}, 0.5, 2, "pass", ""},
		{Row{Lower: true, Target: "ratio<=0.4", Lodge: []float64{10}, Other: []float64{20}}, 0.5, 2, "fail", ""},
		{Row{Lower: false, Target: "ratio>=0.9", Lodge: []float64{80}, Other: []float64{100}}, 0.8, 0.8, "fail", ""},
		{Row{Lower: true, Target: "lodge<0.1 && ratio<=0.05", Lodge: []float64{0.06}, Other: []float64{2}}, 0.03, 1 / 0.03, "pass", ""},
		{Row{Lower: true, Target: "lodge<0.05 && ratio<=0.05", Lodge: []float64{0.06}, Other: []float64{2}}, 0.03, 1 / 0.03, "fail", ""},
		{Row{Lower: true, Target: "lodge<50", Lodge: []float64{20}}, math.NaN(), math.NaN(), "pass", ""},
		{Row{Lower: true, Target: "ratio<1", Lodge: []float64{20}}, math.NaN(), math.NaN(), "", "no ratio value"},
		{Row{Lower: true, Target: "speed<1", Lodge: []float64{1}, Other: []float64{1}}, 1, 1, "", "want ratio or lodge"},
		{Row{Lower: true, Target: "ratio=1", Lodge: []float64{1}, Other: []float64{1}}, 1, 1, "", "no comparison"},
		{Row{Lower: true, Target: "-", Lodge: []float64{1}, Other: []float64{1}}, 1, 1, "", ""},
	}
	for i, tt := range tests {
		if q := tt.row.Ratio(); !(math.Abs(q-tt.ratio) < 1e-9 || math.IsNaN(q) && math.IsNaN(tt.ratio)) {
			t.Errorf("%d: ratio %v, want %v", i, q, tt.ratio)
		}
		if a := tt.row.Advantage(); !(math.Abs(a-tt.adv) < 1e-9 || math.IsNaN(a) && math.IsNaN(tt.adv)) {
			t.Errorf("%d: advantage %v, want %v", i, a, tt.adv)
		}
		v, err := tt.row.Verdict()
		if tt.errMatch != "" {
			if err == nil || !strings.Contains(err.Error(), tt.errMatch) {
				t.Errorf("%d: verdict error %v, want %q", i, err, tt.errMatch)
			}
			continue
		}
		if err != nil || v != tt.verdict {
			t.Errorf("%d: verdict %q, %v; want %q", i, v, err, tt.verdict)
		}
	}
}

func TestTargetText(t *testing.T) {
	for in, want := range map[string]string{
		"ratio<=1.10":              "ratio ≤ 1.10",
		"lodge<0.1 && ratio<=0.05": "Lodge < 0.1 and ratio ≤ 0.05",
		"-":                        "",
	} {
		if got := targetText(in); got != want {
			t.Errorf("targetText(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRunWritesTableAndCharts(t *testing.T) {
	dir := t.TempDir()
	summary := "startup\tstart to agent ready\ts\tlower\tlibvirt\tratio<=1.10\t10,12,11\t20,22,21\n" +
		"clone size\t1 GiB disk\ts\tlower\tlibvirt\tlodge<0.1\t0.05,0.06\t0.5\n" +
		"clone size\t16 GiB disk\ts\tlower\tlibvirt\tlodge<0.1\t0.07\t-\n" +
		"export\tthroughput\tMB/s\thigher\tqemu-img\tratio>=0.9\t80\t100\n" +
		"export\tpipe\ts\tlower\ttar | zstd\t-\t1\t2\n"
	if err := os.WriteFile(filepath.Join(dir, "summary.tsv"), []byte(summary), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "notyet.tsv"), []byte("live migration\tno cluster yet\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	charts := filepath.Join(dir, "charts")
	if err := run(&out, dir, charts, "charts"); err != nil {
		t.Fatal(err)
	}
	md := out.String()
	for _, want := range []string{
		"| startup | start to agent ready (s) | 11.0 (10.0–12.0) | libvirt | 21.0 (20.0–22.0) | 0.524 | ratio ≤ 1.10 | pass |",
		"| export | throughput (MB/s) | 80.0 | qemu-img | 100 | 0.800 | ratio ≥ 0.9 | fail |",
		"- live migration: not yet (no cluster yet)",
		"| export | pipe (s) | 1.00 | tar \\| zstd | 2.00 | 0.500 |  |  |",
		"![Lodge against its peers](charts/ratios.svg)",
		"![Linked clone time against disk size](charts/clone-size.svg)",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("results lack %q:\n%s", want, md)
		}
	}
	for _, name := range []string{"ratios.svg", "clone-size.svg"} {
		raw, err := os.ReadFile(filepath.Join(charts, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := wellFormed(raw); err != nil {
			t.Errorf("%s is not well-formed XML: %v", name, err)
		}
	}
	ratios, _ := os.ReadFile(filepath.Join(charts, "ratios.svg"))
	// Four compared rows: startup, clone size 1 GiB, export, pipe.
	if n := strings.Count(string(ratios), "<rect"); n != 4 {
		t.Errorf("ratio chart has %d bars, want 4", n)
	}
}

func TestRunWithoutSummaryFails(t *testing.T) {
	err := run(io.Discard, t.TempDir(), t.TempDir(), "charts")
	if err == nil || !strings.Contains(err.Error(), "run a scenario first") {
		t.Fatalf("run without results = %v", err)
	}
}

func wellFormed(raw []byte) error {
	d := xml.NewDecoder(bytes.NewReader(raw))
	for {
		_, err := d.Token()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func FuzzParseRow(f *testing.F) {
	f.Add("startup\tto agent\ts\tlower\tlibvirt\tratio<=1.1\t1,2,3\t4,5")
	f.Add("a\tb\tc\thigher\t-\t-\t1\t-")
	f.Fuzz(func(t *testing.T, s string) {
		r, err := parseRow(s)
		if err != nil || r == nil {
			return
		}
		if len(r.Lodge) == 0 {
			t.Fatal("accepted a row without Lodge values")
		}
		_, _ = r.Verdict()
		_ = ratioChart([]Row{*r})
	})
}
