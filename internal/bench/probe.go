// Package bench measures what a VM gets compared with the bare host.
//
// The probe half (this file and disk.go) is the micro-benchmark program:
// it runs unchanged on the host and, copied in through the guest agent,
// inside the guest, so both sides execute the same machine code. The
// runner half (run.go) drives both sides through interfaces, and the
// statistics and report (stats.go, report.go) turn repeated samples into
// rows of host value, guest value and guest as a percentage of host.
package bench

import (
	"context"
	"fmt"
	"math"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// Test names, as they appear in reports and JSON.
const (
	CPUIntSingle    = "cpu.int.single"
	CPUIntAll       = "cpu.int.all"
	CPUFloatSingle  = "cpu.float.single"
	CPUFloatAll     = "cpu.float.all"
	MemRead         = "mem.read"
	MemWrite        = "mem.write"
	MemCopy         = "mem.copy"
	MemLatency      = "mem.latency"
	DiskSeqWrite    = "disk.seq_write"
	DiskSeqRead     = "disk.seq_read"
	DiskRandWrite4K = "disk.rand_write_4k"
	DiskRandRead4K  = "disk.rand_read_4k"
)

// Groups of tests a probe run can be limited to.
const (
	GroupCPU  = "cpu"
	GroupMem  = "mem"
	GroupDisk = "disk"
)

// Sample is one measurement of one test.
type Sample struct {
	Test  string  `json:"test"`
	Unit  string  `json:"unit"`
	Value float64 `json:"value"`
	// Lower is set for tests where a smaller value is better (latency).
	Lower bool `json:"lower,omitempty"`
	// Buffered is set when the disk test could not use direct I/O (the
	// file system refused O_DIRECT) and the page cache was in play.
	Buffered bool `json:"buffered,omitempty"`
}

// ProbeConfig says what one probe run measures.
type ProbeConfig struct {
	// Duration is how long each test runs.
	Duration time.Duration
	// Threads is how many threads the all-CPU tests use.
	Threads int
	// MemBytes is the size of the buffer the memory tests walk.
	MemBytes int64
	// DiskPath is a block device or file the disk tests may overwrite;
	// empty skips them.
	DiskPath string
	// DiskBytes is how much of DiskPath the disk tests use.
	DiskBytes int64
	// Groups limits the run to these groups; empty runs all.
	Groups []string
}

// ProbeResult is what a probe run prints, as JSON.
type ProbeResult struct {
	CPUs     int      `json:"cpus"`
	MemBytes int64    `json:"mem_bytes"`
	Samples  []Sample `json:"samples"`
}

func (c ProbeConfig) wants(group string) bool {
	if len(c.Groups) == 0 {
		return true
	}
	for _, g := range c.Groups {
		if g == group {
			return true
		}
	}
	return false
}

// Validate checks a probe configuration.
func (c ProbeConfig) Validate() error {
	switch {
	case c.Duration < time.Millisecond:
		return fmt.Errorf("probe: duration %s: want at least 1ms", c.Duration)
	case c.Threads < 1:
		return fmt.Errorf("probe: threads %d: want at least 1", c.Threads)
	case c.wants(GroupMem) && c.MemBytes < 1<<20:
		return fmt.Errorf("probe: memory buffer %d bytes: want at least 1 MiB", c.MemBytes)
	case c.DiskPath != "" && c.DiskBytes < 2*seqBlock:
		return fmt.Errorf("probe: disk area %d bytes: want at least %d", c.DiskBytes, 2*seqBlock)
	}
	for _, g := range c.Groups {
		if g != GroupCPU && g != GroupMem && g != GroupDisk {
			return fmt.Errorf("probe: group %q: want cpu, mem or disk", g)
		}
	}
	return nil
}

// Probe runs the micro-benchmarks c asks for, one after another, each for
// c.Duration.
func Probe(ctx context.Context, c ProbeConfig) (ProbeResult, error) {
	if err := c.Validate(); err != nil {
		return ProbeResult{}, err
	}
	if runtime.GOMAXPROCS(0) < c.Threads {
		runtime.GOMAXPROCS(c.Threads)
	}
	res := ProbeResult{CPUs: runtime.NumCPU(), MemBytes: c.MemBytes}
	add := func(s Sample) { res.Samples = append(res.Samples, s) }
	if c.wants(GroupCPU) {
		add(Sample{Test: CPUIntSingle, Unit: "Mops/s", Value: rate(ctx, 1, c.Duration, intKernel) / 1e6})
		add(Sample{Test: CPUIntAll, Unit: "Mops/s", Value: rate(ctx, c.Threads, c.Duration, intKernel) / 1e6})
		add(Sample{Test: CPUFloatSingle, Unit: "MFLOP/s", Value: rate(ctx, 1, c.Duration, floatKernel) / 1e6})
		add(Sample{Test: CPUFloatAll, Unit: "MFLOP/s", Value: rate(ctx, c.Threads, c.Duration, floatKernel) / 1e6})
	}
	if c.wants(GroupMem) {
		for _, s := range memTests(ctx, c) {
			add(s)
		}
	}
	if c.wants(GroupDisk) && c.DiskPath != "" {
		ds, err := diskTests(ctx, c)
		if err != nil {
			return ProbeResult{}, err
		}
		res.Samples = append(res.Samples, ds...)
	}
	if err := ctx.Err(); err != nil {
		return ProbeResult{}, err
	}
	return res, nil
}

// A kernel does n units of work and returns a value that depends on all
// of it, so the compiler cannot drop the work.
type kernel func(n int, seed uint64) uint64

// batch is how many units a kernel does between clock reads: enough that
// reading the clock costs nothing measurable, few enough to stop on time.
const batch = 1 << 16

// sink keeps kernel results alive.
var sink atomic.Uint64

// rate runs k on threads goroutines for d and returns units per second.
func rate(ctx context.Context, threads int, d time.Duration, k kernel) float64 {
	var wg sync.WaitGroup
	counts := make([]int64, threads)
	start := time.Now()
	deadline := start.Add(d)
	for t := range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var acc uint64
			for n := int64(0); ; n += batch {
				if time.Now().After(deadline) || ctx.Err() != nil {
					counts[t] = n
					break
				}
				acc += k(batch, uint64(t)+1)
			}
			sink.Add(acc)
		}()
	}
	wg.Wait()
	var total int64
	for _, c := range counts {
		total += c
	}
	return float64(total) / time.Since(start).Seconds()
}

