// Package api holds the wire types of Lodge's REST API, shared by the
// daemon and the Go client. Field names are the contract that `-o json`
// shows and tests read.
package api

import "time"

// VM states.
const (
	StateRunning  = "running"
	StateStopped  = "stopped"
	StatePaused   = "paused"
	StateStarting = "starting"
	StateStopping = "stopping"
	StateError    = "error"
)

// NIC is one network card.
type NIC struct {
	Network string `json:"network"`
	MAC     string `json:"mac"`
	IP      string `json:"ip,omitempty"`
}

// Disk is one VM disk.
type Disk struct {
	Name    string `json:"name"`
	Bus     string `json:"bus"`
	Size    int64  `json:"size"`
	Path    string `json:"path"`
	Backing string `json:"backing,omitempty"`
	Pool    string `json:"pool"`
}

// VM is a virtual machine as `lodge show -o json` prints it.
type VM struct {
	Name        string `json:"name"`
	Project     string `json:"project"`
	UUID        string `json:"uuid"`
	State       string `json:"state"`
	StateReason string `json:"state_reason,omitempty"`
	Image       string `json:"image"`
	CPUs        int    `json:"cpus"`
	// MaxCPUs above CPUs lets CPUs be plugged in while the VM runs.
	MaxCPUs   int   `json:"max_cpus,omitempty"`
	Memory    int64 `json:"memory"`
	MaxMemory int64 `json:"max_memory"`
	// MemoryActual is what a running guest has now: its boot memory and
	// what virtio-mem has plugged, less what its balloon holds.
	MemoryActual int64 `json:"memory_actual,omitempty"`
	// MemoryPlugged is the part of MemoryActual plugged in by virtio-mem.
	MemoryPlugged int64 `json:"memory_plugged,omitempty"`
	// MinMemory is the floor the host's auto-balloon may take the VM
	// down to; 0 keeps the VM out of auto-ballooning.
	MinMemory int64 `json:"min_memory,omitempty"`
	// Ballooned is the target the auto-balloon holds the VM at, below
	// Memory, while the host is short of memory; 0 when it does not.
	Ballooned int64 `json:"ballooned,omitempty"`
	// MemoryUsed is what the guest itself uses (its total less what it
	// reports available), from its balloon driver's last report.
	MemoryUsed int64      `json:"memory_used,omitempty"`
	Hostname   string     `json:"hostname"`
	InstanceID string     `json:"instance_id"`
	NICs       []NIC      `json:"nics"`
	Disks      []Disk     `json:"disks"`
	CreatedAt  time.Time  `json:"created_at"`
	StartedAt  *time.Time `json:"started_at"`
	PID        int        `json:"pid,omitempty"`
	Agent      bool       `json:"agent"`
	// CID is the VM's vsock context id, unique on the host.
	CID uint32 `json:"cid"`
	// ClonedFrom names the VM this one was cloned from.
	ClonedFrom string `json:"cloned_from,omitempty"`
	// CurrentSnapshot is the snapshot the VM's state descends from: the
	// last one taken or reverted to.
	CurrentSnapshot string `json:"current_snapshot,omitempty"`
	// Snapshots names the VM's snapshots, parents before children.
	Snapshots []string `json:"snapshots,omitempty"`
	// Stack names the stack the VM is a member of.
	Stack string `json:"stack,omitempty"`
}

// Data disks, as CreateVM.DataDisks and a stack member's disks: take
// them: at most MaxDataDisks (fewer on a bus with fewer places), each at
// least MinDataDisk and a whole number of 512-byte sectors.
const (
	MaxDataDisks = 8
	MinDataDisk  = 1 << 20
)

// DataDiskSizeOK reports whether a data disk may have size bytes.
func DataDiskSizeOK(size int64) bool { return size >= MinDataDisk && size%512 == 0 }

// AddDisk is the body of POST /v1/vms/{name}/disks: a new empty data
// disk of Size bytes.
type AddDisk struct {
	Size int64 `json:"size"`
}

