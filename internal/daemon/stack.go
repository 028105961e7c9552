package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/backup"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/network"
	"github.com/lodge-vm/lodge/internal/stack"
	"github.com/lodge-vm/lodge/internal/store"
)

// Stacks: the daemon keeps each stack's file and when each member became
// ready; the members are ordinary VMs labelled with the stack's name.

const stackBucket = "stacks"

type stackRecord struct {
	Name    string               `json:"name"`
	Path    string               `json:"path"`
	File    string               `json:"file"`
	ReadyAt map[string]time.Time `json:"ready_at,omitempty"`
}

func (d *Daemon) stackRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/stacks", d.stackUp)
	mux.HandleFunc("GET /v1/stacks/{name}", d.stackStatus)
	mux.HandleFunc("POST /v1/stacks/{name}/down", d.stackDown)
	mux.HandleFunc("POST /v1/stacks/{name}/rebuild", d.stackRebuild)
	mux.HandleFunc("POST /v1/stacks/{name}/backup", d.stackBackup)
	mux.HandleFunc("GET /v1/stacks/{name}/backups", d.stackBackups)
	mux.HandleFunc("POST /v1/stacks/restore", d.stackRestore)
}

// parseStack reads and checks a stack file against this host.
func (d *Daemon) parseStack(ctx context.Context, req api.StackUp) (*stack.File, error) {
	f, err := stack.Parse(req.Path, []byte(req.File))
	if err != nil {
		return nil, err
	}
	for _, n := range f.Networks {
		if err := network.ValidName(stackNetwork(f.Name, n.Name)); err != nil {
			return nil, fmt.Errorf("%s: stack %q: network %q: %w", req.Path, f.Name, n.Name, err)
		}
		if err := d.networks.Supported(); err != nil && n.NAT {
			return nil, fmt.Errorf("%s: stack %q: network %q: nat: %w", req.Path, f.Name, n.Name, err)
		}
	}
	vms, err := d.vms.List(ctx)
	if err != nil {
		return nil, err
	}
	h := d.host()
	var others int64
	members := map[string]bool{}
	for _, v := range vms {
		if v.Stack != f.Name {
			others += max(v.Memory, v.MaxMemory) + h.VMOverhead
		} else {
			members[v.Name] = true
		}
	}
	// An image is needed only to create members: a stack restored from
	// its backups on a host without the image still comes up.
	imageOK := func(name string) bool {
		if _, err := d.images.Get(ctx, name); err == nil {
			return true
		}
		for _, in := range f.Instances() {
			if in.Spec.Image == name && !members[in.Name] {
				return false
			}
		}
		return true
	}
	limit := int64(float64(h.MemoryLimit)*max(h.Overcommit, 1)) - others
	err = f.Validate(stack.Env{
		ImageExists: imageOK,
		MemoryLimit: max(limit, 1),
		DefaultMemory: func(image string) int64 {
			if img, err := d.images.Get(ctx, image); err == nil && img.Memory > 0 {
				return img.Memory
			}
			return 512 << 20
		},
		VMOverhead: h.VMOverhead,
	})
	return f, err
}

