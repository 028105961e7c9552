package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// GuestProbePath is where the probe is copied inside a guest. /run is a
// tmpfs on every systemd or busybox init, so nothing is left on the
// guest's disk, and it is not mounted noexec.
const GuestProbePath = "/run/lodge-probe"

// Guest is a running VM as the runner needs it.
type Guest interface {
	// Install writes an executable file in the guest.
	Install(ctx context.Context, path string, data []byte) error
	// Run runs argv in the guest and returns its standard output; a
	// non-zero exit is an error that carries the standard error.
	Run(ctx context.Context, argv []string) ([]byte, error)
	// AttachDisk plugs a new scratch disk of size bytes into the guest on
	// bus. detach unplugs it and deletes it.
	AttachDisk(ctx context.Context, bus string, size int64) (detach func(context.Context) error, err error)
}

// Host runs the probe on the bare host.
type Host interface {
	Run(ctx context.Context, args []string) ([]byte, error)
}

// Local runs a probe binary on this host, in a child process so that its
// threads and buffers do not share the daemon's runtime.
type Local struct{ Probe string }

var _ Host = Local{}

// Run implements Host.
func (l Local) Run(ctx context.Context, args []string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, l.Probe, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("host probe %s: %w: %s", l.Probe, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// Options say what a run measures.
type Options struct {
	Duration time.Duration
	Repeats  int
	// Threads for the all-CPU tests on both sides: the VM's vCPUs.
	Threads int
	// MemBytes caps the memory tests' buffer; the guest may use less if
	// it is short of memory, and the host then uses the same.
	MemBytes int64
	// DiskBytes is the area the disk tests use, on each scratch disk and
	// in HostDisk.
	DiskBytes int64
	Buses     []string
	// HostDisk is a file the host's disk tests may create and overwrite,
	// on the file system that holds the VM's disks.
	HostDisk string
	// Busy guests are kept busy while the guest is measured. Hush, if
	// set, pauses them (true) for the host's rounds and resumes them
	// (false): the host's figures are the bare host's, so the
	// percentages show what the neighbours cost.
	Busy     []Guest
	Hush     func(ctx context.Context, paused bool) error
	Progress func(stage string, done, total int64)
	Log      *slog.Logger
}

// busyMem is the memory each busy guest's burner keeps rewriting.
const busyMem = 32 << 20

// Run measures g against h: probe, the probe binary, is installed in g
// (and in each busy guest), then each round runs it in the guest, once
// per bus (the CPU and memory tests with the first bus only), and once on
// the host. Rounds alternate the two sides so that a slow spell of a
// shared machine hits both.
func Run(ctx context.Context, g Guest, h Host, probe []byte, o Options) ([]api.BenchRow, error) {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string, int64, int64) {}
	}
	total := int64(o.Repeats * (len(o.Buses) + 1))
	progress("install probe", 0, total)
	if err := g.Install(ctx, GuestProbePath, probe); err != nil {
		return nil, fmt.Errorf("install probe: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if _, err := g.Run(cctx, []string{"rm", "-f", GuestProbePath}); err != nil {
			log.Debug("remove probe from guest", "err", err)
		}
	}()

	stopBusy, err := startBusy(ctx, o.Busy, probe, log)
	if err != nil {
		return nil, err
	}
	defer stopBusy()

	disks := make([]string, len(o.Buses))
	for i, bus := range o.Buses {
		progress("attach "+bus+" disk", 0, total)
		size := ScratchSize(o.DiskBytes, i)
		detach, err := g.AttachDisk(ctx, bus, size)
		if err != nil {
			return nil, fmt.Errorf("attach scratch disk on bus %s: %w", bus, err)
		}
		defer func() {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			if err := detach(cctx); err != nil {
				log.Warn("detach scratch disk", "bus", bus, "err", err)
			}
		}()
		disks[i] = "size:" + strconv.FormatInt(size, 10)
	}

	hostSide, guestSide := newCollector(), newCollector()
	var step int64
	mem := o.MemBytes
	for r := range o.Repeats {
		round := fmt.Sprintf("round %d/%d", r+1, o.Repeats)
		for i, bus := range o.Buses {
			progress(round+": guest, "+bus+" disk", step, total)
			groups := "cpu,mem,disk"
			if i > 0 {
				groups = "disk"
			}
			args := probeArgs(o, groups, mem, disks[i])
			if i == 0 {
				args = append(args, "-mem-fit")
			}
			if r == 0 && i == 0 {
				// A probe that a killed run left behind would skew this
				// one and hold the memory it needs.
				args = append(args, "-evict")
			}
			out, err := g.Run(ctx, append([]string{GuestProbePath}, args...))
			if err != nil {
				return nil, fmt.Errorf("%s in the guest (%s disk): %w", round, bus, err)
			}
			res, err := decodeResult(out)
			if err != nil {
				return nil, fmt.Errorf("%s in the guest: %w", round, err)
			}
			if i == 0 && res.MemBytes > 0 {
				mem = res.MemBytes
			}
			guestSide.add(bus, res)
			step++
		}
		progress(round+": host", step, total)
		out, err := hostRound(ctx, h, o, probeArgs(o, "cpu,mem,disk", mem, o.HostDisk))
		if err != nil {
			return nil, fmt.Errorf("%s on the host: %w", round, err)
		}
		res, err := decodeResult(out)
		if err != nil {
			return nil, fmt.Errorf("%s on the host: %w", round, err)
		}
		hostSide.add("", res)
		step++
	}
	progress("done", total, total)
	return Rows(hostSide, guestSide), nil
}