// ResizeDisk is the body of PATCH /v1/vms/{name}/disks/{disk}: the disk's
// new, larger size in bytes.
type ResizeDisk struct {
	Size int64 `json:"size"`
}

// CreateVM is the body of POST /v1/vms.
type CreateVM struct {
	Name      string `json:"name"`
	Image     string `json:"image"`
	CPUs      int    `json:"cpus,omitempty"`
	MaxCPUs   int    `json:"max_cpus,omitempty"`
	Memory    int64  `json:"memory,omitempty"`
	MaxMemory int64  `json:"max_memory,omitempty"`
	MinMemory int64  `json:"min_memory,omitempty"`
	DiskSize  int64  `json:"disk_size,omitempty"`
	// DataDisks adds an empty disk of each size after the root disk,
	// named data1, data2, ... on the root disk's bus and pool.
	DataDisks []int64 `json:"data_disks,omitempty"`
	// Project is the project the VM counts against; default "default".
	Project string `json:"project,omitempty"`
	DiskBus string `json:"disk_bus,omitempty"`
	Pool    string `json:"pool,omitempty"`
	Network string `json:"network,omitempty"`
	// Networks puts a NIC on each, in order; it overrides Network.
	Networks  []string `json:"networks,omitempty"`
	CloudInit string   `json:"cloud_init,omitempty"`
	Start     bool     `json:"start,omitempty"`
	// Stack marks the VM as a member of a stack (set by stack up).
	Stack string `json:"stack,omitempty"`
}

// CloneVM is the body of POST /v1/vms/{name}/clone.
type CloneVM struct {
	Name string `json:"name"`
	// Full makes an independent copy instead of a linked clone.
	Full bool `json:"full,omitempty"`
	// KeepIdentity copies the UUID, MACs, CID, hostname and instance-id,
	// as when moving a VM; such copies can never run at the same time.
	KeepIdentity bool   `json:"keep_identity,omitempty"`
	Pool         string `json:"pool,omitempty"`
	Start        bool   `json:"start,omitempty"`
	// Project is the clone's project; by default the source's.
	Project string `json:"project,omitempty"`
}

// Snapshot is one point in a VM's snapshot tree.
type Snapshot struct {
	Name   string `json:"name"`
	VM     string `json:"vm"`
	Parent string `json:"parent"`
	// Depth is the number of ancestors, for drawing the tree.
	Depth     int       `json:"depth"`
	CreatedAt time.Time `json:"created_at"`
	// Size is what the snapshot holds on disk: its frozen disk layers and
	// its memory state.
	Size int64 `json:"size"`
	// Memory is true when the snapshot holds the running guest's memory
	// and device state, so that revert resumes it.
	Memory  bool `json:"memory"`
	Current bool `json:"current"`
	// Pause is how long the guest's CPUs were stopped to take it, in ms.
	PauseMS     int64  `json:"pause_ms,omitempty"`
	Description string `json:"description,omitempty"`
}

// CreateSnapshot is the body of POST /v1/vms/{name}/snapshots.
type CreateSnapshot struct {
	Name string `json:"name"`
	// NoMemory takes the disks only, with the guest's filesystems frozen
	// through its agent.
	NoMemory    bool   `json:"no_memory,omitempty"`
	Description string `json:"description,omitempty"`
}

// RevertSnapshot is the body of POST /v1/vms/{name}/snapshots/{snap}/revert.
type RevertSnapshot struct {
	// Start boots the VM after reverting to a snapshot without memory.
	Start bool `json:"start,omitempty"`
}

// PublishImage is the body of POST /v1/images/publish.
type PublishImage struct {
	VM   string `json:"vm"`
	Name string `json:"name"`
	// Generalize clears the guest's identity inside the new image.
	Generalize bool `json:"generalize,omitempty"`
}