func (d *Daemon) stackUp(w http.ResponseWriter, r *http.Request) {
	var req api.StackUp
	if !decode(w, r, &req) {
		return
	}
	f, err := d.parseStack(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	accepted(w, d.ops.start("stack-up", f.Name, func(ctx context.Context, o *operation) (any, error) {
		if err := d.applyStack(ctx, f, req, o); err != nil {
			return nil, err
		}
		return d.stackView(ctx, f.Name)
	}))
}

// applyStack makes the VMs match the file, then starts them in
// dependency order, each once what it depends on has reached the
// condition asked for.
func (d *Daemon) applyStack(ctx context.Context, f *stack.File, req api.StackUp, o *operation) error {
	err := d.store.Update(ctx, func(tx store.Tx) error {
		var rec stackRecord
		if err := store.GetJSON(tx, stackBucket, f.Name, &rec); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		rec.Name, rec.Path, rec.File = f.Name, req.Path, req.File
		return store.PutJSON(tx, stackBucket, f.Name, rec)
	})
	if err != nil {
		return err
	}
	if err := d.stackNetworks(ctx, f); err != nil {
		return err
	}
	vms, err := d.vms.List(ctx)
	if err != nil {
		return err
	}
	var existing []stack.Existing
	taken := map[string]string{}
	for _, v := range vms {
		taken[v.Name] = v.Stack
		if v.Stack != f.Name {
			continue
		}
		e := stack.Existing{Name: v.Name, Image: v.Image, CPUs: v.CPUs, Memory: v.Memory, Running: v.State == api.StateRunning}
		for _, disk := range v.Disks[min(1, len(v.Disks)):] {
			e.DataDisks = append(e.DataDisks, disk.Size)
		}
		for _, n := range v.NICs {
			e.Networks = append(e.Networks, strings.TrimPrefix(n.Network, f.Name+"-"))
		}
		e.Completed = !e.Running && d.stackReady(ctx, f.Name, v.Name) != nil
		existing = append(existing, e)
	}
	specs := map[string]stack.Instance{}
	for _, in := range f.Instances() {
		specs[in.Name] = in
		if owner, ok := taken[in.Name]; ok && owner != f.Name {
			return fmt.Errorf("stack %q: vm %q %w and is not a member of this stack", f.Name, in.Name, errdefs.ErrExists)
		}
	}
	changes := f.Diff(existing)
	for _, c := range changes {
		if c.Refused != "" {
			return fmt.Errorf("stack %q: vm %q: %s: %w", f.Name, c.Instance, c.Refused, errdefs.ErrConflict)
		}
	}
	for _, c := range changes {
		switch c.Action {
		case stack.ActionCreate:
			in := specs[c.Instance]
			o.Progress("create "+c.Instance, 0, 0)
			if _, err := d.vms.Create(ctx, api.CreateVM{
				Name: in.Name, Image: in.Spec.Image, CPUs: in.Spec.CPUs, Memory: in.Spec.Memory, MaxMemory: in.Spec.MaxMemory,
				DiskSize: in.Spec.Disk, DataDisks: in.Spec.Disks, CloudInit: in.Spec.CloudInit, Networks: memberNetworks(f.Name, in.Spec.Networks), Stack: f.Name,
			}); err != nil {
				return fmt.Errorf("stack %q: %w", f.Name, err)
			}
		case stack.ActionDelete:
			o.Progress("delete "+c.Instance, 0, 0)
			if err := d.vms.Delete(ctx, c.Instance, true); err != nil {
				return fmt.Errorf("stack %q: %w", f.Name, err)
			}
		case stack.ActionUpdate:
			o.Progress("update "+c.Instance, 0, 0)
			if err := d.updateMember(ctx, f, specs[c.Instance], c); err != nil {
				return err
			}
		case stack.ActionRecreate:
			// Losing a member's disks is the user's call.
			if !req.Recreate {
				return fmt.Errorf("stack %q: vm %q differs from the file (%s): %w; run up --recreate to rebuild it on the new image (its disks are replaced)", f.Name, c.Instance, c.Why, errdefs.ErrConflict)
			}
			o.Progress("recreate "+c.Instance, 0, 0)
			if err := d.recreateMember(ctx, f, specs[c.Instance], c); err != nil {
				return fmt.Errorf("stack %q: %w", f.Name, err)
			}
		}
	}
	plan := f.Plan()
	total := int64(len(f.Instances()))
	var done int64
	for i, wave := range plan {
		o.Progress("wave "+strconv.Itoa(i+1)+" of "+strconv.Itoa(len(plan)), done, total)
		var wg sync.WaitGroup
		errs := make([]error, len(wave))
		for j, step := range wave {
			wg.Go(func() { errs[j] = d.rollOut(ctx, f, step) })
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return fmt.Errorf("stack %q: %w (members already up are left running)", f.Name, err)
		}
		done += int64(len(wave))
	}
	o.Progress("done", total, total)
	return nil
}

// updateMember applies an edited member's CPUs and memory to its VM, as
// lodge set does: live where the VM booted with room for it, otherwise
// refused with the reason. New networks need new NICs, so a running
// member is stopped for them, and the rollout starts it again in its
// turn; the members that depend on it are left running.
func (d *Daemon) updateMember(ctx context.Context, f *stack.File, in stack.Instance, c stack.Change) error {
	v, err := d.vms.Get(ctx, in.Name)
	if err != nil {
		return err
	}
	var have []string
	for _, n := range v.NICs {
		have = append(have, n.Network)
	}
	if want := memberNetworks(f.Name, in.Spec.Networks); len(in.Spec.Networks) > 0 && !slices.Equal(have, want) {
		if err := d.stopMember(ctx, f.Name, v); err != nil {
			return err
		}
		if v, err = d.vms.SetNetworks(ctx, in.Name, want); err != nil {
			return fmt.Errorf("stack %q: %w", f.Name, err)
		}
	}
	if err := d.growMemberDisks(ctx, f, in, v); err != nil {
		return err
	}
	var req api.SetVM
	if in.Spec.CPUs != 0 && in.Spec.CPUs != v.CPUs {
		req.CPUs = in.Spec.CPUs
	}
	if in.Spec.Memory != 0 && in.Spec.Memory != v.Memory {
		req.Memory = in.Spec.Memory
		// As at create, the ceiling is at least the memory.
		if ceiling := max(in.Spec.MaxMemory, in.Spec.Memory); ceiling > v.MaxMemory {
			req.MaxMemory = ceiling
		}
	}
	if req.IsZero() {
		return nil
	}
	if _, err := d.vms.Set(ctx, in.Name, req); err != nil {
		return fmt.Errorf("stack %q: apply %s to vm %q: %w", f.Name, c.Why, in.Name, err)
	}
	return nil
}

// growMemberDisks gives a member the data disks its file adds and grows
// those it makes larger, as lodge disk does: hot-plugged and resized
// while it runs. Diff has refused any that would shrink or go.
func (d *Daemon) growMemberDisks(ctx context.Context, f *stack.File, in stack.Instance, v api.VM) error {
	data := v.Disks[min(1, len(v.Disks)):]
	for i, size := range in.Spec.Disks {
		var err error
		switch {
		case i >= len(data):
			_, err = d.vms.AddDisk(ctx, in.Name, size)
		case size > data[i].Size:
			_, err = d.vms.ResizeDisk(ctx, in.Name, data[i].Name, size)
		}
		if err != nil {
			return fmt.Errorf("stack %q: %w", f.Name, err)
		}
	}
	return nil
}

// stackNetwork is the host's name for network net of stack: network
// names are global on a host, like VM names.
func stackNetwork(stackName, net string) string {
	if net == stack.BuiltinNetwork {
		return net
	}
	return stackName + "-" + net
}

func memberNetworks(stackName string, nets []string) []string {
	if len(nets) == 0 {
		return []string{stack.BuiltinNetwork}
	}
	out := make([]string, 0, len(nets))
	for _, n := range nets {
		out = append(out, stackNetwork(stackName, n))
	}
	return out
}

// stackNetworks creates the networks f declares that are missing. One
// that exists must be this stack's and as declared: it is not changed
// under running members.
func (d *Daemon) stackNetworks(ctx context.Context, f *stack.File) error {
	for _, n := range f.Networks {
		name := stackNetwork(f.Name, n.Name)
		have, err := d.networks.Get(ctx, name)
		switch {
		case errors.Is(err, errdefs.ErrNotFound):
			if _, err := d.networks.Create(ctx, api.CreateNetwork{Name: name, Subnet: n.Subnet, NAT: n.NAT, Isolated: n.Isolated, Stack: f.Name}); err != nil {
				return fmt.Errorf("stack %q: %w", f.Name, err)
			}
		case err != nil:
			return err
		case have.Stack != f.Name:
			return fmt.Errorf("stack %q: network %q %w and is not this stack's", f.Name, name, errdefs.ErrExists)
		case (n.Subnet != "" && n.Subnet != have.Subnet) || n.NAT != have.NAT || n.Isolated != have.Isolated:
			return fmt.Errorf("stack %q: network %q differs from the file (subnet %s nat %t isolated %t on the host): %w; take the stack down with --delete to change it",
				f.Name, name, have.Subnet, have.NAT, have.Isolated, errdefs.ErrConflict)
		}
	}
	return nil
}

// rollOut waits for what step's member depends on, starts it, and waits
// until it is ready itself.
func (d *Daemon) rollOut(ctx context.Context, f *stack.File, step stack.Step) error {
	in := step.Instance
	for _, w := range step.Waits {
		if err := d.waitCondition(ctx, f, w.Instance, w.Condition); err != nil {
			return fmt.Errorf("vm %q waits for %q to be %s: %w", in.Name, w.Instance, w.Condition, err)
		}
	}
	v, err := d.vms.Get(ctx, in.Name)
	if err != nil {
		return err
	}
	completed := in.Spec.Oneshot && d.stackReady(ctx, f.Name, in.Name) != nil
	if v.State != api.StateRunning && !completed {
		d.events.Publish(api.Event{Time: time.Now().UTC(), Kind: "stack-member-starting", Target: in.Name, Message: "stack " + f.Name})
		if _, err := d.vms.Start(ctx, in.Name); err != nil {
			return err
		}
	}
	own := ownCondition(in)
	if err := d.waitCondition(ctx, f, in.Name, own); err != nil {
		return fmt.Errorf("vm %q never became %s: %w", in.Name, own, err)
	}
	return nil
}

// ownCondition is what makes a member ready itself: a oneshot member
// has completed, one with a health check is healthy, any other started.
func ownCondition(in stack.Instance) string {
	switch {
	case in.Spec.Oneshot:
		return stack.CondCompleted
	case in.Spec.Health != nil:
		return stack.CondHealthy
	}
	return stack.CondStarted
}

// instanceOf finds an instance of f by VM name.
func instanceOf(f *stack.File, name string) (stack.Instance, bool) {
	for _, in := range f.Instances() {
		if in.Name == name {
			return in, true
		}
	}
	return stack.Instance{}, false
}

// waitCondition polls until VM name reaches cond or its member's timeout
// passes. A health check fails the wait early once it has failed its
// retries in a row after the start period (counted from the first probe
// the guest answered: before that it is booting); otherwise the timeout
// is reported with what the check said last.
func (d *Daemon) waitCondition(ctx context.Context, f *stack.File, name, cond string) error {
	in, ok := instanceOf(f, name)
	if !ok {
		return fmt.Errorf("no member %q", name)
	}
	timeout := in.Spec.Timeout
	if timeout <= 0 {
		timeout = stack.DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// A rollout waits for the first success, so it asks often: each wait
	// in a chain adds up to this much to the whole. Health probes keep
	// the check's own interval, which its retries are counted in.
	every := 250 * time.Millisecond
	h := in.Spec.Health
	if h != nil && cond == stack.CondHealthy && h.Interval > 0 {
		every = h.Interval
	}
	if cond == stack.CondAgent || cond == stack.CondHealthy {
		// The wait's own command answering is the agent condition met:
		// asking again would add a round trip to every link of a chain.
		if d.waitAgent(ctx, name, timeout) && cond == stack.CondAgent {
			d.markReady(ctx, f.Name, name, cond, in)
			return nil
		}
	}
	var last error
	var answered time.Time
	failed := 0
	for {
		ok, err := d.check(ctx, f.Name, in, cond)
		if ok {
			d.markReady(ctx, f.Name, name, cond, in)
			return nil
		}
		var cf *checkFailed
		switch {
		case errors.As(err, &cf):
			last = err
			failed++
			if answered.IsZero() {
				answered = time.Now()
			}
			if h != nil && h.Retries > 0 && failed >= h.Retries && time.Since(answered) >= h.StartPeriod {
				return fmt.Errorf("unhealthy: %d checks failed in a row, the last: %w", failed, err)
			}
		case err != nil:
			return err
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return fmt.Errorf("not within %s: %w", timeout, last)
			}
			return fmt.Errorf("not within %s", timeout)
		case <-time.After(every):
		}
	}
}

// waitAgent waits, up to timeout, for VM name to be running and its
// agent to answer, and says whether it did. The daemon's own agent wait
// connects the moment the guest's agent is up; polling with short execs
// instead costs a handshake timeout each time the guest is not there
// yet. A VM that stops or fails ends the wait early, for the caller's
// check to report.
func (d *Daemon) waitAgent(ctx context.Context, name string, timeout time.Duration) bool {
	for {
		v, err := d.vms.Get(ctx, name)
		if err != nil {
			return false
		}
		switch v.State {
		case api.StateRunning:
			res, err := d.vms.Exec(ctx, name, api.ExecRequest{Command: []string{"true"}, WaitSeconds: int(timeout / time.Second)})
			return err == nil && res.ExitCode == 0
		case api.StateStopped, api.StateError:
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// checkFailed is a health probe that ran in the guest and failed.
type checkFailed struct {
	cmd, why string
}

func (e *checkFailed) Error() string { return fmt.Sprintf("check %q: %s", e.cmd, e.why) }

// check says whether VM in of stack stackName has reached cond now.
func (d *Daemon) check(ctx context.Context, stackName string, in stack.Instance, cond string) (bool, error) {
	v, err := d.vms.Get(ctx, in.Name)
	if err != nil {
		return false, err
	}
	completed := in.Spec.Oneshot && d.stackReady(ctx, stackName, in.Name) != nil
	switch cond {
	case stack.CondStarted:
		return v.State == api.StateRunning || completed, nil
	case stack.CondAgent:
		return v.State == api.StateRunning && d.agentAnswers(ctx, in.Name), nil
	case stack.CondCompleted:
		if v.State == api.StateError {
			return false, fmt.Errorf("it failed: %s", v.StateReason)
		}
		// The rollout waits on a oneshot member right after starting it,
		// so stopped means it ran and powered itself off.
		return completed || v.State == api.StateStopped, nil
	case stack.CondHealthy:
		if v.State != api.StateRunning {
			return false, nil
		}
		return d.healthy(ctx, in)
	}
	return false, fmt.Errorf("unknown condition %q", cond)
}

func (d *Daemon) agentAnswers(ctx context.Context, name string) bool {
	res, err := d.vms.Exec(ctx, name, api.ExecRequest{Command: []string{"true"}, TimeoutSeconds: 5})
	return err == nil && res.ExitCode == 0
}

// healthy runs a member's health check inside its guest, through the
// agent. A TCP check looks for a listening socket on the port in the
// guest's /proc/net/tcp{,6}: on the nat network the host cannot reach the
// guest's ports, and a listener is what a port that answers means.
func (d *Daemon) healthy(ctx context.Context, in stack.Instance) (bool, error) {
	h := in.Spec.Health
	cmd := h.Exec
	if h.TCP > 0 {
		cmd = fmt.Sprintf("grep -qE '^ *[0-9]+: [0-9A-F]+:%04X [0-9A-F]+:[0-9A-F]+ 0A ' /proc/net/tcp /proc/net/tcp6", h.TCP)
	}
	timeout := h.Timeout
	if timeout <= 0 {
		timeout = stack.DefaultHealthTimeout
	}
	res, err := d.vms.Exec(ctx, in.Name, api.ExecRequest{Command: []string{"/bin/sh", "-c", cmd}, TimeoutSeconds: int(max(timeout/time.Second, 1))})
	switch {
	case errors.Is(err, errdefs.ErrNoAgent) || errors.Is(err, errdefs.ErrState):
		// No agent answering (the guest is booting, or too busy to
		// answer in time): not a failed check.
		return false, nil
	case err != nil:
		return false, &checkFailed{cmd: cmd, why: err.Error()}
	case res.ExitCode != 0:
		msg := "exit code " + strconv.Itoa(res.ExitCode)
		if out := strings.TrimSpace(string(res.Stderr)); out != "" {
			msg += ": " + out
		}
		return false, &checkFailed{cmd: cmd, why: msg}
	}
	return true, nil
}

// markReady records when a member first reached its own readiness.
func (d *Daemon) markReady(ctx context.Context, stackName, vm, cond string, in stack.Instance) {
	own := ownCondition(in)
	if cond != own {
		return
	}
	_ = d.store.Update(context.WithoutCancel(ctx), func(tx store.Tx) error {
		var rec stackRecord
		if err := store.GetJSON(tx, stackBucket, stackName, &rec); err != nil {
			return err
		}
		if rec.ReadyAt == nil {
			rec.ReadyAt = map[string]time.Time{}
		}
		if _, ok := rec.ReadyAt[vm]; ok {
			return nil
		}
		rec.ReadyAt[vm] = time.Now().UTC()
		d.events.Publish(api.Event{Time: rec.ReadyAt[vm], Kind: "stack-member-ready", Target: vm, Message: "stack " + stackName + ": " + own})
		return store.PutJSON(tx, stackBucket, stackName, rec)
	})
}

// stackReady is when VM vm of a stack became ready, or nil.
func (d *Daemon) stackReady(ctx context.Context, stackName, vm string) *time.Time {
	var rec stackRecord
	if err := d.store.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, stackBucket, stackName, &rec) }); err != nil {
		return nil
	}
	if t, ok := rec.ReadyAt[vm]; ok {
		return &t
	}
	return nil
}

func (d *Daemon) loadStack(ctx context.Context, name string) (*stack.File, error) {
	rec, err := d.stackRecord(ctx, name)
	if err != nil {
		return nil, err
	}
	return stack.Parse(rec.Path, []byte(rec.File))
}

func (d *Daemon) stackRecord(ctx context.Context, name string) (stackRecord, error) {
	var rec stackRecord
	err := d.store.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, stackBucket, name, &rec) })
	if errors.Is(err, store.ErrNotFound) {
		return rec, fmt.Errorf("stack %q: %w", name, errdefs.ErrNotFound)
	}
	return rec, err
}

