package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/client"
	"github.com/lodge-vm/lodge/internal/bundle"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/ovf"
	"github.com/lodge-vm/lodge/internal/storage"
	"github.com/lodge-vm/lodge/internal/vm"
)

// bundleSources reads each exported disk's allocation map and returns the
// bundle's manifest and sources, and what to close after.
func bundleSources(ctx context.Context, ex *vm.Export) (bundle.Manifest, []bundle.Source, func(), error) {
	v := ex.VM
	m := bundle.Manifest{
		CreatedAt: time.Now().UTC(), Consistency: ex.Consistency,
		VM: bundle.VMSpec{
			Name: v.Name, UUID: v.UUID, Hostname: v.Hostname, InstanceID: v.InstanceID, Image: v.Image,
			CPUs: v.CPUs, MaxCPUs: v.MaxCPUs, Memory: v.Memory, MaxMemory: v.MaxMemory, MinMemory: v.MinMemory,
			CloudInit: ex.CloudInit,
		},
	}
	if m.VM.MaxMemory == m.VM.Memory {
		m.VM.MaxMemory = 0
	}
	for _, n := range v.NICs {
		m.VM.NICs = append(m.VM.NICs, bundle.NIC{Network: n.Network, MAC: n.MAC})
	}
	if ex.Tree != nil {
		return treeSources(ctx, ex, m)
	}
	var srcs []bundle.Source
	for _, d := range ex.Disks {
		src, err := diskSource(ctx, d)
		if err != nil {
			return m, nil, nil, fmt.Errorf("export vm %q: %w", v.Name, err)
		}
		srcs = append(srcs, src)
	}
	return m, srcs, func() {}, nil
}

// diskSource maps the data of one disk of an export.
func diskSource(ctx context.Context, d vm.ExportDisk) (bundle.Source, error) {
	ext, err := d.Data.DataExtents(ctx, 0, d.Data.Size())
	if err != nil {
		return bundle.Source{}, fmt.Errorf("disk %q: map its data: %w", d.Name, err)
	}
	src := bundle.Source{Name: d.Name, Bus: d.Bus, Size: d.Data.Size(), Data: d.Data}
	for _, e := range ext {
		// Block status is in sectors at least; round outward so a
		// region never starts or ends inside a tar block.
		start, end := e.Offset&^511, min((e.Offset+e.Length+511)&^511, src.Size)
		if n := len(src.Extents); n > 0 && src.Extents[n-1].Offset+src.Extents[n-1].Length >= start {
			src.Extents[n-1].Length = end - src.Extents[n-1].Offset
			continue
		}
		src.Extents = append(src.Extents, bundle.Extent{Offset: start, Length: end - start})
	}
	return src, nil
}

// treeSources adds a snapshot tree to m: each disk's base over NBD, and
// the layer and memory files as they are.
func treeSources(ctx context.Context, ex *vm.Export, m bundle.Manifest) (bundle.Manifest, []bundle.Source, func(), error) {
	t := ex.Tree
	for _, d := range ex.Disks {
		bd := bundle.Disk{Name: d.Name, Bus: d.Bus, Size: d.Size, Top: t.Tops[d.Name]}
		if t.Bases[d.Name] {
			bd.Base, bd.BaseSize = bundle.BaseEntry(d.Name), d.Data.Size()
		}
		m.Disks = append(m.Disks, bd)
	}
	m.Layers, m.Snapshots, m.CurrentSnapshot = t.Layers, t.Snapshots, t.Current
	var files []*os.File
	closeAll := func() {
		for _, f := range files {
			_ = f.Close()
		}
	}
	var srcs []bundle.Source
	for _, e := range m.Entries() {
		if path, ok := t.Files[e.Name]; ok {
			f, err := os.Open(path)
			if err != nil {
				closeAll()
				return m, nil, nil, fmt.Errorf("export vm %q: %w", m.VM.Name, err)
			}
			files = append(files, f)
			ext, err := storage.DataExtents(f)
			if err != nil {
				closeAll()
				return m, nil, nil, fmt.Errorf("export vm %q: %s: %w", m.VM.Name, path, err)
			}
			src := bundle.Source{Entry: e.Name, Size: e.RealSize, Data: zeroPadded{f}}
			for _, x := range ext {
				src.Extents = append(src.Extents, bundle.Extent{Offset: x[0], Length: x[1]})
			}
			srcs = append(srcs, src)
			continue
		}
		for _, d := range ex.Disks {
			if bundle.BaseEntry(d.Name) == e.Name {
				src, err := diskSource(ctx, d)
				if err != nil {
					closeAll()
					return m, nil, nil, fmt.Errorf("export vm %q: %w", m.VM.Name, err)
				}
				src.Entry = e.Name
				srcs = append(srcs, src)
			}
		}
	}
	return m, srcs, closeAll, nil
}