// SetVM is the body of PATCH /v1/vms/{name}: the settings to change.
// Memory changes while the VM runs; CPUs and MaxMemory while it is
// stopped.
type SetVM struct {
	Memory    int64 `json:"memory,omitempty"`
	MaxMemory int64 `json:"max_memory,omitempty"`
	// MinMemory, when present, replaces the auto-balloon floor; 0 takes
	// the VM out of auto-ballooning.
	MinMemory *int64 `json:"min_memory,omitempty"`
	CPUs      int    `json:"cpus,omitempty"`
	MaxCPUs   int    `json:"max_cpus,omitempty"`
	// Project moves the VM to another project, if it fits there.
	Project string `json:"project,omitempty"`
	// Networks, for a stopped VM, lays out its NICs anew, one per
	// network in order; a NIC that stays on its network keeps its MAC.
	// It is set alone, not with other settings.
	Networks []string `json:"networks,omitempty"`
}

// IsZero reports whether the request changes nothing.
func (s SetVM) IsZero() bool {
	return s.Memory == 0 && s.MaxMemory == 0 && s.MinMemory == nil && s.CPUs == 0 && s.MaxCPUs == 0 && s.Project == "" && len(s.Networks) == 0
}

// StopVM is the body of POST /v1/vms/{name}/stop.
type StopVM struct {
	Force bool `json:"force,omitempty"`
	// TimeoutSeconds is how long to wait for the guest to power off before
	// forcing; 0 means the daemon's default.
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
}

// ExecRequest is the body of POST /v1/vms/{name}/exec.
type ExecRequest struct {
	Command []string `json:"command"`
	Env     []string `json:"env,omitempty"`
	Stdin   []byte   `json:"stdin,omitempty"`
	// WaitSeconds is how long to wait for the agent to come up.
	WaitSeconds    int `json:"wait_seconds,omitempty"`
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
}

// ExecResult is what the guest command did.
type ExecResult struct {
	ExitCode int    `json:"exit_code"`
	Signal   int    `json:"signal,omitempty"`
	Stdout   []byte `json:"stdout"`
	Stderr   []byte `json:"stderr"`
}

// Image is one entry of the image library.
type Image struct {
	Name         string `json:"name"`
	Path         string `json:"path"`
	Format       string `json:"format"`
	SourceFormat string `json:"source_format"`
	VirtualSize  int64  `json:"virtual_size"`
	ActualSize   int64  `json:"actual_size"`
	// Parent is the image this one is layered on; Chain runs from this
	// image down to the standalone one at the bottom.
	Parent string   `json:"parent,omitempty"`
	Chain  []string `json:"chain"`
	// Children are the images layered directly on this one.
	Children []string `json:"children"`
	// Generalized images have had their guest identity cleared.
	Generalized bool `json:"generalized,omitempty"`
	// PublishedFrom names the VM the image was published from.
	PublishedFrom string `json:"published_from,omitempty"`
	// CPUs and Memory are the defaults for VMs made from the image, as an
	// OVF descriptor recommends them; 0 means Lodge's defaults.
	CPUs      int       `json:"cpus,omitempty"`
	Memory    int64     `json:"memory,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UsedBy    []string  `json:"used_by"`
}

// ImportImage is the body of POST /v1/images. Path is read by the daemon,
// so it must be a path on the daemon's host.
type ImportImage struct {
	Name string `json:"name"`
	Path string `json:"path"`
}

// Pool is a storage pool.
type Pool struct {
	Name  string `json:"name"`
	Path  string `json:"path"`
	Total int64  `json:"total"`
	Free  int64  `json:"free"`
	Error string `json:"error,omitempty"`
}

// HostInfo is `lodge host info -o json`.
type HostInfo struct {
	Accel           string `json:"accel"`
	AccelReason     string `json:"accel_reason"`
	AccelVerified   bool   `json:"accel_verified"`
	CPUs            int    `json:"cpus"`
	MemoryTotal     int64  `json:"memory_total"`
	MemoryAllocated int64  `json:"memory_allocated"`
	MemoryLimit     int64  `json:"memory_limit"`
	MemoryFree      int64  `json:"memory_free"`
	// VMOverhead is what each running VM counts for beyond its guest's
	// memory (QEMU itself, and TCG's code cache); it is in MemoryAllocated.
	VMOverhead int64   `json:"vm_overhead"`
	Overcommit float64 `json:"overcommit"`
	// MemoryAvailable is the host's available memory (MemAvailable), which
	// the auto-balloon watches.
	MemoryAvailable int64 `json:"memory_available"`
	AutoBalloon     bool  `json:"auto_balloon"`
	// AutoBalloonThreshold is the available memory below which idle VMs
	// give memory back.
	AutoBalloonThreshold int64  `json:"auto_balloon_threshold"`
	QEMUVersion          string `json:"qemu_version"`
	Home                 string `json:"home"`
	Pools                []Pool `json:"pools"`
	VMs                  int    `json:"vms"`
	Running              int    `json:"running"`
	DaemonPID            int    `json:"daemon_pid"`
}

// SetHost is the body of PATCH /v1/host: limits to change; 0 keeps one.
type SetHost struct {
	MemoryLimit          int64   `json:"memory_limit,omitempty"`
	Overcommit           float64 `json:"overcommit,omitempty"`
	AutoBalloon          *bool   `json:"auto_balloon,omitempty"`
	AutoBalloonThreshold int64   `json:"auto_balloon_threshold,omitempty"`
}

// Operation states.
const (
	OpRunning   = "running"
	OpSucceeded = "succeeded"
	OpFailed    = "failed"
	OpCancelled = "cancelled"
)

// Operation is a long job.
type Operation struct {
	ID     string `json:"id"`
	Kind   string `json:"kind"`
	Target string `json:"target"`
	State  string `json:"state"`
	Stage  string `json:"stage,omitempty"`
	Done   int64  `json:"done"`
	Total  int64  `json:"total"`
	// Unit of Done and Total: bytes unless it says steps.
	Unit       string     `json:"unit,omitempty"`
	Error      string     `json:"error,omitempty"`
	Code       string     `json:"code,omitempty"`
	CreatedAt  time.Time  `json:"created_at"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
	// Result carries the operation's object, e.g. the VM after create.
	Result any `json:"result,omitempty"`
}