// stackView is a stack's status now; health checks run as it is asked.
func (d *Daemon) stackView(ctx context.Context, name string) (api.StackStatus, error) {
	f, err := d.loadStack(ctx, name)
	if err != nil {
		return api.StackStatus{}, err
	}
	out := api.StackStatus{Name: f.Name, Members: []api.StackMember{}}
	for _, in := range f.Instances() {
		m := api.StackMember{Name: in.Member, VM: in.Name, State: "absent", Health: "-", IPs: []string{}}
		if v, err := d.vms.Get(ctx, in.Name); err == nil {
			m.State, m.StartedAt = v.State, v.StartedAt
			for _, n := range v.NICs {
				if n.IP != "" {
					m.IPs = append(m.IPs, n.IP)
				}
			}
			if in.Spec.Health != nil && v.State == api.StateRunning {
				m.Health = "unhealthy"
				if ok, _ := d.healthy(ctx, in); ok {
					m.Health = "healthy"
				}
			}
		}
		m.ReadyAt = d.stackReady(ctx, name, in.Name)
		out.Members = append(out.Members, m)
	}
	return out, nil
}

func (d *Daemon) stackStatus(w http.ResponseWriter, r *http.Request) {
	out, err := d.stackView(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// stackRequest decodes the body of a request on stack {name} and loads
// the stack; it has answered with the error when ok is false.
func stackRequest[T any](d *Daemon, w http.ResponseWriter, r *http.Request) (name string, req T, f *stack.File, ok bool) {
	name = r.PathValue("name")
	if !decode(w, r, &req) {
		return name, req, nil, false
	}
	f, err := d.loadStack(r.Context(), name)
	if err != nil {
		writeErr(w, err)
		return name, req, nil, false
	}
	return name, req, f, true
}

func (d *Daemon) stackDown(w http.ResponseWriter, r *http.Request) {
	name, req, f, ok := stackRequest[api.StackDown](d, w, r)
	if !ok {
		return
	}
	accepted(w, d.ops.start("stack-down", name, func(ctx context.Context, o *operation) (any, error) {
		for _, in := range f.ReverseOrder() {
			v, err := d.vms.Get(ctx, in.Name)
			if errors.Is(err, errdefs.ErrNotFound) {
				continue
			}
			if err != nil {
				return nil, err
			}
			o.Progress("stop "+in.Name, 0, 0)
			if v.State == api.StateRunning || v.State == api.StatePaused {
				if _, err := d.vms.Stop(ctx, in.Name, false, 0); err != nil {
					return nil, fmt.Errorf("stack %q: %w", name, err)
				}
			}
			if req.Delete {
				if err := d.vms.Delete(ctx, in.Name, true); err != nil {
					return nil, fmt.Errorf("stack %q: %w", name, err)
				}
			}
		}
		if req.Delete {
			for _, n := range f.Networks {
				err := d.removeNetwork(ctx, stackNetwork(name, n.Name))
				if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
					return nil, fmt.Errorf("stack %q: %w", name, err)
				}
			}
		}
		err := d.store.Update(ctx, func(tx store.Tx) error {
			var rec stackRecord
			if err := store.GetJSON(tx, stackBucket, name, &rec); err != nil {
				return err
			}
			if req.Delete {
				return tx.Delete(stackBucket, name)
			}
			rec.ReadyAt = nil
			return store.PutJSON(tx, stackBucket, name, rec)
		})
		return nil, err
	}))
}

// stackRebuild recreates a member's VMs from their image or latest
// backup, one at a time, keeping their identities and addresses (others
// know them by those), and leaves every other member running.
func (d *Daemon) stackRebuild(w http.ResponseWriter, r *http.Request) {
	name, req, f, ok := stackRequest[api.StackRebuild](d, w, r)
	if !ok {
		return
	}
	var targets []stack.Step
	for _, wave := range f.Plan() {
		for _, step := range wave {
			if step.Instance.Member == req.Member || step.Instance.Name == name+"-"+req.Member {
				targets = append(targets, step)
			}
		}
	}
	if len(targets) == 0 {
		writeErr(w, fmt.Errorf("stack %q: member %q: %w", name, req.Member, errdefs.ErrNotFound))
		return
	}
	// What would fail the rebuild once the VM is stopped is checked
	// first: a refused rebuild leaves the member running.
	for _, step := range targets {
		if err := d.canRebuild(r.Context(), step.Instance.Name, req); err != nil {
			writeErr(w, fmt.Errorf("stack %q: %w", name, err))
			return
		}
	}
	accepted(w, d.ops.start("stack-rebuild", name+"/"+req.Member, func(ctx context.Context, o *operation) (any, error) {
		for _, step := range targets {
			if err := d.rebuildMember(ctx, f, step, req, o); err != nil {
				return nil, fmt.Errorf("stack %q: %w", name, err)
			}
		}
		return d.stackView(ctx, name)
	}))
}

func (d *Daemon) canRebuild(ctx context.Context, vmName string, req api.StackRebuild) error {
	v, err := d.vms.Get(ctx, vmName)
	if err != nil {
		return fmt.Errorf("%w; lodge stack up creates it afresh", err)
	}
	if err := noSnapshots("rebuild", v); err != nil {
		return err
	}
	if req.FromBackup {
		bs, err := d.backups.List(ctx, vmName, req.Repo)
		if err != nil {
			return err
		}
		if len(bs) == 0 {
			return fmt.Errorf("rebuild vm %q from a backup: %w: it has no backup (lodge backup create %s)", vmName, errdefs.ErrNotFound, vmName)
		}
		return nil
	}
	if v.Image == "" {
		return fmt.Errorf("rebuild vm %q: %w: it was not created from an image; rebuild it --from-backup", vmName, errdefs.ErrInvalid)
	}
	if _, err := d.images.Get(ctx, v.Image); err != nil {
		return fmt.Errorf("rebuild vm %q from its image: %w", vmName, err)
	}
	return nil
}

// noSnapshots refuses to give a member with snapshots new disks before
// it is stopped; vm.Rebuild would refuse it only then.
func noSnapshots(op string, v api.VM) error {
	if len(v.Snapshots) > 0 {
		return fmt.Errorf("%s vm %q: %w: it has snapshots (%s), which its new disks could not go back to; delete them first", op, v.Name, errdefs.ErrState, strings.Join(v.Snapshots, ", "))
	}
	return nil
}

func (d *Daemon) rebuildMember(ctx context.Context, f *stack.File, step stack.Step, req api.StackRebuild, o *operation) error {
	vmName := step.Instance.Name
	v, err := d.vms.Get(ctx, vmName)
	if err != nil {
		return err
	}
	o.Progress("stop "+vmName, 0, 0)
	if err := d.stopMember(ctx, f.Name, v); err != nil {
		return err
	}
	o.Progress("rebuild "+vmName, 0, 0)
	if req.FromBackup {
		_, _, err = d.backups.RebuildVM(ctx, vmName, req.Repo, func(stage string, done, total int64) { o.Progress(stage+" "+vmName, done, total) })
	} else {
		_, err = d.vms.Rebuild(ctx, vmName, "", nil)
	}
	if err != nil {
		return err
	}
	return d.rollOut(ctx, f, step)
}

// recreateMember rebuilds a member on the image the file now names,
// keeping its identity, and applies the rest of its settings; the
// rollout starts it in its turn.
func (d *Daemon) recreateMember(ctx context.Context, f *stack.File, in stack.Instance, c stack.Change) error {
	v, err := d.vms.Get(ctx, in.Name)
	if err != nil {
		return err
	}
	if err := noSnapshots("recreate", v); err != nil {
		return err
	}
	if err := d.stopMember(ctx, f.Name, v); err != nil {
		return err
	}
	if _, err := d.vms.Rebuild(ctx, in.Name, in.Spec.Image, nil); err != nil {
		return err
	}
	// The file may have changed its other settings too.
	return d.updateMember(ctx, f, in, c)
}

// stopMember stops a member's VM if it runs, and forgets when it was
// ready: it is ready again only once it has come back.
func (d *Daemon) stopMember(ctx context.Context, stackName string, v api.VM) error {
	if v.State == api.StateRunning || v.State == api.StatePaused {
		if _, err := d.vms.Stop(ctx, v.Name, false, 0); err != nil {
			return err
		}
	}
	return d.store.Update(ctx, func(tx store.Tx) error {
		var rec stackRecord
		if err := store.GetJSON(tx, stackBucket, stackName, &rec); err != nil {
			return err
		}
		delete(rec.ReadyAt, v.Name)
		return store.PutJSON(tx, stackBucket, stackName, rec)
	})
}

// stackBackup backs every member up at one point (see
// manager.CreateGroup) and records the set, with the stack's file, in the
// repository, so that the stack can be brought back from it elsewhere.
func (d *Daemon) stackBackup(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	var req api.StackBackupRequest
	if !decode(w, r, &req) {
		return
	}
	rec, err := d.stackRecord(r.Context(), name)
	if err != nil {
		writeErr(w, err)
		return
	}
	f, err := stack.Parse(rec.Path, []byte(rec.File))
	if err != nil {
		writeErr(w, err)
		return
	}
	var members []string
	for _, in := range f.Instances() {
		if _, err := d.vms.Get(r.Context(), in.Name); err == nil {
			members = append(members, in.Name)
		}
	}
	if len(members) == 0 {
		writeErr(w, fmt.Errorf("stack %q: %w: none of its members exists", name, errdefs.ErrState))
		return
	}
	accepted(w, d.ops.start("stack-backup", name, func(ctx context.Context, o *operation) (any, error) {
		now := time.Now().UTC()
		bs, err := d.backups.CreateGroup(ctx, members, req.Repo, o.Progress)
		if err != nil {
			return nil, fmt.Errorf("stack %q: %w", name, err)
		}
		sb := api.StackBackup{ID: backup.NewID(now), Stack: name, Repo: bs[0].Repo, CreatedAt: now, Path: rec.Path, File: rec.File, Members: map[string]string{}}
		for _, b := range bs {
			sb.Members[b.VM] = b.ID
		}
		if err := d.backups.PutStackBackup(ctx, sb); err != nil {
			return nil, err
		}
		return sb, nil
	}))
}

func (d *Daemon) stackBackups(w http.ResponseWriter, r *http.Request) {
	sbs, err := d.backups.StackBackups(r.Context(), r.PathValue("name"), r.URL.Query().Get("repo"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, sbs)
}

// stackRestore brings a stack back from one of its stack backups: its
// networks, each member restored with its identity, then up in
// dependency order. The stack and its members must not exist here.
func (d *Daemon) stackRestore(w http.ResponseWriter, r *http.Request) {
	var req api.StackRestore
	if !decode(w, r, &req) {
		return
	}
	sb, f, err := d.pickStackBackup(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	accepted(w, d.ops.start("stack-restore", f.Name, func(ctx context.Context, o *operation) (any, error) {
		if err := d.store.Update(ctx, func(tx store.Tx) error {
			return store.PutJSON(tx, stackBucket, f.Name, stackRecord{Name: f.Name, Path: sb.Path, File: sb.File})
		}); err != nil {
			return nil, err
		}
		if err := d.stackNetworks(ctx, f); err != nil {
			return nil, err
		}
		for _, in := range f.Instances() {
			id, ok := sb.Members[in.Name]
			if !ok {
				continue // not created when backed up: up creates it
			}
			o.Progress("restore "+in.Name, 0, 0)
			if _, err := d.backups.Restore(ctx, id, api.RestoreBackup{VM: in.Name, Repo: sb.Repo, Stack: f.Name}, o.Progress); err != nil {
				return nil, fmt.Errorf("stack %q: %w", f.Name, err)
			}
		}
		if err := d.applyStack(ctx, f, api.StackUp{Path: sb.Path, File: sb.File}, o); err != nil {
			return nil, err
		}
		return d.stackView(ctx, f.Name)
	}))
}

// pickStackBackup finds the stack backup a restore asks for and checks
// that nothing of the stack is here yet.
func (d *Daemon) pickStackBackup(ctx context.Context, req api.StackRestore) (api.StackBackup, *stack.File, error) {
	if _, err := d.stackRecord(ctx, req.Stack); err == nil {
		return api.StackBackup{}, nil, fmt.Errorf("restore stack %q: %w here; take it down with --delete first", req.Stack, errdefs.ErrExists)
	}
	sbs, err := d.backups.StackBackups(ctx, req.Stack, req.Repo)
	if err != nil {
		return api.StackBackup{}, nil, fmt.Errorf("restore stack %q: %w", req.Stack, err)
	}
	var sb *api.StackBackup
	for i := range sbs {
		if req.From == "" || sbs[i].ID == req.From {
			sb = &sbs[i]
		}
	}
	if sb == nil {
		what := "no stack backup"
		if req.From != "" {
			what = "no stack backup " + req.From
		}
		return api.StackBackup{}, nil, fmt.Errorf("restore stack %q: %w: %s in that repository (lodge stack backup %s)", req.Stack, errdefs.ErrNotFound, what, req.Stack)
	}
	f, err := stack.Parse(sb.Path, []byte(sb.File))
	if err != nil {
		return api.StackBackup{}, nil, fmt.Errorf("restore stack %q: %w", req.Stack, err)
	}
	for vm := range sb.Members {
		if _, err := d.vms.Get(ctx, vm); err == nil {
			return api.StackBackup{}, nil, fmt.Errorf("restore stack %q: vm %q %w here", req.Stack, vm, errdefs.ErrExists)
		}
	}
	for _, n := range f.Networks {
		if err := d.networks.Supported(); err != nil && n.NAT {
			return api.StackBackup{}, nil, fmt.Errorf("restore stack %q: network %q: nat: %w", req.Stack, n.Name, err)
		}
	}
	return *sb, f, nil
}