// zeroPadded reads a file as if it went on in zeros, up to the whole
// block its entry is rounded to.
type zeroPadded struct{ f *os.File }

func (z zeroPadded) ReadAt(p []byte, off int64) (int, error) {
	n, err := z.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		return len(p), nil
	}
	return n, err
}

// exportVM streams a bundle of the VM. Once the stream has begun an
// error can no longer change the status, so the connection is cut
// instead: the client sees a broken stream, never a short success.
func (d *Daemon) exportVM(w http.ResponseWriter, r *http.Request) {
	comp, err := bundle.ParseCompression(r.URL.Query().Get("compression"))
	if err != nil {
		writeErr(w, fmt.Errorf("export: %w: %w", errdefs.ErrInvalid, err))
		return
	}
	format := r.URL.Query().Get("format")
	if format != "" && format != "lodge" && format != "ova" {
		writeErr(w, fmt.Errorf("export: format %q: %w: want lodge or ova", format, errdefs.ErrInvalid))
		return
	}
	name := r.PathValue("name")
	withSnaps, _ := strconv.ParseBool(r.URL.Query().Get("snapshots"))
	if withSnaps && format == "ova" {
		writeErr(w, fmt.Errorf("export: %w: an OVA holds no snapshots", errdefs.ErrInvalid))
		return
	}
	ex, err := d.vms.OpenExport(r.Context(), name, withSnaps)
	if err != nil {
		writeErr(w, err)
		return
	}
	defer ex.Close()
	if format == "ova" {
		d.exportOVA(w, r, ex)
		return
	}
	m, srcs, done, err := bundleSources(r.Context(), ex)
	if err != nil {
		writeErr(w, err)
		return
	}
	defer done()
	lw := &lazyWriter{w: w, contentType: "application/vnd.lodge.bundle"}
	start := time.Now()
	st, err := bundle.Write(r.Context(), lw, m, srcs, bundle.WriteOptions{Compression: comp})
	if err != nil {
		lw.fail(d, ex.Cause(err))
		return
	}
	d.log.Info("exported", "vm", name, "consistency", ex.Consistency, "data", st.Data, "bytes", st.Written, "took", time.Since(start).Round(time.Millisecond))
}

// importTarget creates the VM once the manifest is known.
type importTarget struct {
	d    *Daemon
	opts api.ImportOptions
	im   *vm.Import
}

