// Package manager runs backups: it keeps the registry of repositories,
// takes a VM's point in time from the vm service and stores it in a
// repository (package backup), restores VMs from any backup point, keeps
// schedules, and applies retention.
package manager

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/backup"
	"github.com/lodge-vm/lodge/internal/bundle"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/nbd"
	"github.com/lodge-vm/lodge/internal/store"
	"github.com/lodge-vm/lodge/internal/vm"
)

const (
	repoBucket     = "backup-repos"
	scheduleBucket = "backup-schedules"
	// DefaultRepo lives in $LODGE_HOME/backups and always exists.
	DefaultRepo = "default"
)

// VMs is what the manager needs of the vm service.
type VMs interface {
	Get(ctx context.Context, name string) (api.VM, error)
	OpenBackup(ctx context.Context, name string, opts vm.BackupOptions) (*vm.BackupPoint, error)
	FreezeAll(ctx context.Context, names []string) (thaw func())
	BeginImport(ctx context.Context, spec vm.ImportSpec) (*vm.Import, error)
	Rebuild(ctx context.Context, name, image string, fill vm.DiskFiller) (api.VM, error)
}

var _ VMs = (*vm.Service)(nil)

// Progress reports a long job's stage and bytes.
type Progress func(stage string, done, total int64)

// Manager runs backups for one host.
type Manager struct {
	home  string
	store store.Store
	vms   VMs
	log   *slog.Logger

	mu    sync.Mutex
	repos map[string]*backup.Repo // opened, by path
}

// New returns a manager and makes sure the default repository exists.
func New(ctx context.Context, home string, st store.Store, vms VMs, log *slog.Logger) (*Manager, error) {
	m := &Manager{home: home, store: st, vms: vms, log: log.With("component", "backup"), repos: map[string]*backup.Repo{}}
	def := repoRecord{Name: DefaultRepo, Path: filepath.Join(home, "backups")}
	err := st.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(repoBucket, def.Name); err == nil {
			return nil
		}
		return store.PutJSON(tx, repoBucket, def.Name, def)
	})
	if err != nil {
		return nil, fmt.Errorf("default backup repository: %w", err)
	}
	return m, nil
}

// repoRecord is a registered repository.
type repoRecord struct {
	Name     string `json:"name"`
	Path     string `json:"path"`
	MirrorOf string `json:"mirror_of,omitempty"`
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)

// AddRepo registers a directory as a repository: an existing repository
// (one another host wrote, say) is taken as it is, and an empty or
// missing directory becomes a new one.
func (m *Manager) AddRepo(ctx context.Context, req api.CreateBackupRepo) (api.BackupRepo, error) {
	if !nameRE.MatchString(req.Name) {
		return api.BackupRepo{}, fmt.Errorf("backup repository name %q: %w: use letters, digits, '-' and '_'", req.Name, errdefs.ErrInvalid)
	}
	if !filepath.IsAbs(req.Path) {
		return api.BackupRepo{}, fmt.Errorf("backup repository %q: path %q: %w: must be absolute", req.Name, req.Path, errdefs.ErrInvalid)
	}
	rec := repoRecord{Name: req.Name, Path: filepath.Clean(req.Path), MirrorOf: req.MirrorOf}
	if rec.MirrorOf != "" {
		src, err := m.repoRecord(ctx, rec.MirrorOf)
		if err != nil {
			return api.BackupRepo{}, fmt.Errorf("backup repository %q: mirror of: %w", req.Name, err)
		}
		if src.Path == rec.Path {
			return api.BackupRepo{}, fmt.Errorf("backup repository %q: %w: it cannot mirror %q, which has the same path", req.Name, errdefs.ErrInvalid, src.Name)
		}
	}
	if _, err := m.repoRecord(ctx, req.Name); err == nil {
		return api.BackupRepo{}, fmt.Errorf("backup repository %q: %w", req.Name, errdefs.ErrExists)
	}
	others, err := m.repoRecords(ctx)
	if err != nil {
		return api.BackupRepo{}, err
	}
	for _, o := range others {
		if o.Path == rec.Path {
			return api.BackupRepo{}, fmt.Errorf("backup repository %q: %w: %s is already repository %q", req.Name, errdefs.ErrExists, rec.Path, o.Name)
		}
	}
	if _, err := m.openPath(rec.Path, true); err != nil {
		return api.BackupRepo{}, fmt.Errorf("backup repository %q: %w", req.Name, err)
	}
	err = m.store.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(repoBucket, rec.Name); err == nil {
			return fmt.Errorf("backup repository %q: %w", rec.Name, errdefs.ErrExists)
		}
		return store.PutJSON(tx, repoBucket, rec.Name, rec)
	})
	if err != nil {
		return api.BackupRepo{}, err
	}
	m.log.Info("repository added", "repo", rec.Name, "path", rec.Path)
	return m.describe(rec), nil
}