// hostRound runs the probe on the host with the busy guests paused.
func hostRound(ctx context.Context, h Host, o Options, args []string) ([]byte, error) {
	if o.Hush == nil || len(o.Busy) == 0 {
		return h.Run(ctx, args)
	}
	if err := o.Hush(ctx, true); err != nil {
		return nil, fmt.Errorf("pause the busy VMs: %w", err)
	}
	out, err := h.Run(ctx, args)
	if rerr := o.Hush(context.WithoutCancel(ctx), false); rerr != nil && err == nil {
		err = fmt.Errorf("resume the busy VMs: %w", rerr)
	}
	return out, err
}

// ScratchSize is the size of the scratch disk for the i-th bus: each gets
// its own odd size, by which the probe finds it among the guest's disks
// on any bus.
func ScratchSize(diskBytes int64, i int) int64 { return diskBytes + int64(i+3)<<20 }

func probeArgs(o Options, groups string, mem int64, disk string) []string {
	return []string{"run",
		"-duration", o.Duration.String(),
		"-threads", strconv.Itoa(o.Threads),
		"-mem", strconv.FormatInt(mem, 10),
		"-disk", disk,
		"-disk-bytes", strconv.FormatInt(o.DiskBytes, 10),
		"-groups", groups,
	}
}

func decodeResult(out []byte) (ProbeResult, error) {
	var res ProbeResult
	if err := json.Unmarshal(out, &res); err != nil {
		return ProbeResult{}, fmt.Errorf("probe printed %q: %w", truncate(out, 200), err)
	}
	if len(res.Samples) == 0 {
		return ProbeResult{}, errors.New("probe measured nothing")
	}
	return res, nil
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}

// startBusy installs the probe in each busy guest and starts it burning;
// stop ends the burners (the guests' probes stop on their own an hour
// later if the agent cannot be reached to stop them).
func startBusy(ctx context.Context, busy []Guest, probe []byte, log *slog.Logger) (stop func(), err error) {
	bctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	stop = func() {
		cancel()
		wg.Wait()
	}
	for i, g := range busy {
		if err := g.Install(ctx, GuestProbePath, probe); err != nil {
			stop()
			return nil, fmt.Errorf("install probe in busy vm %d: %w", i+1, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := g.Run(bctx, []string{GuestProbePath, "burn", "-for", "1h", "-mem", strconv.Itoa(busyMem)})
			if err != nil && bctx.Err() == nil {
				log.Warn("busy vm stopped burning", "vm", i+1, "err", err)
			}
		}()
	}
	return stop, nil
}

// SummarizeRows sums rows up per group as the geometric mean of their percentages,
// the fair average of ratios.
func SummarizeRows(rows []api.BenchRow) api.BenchSummary {
	mean := func(prefix string) float64 {
		var logSum float64
		n := 0
		for _, r := range rows {
			if strings.HasPrefix(r.Test, prefix) && r.Percent > 0 {
				logSum += math.Log(r.Percent)
				n++
			}
		}
		if n == 0 {
			return 0
		}
		return math.Round(math.Exp(logSum/float64(n))*10) / 10
	}
	return api.BenchSummary{CPU: mean("cpu."), Memory: mean("mem."), Disk: mean("disk.")}
}