// UnitSteps marks an operation whose progress counts steps, not bytes.
const UnitSteps = "steps"

// Event is one entry of the event stream.
type Event struct {
	Time    time.Time `json:"time"`
	Kind    string    `json:"kind"`
	Target  string    `json:"target"`
	Message string    `json:"message,omitempty"`
	State   string    `json:"state,omitempty"`
}

// Error is the body of every non-2xx reply.
type Error struct {
	Error string `json:"error"`
	// Code is a stable word callers can branch on: not_found, conflict,
	// bad_request, busy, internal.
	Code string `json:"code"`
}

// ProjectLimits caps what the VMs of a project may take together: the sum
// of their memory settings, CPUs and disk sizes, and their number. 0 is
// no limit.
type ProjectLimits struct {
	Memory int64 `json:"memory,omitempty"`
	CPUs   int64 `json:"cpus,omitempty"`
	Disk   int64 `json:"disk,omitempty"`
	VMs    int64 `json:"vms,omitempty"`
}

// Project groups VMs under common limits. Every VM is in one; "default"
// always exists.
type Project struct {
	Name        string        `json:"name"`
	Description string        `json:"description,omitempty"`
	Limits      ProjectLimits `json:"limits"`
	// Usage is what the project's VMs take now, counted as Limits are.
	Usage     ProjectLimits `json:"usage"`
	CreatedAt time.Time     `json:"created_at"`
}

// SetProject is the body of PATCH /v1/projects/{name}: the limits given
// replace the old ones (0 lifts one).
type SetProject struct {
	Description *string `json:"description,omitempty"`
	Memory      *int64  `json:"memory,omitempty"`
	CPUs        *int64  `json:"cpus,omitempty"`
	Disk        *int64  `json:"disk,omitempty"`
	VMs         *int64  `json:"vms,omitempty"`
}

