package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/bundle"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/image"
	"github.com/lodge-vm/lodge/internal/nbd"
	"github.com/lodge-vm/lodge/internal/storage"
	"github.com/lodge-vm/lodge/internal/units"
	"github.com/lodge-vm/lodge/internal/vm"
)

// maxBody bounds request bodies; cloud-init files are the largest.
const maxBody = 4 << 20

func (d *Daemon) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/host", d.hostInfo)
	mux.HandleFunc("PATCH /v1/host", d.setHost)
	mux.HandleFunc("GET /v1/host/token", d.hostToken)
	mux.HandleFunc("GET /v1/vms/{name}/export", d.exportVM)
	mux.HandleFunc("POST /v1/vms/{name}/send", d.sendVM)
	mux.HandleFunc("POST /v1/import", d.importVM)
	mux.HandleFunc("POST /v1/transfers", d.createTransfer)
	mux.HandleFunc("GET /v1/transfers/{id}", d.getTransfer)
	mux.HandleFunc("PUT /v1/transfers/{id}", d.putTransfer)
	mux.HandleFunc("DELETE /v1/transfers/{id}", d.deleteTransfer)
	mux.HandleFunc("GET /v1/vms", d.listVMs)
	mux.HandleFunc("POST /v1/vms", d.createVM)
	mux.HandleFunc("GET /v1/vms/{name}", d.getVM)
	mux.HandleFunc("DELETE /v1/vms/{name}", d.deleteVM)
	mux.HandleFunc("PATCH /v1/vms/{name}", d.setVM)
	mux.HandleFunc("POST /v1/vms/{name}/disks", d.addDisk)
	mux.HandleFunc("PATCH /v1/vms/{name}/disks/{disk}", d.resizeDisk)
	mux.HandleFunc("POST /v1/vms/{name}/{action}", d.vmAction)
	mux.HandleFunc("GET /v1/vms/{name}/snapshots", d.listSnapshots)
	mux.HandleFunc("POST /v1/vms/{name}/snapshots", d.createSnapshot)
	mux.HandleFunc("POST /v1/vms/{name}/snapshots/{snap}/revert", d.revertSnapshot)
	mux.HandleFunc("DELETE /v1/vms/{name}/snapshots/{snap}", d.deleteSnapshot)
	mux.HandleFunc("GET /v1/vms/{name}/console/log", d.consoleLog)
	mux.HandleFunc("GET /v1/vms/{name}/console", d.console)
	mux.HandleFunc("GET /v1/images", d.listImages)
	mux.HandleFunc("POST /v1/images", d.importImage)
	mux.HandleFunc("POST /v1/images/publish", d.publishImage)
	mux.HandleFunc("POST /v1/images/{name}/flatten", d.flattenImage)
	mux.HandleFunc("GET /v1/images/{name}", d.getImage)
	mux.HandleFunc("DELETE /v1/images/{name}", d.deleteImage)
	mux.HandleFunc("GET /v1/pools", d.listPools)
	mux.HandleFunc("POST /v1/pools", d.createPool)
	mux.HandleFunc("DELETE /v1/pools/{name}", d.deletePool)
	mux.HandleFunc("GET /v1/projects", d.listProjects)
	mux.HandleFunc("POST /v1/projects", d.createProject)
	mux.HandleFunc("GET /v1/projects/{name}", d.getProject)
	mux.HandleFunc("PATCH /v1/projects/{name}", d.setProject)
	mux.HandleFunc("DELETE /v1/projects/{name}", d.deleteProject)
	mux.HandleFunc("GET /v1/operations", d.listOps)
	mux.HandleFunc("GET /v1/operations/{id}", d.getOp)
	mux.HandleFunc("GET /v1/operations/{id}/wait", d.waitOp)
	mux.HandleFunc("DELETE /v1/operations/{id}", d.cancelOp)
	mux.HandleFunc("GET /v1/events", d.streamEvents)
	d.backupRoutes(mux)
	d.benchRoutes(mux)
	d.stackRoutes(mux)
	d.networkRoutes(mux)
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// codeOf maps sentinel errors to the API's stable codes.
func codeOf(err error) string {
	switch {
	case errors.Is(err, errdefs.ErrNotFound), errors.Is(err, os.ErrNotExist):
		return "not_found"
	case errors.Is(err, errdefs.ErrBusy):
		return "busy"
	case errors.Is(err, errdefs.ErrExists), errors.Is(err, errdefs.ErrState),
		errors.Is(err, errdefs.ErrConflict), errors.Is(err, errdefs.ErrInUse):
		return "conflict"
	case errors.Is(err, errdefs.ErrLimit):
		return "limit"
	case errors.Is(err, errdefs.ErrQuota):
		return "quota"
	case errors.Is(err, errdefs.ErrInvalid), errors.Is(err, storage.ErrUnsafeImage), errors.Is(err, bundle.ErrCorrupt):
		return "bad_request"
	case errors.Is(err, errdefs.ErrNoAgent):
		return "no_agent"
	case errors.Is(err, errdefs.ErrNoSpace), errors.Is(err, nbd.ErrNoSpace), errors.Is(err, syscall.ENOSPC):
		return "no_space"
	}
	return "internal"
}