// RemoveRepo forgets a repository; its files stay where they are.
func (m *Manager) RemoveRepo(ctx context.Context, name string) error {
	if name == DefaultRepo {
		return fmt.Errorf("backup repository %q: %w: the default repository cannot be removed", name, errdefs.ErrInvalid)
	}
	rec, err := m.repoRecord(ctx, name)
	if err != nil {
		return err
	}
	err = m.store.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(repoBucket, name); err != nil {
			return fmt.Errorf("backup repository %q: %w", name, errdefs.ErrNotFound)
		}
		recs, err := store.ListJSON[repoRecord](tx, repoBucket)
		if err != nil {
			return err
		}
		for _, r := range recs {
			if r.MirrorOf == name {
				return fmt.Errorf("backup repository %q: %w: repository %q mirrors it", name, errdefs.ErrInUse, r.Name)
			}
		}
		scheds, err := store.ListJSON[api.BackupSchedule](tx, scheduleBucket)
		if err != nil {
			return err
		}
		for _, s := range scheds {
			if s.Repo == name {
				return fmt.Errorf("backup repository %q: %w: vm %q is scheduled to back up there", name, errdefs.ErrInUse, s.VM)
			}
		}
		return tx.Delete(repoBucket, name)
	})
	if err == nil {
		m.mu.Lock()
		delete(m.repos, rec.Path)
		m.mu.Unlock()
	}
	return err
}

// Repos lists the repositories with what they hold.
func (m *Manager) Repos(ctx context.Context) ([]api.BackupRepo, error) {
	recs, err := m.repoRecords(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.BackupRepo, 0, len(recs))
	for _, r := range recs {
		out = append(out, m.describe(r))
	}
	return out, nil
}

func (m *Manager) describe(rec repoRecord) api.BackupRepo {
	out := api.BackupRepo{Name: rec.Name, Path: rec.Path, MirrorOf: rec.MirrorOf}
	repo, err := m.openPath(rec.Path, rec.Name == DefaultRepo)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	if bs, err := repo.Backups(); err == nil {
		out.Backups = len(bs)
	} else {
		out.Error = err.Error()
	}
	out.Chunks, out.Size, _ = repo.Usage()
	return out
}

func (m *Manager) repoRecord(ctx context.Context, name string) (repoRecord, error) {
	var rec repoRecord
	err := m.store.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, repoBucket, name, &rec) })
	if errors.Is(err, store.ErrNotFound) {
		return rec, fmt.Errorf("backup repository %q: %w (see lodge backup repo list)", name, errdefs.ErrNotFound)
	}
	return rec, err
}

func (m *Manager) repoRecords(ctx context.Context) ([]repoRecord, error) {
	var out []repoRecord
	err := m.store.View(ctx, func(tx store.Tx) error {
		var err error
		out, err = store.ListJSON[repoRecord](tx, repoBucket)
		return err
	})
	sort.Slice(out, func(i, j int) bool {
		return out[i].Name == DefaultRepo || (out[j].Name != DefaultRepo && out[i].Name < out[j].Name)
	})
	return out, err
}

// openPath opens the repository at path once; create makes one there if
// there is none.
func (m *Manager) openPath(path string, create bool) (*backup.Repo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if r, ok := m.repos[path]; ok {
		if isRepo(path) {
			return r, nil
		}
		// Removed (or unmounted) since it was opened.
		delete(m.repos, path)
	}
	r, err := backup.Open(path)
	if err != nil && create && !isRepo(path) {
		r, err = backup.Init(path)
	}
	if err != nil {
		return nil, err
	}
	m.repos[path] = r
	return r, nil
}

func isRepo(path string) bool {
	_, err := os.Stat(filepath.Join(path, "lodge-repo.json"))
	return err == nil
}

func (m *Manager) open(ctx context.Context, name string) (repoRecord, *backup.Repo, error) {
	if name == "" {
		name = DefaultRepo
	}
	rec, err := m.repoRecord(ctx, name)
	if err != nil {
		return rec, nil, err
	}
	r, err := m.openPath(rec.Path, name == DefaultRepo)
	if err != nil {
		return rec, nil, fmt.Errorf("backup repository %q: %w", name, err)
	}
	return rec, r, nil
}

