package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/bench"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/units"
)

func (d *Daemon) benchRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/vms/{name}/bench", d.benchVM)
	mux.HandleFunc("GET /v1/vms/{name}/bench", d.benchHistory)
}

// Limits on a benchmark request: enough for a careful run, not so much
// that a typo ties the host up for a day.
const (
	benchMaxRepeats  = 20
	benchMaxDuration = time.Minute
	benchMaxWith     = 16
	benchMinDisk     = 16 << 20
	benchMaxDisk     = 16 << 30
	benchMemBytes    = 64 << 20
)

// benchPlan is a validated request.
type benchPlan struct {
	duration time.Duration
	repeats  int
	with     int
	buses    []string
	disk     int64
	save     bool
}

func parseBench(name string, req api.BenchRequest) (benchPlan, error) {
	p := benchPlan{duration: time.Second, repeats: 3, with: req.With, buses: req.DiskBuses, disk: 256 << 20, save: req.Save}
	bad := func(format string, args ...any) (benchPlan, error) {
		return benchPlan{}, fmt.Errorf("bench vm %q: %w: "+format, append([]any{name, errdefs.ErrInvalid}, args...)...)
	}
	if req.Duration != "" {
		d, err := time.ParseDuration(req.Duration)
		if err != nil {
			return bad("duration %q: not a duration like 1s or 500ms", req.Duration)
		}
		p.duration = d
	}
	if p.duration < 10*time.Millisecond || p.duration > benchMaxDuration {
		return bad("duration %s: want 10ms to %s", p.duration, benchMaxDuration)
	}
	if req.Repeats != 0 {
		p.repeats = req.Repeats
	}
	if p.repeats < 1 || p.repeats > benchMaxRepeats {
		return bad("repeats %d: want 1 to %d", p.repeats, benchMaxRepeats)
	}
	if p.with < 0 || p.with > benchMaxWith {
		return bad("with %d: want 0 to %d extra VMs", p.with, benchMaxWith)
	}
	if len(p.buses) == 0 {
		p.buses = []string{qemu.BusVirtio}
	}
	for i, b := range p.buses {
		if !slices.Contains(qemu.Buses, b) {
			return bad("disk bus %q: want %s", b, strings.Join(qemu.Buses, ", "))
		}
		if slices.Index(p.buses, b) != i {
			return bad("disk bus %q given twice", b)
		}
	}
	if req.DiskSize != 0 {
		p.disk = req.DiskSize
	}
	if p.disk < benchMinDisk || p.disk > benchMaxDisk || p.disk%(1<<20) != 0 {
		return bad("disk size %s: want a whole number of MiB from %s to %s", units.FormatSize(p.disk), units.FormatSize(benchMinDisk), units.FormatSize(benchMaxDisk))
	}
	return p, nil
}

func (d *Daemon) benchVM(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	var req api.BenchRequest
	if !decode(w, r, &req) {
		return
	}
	plan, err := parseBench(name, req)
	if err != nil {
		writeErr(w, err)
		return
	}
	// Refuse at once what cannot start, rather than in the operation.
	v, err := d.vms.Get(r.Context(), name)
	if err != nil {
		writeErr(w, err)
		return
	}
	switch {
	case v.State == api.StateRunning && slices.Contains(plan.buses, qemu.BusIDE):
		writeErr(w, fmt.Errorf("bench vm %q: %w: disk bus ide: QEMU cannot hot-plug an IDE disk into a running VM; stop it, and lodge bench boots it with its scratch disks attached", name, errdefs.ErrInvalid))
		return
	case v.State != api.StateRunning && v.State != api.StateStopped:
		writeErr(w, fmt.Errorf("bench vm %q: %w: it is %s; a benchmark needs it running, or stopped (then Lodge boots it for the run)", name, errdefs.ErrState, v.State))
		return
	}
	probe, err := os.ReadFile(d.cfg.Probe)
	if err != nil {
		writeErr(w, fmt.Errorf("bench vm %q: read the probe program (build it with make build, or set LODGE_PROBE): %w", name, err))
		return
	}
	accepted(w, d.ops.start("bench", name, func(ctx context.Context, o *operation) (any, error) {
		return d.runBench(ctx, o, name, plan, probe)
	}))
}

