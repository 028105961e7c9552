package daemon

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
)

func (d *Daemon) backupRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/backup/repos", d.listBackupRepos)
	mux.HandleFunc("POST /v1/backup/repos", d.addBackupRepo)
	mux.HandleFunc("DELETE /v1/backup/repos/{name}", d.removeBackupRepo)
	mux.HandleFunc("POST /v1/backup/repos/{name}/gc", d.gcBackupRepo)
	mux.HandleFunc("POST /v1/backup/sync", d.syncBackups)
	mux.HandleFunc("POST /v1/backup/prune", d.pruneBackups)
	mux.HandleFunc("POST /v1/backup/verify", d.verifyBackups)
	mux.HandleFunc("GET /v1/backup/schedules", d.listBackupSchedules)
	mux.HandleFunc("PUT /v1/backup/schedules/{vm}", d.setBackupSchedule)
	mux.HandleFunc("DELETE /v1/backup/schedules/{vm}", d.deleteBackupSchedule)
	mux.HandleFunc("POST /v1/vms/{name}/backups", d.createBackup)
	mux.HandleFunc("GET /v1/backups", d.listBackups)
	mux.HandleFunc("GET /v1/backups/{id}", d.showBackup)
	mux.HandleFunc("DELETE /v1/backups/{id}", d.deleteBackup)
	mux.HandleFunc("POST /v1/backups/{id}/restore", d.restoreBackup)
	mux.HandleFunc("GET /v1/backups/{id}/files", d.listBackupFiles)
	mux.HandleFunc("GET /v1/backups/{id}/file", d.catBackupFile)
}

// progressOf feeds an operation's progress from a backup job.
func progressOf(o *operation) func(stage string, done, total int64) {
	return func(stage string, done, total int64) { o.Progress(stage, done, total) }
}

func (d *Daemon) listBackupRepos(w http.ResponseWriter, r *http.Request) {
	out, err := d.backups.Repos(r.Context())
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) addBackupRepo(w http.ResponseWriter, r *http.Request) {
	var req api.CreateBackupRepo
	if !decode(w, r, &req) {
		return
	}
	out, err := d.backups.AddRepo(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, out)
}

