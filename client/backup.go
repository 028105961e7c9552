package client

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"strconv"

	"github.com/lodge-vm/lodge/api"
)

// BackupRepos lists the backup repositories.
func (c *Client) BackupRepos(ctx context.Context) ([]api.BackupRepo, error) {
	var out []api.BackupRepo
	return out, c.do(ctx, http.MethodGet, "/v1/backup/repos", nil, &out)
}

// AddBackupRepo registers a directory as a backup repository, creating
// one there if it holds none.
func (c *Client) AddBackupRepo(ctx context.Context, req api.CreateBackupRepo) (api.BackupRepo, error) {
	var out api.BackupRepo
	return out, c.do(ctx, http.MethodPost, "/v1/backup/repos", req, &out)
}

// RemoveBackupRepo forgets a repository; its files stay.
func (c *Client) RemoveBackupRepo(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/backup/repos/"+url.PathEscape(name), nil, nil)
}

// CreateBackup starts backing a VM up; its result is the api.Backup.
func (c *Client) CreateBackup(ctx context.Context, vm string, req api.CreateBackup) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/backups", req, &op)
}

// Backups lists backups, of one VM and in one repository if they are
// not empty.
func (c *Client) Backups(ctx context.Context, vm, repo string) ([]api.Backup, error) {
	q := url.Values{}
	if vm != "" {
		q.Set("vm", vm)
	}
	if repo != "" {
		q.Set("repo", repo)
	}
	var out []api.Backup
	return out, c.do(ctx, http.MethodGet, "/v1/backups?"+q.Encode(), nil, &out)
}

// Backup returns one backup, looked for in repo or in every repository.
func (c *Client) Backup(ctx context.Context, id, repo string) (api.Backup, error) {
	var out api.Backup
	return out, c.do(ctx, http.MethodGet, "/v1/backups/"+url.PathEscape(id)+repoQuery(repo), nil, &out)
}

// DeleteBackup forgets one backup; pruning or gc frees its data.
func (c *Client) DeleteBackup(ctx context.Context, id, repo string) error {
	return c.do(ctx, http.MethodDelete, "/v1/backups/"+url.PathEscape(id)+repoQuery(repo), nil, nil)
}

func repoQuery(repo string) string {
	if repo == "" {
		return ""
	}
	return "?" + url.Values{"repo": {repo}}.Encode()
}

// RestoreBackup starts making a VM from a backup; its result is the VM.
func (c *Client) RestoreBackup(ctx context.Context, id string, req api.RestoreBackup) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/backups/"+url.PathEscape(id)+"/restore", req, &op)
}

// VerifyBackups starts reading and checking every chunk of the given
// backups, or of the whole repository; its result is api.VerifyResult.
func (c *Client) VerifyBackups(ctx context.Context, repo string, ids []string) (api.Operation, error) {
	var op api.Operation
	req := struct {
		Repo string   `json:"repo,omitempty"`
		IDs  []string `json:"ids,omitempty"`
	}{repo, ids}
	return op, c.do(ctx, http.MethodPost, "/v1/backup/verify", req, &op)
}

// PruneBackups applies a retention policy to one VM's backups.
func (c *Client) PruneBackups(ctx context.Context, req api.PruneBackups) (api.PruneResult, error) {
	var out api.PruneResult
	return out, c.do(ctx, http.MethodPost, "/v1/backup/prune", req, &out)
}

// GCBackups starts removing the chunks no backup uses; its result is
// api.GCResult.
func (c *Client) GCBackups(ctx context.Context, repo string) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/backup/repos/"+url.PathEscape(repo)+"/gc", nil, &op)
}

// SyncBackups starts copying the backups one repository lacks from
// another; its result is api.SyncResult.
func (c *Client) SyncBackups(ctx context.Context, req api.SyncBackups) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/backup/sync", req, &op)
}

// BackupSchedules lists the backup schedules.
func (c *Client) BackupSchedules(ctx context.Context) ([]api.BackupSchedule, error) {
	var out []api.BackupSchedule
	return out, c.do(ctx, http.MethodGet, "/v1/backup/schedules", nil, &out)
}

// SetBackupSchedule sets (or replaces) a VM's backup schedule.
func (c *Client) SetBackupSchedule(ctx context.Context, req api.BackupSchedule) (api.BackupSchedule, error) {
	var out api.BackupSchedule
	return out, c.do(ctx, http.MethodPut, "/v1/backup/schedules/"+url.PathEscape(req.VM), req, &out)
}

// DeleteBackupSchedule stops a VM's scheduled backups.
func (c *Client) DeleteBackupSchedule(ctx context.Context, vm string) error {
	return c.do(ctx, http.MethodDelete, "/v1/backup/schedules/"+url.PathEscape(vm), nil, nil)
}

func fileValues(q api.BackupFileQuery) string {
	v := url.Values{"path": {q.Path}}
	if q.Repo != "" {
		v.Set("repo", q.Repo)
	}
	if q.Disk != "" {
		v.Set("disk", q.Disk)
	}
	if q.Partition > 0 {
		v.Set("partition", strconv.Itoa(q.Partition))
	}
	return v.Encode()
}

// BackupFiles lists a directory inside a backup's disk (an ext2/3/4
// filesystem), without restoring it.
func (c *Client) BackupFiles(ctx context.Context, id string, q api.BackupFileQuery) ([]api.BackupFile, error) {
	var out []api.BackupFile
	return out, c.do(ctx, http.MethodGet, "/v1/backups/"+url.PathEscape(id)+"/files?"+fileValues(q), nil, &out)
}

// BackupFile writes one file inside a backup's disk to w.
func (c *Client) BackupFile(ctx context.Context, id string, q api.BackupFileQuery, w io.Writer) error {
	return c.do(ctx, http.MethodGet, "/v1/backups/"+url.PathEscape(id)+"/file?"+fileValues(q), nil, w)
}