func (d *Daemon) runBench(ctx context.Context, o *operation, name string, p benchPlan, probe []byte) (api.BenchReport, error) {
	started := time.Now()
	v, err := d.vms.Get(ctx, name)
	if err != nil {
		return api.BenchReport{}, err
	}
	release, err := d.vms.ReserveForBench(name)
	if err != nil {
		return api.BenchReport{}, err
	}
	defer release()
	g, dir, stopAfter, err := d.benchTarget(ctx, o, v, p)
	if err != nil {
		return api.BenchReport{}, err
	}
	defer stopAfter()
	busy, names, cleanup, err := d.startBusyVMs(ctx, o, v, p.with)
	defer cleanup()
	if err != nil {
		return api.BenchReport{}, err
	}
	hostDisk := filepath.Join(dir, ".bench-host-"+name)
	defer func() { _ = os.Remove(hostDisk) }()
	rows, err := bench.Run(ctx, g, bench.Local{Probe: d.cfg.Probe}, probe, bench.Options{
		Duration:  p.duration,
		Repeats:   p.repeats,
		Threads:   v.CPUs,
		MemBytes:  benchMemBytes,
		DiskBytes: p.disk,
		Buses:     p.buses,
		HostDisk:  hostDisk,
		Busy:      busy,
		Hush:      d.hushBusy(names),
		Progress:  o.Steps,
		Log:       d.log.With("component", "bench", "vm", name),
	})
	if err != nil {
		return api.BenchReport{}, fmt.Errorf("bench vm %q: %w", name, err)
	}
	accel := d.currentAccel()
	rep := api.BenchReport{
		VM: name, Accel: accel.Accel, CPUs: v.CPUs, Memory: v.Memory, HostCPUs: runtime.NumCPU(),
		Repeats: p.repeats, Duration: p.duration.Seconds(), With: p.with, DiskBuses: p.buses, DiskSize: p.disk,
		CreatedAt: started.UTC(), Seconds: time.Since(started).Seconds(), Rows: rows,
	}
	sum := bench.SummarizeRows(rows)
	rep.Summary = &sum
	rep.Booted = v.State == api.StateStopped
	rep.Notes = benchNotes(rep)
	if p.save {
		if err := d.saveBench(&rep); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// benchTarget readies the VM under test: a running one as it is (scratch
// disks are hot-plugged later); a stopped one booted with its scratch
// disks attached, and stopped again, scratch disks removed, by stopAfter.
func (d *Daemon) benchTarget(ctx context.Context, o *operation, v api.VM, p benchPlan) (bench.Guest, string, func(), error) {
	if v.State != api.StateStopped {
		g, dir, err := d.vms.BenchGuest(ctx, v.Name)
		return g, dir, func() {}, err
	}
	sizes := make([]int64, len(p.buses))
	for i := range p.buses {
		sizes[i] = bench.ScratchSize(p.disk, i)
	}
	o.Steps("boot with scratch disks", 0, 0)
	g, dir, err := d.vms.BootForBench(ctx, v.Name, p.buses, sizes)
	if err != nil {
		return nil, "", nil, err
	}
	stopAfter := func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Minute)
		defer cancel()
		if err := d.vms.StopAfterBench(cctx, v.Name, p.buses); err != nil {
			d.log.Warn("stop vm after bench", "vm", v.Name, "err", err)
		}
	}
	return g, dir, stopAfter, nil
}

func benchNotes(rep api.BenchReport) []string {
	var notes []string
	if rep.Booted {
		notes = append(notes, "the VM was stopped: Lodge booted it for the run with its scratch disks attached, and stopped it after")
	}
	if rep.Accel != "kvm" {
		notes = append(notes, "accelerator "+rep.Accel+": QEMU emulates the guest's CPU in software, so these figures are for software emulation and say little about the same VM under KVM")
	}
	for _, r := range rep.Rows {
		if r.HostBuffered {
			notes = append(notes, "the host's file system refused direct I/O, so the host's disk figures include its page cache")
			break
		}
	}
	if rep.With > 0 {
		notes = append(notes, fmt.Sprintf("%d extra VMs kept their vCPUs busy while the guest was measured, and were paused while the host was", rep.With))
	}
	notes = append(notes, "scratch disks are qcow2 files beside the VM's disks, opened as its disks are (host page cache on), so guest disk figures can exceed the host's direct I/O")
	return notes
}