// ApplyTo gives p the limits and description that s sets.
func (s SetProject) ApplyTo(p *Project) {
	for _, f := range []struct{ v, dst *int64 }{
		{s.Memory, &p.Limits.Memory}, {s.CPUs, &p.Limits.CPUs}, {s.Disk, &p.Limits.Disk}, {s.VMs, &p.Limits.VMs},
	} {
		if f.v != nil {
			*f.dst = *f.v
		}
	}
	if s.Description != nil {
		p.Description = *s.Description
	}
}

// ImportOptions are the query parameters of POST /v1/import and the body
// of POST /v1/transfers.
type ImportOptions struct {
	// Name renames the VM; by default it keeps the bundle's name.
	Name string `json:"name,omitempty"`
	// KeepIdentity keeps UUID, MACs, instance-id and hostname, for a move.
	KeepIdentity bool   `json:"keep_identity,omitempty"`
	Project      string `json:"project,omitempty"`
	Pool         string `json:"pool,omitempty"`
}

// Transfer is a receiving daemon's view of a bundle being sent to it.
type Transfer struct {
	ID string `json:"id"`
	// Next is the chunk the sender must resume from.
	Next uint64 `json:"next"`
	// Feeding is true while the receiver is still taking a stream; a
	// sender resumes only once it is false.
	Feeding bool `json:"feeding,omitempty"`
	Done    bool `json:"done"`
	// VM is the imported VM, once done.
	VM *VM `json:"vm,omitempty"`
}

// SendVM is the body of POST /v1/vms/{name}/send.
type SendVM struct {
	// To is the receiving daemon's address: https://HOST:PORT.
	To string `json:"to"`
	// Token is the receiver's access token (`lodge host token` there).
	Token       string `json:"token"`
	Move        bool   `json:"move,omitempty"`
	Compression string `json:"compression,omitempty"`
	// WithSnapshots sends the snapshot tree too (a stopped VM only).
	WithSnapshots bool `json:"with_snapshots,omitempty"`
	ImportOptions
}

// HostToken is GET /v1/host/token: how remote daemons reach this one.
type HostToken struct {
	// Listen is the HTTPS address, "" without a TCP listener.
	Listen string `json:"listen"`
	Token  string `json:"token"`
}

// ExportOptions are the query parameters of GET /v1/vms/{name}/export.
type ExportOptions struct {
	// Format is "lodge" (default) or "ova".
	Format      string `json:"format,omitempty"`
	Compression string `json:"compression,omitempty"`
	// WithSnapshots carries the snapshot tree (a stopped VM only).
	WithSnapshots bool `json:"snapshots,omitempty"`
}

// BackupRepo is a registered backup repository.
type BackupRepo struct {
	Name string `json:"name"`
	Path string `json:"path"`
	// MirrorOf names a repository whose new backups are copied here
	// after each one is made.
	MirrorOf string `json:"mirror_of,omitempty"`
	Backups  int    `json:"backups"`
	// Size is what the repository's chunks take on disk.
	Size   int64  `json:"size"`
	Chunks int    `json:"chunks"`
	Error  string `json:"error,omitempty"`
}

// Backup is one backup point of a VM in a repository.
type Backup struct {
	ID        string    `json:"id"`
	VM        string    `json:"vm"`
	VMUUID    string    `json:"vm_uuid,omitempty"`
	Repo      string    `json:"repo"`
	CreatedAt time.Time `json:"created_at"`
	// Kind is "full" or "incremental": how it was read. Every backup can
	// be restored alone.
	Kind   string `json:"kind"`
	Parent string `json:"parent,omitempty"`
	// Reason says why a backup is full when an earlier one existed.
	Reason      string `json:"reason,omitempty"`
	Consistency string `json:"consistency"`
	// Size is the data the backup holds (its non-zero chunks), NewData
	// what it added to the repository (compressed), Read what was read
	// from the VM.
	Size     int64   `json:"size"`
	NewData  int64   `json:"new_data"`
	Read     int64   `json:"read"`
	Duration float64 `json:"duration_seconds"`
	// Yielded is the part of Duration the reading paused while the
	// guest wrote hard, so as not to slow it.
	Yielded float64      `json:"yielded_seconds,omitempty"`
	Disks   []BackupDisk `json:"disks,omitempty"`
	// Chain lists the backups this one was read on top of, newest first.
	Chain []string `json:"chain,omitempty"`
}

