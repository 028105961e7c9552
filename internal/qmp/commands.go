package qmp

import (
	"context"
	"errors"
	"fmt"
)

// Status is the reply to query-status.
type Status struct {
	// Status is QEMU's run state: "running", "paused", "shutdown",
	// "inmigrate", "prelaunch", "internal-error", ...
	Status string `json:"status"`
	// Running is true only while the guest's CPUs run.
	Running bool `json:"running"`
}

// QueryStatus reports whether the guest runs, and if not, why.
func QueryStatus(ctx context.Context, m Monitor) (Status, error) {
	var st Status
	if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
		return Status{}, err
	}
	return st, nil
}

// Stop pauses the guest's CPUs.
func Stop(ctx context.Context, m Monitor) error {
	return m.Execute(ctx, "stop", nil, nil)
}

// Cont resumes a paused guest.
func Cont(ctx context.Context, m Monitor) error {
	return m.Execute(ctx, "cont", nil, nil)
}

// SystemPowerdown presses the guest's ACPI power button. Success means
// only that the button was pressed: the guest may ignore it.
func SystemPowerdown(ctx context.Context, m Monitor) error {
	return m.Execute(ctx, "system_powerdown", nil, nil)
}

// SystemReset resets the guest as if by the reset button.
func SystemReset(ctx context.Context, m Monitor) error {
	return m.Execute(ctx, "system_reset", nil, nil)
}

// Quit makes QEMU exit at once, without telling the guest.
//
// QEMU may exit before its reply reaches us, so the connection ending
// while we wait counts as success. A connection that had already ended
// before the call does not: then we cannot know that QEMU got the
// command.
func Quit(ctx context.Context, m Monitor) error {
	select {
	case <-m.Done():
		return fmt.Errorf("qmp quit: %w", ErrClosed)
	default:
	}
	err := m.Execute(ctx, "quit", nil, nil)
	if errors.Is(err, ErrClosed) {
		return nil
	}
	return err
}

// BlockDevice is one entry of query-block: a guest device and the node at
// the top of its disk's chain.
type BlockDevice struct {
	// QDev is the device's id or QOM path.
	QDev     string `json:"qdev"`
	Inserted *struct {
		NodeName string `json:"node-name"`
		File     string `json:"file"`
	} `json:"inserted,omitempty"`
}

// QueryBlock lists the guest's block devices.
func QueryBlock(ctx context.Context, m Monitor) ([]BlockDevice, error) {
	var out []BlockDevice
	if err := m.Execute(ctx, "query-block", nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// OpenDisk opens the qcow2 file at file as node, with the options a VM's
// own disks have on its command line, and without its backing file: a
// caller that wants one attaches it.
func OpenDisk(ctx context.Context, m Monitor, node, file string) error {
	return m.Execute(ctx, "blockdev-add", map[string]any{
		"driver": "qcow2", "node-name": node, "discard": "unmap", "backing": nil,
		"file": map[string]any{
			"driver": "file", "filename": file, "node-name": node + "-file",
			"cache": map[string]any{"direct": false}, "discard": "unmap", "drop-cache": false,
		},
	}, nil)
}

// SnapshotExisting puts the qcow2 overlay at file, made beforehand with
// node's file as its backing file, on top of node and moves the guest's
// writes to it, all in QEMU's main loop, so the guest sees no pause
// beyond one iteration. node becomes read-only; the new top is named
// newNode. QEMU only opens the file (creating it there would sync it, and
// a sync waits behind whatever else the host is writing), with the
// options a VM's own disks have.
func SnapshotExisting(ctx context.Context, m Monitor, node, file, newNode string) error {
	if err := OpenDisk(ctx, m, newNode, file); err != nil {
		return err
	}
	if err := m.Execute(ctx, "blockdev-snapshot", map[string]any{"node": node, "overlay": newNode}, nil); err != nil {
		_ = BlockdevDel(context.WithoutCancel(ctx), m, newNode)
		return err
	}
	return nil
}

// MigrationStatus is the part of query-migrate Lodge reads.
type MigrationStatus struct {
	// Status is "none", "setup", "active", "completed", "failed",
	// "cancelling", "cancelled", ...
	Status string `json:"status"`
	RAM    *struct {
		Transferred int64 `json:"transferred"`
		Remaining   int64 `json:"remaining"`
		Total       int64 `json:"total"`
		// DirtySyncCount counts the passes over guest memory so far.
		DirtySyncCount int64 `json:"dirty-sync-count"`
	} `json:"ram,omitempty"`
	// Downtime is how long the guest was paused, in ms, once completed.
	Downtime  int64  `json:"downtime,omitempty"`
	ErrorDesc string `json:"error-desc,omitempty"`
}

// QueryMigrate reports the outgoing or incoming migration's progress.
func QueryMigrate(ctx context.Context, m Monitor) (MigrationStatus, error) {
	var st MigrationStatus
	if err := m.Execute(ctx, "query-migrate", nil, &st); err != nil {
		return MigrationStatus{}, err
	}
	return st, nil
}

// SetMigrationCapabilities turns migration capabilities on or off.
func SetMigrationCapabilities(ctx context.Context, m Monitor, caps map[string]bool) error {
	list := make([]map[string]any, 0, len(caps))
	for name, on := range caps {
		list = append(list, map[string]any{"capability": name, "state": on})
	}
	return m.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil)
}

// SetMigrationParameters sets migration parameters such as max-bandwidth.
func SetMigrationParameters(ctx context.Context, m Monitor, params map[string]any) error {
	return m.Execute(ctx, "migrate-set-parameters", params, nil)
}

// Migrate starts an outgoing migration to uri; it returns at once and
// QueryMigrate follows it.
func Migrate(ctx context.Context, m Monitor, uri string) error {
	return m.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil)
}