// startBusyVMs starts n VMs like v (same image, CPUs and memory) for the
// benchmark's company; cleanup deletes them, whatever happened.
func (d *Daemon) startBusyVMs(ctx context.Context, o *operation, v api.VM, n int) ([]bench.Guest, []string, func(), error) {
	var names []string
	cleanup := func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		for _, b := range names {
			if err := d.vms.Delete(cctx, b, true); err != nil {
				d.log.Warn("delete busy vm", "vm", b, "err", err)
			}
		}
	}
	if n == 0 {
		return nil, nil, cleanup, nil
	}
	if v.Image == "" {
		return nil, nil, cleanup, fmt.Errorf("bench vm %q: %w: it has no image to start the %d busy VMs from", v.Name, errdefs.ErrInvalid, n)
	}
	var guests []bench.Guest
	tag := newID()[:6]
	for i := range n {
		b := fmt.Sprintf("bench-busy%d-%s", i+1, tag)
		o.Steps(fmt.Sprintf("start busy vm %d/%d", i+1, n), 0, 0)
		if _, err := d.vms.Create(ctx, api.CreateVM{Name: b, Image: v.Image, CPUs: v.CPUs, Memory: v.Memory}); err != nil {
			return nil, nil, cleanup, fmt.Errorf("bench vm %q: busy vm %s: %w", v.Name, b, err)
		}
		names = append(names, b)
		if _, err := d.vms.Start(ctx, b); err != nil {
			return nil, nil, cleanup, fmt.Errorf("bench vm %q: busy vm %s: %w", v.Name, b, err)
		}
		g, _, err := d.vms.BenchGuest(ctx, b)
		if err != nil {
			return nil, nil, cleanup, err
		}
		guests = append(guests, g)
	}
	return guests, names, cleanup, nil
}

// hushBusy pauses or resumes the busy VMs.
func (d *Daemon) hushBusy(names []string) func(ctx context.Context, paused bool) error {
	return func(ctx context.Context, paused bool) error {
		for _, n := range names {
			var err error
			if paused {
				_, err = d.vms.Pause(ctx, n)
			} else {
				_, err = d.vms.Resume(ctx, n)
			}
			if err != nil {
				return err
			}
		}
		return nil
	}
}

func (d *Daemon) benchDir(vm string) string { return filepath.Join(d.cfg.Home, "bench", vm) }

// saveBench writes the report where bench history finds it, atomically:
// a crash leaves the old history, never half a report.
func (d *Daemon) saveBench(rep *api.BenchReport) error {
	dir := d.benchDir(rep.VM)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("save bench of vm %q: %w", rep.VM, err)
	}
	rep.ID = rep.CreatedAt.Format("20060102-150405") + "-" + newID()[:6]
	rep.Saved = true
	raw, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(dir, rep.ID+".json")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, raw, 0o640); err != nil {
		return fmt.Errorf("save bench of vm %q: %w", rep.VM, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save bench of vm %q: %w", rep.VM, err)
	}
	return nil
}

// benchHistory lists the saved reports of a VM, oldest first. The VM
// need not exist any more: its history outlives it.
func (d *Daemon) benchHistory(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	entries, err := os.ReadDir(d.benchDir(name))
	if errors.Is(err, os.ErrNotExist) {
		if _, gerr := d.vms.Get(r.Context(), name); gerr != nil {
			writeErr(w, gerr)
			return
		}
		writeJSON(w, http.StatusOK, []api.BenchReport{})
		return
	}
	if err != nil {
		writeErr(w, err)
		return
	}
	out := []api.BenchReport{}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		raw, err := os.ReadFile(filepath.Join(d.benchDir(name), e.Name()))
		if err != nil {
			writeErr(w, err)
			return
		}
		var rep api.BenchReport
		if err := json.Unmarshal(raw, &rep); err != nil {
			d.log.Warn("unreadable bench report", "file", e.Name(), "err", err)
			continue
		}
		out = append(out, rep)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	writeJSON(w, http.StatusOK, out)
}