// BackupDisk is one disk in a backup.
type BackupDisk struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// CreateBackupRepo registers a repository.
type CreateBackupRepo struct {
	Name     string `json:"name"`
	Path     string `json:"path"`
	MirrorOf string `json:"mirror_of,omitempty"`
}

// CreateBackup backs a VM up.
type CreateBackup struct {
	Repo string `json:"repo,omitempty"`
}

// RestoreBackup makes a VM from a backup.
type RestoreBackup struct {
	// VM is the name the backup was taken of; it is restored under it,
	// with its identity, unless As gives another name (and a new
	// identity).
	VM    string `json:"vm"`
	As    string `json:"as,omitempty"`
	Repo  string `json:"repo,omitempty"`
	Pool  string `json:"pool,omitempty"`
	Start bool   `json:"start,omitempty"`
	// Stack labels the restored VM as a member of a stack (stack restore).
	Stack string `json:"stack,omitempty"`
}

// BackupKeep is a retention policy: how many backups to keep per VM, by
// recency and by period. All zero keeps everything.
type BackupKeep struct {
	Last    int `json:"last,omitempty"`
	Hourly  int `json:"hourly,omitempty"`
	Daily   int `json:"daily,omitempty"`
	Weekly  int `json:"weekly,omitempty"`
	Monthly int `json:"monthly,omitempty"`
}

// PruneBackups applies a retention policy to one VM's backups in a
// repository, then collects the chunks nothing uses.
type PruneBackups struct {
	VM     string     `json:"vm"`
	Repo   string     `json:"repo,omitempty"`
	Keep   BackupKeep `json:"keep"`
	DryRun bool       `json:"dry_run,omitempty"`
}

// PruneResult says what a prune kept and removed.
type PruneResult struct {
	Kept    []string `json:"kept"`
	Removed []string `json:"removed"`
	// Freed is what garbage collection gave back.
	Freed int64 `json:"freed"`
}

// SyncBackups copies the backups To lacks from From.
type SyncBackups struct {
	From string `json:"from"`
	To   string `json:"to"`
}

// SyncResult says what a sync copied.
type SyncResult struct {
	Backups int   `json:"backups"`
	Chunks  int   `json:"chunks"`
	Bytes   int64 `json:"bytes"`
}

// VerifyResult says what a verify read and what it found wrong.
type VerifyResult struct {
	Backups int      `json:"backups"`
	Chunks  int      `json:"chunks"`
	Bytes   int64    `json:"bytes"`
	Bad     []string `json:"bad,omitempty"`
}

// GCResult says what garbage collection removed.
type GCResult struct {
	Chunks  int   `json:"chunks"`
	Removed int   `json:"removed"`
	Freed   int64 `json:"freed"`
}

// BackupSchedule makes the daemon back a VM up on a schedule and prune
// by a retention policy after each backup.
type BackupSchedule struct {
	VM   string `json:"vm"`
	Repo string `json:"repo,omitempty"`
	// Schedule is an interval ("1h", "1d") or a cron expression
	// ("0 3 * * *").
	Schedule  string     `json:"schedule"`
	Keep      BackupKeep `json:"keep"`
	LastRun   *time.Time `json:"last_run,omitempty"`
	NextRun   *time.Time `json:"next_run,omitempty"`
	LastError string     `json:"last_error,omitempty"`
}

// BackupFileQuery names a file or directory inside a backup's disk.
type BackupFileQuery struct {
	Path string `json:"path"`
	Repo string `json:"repo,omitempty"`
	// Disk is the disk's name; the first disk if empty.
	Disk string `json:"disk,omitempty"`
	// Partition is the partition's number; 0 looks through every ext
	// filesystem on the disk for the path.
	Partition int `json:"partition,omitempty"`
}

