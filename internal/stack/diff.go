package stack

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/lodge-vm/lodge/internal/units"
)

// Actions a Change asks for.
const (
	ActionCreate   = "create"
	ActionStart    = "start"
	ActionNone     = "none"
	ActionUpdate   = "update"
	ActionRecreate = "recreate"
	ActionDelete   = "delete"
)

// Existing is a VM that is already on the host and labelled with the
// stack's name.
type Existing struct {
	Name  string
	Image string
	CPUs  int
	// Memory is the memory the VM is configured with, not what a balloon
	// has left it with for now: otherwise an idle VM would show up as
	// changed and a second `up` would not be a no-op.
	Memory int64
	// Networks are in the file's terms (the names under networks:, or
	// the built-in one), whatever the host calls them.
	Networks []string
	// DataDisks are the sizes of its disks after the root disk.
	DataDisks []int64
	Running   bool
	// Completed says a oneshot VM powered itself off with no error. Such
	// a VM is done: starting it again on the next `up` would redo its
	// provisioning.
	Completed bool
}

// Change is what `up` does to one VM.
type Change struct {
	Instance string
	// Action is one of the Action constants.
	Action string
	// Why is for the user; empty when there is nothing to say.
	Why string
	// Refused says why the file asks for what up cannot do to this VM;
	// up then changes nothing at all.
	Refused string
}

// Diff compares the file with the VMs that exist, so that `up` is
// idempotent and an edited file applies only what changed. It lists the
// file's instances in file order, then the VMs to delete by name.
//
// An image that differs means recreate: the disk is made from the image,
// so nothing less brings the VM in line. Settings that can change on the
// VM itself (cpus, memory, networks) mean update; the file's zero values
// are the daemon's defaults and are not compared. New networks need new
// NICs, which a running VM is stopped for. A VM that needs an update and
// is stopped, or is stopped for it, is started after it; Why says so.
func (f *File) Diff(existing []Existing) []Change {
	have := make(map[string]Existing, len(existing))
	for _, e := range existing {
		if _, dup := have[e.Name]; !dup {
			have[e.Name] = e
		}
	}
	var out []Change
	wanted := map[string]bool{}
	for _, in := range f.Instances() {
		wanted[in.Name] = true
		out = append(out, diffOne(in, have))
	}
	var gone []string
	for name := range have {
		if !wanted[name] {
			gone = append(gone, name)
		}
	}
	slices.Sort(gone)
	for _, name := range gone {
		out = append(out, Change{Instance: name, Action: ActionDelete, Why: f.whyGone(name)})
	}
	return out
}

func diffOne(in Instance, have map[string]Existing) Change {
	c := diffSettings(in, have)
	if e, ok := have[in.Name]; ok && c.Action != ActionRecreate {
		_, c.Refused = diskChange(e.DataDisks, in.Spec.Disks)
	}
	return c
}

// diskChange says how a member's data disks differ from the file's: what
// up does about it (it adds disks at the end and grows disks), or why it
// will not. A disk that would go or shrink takes the guest's data with
// it; that is for the user to do by hand, never a side effect of up.
func diskChange(have, want []int64) (change, refused string) {
	if slices.Equal(have, want) {
		return "", ""
	}
	what := fmt.Sprintf("data disks [%s] -> [%s]", sizes(have), sizes(want))
	if len(want) < len(have) {
		return "", what + ": up adds and grows disks but never removes one (its data would be lost); delete the VM and run up again to remake it"
	}
	for i := range have {
		if want[i] < have[i] {
			return "", fmt.Sprintf("%s: data%d would shrink, cutting off the guest's data; up only grows disks", what, i+1)
		}
	}
	return what, ""
}

func sizes(v []int64) string {
	out := make([]string, len(v))
	for i, n := range v {
		out[i] = units.FormatSize(n)
	}
	return strings.Join(out, " ")
}

func diffSettings(in Instance, have map[string]Existing) Change {
	m := in.Spec
	e, ok := have[in.Name]
	switch {
	case !ok:
		return Change{Instance: in.Name, Action: ActionCreate, Why: "not created yet"}
	case e.Image != "" && e.Image != m.Image:
		// A member restored from a backup has no image: it is what the
		// backup held, not a disk on an image, and it is kept.
		return Change{Instance: in.Name, Action: ActionRecreate, Why: fmt.Sprintf("image %q -> %q", e.Image, m.Image)}
	}
	var diffs []string
	if m.CPUs != 0 && m.CPUs != e.CPUs {
		diffs = append(diffs, fmt.Sprintf("cpus %d -> %d", e.CPUs, m.CPUs))
	}
	if m.Memory != 0 && m.Memory != e.Memory {
		diffs = append(diffs, fmt.Sprintf("memory %s -> %s", units.FormatSize(e.Memory), units.FormatSize(m.Memory)))
	}
	if grow, _ := diskChange(e.DataDisks, m.Disks); grow != "" {
		diffs = append(diffs, grow)
	}
	renic := len(m.Networks) > 0 && !slices.Equal(m.Networks, e.Networks)
	if renic {
		diffs = append(diffs, fmt.Sprintf("networks [%s] -> [%s]", strings.Join(e.Networks, " "), strings.Join(m.Networks, " ")))
	}
	done := m.Oneshot && e.Completed
	switch {
	case len(diffs) > 0:
		why := strings.Join(diffs, ", ")
		switch {
		case renic && e.Running:
			why += "; stop it for its new NICs, then start it"
		case !e.Running && !done:
			why += "; then start it"
		}
		return Change{Instance: in.Name, Action: ActionUpdate, Why: why}
	case done:
		return Change{Instance: in.Name, Action: ActionNone, Why: "oneshot, completed"}
	case !e.Running:
		return Change{Instance: in.Name, Action: ActionStart, Why: "stopped"}
	}
	return Change{Instance: in.Name, Action: ActionNone}
}

// whyGone explains a deletion. Changing a member's count between 1 and
// more renames its VMs (shop-app becomes shop-app-1 and shop-app-2), so
// the user must be told that this is what deletes shop-app.
func (f *File) whyGone(name string) string {
	for i := range f.VMs {
		m := &f.VMs[i]
		rest, ok := strings.CutPrefix(name, vmName(f.Name, m.Name, 0))
		if !ok {
			continue
		}
		if rest == "" {
			return fmt.Sprintf("vm %q now has a count of %d: its VMs are %s to %s", m.Name, m.count(), vmName(f.Name, m.Name, 1), vmName(f.Name, m.Name, m.count()))
		}
		if n, err := strconv.Atoi(strings.TrimPrefix(rest, "-")); err == nil && strings.HasPrefix(rest, "-") && n > 0 {
			return fmt.Sprintf("vm %q now has a count of %d", m.Name, m.count())
		}
	}
	return "no longer in the file"
}
