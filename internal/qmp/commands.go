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

// SnapshotSync makes a new qcow2 overlay at file on top of node and moves
// the guest's writes to it, all in QEMU's main loop, so the guest sees no
// pause beyond one iteration. node becomes read-only; the new top is
// named newNode.
func SnapshotSync(ctx context.Context, m Monitor, node, file, newNode string) error {
	return m.Execute(ctx, "blockdev-snapshot-sync", map[string]any{
		"node-name": node, "snapshot-file": file, "snapshot-node-name": newNode,
		"format": "qcow2", "mode": "absolute-paths",
	}, nil)
}