func (d *Daemon) removeBackupRepo(w http.ResponseWriter, r *http.Request) {
	if err := d.backups.RemoveRepo(r.Context(), r.PathValue("name")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) gcBackupRepo(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	accepted(w, d.ops.start("backup-gc", name, func(ctx context.Context, o *operation) (any, error) {
		o.Progress("gc", 0, 0)
		return d.backups.GC(ctx, name)
	}))
}

func (d *Daemon) syncBackups(w http.ResponseWriter, r *http.Request) {
	var req api.SyncBackups
	if !decode(w, r, &req) {
		return
	}
	accepted(w, d.ops.start("backup-sync", req.From+"->"+req.To, func(ctx context.Context, o *operation) (any, error) {
		return d.backups.Sync(ctx, req.From, req.To, progressOf(o))
	}))
}

func (d *Daemon) pruneBackups(w http.ResponseWriter, r *http.Request) {
	var req api.PruneBackups
	if !decode(w, r, &req) {
		return
	}
	out, err := d.backups.Prune(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) verifyBackups(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Repo string   `json:"repo,omitempty"`
		IDs  []string `json:"ids,omitempty"`
	}
	if !decode(w, r, &req) {
		return
	}
	target := req.Repo
	if len(req.IDs) > 0 {
		target = strings.Join(req.IDs, ",")
	}
	accepted(w, d.ops.start("backup-verify", target, func(ctx context.Context, o *operation) (any, error) {
		res, err := d.backups.Verify(ctx, req.Repo, req.IDs, progressOf(o))
		if err != nil && len(res.Bad) > 0 {
			return nil, &verifyError{err: err, bad: res.Bad}
		}
		return res, err
	}))
}

// verifyError carries every bad chunk in the operation's one-line error.
type verifyError struct {
	err error
	bad []string
}

func (e *verifyError) Error() string {
	msg := e.err.Error()
	if len(e.bad) > 0 {
		msg += ": " + e.bad[0]
		if len(e.bad) > 1 {
			msg += " (and " + strconv.Itoa(len(e.bad)-1) + " more)"
		}
	}
	return msg
}

func (e *verifyError) Unwrap() error { return e.err }

func (d *Daemon) listBackupSchedules(w http.ResponseWriter, r *http.Request) {
	out, err := d.backups.Schedules(r.Context())
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) setBackupSchedule(w http.ResponseWriter, r *http.Request) {
	var req api.BackupSchedule
	if !decode(w, r, &req) {
		return
	}
	req.VM = r.PathValue("vm")
	out, err := d.backups.SetSchedule(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) deleteBackupSchedule(w http.ResponseWriter, r *http.Request) {
	if err := d.backups.DeleteSchedule(r.Context(), r.PathValue("vm")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) createBackup(w http.ResponseWriter, r *http.Request) {
	var req api.CreateBackup
	name, ok := d.vmRequest(w, r, &req)
	if !ok {
		return
	}
	accepted(w, d.ops.start("backup", name, func(ctx context.Context, o *operation) (any, error) {
		return d.backups.Create(ctx, name, req.Repo, progressOf(o))
	}))
}

func (d *Daemon) listBackups(w http.ResponseWriter, r *http.Request) {
	out, err := d.backups.List(r.Context(), r.URL.Query().Get("vm"), r.URL.Query().Get("repo"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) showBackup(w http.ResponseWriter, r *http.Request) {
	out, err := d.backups.Show(r.Context(), r.PathValue("id"), r.URL.Query().Get("repo"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) deleteBackup(w http.ResponseWriter, r *http.Request) {
	if err := d.backups.Delete(r.Context(), r.PathValue("id"), r.URL.Query().Get("repo")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) restoreBackup(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var req api.RestoreBackup
	if !decode(w, r, &req) {
		return
	}
	// Bad ids and names fail now, not in the operation.
	if _, err := d.backups.Show(r.Context(), id, req.Repo); err != nil {
		writeErr(w, err)
		return
	}
	target := req.As
	if target == "" {
		target = req.VM
	}
	accepted(w, d.ops.start("restore", target, func(ctx context.Context, o *operation) (any, error) {
		v, err := d.backups.Restore(ctx, id, req, progressOf(o))
		if err != nil || !req.Start {
			return v, err
		}
		o.Progress("start", 0, 0)
		return d.vms.Start(ctx, v.Name)
	}))
}

// backupLoop runs scheduled backups. Each one is an operation, so it
// shows in `lodge events` and can be cancelled like any other.
func (d *Daemon) backupLoop(ctx context.Context) {
	tick := time.NewTicker(d.cfg.BackupTick)
	defer tick.Stop()
	running := map[string]*operation{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		due, err := d.backups.Due(ctx, time.Now())
		if err != nil {
			d.log.Warn("backup schedules", "err", err)
			continue
		}
		for _, s := range due {
			if o := running[s.VM]; o != nil {
				select {
				case <-o.done:
				default:
					continue // the last one is still running
				}
			}
			running[s.VM] = d.ops.start("backup", s.VM, func(ctx context.Context, o *operation) (any, error) {
				return d.backups.RunScheduled(ctx, s, progressOf(o))
			})
		}
	}
}

func fileQuery(r *http.Request) (api.BackupFileQuery, error) {
	q := r.URL.Query()
	out := api.BackupFileQuery{Path: q.Get("path"), Repo: q.Get("repo"), Disk: q.Get("disk")}
	if p := q.Get("partition"); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 {
			return out, fmt.Errorf("partition %q: %w: want a partition number", p, errdefs.ErrInvalid)
		}
		out.Partition = n
	}
	if out.Path == "" {
		out.Path = "/"
	}
	return out, nil
}

func (d *Daemon) listBackupFiles(w http.ResponseWriter, r *http.Request) {
	q, err := fileQuery(r)
	if err != nil {
		writeErr(w, err)
		return
	}
	out, err := d.backups.ListFiles(r.Context(), r.PathValue("id"), q)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) catBackupFile(w http.ResponseWriter, r *http.Request) {
	q, err := fileQuery(r)
	if err != nil {
		writeErr(w, err)
		return
	}
	lw := &lazyWriter{w: w, contentType: "application/octet-stream"}
	if err := d.backups.CatFile(r.Context(), r.PathValue("id"), q, lw); err != nil {
		lw.fail(d, err)
		return
	}
	if !lw.started {
		// An empty file.
		w.Header().Set("Content-Type", lw.contentType)
		w.WriteHeader(http.StatusOK)
	}
}
