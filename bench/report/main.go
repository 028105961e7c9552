// Command report turns the benchmark scenarios' summary rows
// (bench/results/summary.tsv) into the head of bench/results.md: the
// machine, the versions and the date, then one table row per measure with
// Lodge's and the peer's medians and ranges, the ratio, the target and
// whether it was met; and it draws the charts results.md links to.
//
//	go run ./bench/report -results bench/results -charts bench/charts >head.md
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/internal/bench"
)

func main() {
	results := flag.String("results", "bench/results", "directory of the scenarios' TSV files")
	charts := flag.String("charts", "bench/charts", "directory to write the SVG charts to")
	link := flag.String("link", "charts", "path of the charts directory as results.md links it")
	flag.Parse()
	if err := run(os.Stdout, *results, *charts, *link); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
}

func run(w io.Writer, results, charts, link string) error {
	rows, err := readSummary(filepath.Join(results, "summary.tsv"))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(charts, 0o755); err != nil {
		return err
	}
	accel := strings.TrimSpace(readOr(filepath.Join(results, "accel.txt"), "?"))
	writeHead(w, accel, machine())
	writeTable(w, rows)
	writeNotYet(w, readNotYet(filepath.Join(results, "notyet.tsv")))
	if err := os.WriteFile(filepath.Join(charts, "ratios.svg"), []byte(ratioChart(rows)), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(w, "\n![Lodge against its peers](%s/ratios.svg)\n", link)
	if pts := cloneSizes(rows); len(pts) > 0 {
		if err := os.WriteFile(filepath.Join(charts, "clone-size.svg"), []byte(cloneChart(pts)), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(w, "\n![Linked clone time against disk size](%s/clone-size.svg)\n", link)
	}
	return nil
}

// Row is one measure of one scenario: every run's value for Lodge and
// for the peer it is compared with.
type Row struct {
	Scenario, Measure, Unit string
	// Lower is true when a smaller value is better (times, sizes).
	Lower  bool
	Peer   string
	Target string
	Lodge  []float64
	Other  []float64
}

func readSummary(path string) ([]Row, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read %s (run a scenario first): %w", path, err)
	}
	defer func() { _ = f.Close() }()
	var rows []Row
	sc := bufio.NewScanner(f)
	line := 0
	for sc.Scan() {
		line++
		row, err := parseRow(sc.Text())
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		if row != nil {
			rows = append(rows, *row)
		}
	}
	return rows, sc.Err()
}

// parseRow reads "scenario measure unit lower|higher peer target
// lodge-values peer-values", tab-separated, values comma-separated. A
// blank or # line gives nil.
func parseRow(s string) (*Row, error) {
	if strings.TrimSpace(s) == "" || strings.HasPrefix(s, "#") {
		return nil, nil
	}
	f := strings.Split(s, "\t")
	if len(f) != 8 {
		return nil, fmt.Errorf("%d fields, want 8", len(f))
	}
	if f[3] != "lower" && f[3] != "higher" {
		return nil, fmt.Errorf("field 4 is %q, want lower or higher", f[3])
	}
	r := &Row{Scenario: f[0], Measure: f[1], Unit: f[2], Lower: f[3] == "lower", Peer: f[4], Target: f[5]}
	var err error
	if r.Lodge, err = values(f[6]); err != nil {
		return nil, fmt.Errorf("lodge values: %w", err)
	}
	if r.Other, err = values(f[7]); err != nil {
		return nil, fmt.Errorf("%s values: %w", r.Peer, err)
	}
	if len(r.Lodge) == 0 {
		return nil, errors.New("no Lodge values")
	}
	return r, nil
}

func values(s string) ([]float64, error) {
	if s == "" || s == "-" {
		return nil, nil
	}
	var out []float64
	for _, v := range strings.Split(s, ",") {
		x, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || math.IsNaN(x) || math.IsInf(x, 0) {
			return nil, fmt.Errorf("%q is not a number", v)
		}
		out = append(out, x)
	}
	return out, nil
}

// stats summarizes one side's runs, as lodge bench does its repeats.
func stats(v []float64) bench.Summary { return bench.Summarize(v) }

// Ratio is Lodge's median over the peer's, or NaN without a peer.
func (r Row) Ratio() float64 {
	l, o := stats(r.Lodge), stats(r.Other)
	if o.N == 0 || o.Median == 0 {
		return math.NaN()
	}
	return l.Median / o.Median
}

// Advantage is how many times better Lodge did: above 1 when Lodge wins,
// whichever way the measure points.
func (r Row) Advantage() float64 {
	q := r.Ratio()
	if math.IsNaN(q) || q == 0 {
		return math.NaN()
	}
	if r.Lower {
		return 1 / q
	}
	return q
}

// Verdict evaluates the target: conditions joined by "&&", each
// "ratio OP X" or "lodge OP X" (in the row's unit), OP one of < <= > >=.
// It returns "" when there is no target or nothing to judge.
func (r Row) Verdict() (string, error) {
	if r.Target == "" || r.Target == "-" {
		return "", nil
	}
	for _, cond := range strings.Split(r.Target, "&&") {
		ok, err := r.holds(strings.TrimSpace(cond))
		if err != nil {
			return "", err
		}
		if !ok {
			return "fail", nil
		}
	}
	return "pass", nil
}

func (r Row) holds(cond string) (bool, error) {
	for _, op := range []string{"<=", ">=", "<", ">"} {
		lhs, rhs, found := strings.Cut(cond, op)
		if !found {
			continue
		}
		want, err := strconv.ParseFloat(strings.TrimSpace(rhs), 64)
		if err != nil {
			return false, fmt.Errorf("target %q: %q is not a number", cond, rhs)
		}
		var got float64
		switch strings.TrimSpace(lhs) {
		case "ratio":
			got = r.Ratio()
		case "lodge":
			got = stats(r.Lodge).Median
		default:
			return false, fmt.Errorf("target %q: want ratio or lodge on the left", cond)
		}
		if math.IsNaN(got) {
			return false, fmt.Errorf("target %q: no %s value", cond, strings.TrimSpace(lhs))
		}
		switch op {
		case "<=":
			return got <= want, nil
		case ">=":
			return got >= want, nil
		case "<":
			return got < want, nil
		}
		return got > want, nil
	}
	return false, fmt.Errorf("target %q: no comparison", cond)
}

// targetText shows a target as readers write it.
func targetText(t string) string {
	if t == "" || t == "-" {
		return ""
	}
	r := strings.NewReplacer("<=", "≤ ", ">=", "≥ ", "<", "< ", ">", "> ", "&&", "and", "ratio", "ratio ", "lodge", "Lodge ")
	return strings.Join(strings.Fields(r.Replace(t)), " ")
}

func num(v float64) string {
	a := math.Abs(v)
	switch {
	case a == 0:
		return "0"
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(v, 'f', 3, 64)
}

func cell(v []float64) string {
	st := stats(v)
	if st.N == 0 {
		return "-"
	}
	if st.N == 1 {
		return num(st.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", num(st.Median), num(st.Min), num(st.Max))
}

type machineInfo struct {
	CPU, Kernel, QEMU, Libvirt, Commit string
	CPUs                               int
	Memory                             int64
}

func machine() machineInfo {
	m := machineInfo{CPUs: runtime.NumCPU()}
	for l := range strings.SplitSeq(readOr("/proc/cpuinfo", ""), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			m.CPU = strings.TrimSpace(v)
			break
		}
	}
	for l := range strings.SplitSeq(readOr("/proc/meminfo", ""), "\n") {
		if rest, ok := strings.CutPrefix(l, "MemTotal:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			m.Memory = kb << 10
		}
	}
	m.Kernel = firstLine("uname", "-r")
	m.QEMU = firstLine("qemu-system-x86_64", "--version")
	m.Libvirt = firstLine("libvirtd", "--version")
	m.Commit = firstLine("git", "rev-parse", "--short", "HEAD")
	return m
}

func firstLine(name string, args ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).Output()
	if err != nil {
		return "?"
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

func readOr(path, def string) string {
	raw, err := os.ReadFile(path)
	if err != nil {
		return def
	}
	return string(raw)
}

func writeHead(w io.Writer, accel string, m machineInfo) {
	fmt.Fprintf(w, "# Lodge against libvirt and standard tools: measured %s\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(w, "- machine: %d CPUs (%s), %.0f GiB, kernel %s\n", m.CPUs, m.CPU, float64(m.Memory)/(1<<30), m.Kernel)
	fmt.Fprintf(w, "- accelerator: **%s**", accel)
	if accel == "tcg" {
		fmt.Fprint(w, " (software emulation for Lodge and libvirt alike: nested KVM stalls guests here)")
	}
	fmt.Fprintf(w, "\n- versions: Lodge %s, %s, %s, %s\n\n", m.Commit, m.QEMU, m.Libvirt, runtime.Version())
	fmt.Fprintln(w, "Lodge and its peer ran alternately (A B A B) in one session on one machine,")
	fmt.Fprintln(w, "on the same guest, disk and memory. Each cell is the median of the runs with")
	fmt.Fprintln(w, "the range in brackets. This machine is shared: only the ratios carry over.")
	fmt.Fprintln(w)
}

func writeTable(w io.Writer, rows []Row) {
	fmt.Fprintln(w, "| scenario | measure | Lodge | peer | peer's value | Lodge / peer | target | result |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|")
	for _, r := range rows {
		ratio := "-"
		if q := r.Ratio(); !math.IsNaN(q) {
			ratio = num(q)
		}
		verdict, err := r.Verdict()
		if err != nil {
			verdict = "? (" + err.Error() + ")"
		}
		peer := r.Peer
		if peer == "" || peer == "-" {
			peer = "none"
		}
		fmt.Fprintf(w, "| %s | %s (%s) | %s | %s | %s | %s | %s | %s |\n", mdCell(r.Scenario), mdCell(r.Measure), mdCell(r.Unit),
			cell(r.Lodge), mdCell(peer), cell(r.Other), ratio, targetText(r.Target), mdCell(verdict))
	}
}

// mdCell escapes what would end a markdown table cell.
func mdCell(s string) string { return strings.ReplaceAll(s, "|", `\|`) }

// readNotYet lists scenarios that cannot be measured yet: "name\twhy".
func readNotYet(path string) [][2]string {
	var out [][2]string
	for l := range strings.SplitSeq(readOr(path, ""), "\n") {
		if name, why, ok := strings.Cut(l, "\t"); ok {
			out = append(out, [2]string{name, why})
		}
	}
	return out
}

func writeNotYet(w io.Writer, items [][2]string) {
	if len(items) == 0 {
		return
	}
	fmt.Fprintln(w, "\nNot yet measured:")
	fmt.Fprintln(w)
	for _, it := range items {
		fmt.Fprintf(w, "- %s: not yet (%s)\n", it[0], it[1])
	}
}
