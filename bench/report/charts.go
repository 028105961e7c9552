package main

import (
	"fmt"
	"html"
	"math"
	"strconv"
	"strings"
)

// ratioChart draws one horizontal bar per compared measure: how many
// times better Lodge did than its peer, on a log scale around parity, so
// that 10× better and 10× worse are bars of one length on either side.
func ratioChart(rows []Row) string {
	type bar struct {
		label string
		adv   float64
	}
	var bars []bar
	for _, r := range rows {
		if a := r.Advantage(); !math.IsNaN(a) && a > 0 {
			bars = append(bars, bar{r.Scenario + ": " + r.Measure + " (vs " + r.Peer + ")", a})
		}
	}
	const (
		labelW = 430
		plotW  = 420
		rowH   = 22
		top    = 40
	)
	// The scale reaches the largest advantage either way, at least 10×.
	span := 1.0
	for _, b := range bars {
		span = math.Max(span, math.Abs(math.Log10(b.adv)))
	}
	span = math.Ceil(span)
	h := top + rowH*len(bars) + 40
	var s strings.Builder
	fmt.Fprintf(&s, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", labelW+plotW+80, h)
	fmt.Fprintf(&s, `<text x="10" y="20" font-size="14" font-weight="bold">How many times better Lodge did than its peer (log scale; right of the line: Lodge ahead)</text>`+"\n")
	mid := float64(labelW) + plotW/2
	x := func(adv float64) float64 { return mid + math.Log10(adv)/span*plotW/2 }
	for d := -span; d <= span; d++ {
		gx := mid + d/span*plotW/2
		fmt.Fprintf(&s, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`+"\n", gx, top-5, gx, top+rowH*len(bars))
		fmt.Fprintf(&s, `<text x="%.1f" y="%d" text-anchor="middle" fill="#666">%s</text>`+"\n", gx, top+rowH*len(bars)+15, tick(d))
	}
	for i, b := range bars {
		y := top + i*rowH
		fmt.Fprintf(&s, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", labelW-8, y+15, html.EscapeString(b.label))
		x0, x1 := mid, x(b.adv)
		color := "#2a7"
		if x1 < x0 {
			x0, x1, color = x1, x0, "#c44"
		}
		fmt.Fprintf(&s, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", x0, y+4, math.Max(x1-x0, 1), rowH-8, color)
		fmt.Fprintf(&s, `<text x="%.1f" y="%d" fill="#333">%s×</text>`+"\n", float64(labelW+plotW+5), y+15, num(b.adv))
	}
	fmt.Fprintf(&s, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#000"/>`+"\n", mid, top-5, mid, top+rowH*len(bars))
	s.WriteString("</svg>\n")
	return s.String()
}

// tick labels a decade of the log scale: 1×, 10×, 1/10×.
func tick(d float64) string {
	switch {
	case d == 0:
		return "1×"
	case d > 0:
		return strconv.FormatFloat(math.Pow(10, d), 'f', 0, 64) + "×"
	}
	return "1/" + strconv.FormatFloat(math.Pow(10, -d), 'f', 0, 64) + "×"
}

// point is one disk size's linked clone time, and the peer's copy of the
// same disk if it was measured.
type point struct {
	gib         float64
	lodge, peer float64
}

// cloneSizes picks the "clone size" rows, whose measure is "N GiB disk".
func cloneSizes(rows []Row) []point {
	var pts []point
	for _, r := range rows {
		if r.Scenario != "clone size" {
			continue
		}
		g, err := strconv.ParseFloat(strings.TrimSuffix(r.Measure, " GiB disk"), 64)
		if err != nil {
			continue
		}
		p := point{gib: g, lodge: stats(r.Lodge).Median, peer: math.NaN()}
		if len(r.Other) > 0 {
			p.peer = stats(r.Other).Median
		}
		pts = append(pts, p)
	}
	return pts
}

// cloneChart plots clone time (ms, log scale) against disk size (GiB,
// log scale): Lodge's linked clone, and the peer's copy where measured.
func cloneChart(pts []point) string {
	const (
		left, top, w, h = 70, 40, 480, 260
	)
	maxMS, minMS := 100.0, 10.0
	maxG := 1.0
	for _, p := range pts {
		maxMS = math.Max(maxMS, math.Max(p.lodge, nz(p.peer))*1000)
		minMS = math.Min(minMS, p.lodge*1000)
		maxG = math.Max(maxG, p.gib)
	}
	lo, hi := math.Floor(math.Log10(minMS)), math.Ceil(math.Log10(maxMS))
	gx := func(g float64) float64 { return left + math.Log2(g)/math.Max(math.Log2(maxG), 1)*w }
	gy := func(ms float64) float64 { return top + h - (math.Log10(ms)-lo)/(hi-lo)*h }
	var s strings.Builder
	fmt.Fprintf(&s, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", left+w+180, top+h+50)
	fmt.Fprintln(&s, `<text x="10" y="20" font-size="14" font-weight="bold">Clone time against disk size (both axes log scale)</text>`)
	for d := lo; d <= hi; d++ {
		y := gy(math.Pow(10, d))
		fmt.Fprintf(&s, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/><text x="%d" y="%.1f" text-anchor="end" fill="#666">%s ms</text>`+"\n",
			left, y, left+w, y, left-5, y+4, strconv.FormatFloat(math.Pow(10, d), 'f', 0, 64))
	}
	for _, p := range pts {
		x := gx(p.gib)
		fmt.Fprintf(&s, `<text x="%.1f" y="%d" text-anchor="middle" fill="#666">%s GiB</text>`+"\n", x, top+h+18, num(p.gib))
	}
	line := func(get func(point) float64, color, name string, row int) {
		var path []string
		for _, p := range pts {
			v := get(p)
			if math.IsNaN(v) {
				continue
			}
			x, y := gx(p.gib), gy(v*1000)
			path = append(path, fmt.Sprintf("%.1f,%.1f", x, y))
			fmt.Fprintf(&s, `<circle cx="%.1f" cy="%.1f" r="4" fill="%s"/><text x="%.1f" y="%.1f" fill="%s">%s</text>`+"\n", x, y, color, x+6, y-6, color, num(v*1000))
		}
		if len(path) == 0 {
			return
		}
		fmt.Fprintf(&s, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", strings.Join(path, " "), color)
		fmt.Fprintf(&s, `<text x="%d" y="%d" fill="%s">%s</text>`+"\n", left+w+15, top+20+row*18, color, name)
	}
	// The target for a linked clone, whatever the disk's size.
	ty := gy(100)
	fmt.Fprintf(&s, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#888" stroke-dasharray="6,4"/><text x="%d" y="%.1f" fill="#888">target: 100 ms</text>`+"\n", left, ty, left+w, ty, left+w+15, ty+4)
	line(func(p point) float64 { return p.lodge }, "#2a7", "Lodge linked clone", 0)
	line(func(p point) float64 { return p.peer }, "#c44", "libvirt copy (vol-clone)", 1)
	s.WriteString("</svg>\n")
	return s.String()
}

func nz(v float64) float64 {
	if math.IsNaN(v) {
		return 0
	}
	return v
}