// latest is the newest backup of the VM with uuid in repo, or nil.
func latest(repo *backup.Repo, uuid string) (*backup.Manifest, error) {
	bs, err := repo.Backups()
	if err != nil {
		return nil, err
	}
	for i := len(bs) - 1; i >= 0; i-- {
		if bs[i].VMUUID == uuid {
			return &bs[i], nil
		}
	}
	return nil, nil
}

// spec is what a backup keeps of the VM's settings, for a restore.
type spec struct {
	VM        api.VM `json:"vm"`
	CloudInit string `json:"cloud_init,omitempty"`
}

// Create backs VM name up to repository repoName: incrementally if its
// disks tracked their writes since its last backup there, fully
// otherwise.
func (m *Manager) Create(ctx context.Context, name, repoName string, progress Progress) (api.Backup, error) {
	bs, err := m.CreateGroup(ctx, []string{name}, repoName, progress)
	if err != nil {
		return api.Backup{}, err
	}
	return bs[0], nil
}

// job is one VM's backup within a group.
type job struct {
	name   string
	parent *backup.Manifest
	opts   vm.BackupOptions
	w      *backup.Writer
	p      *vm.BackupPoint
}

// CreateGroup backs several VMs up at one point: every guest is frozen,
// then every VM's point is taken, then the guests are thawed, all before
// any data is read, so that no guest writes between two points; rather
// than each point a whole backup's time after the last. Then each is read
// and committed.
func (m *Manager) CreateGroup(ctx context.Context, names []string, repoName string, progress Progress) (_ []api.Backup, err error) {
	defer func() {
		if err != nil {
			m.log.Error("backup failed", "vms", names, "repo", repoName, "err", err)
		}
	}()
	rec, repo, err := m.open(ctx, repoName)
	if err != nil {
		return nil, fmt.Errorf("backup vm %q: %w", strings.Join(names, ", "), err)
	}
	others, err := m.repoRecords(ctx)
	if err != nil {
		return nil, err
	}
	jobs := make([]*job, 0, len(names))
	defer func() {
		for _, j := range jobs {
			if j.p != nil {
				j.p.Close()
			}
			if j.w != nil {
				_ = j.w.Close()
			}
		}
	}()
	now := time.Now()
	for _, name := range names {
		v, err := m.vms.Get(ctx, name)
		if err != nil {
			return nil, err
		}
		j := &job{name: name}
		if j.parent, err = latest(repo, v.UUID); err != nil {
			return nil, fmt.Errorf("backup vm %q: repository %q: %w", name, rec.Name, err)
		}
		j.opts = vm.BackupOptions{ID: backup.NewID(now)}
		if j.parent != nil {
			j.opts.Parent = j.parent.ID
		}
		for _, o := range others {
			if o.Name == rec.Name {
				continue
			}
			if r, err := m.openPath(o.Path, false); err == nil {
				if b, err := latest(r, v.UUID); err == nil && b != nil {
					j.opts.Keep = append(j.opts.Keep, b.ID)
				}
			}
		}
		// Registered before the point is taken, so that GC keeps what
		// the backup relies on from the start.
		if j.w, err = repo.BeginWrite(ctx); err != nil {
			return nil, fmt.Errorf("backup vm %q to repository %q: %w", name, rec.Name, err)
		}
		jobs = append(jobs, j)
	}
	start := time.Now()
	progress("freeze", 0, 0)
	// Several guests are all frozen before the first point is taken and
	// thawed after the last, so that no guest writes between points.
	thaw := func() {}
	if len(jobs) > 1 {
		thaw = m.vms.FreezeAll(ctx, names)
	}
	for _, j := range jobs {
		if j.p, err = m.vms.OpenBackup(ctx, j.name, j.opts); err != nil {
			thaw()
			return nil, err
		}
	}
	thaw()
	out := make([]api.Backup, 0, len(jobs))
	for _, j := range jobs {
		man, err := m.read(ctx, j.w, repo.ChunkSize(), j.p, j.parent, j.opts, progress)
		if err != nil {
			return nil, fmt.Errorf("backup vm %q to repository %q: %w", j.name, rec.Name, j.p.Cause(err))
		}
		progress("commit", 0, 0)
		if err := j.w.Flush(ctx); err != nil {
			return nil, fmt.Errorf("backup vm %q to repository %q: %w", j.name, rec.Name, err)
		}
		man.Stats.Duration = time.Since(start)
		man.Stats.Yielded = j.p.Yielded()
		if err := j.w.Commit(ctx, &man); err != nil {
			return nil, fmt.Errorf("backup vm %q to repository %q: %w", j.name, rec.Name, err)
		}
		if err := j.p.Commit(context.WithoutCancel(ctx)); err != nil {
			m.log.Warn("backup stored, change tracking not moved on", "vm", j.name, "backup", man.ID, "err", err)
		}
		m.log.Info("backed up", "vm", j.name, "repo", rec.Name, "backup", man.ID, "kind", man.Kind,
			"read", man.Stats.Read, "stored", man.Stats.Stored, "seconds", man.Stats.Duration.Seconds(), "reason", man.Reason)
		out = append(out, view(rec.Name, man, nil))
	}
	m.mirror(ctx, rec.Name, progress)
	return out, nil
}