func (t *importTarget) Begin(ctx context.Context, m bundle.Manifest) error {
	spec := vm.ImportSpec{KeepIdentity: t.opts.KeepIdentity, Pool: t.opts.Pool, CloudInit: m.VM.CloudInit}
	spec.Name = m.VM.Name
	if t.opts.Name != "" {
		spec.Name = t.opts.Name
	}
	spec.Project = t.opts.Project
	spec.UUID, spec.InstanceID, spec.Hostname = m.VM.UUID, m.VM.InstanceID, m.VM.Hostname
	spec.CPUs, spec.MaxCPUs, spec.Memory, spec.MaxMemory, spec.MinMemory = m.VM.CPUs, m.VM.MaxCPUs, m.VM.Memory, m.VM.MaxMemory, m.VM.MinMemory
	for _, n := range m.VM.NICs {
		spec.NICs = append(spec.NICs, api.NIC{Network: n.Network, MAC: n.MAC})
	}
	for _, disk := range m.Disks {
		spec.Disks = append(spec.Disks, api.Disk{Name: disk.Name, Bus: disk.Bus, Size: disk.Size})
	}
	for _, e := range m.Entries() {
		spec.Data += e.Data
	}
	if len(m.Layers) > 0 {
		spec.Tree = &m
	}
	im, err := t.d.vms.BeginImport(ctx, spec)
	if err != nil {
		return err
	}
	t.im = im
	return nil
}

func (t *importTarget) Entry(name string) (io.WriterAt, error) { return t.im.Entry(name) }

// finish commits a whole import or undoes a failed one.
func (t *importTarget) finish(ctx context.Context, err error) (api.VM, error) {
	if err != nil {
		if t.im != nil {
			t.im.Abort(context.WithoutCancel(ctx))
		}
		return api.VM{}, err
	}
	return t.im.Commit(ctx)
}

func importOptions(r *http.Request) api.ImportOptions {
	q := r.URL.Query()
	keep, _ := strconv.ParseBool(q.Get("keep_identity"))
	return api.ImportOptions{Name: q.Get("name"), KeepIdentity: keep, Project: q.Get("project"), Pool: q.Get("pool")}
}

// importVM makes a VM from the bundle in the request body. A client that
// goes away cancels it, and nothing is left behind.
func (d *Daemon) importVM(w http.ResponseWriter, r *http.Request) {
	t := &importTarget{d: d, opts: importOptions(r)}
	_, err := bundle.Import(r.Context(), r.Body, t, bundle.ReadOptions{})
	v, err := t.finish(r.Context(), err)
	if err != nil {
		writeErr(w, fmt.Errorf("import: %w", err))
		return
	}
	writeJSON(w, http.StatusCreated, v)
}

// A transfer is an import fed by several requests: when a sender's
// connection breaks, it asks where the transfer stands and sends the
// rest, from the first chunk the receiver does not have.
type transfer struct {
	id     string
	dec    *bundle.Decoder
	stream *bundle.Stream
	target *importTarget
	feed   sync.Mutex // one sender at a time
	// feeding is set while a PUT runs. A sender whose connection broke
	// must wait for the receiver's side of it to wind down: until then
	// Next can still move, and a new PUT would be refused as busy.
	feeding atomic.Bool
	done    chan struct{}
	vm      api.VM
	err     error
	seen    time.Time
	seenMu  sync.Mutex
}

type transfers struct {
	mu   sync.Mutex
	all  map[string]*transfer
	d    *Daemon
	base context.Context
}

// transferIdle is how long a transfer may wait for its sender before it
// is abandoned and what it made removed.
const transferIdle = 10 * time.Minute

func newTransfers(ctx context.Context, d *Daemon) *transfers {
	ts := &transfers{all: map[string]*transfer{}, d: d, base: ctx}
	go ts.reap(ctx)
	return ts
}

func (ts *transfers) reap(ctx context.Context) {
	tick := time.NewTicker(time.Minute)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		ts.mu.Lock()
		for id, t := range ts.all {
			t.seenMu.Lock()
			idle := time.Since(t.seen)
			t.seenMu.Unlock()
			if idle > transferIdle {
				t.stream.Close(errors.New("the sender went away"))
				delete(ts.all, id)
			}
		}
		ts.mu.Unlock()
	}
}