var statusOf = map[string]int{
	"not_found": http.StatusNotFound, "busy": http.StatusConflict, "conflict": http.StatusConflict,
	"limit": http.StatusConflict, "quota": http.StatusForbidden, "bad_request": http.StatusBadRequest, "no_agent": http.StatusServiceUnavailable,
	"no_space": http.StatusInsufficientStorage,
	"internal": http.StatusInternalServerError,
}

func writeErr(w http.ResponseWriter, err error) {
	code := codeOf(err)
	writeJSON(w, statusOf[code], api.Error{Error: err.Error(), Code: code})
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeJSON(w, http.StatusBadRequest, api.Error{Error: "request body: " + err.Error(), Code: "bad_request"})
		return false
	}
	return true
}

func (d *Daemon) hostInfo(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	a := d.currentAccel()
	h := d.host()
	alloc, running, total, err := d.vms.MemoryAllocated(ctx)
	if err != nil {
		writeErr(w, err)
		return
	}
	limit := int64(float64(h.MemoryLimit) * h.Overcommit)
	info := api.HostInfo{
		Accel: a.Accel, AccelReason: a.Reason, AccelVerified: a.Verified, CPUs: runtime.NumCPU(),
		MemoryTotal: h.MemoryTotal, MemoryAllocated: alloc, MemoryLimit: limit, MemoryFree: max(limit-alloc, 0),
		Overcommit: h.Overcommit, VMOverhead: h.VMOverhead, QEMUVersion: d.qemuVer, Home: d.cfg.Home, VMs: total, Running: running,
		DaemonPID: os.Getpid(), Pools: []api.Pool{},
	}
	info.AutoBalloon, info.AutoBalloonThreshold = d.autoBalloonSettings()
	if avail, err := meminfo(d.cfg.AutoBalloon.MemInfo, "MemAvailable"); err == nil {
		info.MemoryAvailable = avail
	}
	pools, err := d.pools.List(ctx)
	if err != nil {
		writeErr(w, err)
		return
	}
	for _, p := range pools {
		info.Pools = append(info.Pools, poolView(p))
	}
	writeJSON(w, http.StatusOK, info)
}

func poolView(p storage.Pool) api.Pool {
	out := api.Pool{Name: p.Name, Path: p.Path}
	if u, err := p.Usage(); err == nil {
		out.Total, out.Free = u.Total, u.Free
	} else {
		out.Error = err.Error()
	}
	return out
}

func (d *Daemon) listVMs(w http.ResponseWriter, r *http.Request) {
	vms, err := d.vms.List(r.Context())
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, vms)
}