// read reads the point's disks into the repository and returns the
// backup's manifest, not yet committed.
func (m *Manager) read(ctx context.Context, w *backup.Writer, chunk int, p *vm.BackupPoint, parent *backup.Manifest, opts vm.BackupOptions, progress Progress) (backup.Manifest, error) {
	raw, err := json.Marshal(spec{VM: p.VM, CloudInit: p.CloudInit})
	if err != nil {
		return backup.Manifest{}, err
	}
	man := backup.Manifest{
		Format: 1, ID: opts.ID, VM: p.VM.Name, VMUUID: p.VM.UUID, CreatedAt: time.Now().UTC(),
		Kind: backup.KindIncremental, Consistency: p.Consistency, Spec: raw,
	}
	if parent != nil {
		man.Parent = parent.ID
	}
	type job struct {
		in   backup.DiskInput
		disk string
	}
	var jobs []job
	var total int64
	var full int
	var reasons []string
	for _, d := range p.Disks {
		in := backup.DiskInput{Name: d.Name, Size: d.Size, Reader: d.Data}
		pd := parentDisk(parent, d.Name)
		whole := ""
		switch {
		case parent != nil && pd == nil:
			// Added since: it has no bitmap of the parent's either, and
			// that is no loss of tracking.
			whole = fmt.Sprintf("disk %q is new since backup %s", d.Name, parent.ID)
		case d.Full:
		case pd == nil:
			whole = fmt.Sprintf("disk %q has no parent backup to build on", d.Name)
		case pd.Size > d.Size:
			whole = fmt.Sprintf("disk %q is smaller than in backup %s", d.Name, parent.ID)
		default:
			// A disk grown since reads as the parent's chunks, then
			// zeros, plus what its bitmap says was written. The chunk
			// the old end cut short is whole now and read again.
			in.Parent = pd.Chunks
			if c := int64(chunk); pd.Size < d.Size && pd.Size%c != 0 {
				d.Read = append(d.Read, nbd.Extent{Offset: pd.Size / c * c, Length: c})
				slices.SortFunc(d.Read, func(a, b nbd.Extent) int { return cmp.Compare(a.Offset, b.Offset) })
			}
		}
		if whole != "" {
			if !d.Full {
				if d.Read, err = d.Data.DataExtents(ctx, 0, d.Size); err != nil {
					return man, fmt.Errorf("disk %q: %w", d.Name, err)
				}
			}
			d.Full, d.Reason = true, whole
		}
		if d.Full {
			full++
			if d.Reason != "" {
				reasons = append(reasons, d.Reason)
			}
		}
		in.Read = chunksOf(d.Read, d.Size, int64(chunk))
		total += int64(len(in.Read)) * int64(chunk)
		jobs = append(jobs, job{in: in, disk: d.Name})
	}
	// A backup is full when every disk was read whole; it then stands on
	// no parent. Otherwise the reasons say which disks were.
	if full == len(p.Disks) {
		man.Kind, man.Parent = backup.KindFull, ""
	}
	man.Reason = strings.Join(reasons, "; ")
	var done int64
	var mu sync.Mutex
	for _, j := range jobs {
		dm, st, err := w.BackupDisk(ctx, j.in, func(n int64) {
			mu.Lock()
			done += n
			d := done
			mu.Unlock()
			progress("read", d, total)
		})
		if err != nil {
			return man, fmt.Errorf("disk %q: %w", j.disk, err)
		}
		man.Disks = append(man.Disks, dm)
		man.Stats.Read += st.Read
		man.Stats.Stored += st.Stored
		man.Stats.Data += st.Data
		man.Stats.Chunks += st.Chunks
		man.Stats.NewChunks += st.NewChunks
	}
	return man, nil
}