func (d *Daemon) createTransfer(w http.ResponseWriter, r *http.Request) {
	var opts api.ImportOptions
	if !decode(w, r, &opts) {
		return
	}
	dec, err := bundle.NewDecoder()
	if err != nil {
		writeErr(w, err)
		return
	}
	t := &transfer{id: newID(), dec: dec, stream: bundle.NewStream(), target: &importTarget{d: d, opts: opts}, done: make(chan struct{}), seen: time.Now()}
	go func() {
		_, err := bundle.Finish(d.transfers.base, t.stream, t.target, bundle.ReadOptions{Total: dec.Total})
		t.vm, t.err = t.target.finish(d.transfers.base, err)
		t.stream.Close(errors.New("the import has ended"))
		dec.Close()
		close(t.done)
	}()
	d.transfers.mu.Lock()
	d.transfers.all[t.id] = t
	d.transfers.mu.Unlock()
	writeJSON(w, http.StatusCreated, api.Transfer{ID: t.id})
}

func (d *Daemon) transferOr404(w http.ResponseWriter, r *http.Request) *transfer {
	d.transfers.mu.Lock()
	t := d.transfers.all[r.PathValue("id")]
	d.transfers.mu.Unlock()
	if t == nil {
		writeErr(w, fmt.Errorf("transfer %q: %w", r.PathValue("id"), errdefs.ErrNotFound))
	}
	return t
}

func (t *transfer) view() api.Transfer {
	out := api.Transfer{ID: t.id, Next: t.dec.Next(), Feeding: t.feeding.Load()}
	select {
	case <-t.done:
		out.Done = t.err == nil
		if t.err == nil {
			v := t.vm
			out.VM = &v
		}
	default:
	}
	return out
}

func (d *Daemon) getTransfer(w http.ResponseWriter, r *http.Request) {
	if t := d.transferOr404(w, r); t != nil {
		select {
		case <-t.done:
			if t.err != nil {
				writeErr(w, fmt.Errorf("transfer %s: %w", t.id, t.err))
				return
			}
		default:
		}
		writeJSON(w, http.StatusOK, t.view())
	}
}

// putTransfer feeds (the rest of) a bundle into a transfer. A broken
// connection keeps the transfer; damage ends it.
func (d *Daemon) putTransfer(w http.ResponseWriter, r *http.Request) {
	t := d.transferOr404(w, r)
	if t == nil {
		return
	}
	if !t.feed.TryLock() {
		writeErr(w, fmt.Errorf("transfer %s: %w: another sender is feeding it", t.id, errdefs.ErrBusy))
		return
	}
	defer t.feed.Unlock()
	t.feeding.Store(true)
	touch := func() {
		t.seenMu.Lock()
		t.seen = time.Now()
		t.seenMu.Unlock()
	}
	touch()
	err := t.dec.Feed(r.Context(), r.Body, func(raw []byte, sum [32]byte) error {
		touch()
		return t.stream.Deliver(r.Context(), raw, sum)
	})
	touch()
	t.feeding.Store(false)
	switch {
	case err == nil:
		t.stream.Close(nil)
		<-t.done
	case errors.Is(err, bundle.ErrCorrupt) && !errors.Is(err, bundle.ErrTruncated):
		// Damage is the bundle's fault, not the line's: resending the
		// same bytes cannot help. A stream that merely ends early (a
		// dropped connection) keeps the transfer for the sender's retry.
		t.stream.Close(err)
		<-t.done
	}
	d.transfers.mu.Lock()
	defer d.transfers.mu.Unlock()
	select {
	case <-t.done:
		delete(d.transfers.all, t.id)
		if t.err != nil {
			writeErr(w, fmt.Errorf("transfer %s: %w", t.id, t.err))
			return
		}
	default:
	}
	writeJSON(w, http.StatusOK, t.view())
}