func (d *Daemon) getVM(w http.ResponseWriter, r *http.Request) {
	v, err := d.vms.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// accepted answers a long call with its operation.
func accepted(w http.ResponseWriter, o *operation) {
	writeJSON(w, http.StatusAccepted, o.snapshot())
}

func (d *Daemon) createVM(w http.ResponseWriter, r *http.Request) {
	var req api.CreateVM
	if !decode(w, r, &req) {
		return
	}
	// Validate before answering, so bad input fails the call itself.
	if err := vm.ValidateName("vm", req.Name); err != nil {
		writeErr(w, err)
		return
	}
	if _, err := d.vms.Get(r.Context(), req.Name); err == nil {
		writeErr(w, fmt.Errorf("vm %q: %w", req.Name, errdefs.ErrExists))
		return
	}
	o := d.ops.start("create", req.Name, func(ctx context.Context, o *operation) (any, error) {
		o.Progress("create", 0, 0)
		v, err := d.vms.Create(ctx, req)
		if err != nil || !req.Start {
			return v, err
		}
		o.Progress("start", 0, 0)
		return d.vms.Start(ctx, req.Name)
	})
	accepted(w, o)
}

// vmRequest starts a handler for an operation on the VM the path names:
// the VM must exist, and body, unless nil, is decoded from the request.
// ok false means the answer is written.
func (d *Daemon) vmRequest(w http.ResponseWriter, r *http.Request, body any) (name string, ok bool) {
	name = r.PathValue("name")
	if _, err := d.vms.Get(r.Context(), name); err != nil {
		writeErr(w, err)
		return name, false
	}
	return name, body == nil || decode(w, r, body)
}

func (d *Daemon) deleteVM(w http.ResponseWriter, r *http.Request) {
	name, ok := d.vmRequest(w, r, nil)
	if !ok {
		return
	}
	force := r.URL.Query().Get("force") == "true"
	o := d.ops.start("delete", name, func(ctx context.Context, _ *operation) (any, error) {
		return nil, d.vms.Delete(ctx, name, force)
	})
	accepted(w, o)
}

func (d *Daemon) addDisk(w http.ResponseWriter, r *http.Request) {
	var req api.AddDisk
	name, ok := d.vmRequest(w, r, &req)
	if !ok {
		return
	}
	if !api.DataDiskSizeOK(req.Size) {
		writeErr(w, fmt.Errorf("add a disk to vm %q: size %d: %w: want at least %s, in whole 512-byte sectors", name, req.Size, errdefs.ErrInvalid, units.FormatSize(api.MinDataDisk)))
		return
	}
	accepted(w, d.ops.start("disk-add", name, func(ctx context.Context, _ *operation) (any, error) { return d.vms.AddDisk(ctx, name, req.Size) }))
}

func (d *Daemon) resizeDisk(w http.ResponseWriter, r *http.Request) {
	var req api.ResizeDisk
	name, ok := d.vmRequest(w, r, &req)
	if !ok {
		return
	}
	disk := r.PathValue("disk")
	if req.Size <= 0 {
		writeErr(w, fmt.Errorf("resize disk %q of vm %q: size %d: %w: want a positive size", disk, name, req.Size, errdefs.ErrInvalid))
		return
	}
	accepted(w, d.ops.start("disk-resize", name, func(ctx context.Context, _ *operation) (any, error) {
		return d.vms.ResizeDisk(ctx, name, disk, req.Size)
	}))
}

func (d *Daemon) setVM(w http.ResponseWriter, r *http.Request) {
	var req api.SetVM
	name, ok := d.vmRequest(w, r, &req)
	if !ok {
		return
	}
	if req.IsZero() {
		writeErr(w, fmt.Errorf("set vm %q: %w: nothing to change", name, errdefs.ErrInvalid))
		return
	}
	if nets := req.Networks; len(nets) > 0 {
		// Alone, so that a refusal of either half cannot leave the other
		// half done.
		if req.Networks = nil; !req.IsZero() {
			writeErr(w, fmt.Errorf("set vm %q: %w: networks are set alone, not with other settings", name, errdefs.ErrInvalid))
			return
		}
		accepted(w, d.ops.start("set", name, func(ctx context.Context, _ *operation) (any, error) { return d.vms.SetNetworks(ctx, name, nets) }))
		return
	}
	accepted(w, d.ops.start("set", name, func(ctx context.Context, _ *operation) (any, error) { return d.vms.Set(ctx, name, req) }))
}

func (d *Daemon) listSnapshots(w http.ResponseWriter, r *http.Request) {
	snaps, err := d.vms.ListSnapshots(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, snaps)
}

func (d *Daemon) createSnapshot(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	var req api.CreateSnapshot
	if !decode(w, r, &req) {
		return
	}
	if err := vm.ValidateName("snapshot", req.Name); err != nil {
		writeErr(w, err)
		return
	}
	snaps, err := d.vms.ListSnapshots(r.Context(), name)
	if err != nil {
		writeErr(w, err)
		return
	}
	for _, s := range snaps {
		if s.Name == req.Name {
			writeErr(w, fmt.Errorf("snapshot %q of vm %q: %w", req.Name, name, errdefs.ErrExists))
			return
		}
	}
	accepted(w, d.ops.start("snapshot", name, func(ctx context.Context, o *operation) (any, error) {
		o.Progress("snapshot", 0, 0)
		return d.vms.CreateSnapshot(ctx, name, req, func(done, total int64) { o.Progress("memory", done, total) })
	}))
}

// snapshotTarget checks that a VM's snapshot exists before an operation
// is started for it, so the error comes back at once.
func (d *Daemon) snapshotTarget(w http.ResponseWriter, r *http.Request) (string, string, bool) {
	name, snap := r.PathValue("name"), r.PathValue("snap")
	snaps, err := d.vms.ListSnapshots(r.Context(), name)
	if err != nil {
		writeErr(w, err)
		return "", "", false
	}
	for _, s := range snaps {
		if s.Name == snap {
			return name, snap, true
		}
	}
	writeErr(w, fmt.Errorf("snapshot %q of vm %q: %w", snap, name, errdefs.ErrNotFound))
	return "", "", false
}

func (d *Daemon) revertSnapshot(w http.ResponseWriter, r *http.Request) {
	name, snap, ok := d.snapshotTarget(w, r)
	if !ok {
		return
	}
	var req api.RevertSnapshot
	if r.ContentLength != 0 && !decode(w, r, &req) {
		return
	}
	accepted(w, d.ops.start("revert", name, func(ctx context.Context, o *operation) (any, error) {
		o.Progress("revert", 0, 0)
		return d.vms.RevertSnapshot(ctx, name, snap, req)
	}))
}

func (d *Daemon) deleteSnapshot(w http.ResponseWriter, r *http.Request) {
	name, snap, ok := d.snapshotTarget(w, r)
	if !ok {
		return
	}
	accepted(w, d.ops.start("snapshot-delete", name, func(ctx context.Context, o *operation) (any, error) {
		o.Progress("delete", 0, 0)
		return nil, d.vms.DeleteSnapshot(ctx, name, snap, func(done, total int64) { o.Progress("merge", done, total) })
	}))
}

func (d *Daemon) vmAction(w http.ResponseWriter, r *http.Request) {
	name, action := r.PathValue("name"), r.PathValue("action")
	ctx := r.Context()
	if _, err := d.vms.Get(ctx, name); err != nil {
		writeErr(w, err)
		return
	}
	switch action {
	case "start":
		accepted(w, d.ops.start("start", name, func(ctx context.Context, _ *operation) (any, error) { return d.vms.Start(ctx, name) }))
	case "stop", "restart":
		var req api.StopVM
		if r.ContentLength != 0 && !decode(w, r, &req) {
			return
		}
		if req.TimeoutSeconds < 0 {
			writeErr(w, fmt.Errorf("stop vm %q: timeout %ds: %w: must not be negative", name, req.TimeoutSeconds, errdefs.ErrInvalid))
			return
		}
		timeout := time.Duration(req.TimeoutSeconds) * time.Second
		if action == "stop" {
			accepted(w, d.ops.start("stop", name, func(ctx context.Context, _ *operation) (any, error) { return d.vms.Stop(ctx, name, req.Force, timeout) }))
			return
		}
		accepted(w, d.ops.start("restart", name, func(ctx context.Context, _ *operation) (any, error) { return d.vms.Restart(ctx, name, timeout) }))
	case "clone":
		var req api.CloneVM
		if !decode(w, r, &req) {
			return
		}
		if err := vm.ValidateName("vm", req.Name); err != nil {
			writeErr(w, err)
			return
		}
		if _, err := d.vms.Get(ctx, req.Name); err == nil {
			writeErr(w, fmt.Errorf("vm %q: %w", req.Name, errdefs.ErrExists))
			return
		}
		accepted(w, d.ops.start("clone", name, func(ctx context.Context, o *operation) (any, error) {
			o.Progress("clone", 0, 0)
			v, err := d.vms.Clone(ctx, name, req, func(done, total int64) { o.Progress("copy", done, total) })
			if err != nil || !req.Start {
				return v, err
			}
			o.Progress("start", 0, 0)
			return d.vms.Start(ctx, req.Name)
		}))
	case "pause", "resume":
		fn := d.vms.Pause
		if action == "resume" {
			fn = d.vms.Resume
		}
		v, err := fn(ctx, name)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, v)
	case "exec":
		var req api.ExecRequest
		if !decode(w, r, &req) {
			return
		}
		res, err := d.vms.Exec(ctx, name, req)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
	default:
		writeJSON(w, http.StatusNotFound, api.Error{Error: fmt.Sprintf("vm %q: unknown action %q", name, action), Code: "not_found"})
	}
}