// intKernel: one unit is one xorshift step and a multiply-add, all
// integer ALU work that stays in registers.
func intKernel(n int, seed uint64) uint64 {
	x, acc := seed|1, uint64(0)
	for range n {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		acc += x * 0x9e3779b97f4a7c15
	}
	return acc
}

// floatKernel: one unit is one floating-point operation; four
// independent multiply-add chains keep the FPU's pipeline full.
func floatKernel(n int, seed uint64) uint64 {
	a, b, c, d := float64(seed), float64(seed)+0.5, float64(seed)+0.25, float64(seed)+0.125
	const m, k = 0.999999, 0.000001
	for range n / 8 {
		a = a*m + k
		b = b*m + k
		c = c*m + k
		d = d*m + k
	}
	return math.Float64bits(a + b + c + d)
}

// memTests measures bandwidth by walking a buffer of c.MemBytes, and
// latency by chasing pointers through it in a random order.
func memTests(ctx context.Context, c ProbeConfig) []Sample {
	words := int(c.MemBytes / 8)
	buf := make([]uint64, words)
	for i := range buf {
		buf[i] = uint64(i)
	}
	bytes := float64(len(buf) * 8)
	var out []Sample
	mbps := func(test string, pass func()) {
		// A cancelled run's figures are thrown away (Probe returns the
		// context's error), so timed's error needs no look here.
		passes, elapsed, _ := timed(ctx, c.Duration, func(int64) error { pass(); return nil })
		out = append(out, Sample{Test: test, Unit: "MB/s", Value: float64(passes) * bytes / elapsed / 1e6})
	}
	mbps(MemRead, func() { sink.Add(sumWords(buf)) })
	mbps(MemWrite, func() { fillWords(buf, sink.Load()|1) })
	half := len(buf) / 2
	// A copy reads half the buffer and writes the other half: it moves
	// as many bytes as one pass over the whole buffer.
	mbps(MemCopy, func() { copy(buf[half:], buf[:half]) })
	out = append(out, Sample{Test: MemLatency, Unit: "ns", Lower: true, Value: chaseLatency(ctx, buf, c.Duration)})
	buf = nil
	debug.FreeOSMemory()
	return out
}

func sumWords(buf []uint64) uint64 {
	var a, b, c, d uint64
	i := 0
	for ; i+4 <= len(buf); i += 4 {
		a += buf[i]
		b += buf[i+1]
		c += buf[i+2]
		d += buf[i+3]
	}
	for ; i < len(buf); i++ {
		a += buf[i]
	}
	return a + b + c + d
}

func fillWords(buf []uint64, v uint64) {
	for i := range buf {
		buf[i] = v
	}
}

// lineWords is a cache line in words: the chase visits one word per line
// so that every step is a miss once the buffer exceeds the caches.
const lineWords = 8

// chaseLatency follows the cycle linkCycle lays through buf for d and
// returns nanoseconds per step. Each step's address depends on the last
// load, so steps cannot overlap and the time per step is the memory's
// latency.
func chaseLatency(ctx context.Context, buf []uint64, d time.Duration) float64 {
	if !linkCycle(buf) {
		return 0
	}
	var steps float64
	p := uint64(0)
	start := time.Now()
	for time.Since(start) < d && ctx.Err() == nil {
		for range 1 << 14 {
			p = buf[p]
		}
		steps += 1 << 14
	}
	sink.Add(p)
	return float64(time.Since(start).Nanoseconds()) / steps
}

// linkCycle links the buffer's cache lines into one random cycle through
// all of them (Sattolo's algorithm): the first word of each line holds
// the index of the next line's first word. It reports false if buf holds
// fewer than two lines.
func linkCycle(buf []uint64) bool {
	lines := len(buf) / lineWords
	if lines < 2 {
		return false
	}
	order := make([]uint32, lines)
	for i := range order {
		order[i] = uint32(i)
	}
	rng := uint64(0x2545f4914f6cdd1d)
	for i := lines - 1; i > 0; i-- {
		rng ^= rng << 13
		rng ^= rng >> 7
		rng ^= rng << 17
		j := int(rng % uint64(i))
		order[i], order[j] = order[j], order[i]
	}
	for i := range lines {
		buf[int(order[i])*lineWords] = uint64(order[(i+1)%lines]) * lineWords
	}
	return true
}

// Burn keeps every CPU and some memory busy until ctx ends: the load an
// extra VM puts on the host during a benchmark with company.
func Burn(ctx context.Context, memBytes int64) {
	threads := runtime.NumCPU()
	var wg sync.WaitGroup
	for t := range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]uint64, memBytes/8/int64(threads))
			for ctx.Err() == nil {
				v := sink.Add(intKernel(batch, uint64(t)+1))
				fillWords(buf, v)
			}
		}()
	}
	wg.Wait()
}