func (d *Daemon) deleteTransfer(w http.ResponseWriter, r *http.Request) {
	t := d.transferOr404(w, r)
	if t == nil {
		return
	}
	t.stream.Close(errors.New("the sender abandoned the transfer"))
	<-t.done
	d.transfers.mu.Lock()
	delete(d.transfers.all, t.id)
	d.transfers.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// sendVM streams a VM to another daemon as an operation.
func (d *Daemon) sendVM(w http.ResponseWriter, r *http.Request) {
	var req api.SendVM
	if !decode(w, r, &req) {
		return
	}
	name := r.PathValue("name")
	comp, err := bundle.ParseCompression(req.Compression)
	if err != nil {
		writeErr(w, fmt.Errorf("send vm %q: %w: %w", name, errdefs.ErrInvalid, err))
		return
	}
	remote, err := client.NewRemote(req.To, req.Token)
	if err != nil {
		writeErr(w, fmt.Errorf("send vm %q: %w: %w", name, errdefs.ErrInvalid, err))
		return
	}
	if _, err := d.vms.Get(r.Context(), name); err != nil {
		writeErr(w, err)
		return
	}
	o := d.ops.start("send", name, func(ctx context.Context, o *operation) (any, error) {
		return d.send(ctx, o, name, remote, req, comp)
	})
	accepted(w, o)
}

// Send retries: how many times a broken connection is resumed, and how
// long the receiver may stay out of reach between tries.
const (
	sendAttempts = 20
	sendPatience = 2 * time.Minute
)

func (d *Daemon) send(ctx context.Context, o *operation, name string, remote *client.Client, req api.SendVM, comp bundle.Compression) (api.VM, error) {
	if req.Move {
		// A move takes the VM as it is at the end: stop it first, so no
		// write is left behind on this host.
		if _, err := d.vms.Stop(ctx, name, false, 0); err != nil && !errors.Is(err, errdefs.ErrState) {
			return api.VM{}, fmt.Errorf("send vm %q: stop it before the move: %w", name, err)
		}
	}
	ex, err := d.vms.OpenExport(ctx, name, req.WithSnapshots)
	if err != nil {
		return api.VM{}, err
	}
	m, srcs, done, err := bundleSources(ctx, ex)
	if err != nil {
		ex.Close()
		return api.VM{}, err
	}
	defer done()
	opts := req.ImportOptions
	if req.Move {
		opts.KeepIdentity = true
	}
	tr, err := remote.CreateTransfer(ctx, opts)
	if err != nil {
		ex.Close()
		return api.VM{}, fmt.Errorf("send vm %q to %s: %w", name, req.To, err)
	}
	var next uint64
	var result api.VM
	for attempt := 1; ; attempt++ {
		pr, pw := io.Pipe()
		wrote := make(chan error, 1)
		go func() {
			_, err := bundle.Write(ctx, pw, m, srcs, bundle.WriteOptions{Compression: comp, Skip: next, Progress: func(done, total int64) {
				o.Progress("send", done, total)
			}})
			_ = pw.CloseWithError(err)
			wrote <- err
		}()
		st, err := remote.PutTransfer(ctx, tr.ID, pr)
		_ = pr.CloseWithError(errors.New("send attempt over"))
		werr := <-wrote
		if err == nil && st.Done && st.VM != nil {
			result = *st.VM
			break
		}
		if err == nil && werr != nil {
			err = werr
		}
		if err == nil {
			err = errors.New("the receiver did not finish the import")
		}
		stopped := ex.Err()
		if stopped != nil {
			err = stopped // the point in time is gone: no resuming
		}
		if ctx.Err() != nil || stopped != nil || (isReply(err) && !client.IsBusy(err)) || attempt >= sendAttempts {
			ex.Close()
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			_ = remote.DeleteTransfer(cctx, tr.ID)
			cancel()
			if ctx.Err() != nil {
				return api.VM{}, fmt.Errorf("send vm %q: cancelled: %w", name, ctx.Err())
			}
			return api.VM{}, fmt.Errorf("send vm %q to %s: %w", name, req.To, err)
		}
		d.log.Warn("send interrupted; resuming", "vm", name, "attempt", attempt, "err", err)
		if next, err = d.resumePoint(ctx, remote, tr.ID); err != nil {
			ex.Close()
			return api.VM{}, fmt.Errorf("send vm %q to %s: %w", name, req.To, err)
		}
		d.log.Info("resuming send", "vm", name, "from_chunk", next)
	}
	ex.Close()
	d.log.Info("sent", "vm", name, "to", req.To, "as", result.Name)
	if req.Move {
		if err := d.vms.Delete(ctx, name, false); err != nil {
			return result, fmt.Errorf("send vm %q: the receiver has it, but removing it here failed: %w", name, err)
		}
	}
	return result, nil
}

// isReply reports whether err is the receiver's answer rather than a
// broken line.
func isReply(err error) bool {
	var ce *client.Error
	return errors.As(err, &ce)
}

// resumePoint asks the receiver, patiently, where to resume. It waits
// for the receiver to finish with the broken attempt first: a cut
// connection can reach the sender well before the receiver has
// delivered what it already read.
func (d *Daemon) resumePoint(ctx context.Context, remote *client.Client, id string) (uint64, error) {
	deadline := time.Now().Add(sendPatience)
	backoff := 250 * time.Millisecond
	for {
		st, err := remote.GetTransfer(ctx, id)
		wait := 250 * time.Millisecond // the receiver answers: poll briskly
		switch {
		case err == nil && !st.Feeding:
			return st.Next, nil
		case err == nil && time.Now().After(deadline):
			return 0, fmt.Errorf("ask where to resume: the receiver is still busy with the broken attempt after %s", sendPatience)
		case err != nil && (isReply(err) || time.Now().After(deadline)):
			return 0, fmt.Errorf("ask where to resume: %w", err)
		case err != nil:
			wait, backoff = backoff, min(2*backoff, 5*time.Second)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(wait):
		}
	}
}

// exportOVA streams an OVA of the export: an OVF descriptor and
// streamOptimized VMDKs, for other hypervisors. qemu-img reads the same
// point-in-time view over NBD.
func (d *Daemon) exportOVA(w http.ResponseWriter, r *http.Request, ex *vm.Export) {
	m := ovf.Machine{Name: ex.VM.Name, CPUs: ex.VM.CPUs, MemoryBytes: ex.VM.Memory, Firmware: "bios"}
	for _, disk := range ex.Disks {
		m.Disks = append(m.Disks, ovf.ExportDisk{Name: disk.Name, Source: disk.Source, Format: disk.Format, Capacity: disk.Data.Size(), Bus: disk.Bus})
	}
	for _, n := range ex.VM.NICs {
		m.NICs = append(m.NICs, ovf.ExportNIC{MAC: n.MAC, Network: n.Network})
	}
	tmp := filepath.Join(d.cfg.Home, "tmp")
	if err := os.MkdirAll(tmp, 0o750); err != nil {
		writeErr(w, err)
		return
	}
	lw := &lazyWriter{w: w, contentType: "application/x-tar"}
	if err := ovf.WriteOVA(r.Context(), lw, m, d.cfg.QEMUImg, tmp, nil); err != nil {
		lw.fail(d, fmt.Errorf("export vm %q as OVA: %w", ex.VM.Name, ex.Cause(err)))
		return
	}
	d.log.Info("exported OVA", "vm", ex.VM.Name)
}

// lazyWriter sends the success status with the first byte, so that an
// export that fails before writing anything still gets a proper error
// reply.
type lazyWriter struct {
	w           http.ResponseWriter
	contentType string
	started     bool
}

func (l *lazyWriter) Write(p []byte) (int, error) {
	if !l.started {
		l.started = true
		l.w.Header().Set("Content-Type", l.contentType)
		l.w.WriteHeader(http.StatusOK)
	}
	return l.w.Write(p)
}

// fail reports err: as an error reply if nothing was sent yet, otherwise
// by cutting the connection, so the client sees a broken stream and
// never a short success.
func (l *lazyWriter) fail(d *Daemon, err error) {
	d.log.Error("export failed", "err", err)
	if !l.started {
		writeErr(l.w, err)
		return
	}
	panic(http.ErrAbortHandler)
}