func (d *Daemon) consoleLog(w http.ResponseWriter, r *http.Request) {
	raw, err := d.vms.ConsoleLog(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write(raw)
}

// console upgrades the HTTP connection to a raw byte stream joined to the
// VM's serial console.
func (d *Daemon) console(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Upgrade") != "lodge-console" {
		writeJSON(w, http.StatusBadRequest, api.Error{Error: "console needs Upgrade: lodge-console", Code: "bad_request"})
		return
	}
	conn, release, err := d.vms.Console(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	defer release()
	hj, ok := w.(http.Hijacker)
	if !ok {
		writeErr(w, errors.New("console: connection cannot be hijacked"))
		return
	}
	client, rw, err := hj.Hijack()
	if err != nil {
		return
	}
	defer func() { _ = client.Close() }()
	_, _ = rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: lodge-console\r\nConnection: Upgrade\r\n\r\n")
	_ = rw.Flush()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(conn, rw); done <- struct{}{} }()
	go func() { _, _ = io.Copy(client, conn); done <- struct{}{} }()
	<-done
}

func (d *Daemon) listImages(w http.ResponseWriter, r *http.Request) {
	imgs, err := d.images.List(r.Context())
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, imgs)
}

func (d *Daemon) getImage(w http.ResponseWriter, r *http.Request) {
	img, err := d.images.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

func (d *Daemon) importImage(w http.ResponseWriter, r *http.Request) {
	var req api.ImportImage
	if !decode(w, r, &req) {
		return
	}
	if err := image.ValidateName(req.Name); err != nil {
		writeErr(w, err)
		return
	}
	if _, err := d.images.Get(r.Context(), req.Name); err == nil {
		writeErr(w, fmt.Errorf("image %q: %w", req.Name, errdefs.ErrExists))
		return
	}
	o := d.ops.start("image-import", req.Name, func(ctx context.Context, o *operation) (any, error) {
		var size int64
		if st, err := os.Stat(req.Path); err == nil {
			size = st.Size()
		}
		img, err := d.images.Import(ctx, req.Name, req.Path, func(f float64) { o.Progress("convert", int64(f*float64(size)), size) })
		if err == nil {
			d.reprobe(d.ops.base)
		}
		return img, err
	})
	accepted(w, o)
}

func (d *Daemon) publishImage(w http.ResponseWriter, r *http.Request) {
	var req api.PublishImage
	if !decode(w, r, &req) {
		return
	}
	if err := image.ValidateName(req.Name); err != nil {
		writeErr(w, err)
		return
	}
	if _, err := d.vms.Get(r.Context(), req.VM); err != nil {
		writeErr(w, err)
		return
	}
	if _, err := d.images.Get(r.Context(), req.Name); err == nil {
		writeErr(w, fmt.Errorf("image %q: %w", req.Name, errdefs.ErrExists))
		return
	}
	accepted(w, d.ops.start("image-publish", req.Name, func(ctx context.Context, o *operation) (any, error) {
		stage := "copy"
		if req.Generalize {
			stage = "copy and generalize"
		}
		o.Progress(stage, 0, 0)
		return d.vms.Publish(ctx, req)
	}))
}

func (d *Daemon) flattenImage(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	img, err := d.images.Get(r.Context(), name)
	if err != nil {
		writeErr(w, err)
		return
	}
	accepted(w, d.ops.start("image-flatten", name, func(ctx context.Context, o *operation) (any, error) {
		return d.images.Flatten(ctx, name, func(f float64) { o.Progress("copy", int64(f*float64(img.VirtualSize)), img.VirtualSize) })
	}))
}

func (d *Daemon) deleteImage(w http.ResponseWriter, r *http.Request) {
	if err := d.images.Delete(r.Context(), r.PathValue("name")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) listPools(w http.ResponseWriter, r *http.Request) {
	pools, err := d.pools.List(r.Context())
	if err != nil {
		writeErr(w, err)
		return
	}
	out := make([]api.Pool, 0, len(pools))
	for _, p := range pools {
		out = append(out, poolView(p))
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) createPool(w http.ResponseWriter, r *http.Request) {
	var req api.Pool
	if !decode(w, r, &req) {
		return
	}
	p, err := d.pools.Create(r.Context(), req.Name, req.Path)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, poolView(p))
}

func (d *Daemon) deletePool(w http.ResponseWriter, r *http.Request) {
	if err := d.pools.Delete(r.Context(), r.PathValue("name")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) listOps(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, d.ops.list())
}

func (d *Daemon) opOr404(w http.ResponseWriter, r *http.Request) *operation {
	o := d.ops.get(r.PathValue("id"))
	if o == nil {
		writeJSON(w, http.StatusNotFound, api.Error{Error: fmt.Sprintf("operation %q: not found", r.PathValue("id")), Code: "not_found"})
	}
	return o
}

func (d *Daemon) getOp(w http.ResponseWriter, r *http.Request) {
	if o := d.opOr404(w, r); o != nil {
		writeJSON(w, http.StatusOK, o.snapshot())
	}
}

// waitOp blocks until the operation ends or the timeout (seconds, default
// 30) passes, then returns it as it is.
func (d *Daemon) waitOp(w http.ResponseWriter, r *http.Request) {
	o := d.opOr404(w, r)
	if o == nil {
		return
	}
	timeout := 30 * time.Second
	if s := r.URL.Query().Get("timeout"); s != "" {
		f, err := strconv.ParseFloat(s, 64)
		if err != nil || f < 0 || f > 3600 {
			writeJSON(w, http.StatusBadRequest, api.Error{Error: fmt.Sprintf("timeout %q: want seconds between 0 and 3600", s), Code: "bad_request"})
			return
		}
		timeout = time.Duration(f * float64(time.Second))
	}
	select {
	case <-o.done:
	case <-time.After(timeout):
	case <-r.Context().Done():
		return
	}
	writeJSON(w, http.StatusOK, o.snapshot())
}

func (d *Daemon) cancelOp(w http.ResponseWriter, r *http.Request) {
	if o := d.opOr404(w, r); o != nil {
		o.cancel()
		writeJSON(w, http.StatusAccepted, o.snapshot())
	}
}

// streamEvents writes one JSON event per line until the client leaves.
func (d *Daemon) streamEvents(w http.ResponseWriter, r *http.Request) {
	ch, cancel := d.events.subscribe()
	defer cancel()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw)
	if flusher != nil {
		flusher.Flush()
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case ev := <-ch:
			if enc.Encode(ev) != nil || bw.Flush() != nil {
				return
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}