// BackupFile is one entry of a directory inside a backup.
type BackupFile struct {
	Name string `json:"name"`
	// Type is "file", "dir", "symlink" or "other".
	Type string `json:"type"`
	Mode uint32 `json:"mode"`
	Size int64  `json:"size"`
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
}

// StackUp brings a stack up from its file.
type StackUp struct {
	// Path is the file's name, for messages.
	Path string `json:"path"`
	// File is the stack file's YAML.
	File string `json:"file"`
	// Recreate lets up rebuild a member whose image the file changed, on
	// the new image: its disks are replaced, its identity kept. Without
	// it such a member is refused, since its disks' data would be lost.
	Recreate bool `json:"recreate,omitempty"`
}

// StackMember is one VM of a stack, as `stack status` shows it.
type StackMember struct {
	Name      string     `json:"name"`
	VM        string     `json:"vm"`
	State     string     `json:"state"`
	Health    string     `json:"health"`
	IPs       []string   `json:"ips"`
	StartedAt *time.Time `json:"started_at"`
	// ReadyAt is when the member was first seen ready: its health check
	// passed, or (without one) it started; a oneshot member when it
	// completed.
	ReadyAt *time.Time `json:"ready_at"`
}

// StackStatus is a stack's members.
type StackStatus struct {
	Name    string        `json:"name"`
	Members []StackMember `json:"members"`
}

// StackDown stops a stack, dependents first.
type StackDown struct {
	Delete bool `json:"delete,omitempty"`
}

// StackRebuild is the body of POST /v1/stacks/{name}/rebuild.
type StackRebuild struct {
	// Member is a member's name (all its instances) or one instance's
	// (app-2).
	Member string `json:"member"`
	// FromBackup takes each VM's latest backup (in Repo, or any
	// repository) instead of a fresh disk on its image.
	FromBackup bool   `json:"from_backup,omitempty"`
	Repo       string `json:"repo,omitempty"`
}

// Network is a network VMs attach to, as `lodge net list -o json` prints
// it. "nat" is built in: QEMU's user-mode NAT, private to each VM.
type Network struct {
	Name string `json:"name"`
	// Builtin marks "nat", which cannot be created or deleted.
	Builtin bool   `json:"builtin,omitempty"`
	Subnet  string `json:"subnet,omitempty"`
	Gateway string `json:"gateway,omitempty"`
	// Mode is "bridge" (a Linux bridge with dnsmasq; needs root) or
	// "user" (a switch inside the daemon; any user).
	Mode string `json:"mode,omitempty"`
	// Bridge is the host's Linux bridge, in bridge mode.
	Bridge string `json:"bridge,omitempty"`
	// NAT routes the network to the outside through the host.
	NAT bool `json:"nat"`
	// Isolated keeps the guests from the host and the outside: they
	// reach only each other (and DHCP and DNS).
	Isolated bool `json:"isolated"`
	// Stack is the stack that declared the network, if any.
	Stack     string         `json:"stack,omitempty"`
	Leases    []NetworkLease `json:"leases,omitempty"`
	CreatedAt time.Time      `json:"created_at,omitzero"`
}

// NetworkLease is the address a VM's NIC gets on a network, and the names
// it answers to there.
type NetworkLease struct {
	VM    string   `json:"vm"`
	MAC   string   `json:"mac"`
	IP    string   `json:"ip"`
	Names []string `json:"names"`
	// Port is the NIC's datagram socket on a user-mode network.
	Port string `json:"port,omitempty"`
}

// CreateNetwork is the body of POST /v1/networks.
type CreateNetwork struct {
	Name string `json:"name"`
	// Subnet is an IPv4 CIDR; empty picks a free /24 in 10.0.0.0/8.
	Subnet   string `json:"subnet,omitempty"`
	NAT      bool   `json:"nat,omitempty"`
	Isolated bool   `json:"isolated,omitempty"`
	Stack    string `json:"stack,omitempty"`
	// Mode is "bridge", "user", or empty: bridge where the daemon may
	// build one, user otherwise.
	Mode string `json:"mode,omitempty"`
}