// MigrateIncoming starts loading state into a QEMU started with
// -incoming defer.
func MigrateIncoming(ctx context.Context, m Monitor, uri string) error {
	return m.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil)
}

// MigrateContinue lets a migration paused in state (pre-switchover, with
// the pause-before-switchover capability) go on.
func MigrateContinue(ctx context.Context, m Monitor, state string) error {
	return m.Execute(ctx, "migrate-continue", map[string]any{"state": state}, nil)
}

// MigrateCancel stops an outgoing migration.
func MigrateCancel(ctx context.Context, m Monitor) error {
	return m.Execute(ctx, "migrate_cancel", nil, nil)
}

// BlockNode is one entry of query-named-block-nodes.
type BlockNode struct {
	NodeName     string        `json:"node-name"`
	Driver       string        `json:"drv"`
	File         string        `json:"file"`
	DirtyBitmaps []DirtyBitmap `json:"dirty-bitmaps,omitempty"`
}

// DirtyBitmap is a node's record of the clusters written since the bitmap
// was added. One QEMU could not save (it was killed) comes back
// Inconsistent and no longer says anything.
type DirtyBitmap struct {
	Name         string `json:"name"`
	Recording    bool   `json:"recording"`
	Persistent   bool   `json:"persistent"`
	Inconsistent bool   `json:"inconsistent"`
	Busy         bool   `json:"busy"`
	Count        int64  `json:"count"`
	Granularity  int64  `json:"granularity"`
}

// QueryNamedBlockNodes lists every block node, including the backing
// nodes QEMU opened and named itself.
func QueryNamedBlockNodes(ctx context.Context, m Monitor) ([]BlockNode, error) {
	var out []BlockNode
	if err := m.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// BlockStream starts a job that copies into node the data it reads
// through its backing chain down to (not including) base, then makes base
// its backing file; base "" streams the whole chain. The job stays until
// JobDismiss so that its result can be read.
func BlockStream(ctx context.Context, m Monitor, jobID, node, base string) error {
	args := map[string]any{"job-id": jobID, "device": node, "auto-dismiss": false}
	if base != "" {
		args["base-node"] = base
	}
	return m.Execute(ctx, "block-stream", args, nil)
}

// Job is one entry of query-jobs.
type Job struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Status   string `json:"status"`
	Current  int64  `json:"current-progress"`
	Total    int64  `json:"total-progress"`
	ErrorMsg string `json:"error,omitempty"`
}