func parentDisk(parent *backup.Manifest, name string) *backup.DiskManifest {
	if parent == nil {
		return nil
	}
	for i := range parent.Disks {
		if parent.Disks[i].Name == name {
			return &parent.Disks[i]
		}
	}
	return nil
}

// chunksOf lists, in order, the chunks of chunk bytes that ranges touch;
// ranges are sorted by offset and may overlap.
func chunksOf(ranges []nbd.Extent, size, chunk int64) []int64 {
	var out []int64
	for _, r := range ranges {
		if r.Length <= 0 {
			continue
		}
		first := r.Offset / chunk
		last := min(r.Offset+r.Length-1, size-1) / chunk
		for c := first; c <= last; c++ {
			if n := len(out); n == 0 || out[n-1] < c {
				out = append(out, c)
			}
		}
	}
	return out
}

// view is a manifest as the API shows it.
func view(repo string, b backup.Manifest, chain []string) api.Backup {
	out := api.Backup{
		ID: b.ID, VM: b.VM, VMUUID: b.VMUUID, Repo: repo, CreatedAt: b.CreatedAt, Kind: b.Kind, Parent: b.Parent,
		Reason: b.Reason, Consistency: b.Consistency, Size: b.Stats.Data, NewData: b.Stats.Stored, Read: b.Stats.Read,
		Duration: b.Stats.Duration.Seconds(), Yielded: b.Stats.Yielded.Seconds(), Chain: chain,
	}
	for _, d := range b.Disks {
		out.Disks = append(out.Disks, api.BackupDisk{Name: d.Name, Size: d.Size})
	}
	return out
}