// StackBackup is a stack backed up at one point: its file and one backup
// per member, in one repository.
type StackBackup struct {
	ID        string    `json:"id"`
	Stack     string    `json:"stack"`
	Repo      string    `json:"repo"`
	CreatedAt time.Time `json:"created_at"`
	// Path and File are the stack file as `stack up` last read it.
	Path string `json:"path"`
	File string `json:"file"`
	// Members maps each member VM to its backup's id.
	Members map[string]string `json:"members"`
}

// StackBackupRequest is the body of POST /v1/stacks/{name}/backup.
type StackBackupRequest struct {
	Repo string `json:"repo,omitempty"`
}

// StackRestore is the body of POST /v1/stacks/restore.
type StackRestore struct {
	// Stack is the stack's name; From picks one of its stack backups
	// (default: the latest) in Repo.
	Stack string `json:"stack"`
	From  string `json:"from,omitempty"`
	Repo  string `json:"repo,omitempty"`
}

// BenchRequest asks for a benchmark of a running VM against its host.
type BenchRequest struct {
	// Duration of each test in each repeat, e.g. "1s"; default 1s.
	Duration string `json:"duration,omitempty"`
	// Repeats of the whole set on each side, alternated; default 3.
	Repeats int `json:"repeats,omitempty"`
	// With is how many extra busy VMs run alongside.
	With int `json:"with,omitempty"`
	// DiskBuses repeats the disk tests on a scratch disk on each bus;
	// default virtio.
	DiskBuses []string `json:"disk_buses,omitempty"`
	// DiskSize is the scratch disk's tested area; default 256 MiB.
	DiskSize int64 `json:"disk_size,omitempty"`
	// Save keeps the report for bench history.
	Save bool `json:"save,omitempty"`
}

// BenchReport is what a VM gets compared with its host.
type BenchReport struct {
	ID     string `json:"id,omitempty"`
	VM     string `json:"vm"`
	Accel  string `json:"accel"`
	CPUs   int    `json:"cpus"`
	Memory int64  `json:"memory"`
	// HostCPUs is how many CPUs the host has; the all-CPU rows use as
	// many threads as the VM has vCPUs on both sides.
	HostCPUs  int           `json:"host_cpus"`
	Repeats   int           `json:"repeats"`
	Duration  float64       `json:"duration"`
	With      int           `json:"with"`
	DiskBuses []string      `json:"disk_buses"`
	DiskSize  int64         `json:"disk_size"`
	CreatedAt time.Time     `json:"created_at"`
	Seconds   float64       `json:"seconds"`
	Rows      []BenchRow    `json:"rows"`
	Notes     []string      `json:"notes,omitempty"`
	Saved     bool          `json:"saved,omitempty"`
	Summary   *BenchSummary `json:"summary,omitempty"`
	// Booted is set when the VM was stopped and Lodge booted it for the
	// run, with its scratch disks attached (the only way to test IDE).
	Booted bool `json:"booted,omitempty"`
}

// BenchRow is one test: the host's and the guest's medians, the guest as
// a percentage of the host, and each side's spread over the repeats.
type BenchRow struct {
	Test    string  `json:"test"`
	Bus     string  `json:"bus,omitempty"`
	Unit    string  `json:"unit"`
	Host    float64 `json:"host"`
	Guest   float64 `json:"guest"`
	Percent float64 `json:"percent"`
	// Spreads are half the range over the repeats, as a percentage of
	// the median.
	HostSpread    float64 `json:"host_spread"`
	GuestSpread   float64 `json:"guest_spread"`
	Repeats       int     `json:"repeats"`
	LowerIsBetter bool    `json:"lower_is_better,omitempty"`
	// HostBuffered is set when the host's file system refused direct
	// I/O, so the host's disk figures include its page cache.
	HostBuffered bool `json:"host_buffered,omitempty"`
}

// BenchSummary is the geometric mean of each group's percentages.
type BenchSummary struct {
	CPU    float64 `json:"cpu"`
	Memory float64 `json:"memory"`
	Disk   float64 `json:"disk"`
}