// QueryJobs lists the block jobs.
func QueryJobs(ctx context.Context, m Monitor) ([]Job, error) {
	var out []Job
	if err := m.Execute(ctx, "query-jobs", nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// JobDismiss removes a concluded job.
func JobDismiss(ctx context.Context, m Monitor, id string) error {
	return m.Execute(ctx, "job-dismiss", map[string]any{"id": id}, nil)
}

// JobCancel stops a running job.
func JobCancel(ctx context.Context, m Monitor, id string) error {
	return m.Execute(ctx, "job-cancel", map[string]any{"id": id}, nil)
}

// Balloon asks the guest's balloon driver to leave it target bytes.
func Balloon(ctx context.Context, m Monitor, target int64) error {
	return m.Execute(ctx, "balloon", map[string]any{"value": target}, nil)
}

// QueryBalloon reports how much memory the guest has now.
func QueryBalloon(ctx context.Context, m Monitor) (int64, error) {
	var out struct {
		Actual int64 `json:"actual"`
	}
	if err := m.Execute(ctx, "query-balloon", nil, &out); err != nil {
		return 0, err
	}
	return out.Actual, nil
}

// The balloon device's QOM path; Lodge gives it the id balloon0.
const balloonPath = "/machine/peripheral/balloon0"

// EnableBalloonStats asks the guest's balloon driver to report its
// memory statistics every interval seconds.
func EnableBalloonStats(ctx context.Context, m Monitor, interval int) error {
	return m.Execute(ctx, "qom-set", map[string]any{"path": balloonPath, "property": "guest-stats-polling-interval", "value": interval}, nil)
}

// BalloonStats is the part of the balloon's guest-stats Lodge reads; a
// value the guest does not report is -1.
type BalloonStats struct {
	Stats struct {
		Total     int64 `json:"stat-total-memory"`
		Free      int64 `json:"stat-free-memory"`
		Available int64 `json:"stat-available-memory"`
	} `json:"stats"`
	// LastUpdate is 0 until the guest has reported once.
	LastUpdate int64 `json:"last-update"`
}

// QueryBalloonStats reads the guest's last memory report.
func QueryBalloonStats(ctx context.Context, m Monitor) (BalloonStats, error) {
	var out BalloonStats
	err := m.Execute(ctx, "qom-get", map[string]any{"path": balloonPath, "property": "guest-stats"}, &out)
	return out, err
}

// SetVirtioMemRequested asks the guest's virtio-mem driver behind device
// id to plug or unplug memory until size bytes are plugged.
func SetVirtioMemRequested(ctx context.Context, m Monitor, id string, size int64) error {
	return m.Execute(ctx, "qom-set", map[string]any{"path": "/machine/peripheral/" + id, "property": "requested-size", "value": size}, nil)
}

// PlugDimm adds a pc-dimm of size bytes named id, with its RAM backend.
func PlugDimm(ctx context.Context, m Monitor, id string, size int64) error {
	backend := id + "-mem"
	if err := m.Execute(ctx, "object-add", map[string]any{"qom-type": "memory-backend-ram", "id": backend, "size": size}, nil); err != nil {
		return err
	}
	if err := m.Execute(ctx, "device_add", map[string]any{"driver": "pc-dimm", "id": id, "memdev": backend}, nil); err != nil {
		_ = m.Execute(context.WithoutCancel(ctx), "object-del", map[string]any{"id": backend}, nil)
		return err
	}
	return nil
}

// DropDimmBackend frees the RAM of an unplugged pc-dimm.
func DropDimmBackend(ctx context.Context, m Monitor, id string) error {
	return m.Execute(ctx, "object-del", map[string]any{"id": id + "-mem"}, nil)
}

// MemoryDevice is a hot-pluggable memory device as QEMU lists it.
type MemoryDevice struct {
	Type string `json:"type"`
	Data struct {
		ID   string `json:"id"`
		Size int64  `json:"size"`
	} `json:"data"`
}

// MemoryDevices lists the guest's pc-dimms and virtio-mem devices.
func MemoryDevices(ctx context.Context, m Monitor) ([]MemoryDevice, error) {
	var out []MemoryDevice
	err := m.Execute(ctx, "query-memory-devices", nil, &out)
	return out, err
}

// HotpluggableCPU is a CPU slot of the machine; QOMPath is empty while
// nothing is plugged into it.
type HotpluggableCPU struct {
	Type  string `json:"type"`
	Props struct {
		SocketID int `json:"socket-id"`
		CoreID   int `json:"core-id"`
		ThreadID int `json:"thread-id"`
	} `json:"props"`
	QOMPath string `json:"qom-path,omitempty"`
}

// HotpluggableCPUs lists the machine's CPU slots.
func HotpluggableCPUs(ctx context.Context, m Monitor) ([]HotpluggableCPU, error) {
	var out []HotpluggableCPU
	err := m.Execute(ctx, "query-hotpluggable-cpus", nil, &out)
	return out, err
}

// PlugCPU plugs a CPU of slot's type into slot, named id.
func PlugCPU(ctx context.Context, m Monitor, slot HotpluggableCPU, id string) error {
	return m.Execute(ctx, "device_add", map[string]any{"driver": slot.Type, "id": id,
		"socket-id": slot.Props.SocketID, "core-id": slot.Props.CoreID, "thread-id": slot.Props.ThreadID}, nil)
}

// DeviceDel asks the guest to give up device id.
func DeviceDel(ctx context.Context, m Monitor, id string) error {
	return m.Execute(ctx, "device_del", map[string]any{"id": id}, nil)
}

// OSPMStatus is what a guest last reported, through ACPI _OST, about a
// hot-plugged device: Source is the event (0 while it has reported
// nothing), Status 0 for success.
type OSPMStatus struct {
	Device string `json:"device"`
	Source int    `json:"source"`
	Status int    `json:"status"`
}

// ACPIOSPMStatus lists what the guest reported about hot-plugged devices.
func ACPIOSPMStatus(ctx context.Context, m Monitor) ([]OSPMStatus, error) {
	var out []OSPMStatus
	err := m.Execute(ctx, "query-acpi-ospm-status", nil, &out)
	return out, err
}

// FleeceSpec is one disk's point-in-time view: target is a new qcow2
// node layered on source, which takes a copy of each block before the
// guest overwrites it, so reading target gives the disk as it was.
type FleeceSpec struct {
	JobID, Source, Target string
}

// AddFleeceNode opens the qcow2 file at path as node name, with node
// backing as its backing file.
func AddFleeceNode(ctx context.Context, m Monitor, name, path, backing string) error {
	return m.Execute(ctx, "blockdev-add", map[string]any{
		"driver": "qcow2", "node-name": name, "backing": backing,
		"file": map[string]any{"driver": "file", "filename": path},
		// The file is thrown away after the export and after a crash, so
		// nothing in it needs to reach the disk: without this, qcow2's
		// metadata ordering syncs it while the guest waits on its write.
		"cache": map[string]any{"no-flush": true},
	}, nil)
}

// Action is one step of a transaction.
type Action map[string]any

func action(kind string, data map[string]any) Action {
	return Action{"type": kind, "data": data}
}

// AddBitmap adds a dirty bitmap to node. A persistent one is saved in the
// qcow2 file when QEMU closes it; a disabled one records nothing more.
func AddBitmap(node, name string, persistent, disabled bool) Action {
	return action("block-dirty-bitmap-add", map[string]any{"node": node, "name": name, "persistent": persistent, "disabled": disabled})
}

// MergeBitmaps adds the bits of sources, bitmaps of any node, to bitmap
// target of node.
func MergeBitmaps(node, target string, sources ...BitmapRef) Action {
	return action("block-dirty-bitmap-merge", map[string]any{"node": node, "target": target, "bitmaps": sources})
}

// StartFleecing starts, in one transaction so that all disks share one
// point in time, a copy-before-write (backup sync=none) job per disk.
// extra actions run in the same transaction, at the same instant.
func StartFleecing(ctx context.Context, m Monitor, specs []FleeceSpec, extra ...Action) error {
	actions := make([]Action, 0, len(specs)+len(extra))
	actions = append(actions, extra...)
	for _, s := range specs {
		actions = append(actions, action("blockdev-backup", map[string]any{
			"job-id": s.JobID, "device": s.Source, "target": s.Target, "sync": "none",
		}))
	}
	return m.Execute(ctx, "transaction", map[string]any{"actions": actions}, nil)
}

// RemoveBitmap drops a dirty bitmap, from the qcow2 file too if it is
// persistent.
func RemoveBitmap(ctx context.Context, m Monitor, node, name string) error {
	return m.Execute(ctx, "block-dirty-bitmap-remove", map[string]any{"node": node, "name": name}, nil)
}

// BitmapRef names a dirty bitmap of a node.
type BitmapRef struct {
	Node string `json:"node"`
	Name string `json:"name"`
}

// BlockdevDel closes a node added with blockdev-add.
func BlockdevDel(ctx context.Context, m Monitor, name string) error {
	return m.Execute(ctx, "blockdev-del", map[string]any{"node-name": name}, nil)
}

// NBDServerStart starts QEMU's NBD server on a unix socket.
func NBDServerStart(ctx context.Context, m Monitor, socket string) error {
	return m.Execute(ctx, "nbd-server-start", map[string]any{
		"addr": map[string]any{"type": "unix", "data": map[string]any{"path": socket}},
	}, nil)
}

// NBDServerStop stops it, ending its exports.
func NBDServerStop(ctx context.Context, m Monitor) error {
	return m.Execute(ctx, "nbd-server-stop", nil, nil)
}

// ExportNBD exports node read-only under name on the NBD server. Each
// bitmap, of node or a node below it, can then be read by clients as the
// meta context "qemu:dirty-bitmap:NAME"; and which layer holds each range
// as "qemu:allocation-depth".
func ExportNBD(ctx context.Context, m Monitor, id, node, name string, bitmaps ...BitmapRef) error {
	args := map[string]any{"type": "nbd", "id": id, "node-name": node, "name": name, "writable": false, "allocation-depth": true}
	if len(bitmaps) > 0 {
		args["bitmaps"] = bitmaps
	}
	return m.Execute(ctx, "block-export-add", args, nil)
}

// UnexportNBD removes an export, even with clients connected.
func UnexportNBD(ctx context.Context, m Monitor, id string) error {
	return m.Execute(ctx, "block-export-del", map[string]any{"id": id, "mode": "hard"}, nil)
}