// List returns the backups in every repository (or in repo), of every VM
// (or of vmName), oldest first.
func (m *Manager) List(ctx context.Context, vmName, repoName string) ([]api.Backup, error) {
	recs, err := m.repoRecords(ctx)
	if err != nil {
		return nil, err
	}
	var out []api.Backup
	found := repoName == ""
	for _, rec := range recs {
		if repoName != "" && rec.Name != repoName {
			continue
		}
		found = true
		repo, err := m.openPath(rec.Path, rec.Name == DefaultRepo)
		if err != nil {
			return nil, fmt.Errorf("backup repository %q: %w", rec.Name, err)
		}
		bs, err := repo.Backups()
		if err != nil {
			return nil, fmt.Errorf("backup repository %q: %w", rec.Name, err)
		}
		for _, b := range bs {
			if vmName == "" || b.VM == vmName {
				out = append(out, view(rec.Name, b, nil))
			}
		}
	}
	if !found {
		return nil, fmt.Errorf("backup repository %q: %w (see lodge backup repo list)", repoName, errdefs.ErrNotFound)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out, nil
}

// find looks for backup id in repoName, or in every repository.
func (m *Manager) find(ctx context.Context, id, repoName string) (repoRecord, *backup.Repo, backup.Manifest, error) {
	if !backup.ValidID(id) {
		return repoRecord{}, nil, backup.Manifest{}, fmt.Errorf("backup %q: %w: not a backup id (see lodge backup list)", id, errdefs.ErrInvalid)
	}
	recs, err := m.repoRecords(ctx)
	if err != nil {
		return repoRecord{}, nil, backup.Manifest{}, err
	}
	for _, rec := range recs {
		if repoName != "" && rec.Name != repoName {
			continue
		}
		repo, err := m.openPath(rec.Path, rec.Name == DefaultRepo)
		if err != nil {
			continue
		}
		b, err := repo.Backup(id)
		if err == nil {
			return rec, repo, b, nil
		}
		if !errors.Is(err, errdefs.ErrNotFound) {
			return rec, nil, b, fmt.Errorf("backup %q in repository %q: %w", id, rec.Name, err)
		}
	}
	where := "any repository"
	if repoName != "" {
		where = fmt.Sprintf("repository %q", repoName)
	}
	return repoRecord{}, nil, backup.Manifest{}, fmt.Errorf("backup %q: %w in %s (see lodge backup list)", id, errdefs.ErrNotFound, where)
}

// Show returns one backup with the chain of backups it was read on.
func (m *Manager) Show(ctx context.Context, id, repoName string) (api.Backup, error) {
	rec, repo, b, err := m.find(ctx, id, repoName)
	if err != nil {
		return api.Backup{}, err
	}
	var chain []string
	for p := b.Parent; p != "" && len(chain) < 10000; {
		chain = append(chain, p)
		// A parent pruned since ends the chain.
		next := ""
		if pb, perr := repo.Backup(p); perr == nil {
			next = pb.Parent
		}
		p = next
	}
	return view(rec.Name, b, chain), nil
}

// Delete forgets one backup; Prune or GC frees its chunks.
func (m *Manager) Delete(ctx context.Context, id, repoName string) error {
	_, repo, _, err := m.find(ctx, id, repoName)
	if err != nil {
		return err
	}
	return repo.Delete(ctx, id)
}

// Verify reads and checks every chunk of the given backups (all of the
// repository's if ids is empty).
func (m *Manager) Verify(ctx context.Context, repoName string, ids []string, progress Progress) (api.VerifyResult, error) {
	var repo *backup.Repo
	var err error
	if len(ids) > 0 {
		var rec repoRecord
		if rec, repo, _, err = m.find(ctx, ids[0], repoName); err != nil {
			return api.VerifyResult{}, err
		}
		repoName = rec.Name
		for _, id := range ids[1:] {
			if _, err := repo.Backup(id); err != nil {
				return api.VerifyResult{}, fmt.Errorf("backup %q in repository %q: %w", id, repoName, err)
			}
		}
	} else if _, repo, err = m.open(ctx, repoName); err != nil {
		return api.VerifyResult{}, err
	}
	rep, err := repo.Verify(ctx, ids, func(done, total int64) { progress("verify", done, total) })
	out := api.VerifyResult{Backups: rep.Backups, Chunks: rep.Chunks, Bytes: rep.Bytes}
	for _, b := range rep.Bad {
		out.Bad = append(out.Bad, fmt.Sprintf("backup %s disk %q at offset %d: chunk %s: %s", b.Backup, b.Disk, b.Offset, b.Digest, b.Err))
	}
	return out, err
}

// Restore makes a VM from a backup. Under the VM's own name it keeps its
// identity (the VM was lost); under another name it gets a new one, as a
// clone does, so that both can run.
func (m *Manager) Restore(ctx context.Context, id string, req api.RestoreBackup, progress Progress) (api.VM, error) {
	_, repo, b, err := m.find(ctx, id, req.Repo)
	if err != nil {
		return api.VM{}, err
	}
	if req.VM != "" && b.VM != req.VM {
		return api.VM{}, fmt.Errorf("restore backup %s: %w: it is a backup of vm %q, not %q", id, errdefs.ErrInvalid, b.VM, req.VM)
	}
	name := b.VM
	if req.As != "" {
		name = req.As
	}
	if _, err := m.vms.Get(ctx, name); err == nil {
		hint := "restore it under another name with --as NAME, or delete it first"
		if req.As != "" {
			hint = "choose another name"
		}
		return api.VM{}, fmt.Errorf("restore backup %s: vm %q %w: %s", id, name, errdefs.ErrExists, hint)
	}
	var sp spec
	if err := json.Unmarshal(b.Spec, &sp); err != nil {
		return api.VM{}, fmt.Errorf("restore backup %s: settings: %w: %w", id, backup.ErrCorrupt, err)
	}
	sp.VM.Name, sp.VM.Stack = name, req.Stack
	sp.VM.Disks = nil
	for _, d := range b.Disks {
		sp.VM.Disks = append(sp.VM.Disks, api.Disk{Name: d.Name, Size: d.Size, Bus: diskBus(sp, d.Name)})
	}
	im, err := m.vms.BeginImport(ctx, vm.ImportSpec{VM: sp.VM, CloudInit: sp.CloudInit, KeepIdentity: req.As == "", Pool: req.Pool, Data: b.Stats.Data})
	if err != nil {
		if req.As == "" && errors.Is(err, errdefs.ErrExists) {
			// Another VM here has this identity (a clone kept it, or the
			// VM was restored before under another name).
			return api.VM{}, fmt.Errorf("restore backup %s as vm %q: %w; restore it with --as NAME to give it a new identity", id, name, err)
		}
		return api.VM{}, fmt.Errorf("restore backup %s: %w", id, err)
	}
	ok := false
	defer func() {
		if !ok {
			im.Abort(context.WithoutCancel(ctx))
		}
	}()
	var done int64
	for _, d := range b.Disks {
		w, err := im.Entry(bundle.DiskEntry(d.Name))
		if err != nil {
			return api.VM{}, fmt.Errorf("restore backup %s: %w", id, err)
		}
		err = repo.ReadDisk(ctx, d, func(off int64, data []byte) error {
			if _, err := w.WriteAt(data, off); err != nil {
				return err
			}
			done += int64(len(data))
			progress("restore", done, b.Stats.Data)
			return nil
		})
		if err != nil {
			return api.VM{}, fmt.Errorf("restore backup %s: %w", id, err)
		}
	}
	v, err := im.Commit(ctx)
	if err != nil {
		return api.VM{}, fmt.Errorf("restore backup %s: %w", id, err)
	}
	ok = true
	m.log.Info("restored", "backup", id, "vm", v.Name)
	return v, nil
}

func diskBus(sp spec, name string) string {
	for _, d := range sp.VM.Disks {
		if d.Name == name {
			return d.Bus
		}
	}
	return ""
}

// Prune applies a retention policy to one VM's backups in a repository,
// then collects the chunks nothing uses any more.
func (m *Manager) Prune(ctx context.Context, req api.PruneBackups) (api.PruneResult, error) {
	rec, repo, err := m.open(ctx, req.Repo)
	if err != nil {
		return api.PruneResult{}, err
	}
	keep := keepOf(req.Keep)
	if keep.IsZero() {
		return api.PruneResult{}, fmt.Errorf("prune backups of vm %q: %w: give at least one --keep-* rule", req.VM, errdefs.ErrInvalid)
	}
	bs, err := repo.Backups()
	if err != nil {
		return api.PruneResult{}, fmt.Errorf("prune backups of vm %q: repository %q: %w", req.VM, rec.Name, err)
	}
	var mine []backup.Manifest
	for _, b := range bs {
		if b.VM == req.VM {
			mine = append(mine, b)
		}
	}
	kept, drop := backup.Prune(mine, keep)
	out := api.PruneResult{Kept: ids(kept), Removed: ids(drop)}
	if req.DryRun {
		return out, nil
	}
	for _, b := range drop {
		if err := repo.Delete(ctx, b.ID); err != nil {
			return out, fmt.Errorf("prune backups of vm %q: %w", req.VM, err)
		}
	}
	if len(drop) > 0 {
		st, err := repo.GC(ctx)
		if err != nil && !errors.Is(err, errdefs.ErrBusy) {
			return out, fmt.Errorf("prune backups of vm %q: %w", req.VM, err)
		}
		out.Freed = st.Freed
	}
	m.log.Info("pruned", "vm", req.VM, "repo", rec.Name, "kept", len(kept), "removed", len(drop), "freed", out.Freed)
	return out, nil
}

func ids(bs []backup.Manifest) []string {
	out := []string{}
	for _, b := range bs {
		out = append(out, b.ID)
	}
	return out
}

// GC removes the chunks of a repository that no backup uses.
func (m *Manager) GC(ctx context.Context, repoName string) (api.GCResult, error) {
	rec, repo, err := m.open(ctx, repoName)
	if err != nil {
		return api.GCResult{}, err
	}
	st, err := repo.GC(ctx)
	if err != nil {
		return api.GCResult{}, fmt.Errorf("backup repository %q: %w", rec.Name, err)
	}
	return api.GCResult{Chunks: st.Chunks, Removed: st.Removed, Freed: st.Freed}, nil
}

// Sync copies the backups repository to lacks from repository from,
// moving only the chunks it does not have.
func (m *Manager) Sync(ctx context.Context, from, to string, progress Progress) (api.SyncResult, error) {
	if from == to {
		return api.SyncResult{}, fmt.Errorf("sync backup repository %q to itself: %w", from, errdefs.ErrInvalid)
	}
	_, src, err := m.open(ctx, from)
	if err != nil {
		return api.SyncResult{}, err
	}
	_, dst, err := m.open(ctx, to)
	if err != nil {
		return api.SyncResult{}, err
	}
	st, err := backup.Sync(ctx, src, dst, func(done, total int64) { progress("sync", done, total) })
	out := api.SyncResult{Backups: st.Backups, Chunks: st.Chunks, Bytes: st.Bytes}
	if err != nil {
		return out, fmt.Errorf("sync backup repository %q to %q: %w", from, to, err)
	}
	return out, nil
}

// mirror copies new backups of repository name to the repositories that
// mirror it. A mirror that fails is logged: the backup itself is made.
func (m *Manager) mirror(ctx context.Context, name string, progress Progress) {
	recs, err := m.repoRecords(ctx)
	if err != nil {
		return
	}
	for _, r := range recs {
		if r.MirrorOf != name {
			continue
		}
		st, err := m.Sync(ctx, name, r.Name, progress)
		if err != nil {
			m.log.Error("mirror backups", "from", name, "to", r.Name, "err", err)
			continue
		}
		m.log.Info("mirrored", "from", name, "to", r.Name, "backups", st.Backups, "chunks", st.Chunks, "bytes", st.Bytes)
	}
}

// keepOf converts the API's policy.
func keepOf(k api.BackupKeep) backup.Keep {
	return backup.Keep{Last: k.Last, Hourly: k.Hourly, Daily: k.Daily, Weekly: k.Weekly, Monthly: k.Monthly}
}

// RebuildVM rebuilds VM vmName in place from its latest backup (in
// repoName, or in any repository): its disks get the backup's content,
// and it keeps its identity, NICs and settings. It must be stopped.
func (m *Manager) RebuildVM(ctx context.Context, vmName, repoName string, progress Progress) (api.VM, api.Backup, error) {
	bs, err := m.List(ctx, vmName, repoName)
	if err != nil {
		return api.VM{}, api.Backup{}, err
	}
	if len(bs) == 0 {
		return api.VM{}, api.Backup{}, fmt.Errorf("rebuild vm %q from a backup: %w: it has no backup (lodge backup create %s)", vmName, errdefs.ErrNotFound, vmName)
	}
	latest := bs[len(bs)-1]
	_, repo, b, err := m.find(ctx, latest.ID, latest.Repo)
	if err != nil {
		return api.VM{}, api.Backup{}, err
	}
	var done int64
	fill := func(ctx context.Context, disk string, w io.WriterAt) error {
		for _, d := range b.Disks {
			if d.Name != disk {
				continue
			}
			return repo.ReadDisk(ctx, d, func(off int64, data []byte) error {
				if _, err := w.WriteAt(data, off); err != nil {
					return err
				}
				done += int64(len(data))
				progress("restore", done, b.Stats.Data)
				return nil
			})
		}
		return fmt.Errorf("%w: backup %s has no disk %q", errdefs.ErrInvalid, latest.ID, disk)
	}
	v, err := m.vms.Rebuild(ctx, vmName, "", fill)
	if err != nil {
		return api.VM{}, api.Backup{}, fmt.Errorf("rebuild vm %q from backup %s: %w", vmName, latest.ID, err)
	}
	return v, latest, nil
}

// stackDir holds a repository's stack backups, next to its manifests, so
// that whoever has the repository can bring a stack back.
func stackDir(repoPath string) string { return filepath.Join(repoPath, "stacks") }

// PutStackBackup records a stack backup in its repository.
func (m *Manager) PutStackBackup(ctx context.Context, sb api.StackBackup) error {
	rec, _, err := m.open(ctx, sb.Repo)
	if err != nil {
		return err
	}
	dir := stackDir(rec.Path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("stack %q: backup %s: %w", sb.Stack, sb.ID, err)
	}
	raw, err := json.MarshalIndent(sb, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(dir, sb.Stack+"."+sb.ID+".json")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, raw, 0o640); err != nil {
		return fmt.Errorf("stack %q: backup %s: %w", sb.Stack, sb.ID, err)
	}
	if err := syncFile(tmp); err != nil {
		return fmt.Errorf("stack %q: backup %s: %w", sb.Stack, sb.ID, err)
	}
	return os.Rename(tmp, path)
}

// StackBackups lists stack's backups in repository repoName (default:
// the default repository), oldest first.
func (m *Manager) StackBackups(ctx context.Context, stackName, repoName string) ([]api.StackBackup, error) {
	rec, _, err := m.open(ctx, repoName)
	if err != nil {
		return nil, err
	}
	paths, err := filepath.Glob(filepath.Join(stackDir(rec.Path), stackName+".*.json"))
	if err != nil {
		return nil, err
	}
	var out []api.StackBackup
	for _, p := range paths {
		raw, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		var sb api.StackBackup
		if err := json.Unmarshal(raw, &sb); err != nil || sb.Stack != stackName || !backup.ValidID(sb.ID) {
			return nil, fmt.Errorf("stack backup %s: %w: not a stack backup", filepath.Base(p), backup.ErrCorrupt)
		}
		sb.Repo = rec.Name
		out = append(out, sb)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out, nil
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	return f.Sync()
}
