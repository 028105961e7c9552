// Package stack reads a stack file, the YAML that declares a group of VMs
// (its members), the private networks between them and the order they
// start in, and turns it into what the daemon acts on: the expanded list of
// VMs, a rollout plan in waves, the reverse order for `stack down`, and the
// difference between the file and the VMs that already exist.
//
// Everything here is pure: no QEMU, no store, no clock. Parse checks all a
// file can tell about itself; Validate adds what only the host knows (its
// images and its memory). Every refusal names the file, the line and the
// object, since a stack file is written by hand and a message without a
// line sends the user hunting.
package stack

import (
	"regexp"
	"strconv"
	"time"
)

// Conditions a member can wait for on one of its dependencies.
const (
	// CondStarted: the dependency's QEMU process is running.
	CondStarted = "started"
	// CondAgent: the guest agent inside the dependency answers.
	CondAgent = "agent"
	// CondHealthy: the dependency's health check passes.
	CondHealthy = "healthy"
	// CondCompleted: a oneshot dependency powered itself off with no error.
	CondCompleted = "completed"
)

// BuiltinNetwork is the network every host has, which a stack may use
// without declaring it.
const BuiltinNetwork = "nat"

// Defaults filled in by Parse when the file leaves a field out.
const (
	DefaultCount          = 1
	DefaultTimeout        = 5 * time.Minute
	DefaultHealthInterval = 2 * time.Second
	DefaultHealthTimeout  = 10 * time.Second
	DefaultHealthRetries  = 3
	// DefaultStartPeriod is how long, after a guest's agent first
	// answers, failed probes are expected: services come up after the
	// agent does.
	DefaultStartPeriod = 30 * time.Second
)

// MaxInstances bounds the VMs one stack expands to. A stack is a handful
// of servers; a count typed with an extra zero should be refused, not
// expanded into a plan with millions of waits.
const MaxInstances = 1000

// File is a parsed stack file.
type File struct {
	Name     string
	Networks []Network
	// VMs are the members in the order the file lists them.
	VMs []Member
	// Timeout bounds the whole rollout; 0 leaves it to each member's own.
	Timeout time.Duration
	// Path is the file's name as the user gave it, for messages.
	Path string

	// at holds where things were written, keyed by place(...), so that
	// checks that run after parsing (references, cycles, Validate) can
	// still point at a line.
	at map[string]pos
}

// Network is a private network the stack declares.
type Network struct {
	Name string
	// Subnet is an IPv4 CIDR such as 10.77.0.0/24; empty lets the host
	// choose one.
	Subnet   string
	NAT      bool
	Isolated bool
}

// Member is one entry under vms:. With Count above 1 it stands for several
// VMs, all alike.
type Member struct {
	// Name is the member's name as written in the file, not the VM name.
	Name  string
	Image string
	// CPUs, Memory, MaxMemory and Disk are 0 where the file says nothing,
	// so that the daemon's own defaults (or the image's) apply.
	CPUs      int
	Memory    int64
	MaxMemory int64
	Disk      int64
	// Disks are the sizes of the data disks made after the root disk.
	Disks []int64
	// Networks are names declared under networks:, or BuiltinNetwork.
	Networks []string
	Count    int
	// DependsOn maps a member's name to the condition waited for.
	DependsOn map[string]string
	Health    *Health
	// Oneshot marks a VM that powers itself off when its job is done.
	Oneshot   bool
	CloudInit string
	// Timeout bounds how long the rollout waits for this member to meet
	// the conditions its dependents wait for.
	Timeout time.Duration
}

// Health is how to tell a member is ready to serve: a command run in the
// guest through the agent (Exec) or a TCP port that accepts a connection
// (TCP). Exactly one is set.
type Health struct {
	Exec string
	TCP  int
	// Interval is the pause between two probes.
	Interval time.Duration
	// Timeout bounds one probe, so that a hung command cannot stall the
	// wait; the whole wait is bounded by the member's Timeout.
	Timeout time.Duration
	// Retries is how many probes in a row must fail, after the start
	// period, before the member counts as unhealthy: the rollout then
	// stops at once rather than waiting out the member's timeout.
	Retries int
	// StartPeriod is the grace given after the guest's agent first
	// answers (the guest has booted), during which failures don't count.
	StartPeriod time.Duration
}

// Instance is one VM of a stack.
type Instance struct {
	// Name is the VM's name on the host.
	Name   string
	Member string
	// Index is 1..Count for a member with Count above 1, 0 otherwise.
	Index int
	// Spec points into the File's VMs; it is shared by all the instances
	// of a member and must not be changed.
	Spec *Member
}

// nameRE is the rule for stack, member and network names. Names end up in
// VM names, hostnames and directory names, hence lower case, no dots and
// no slashes.
var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// maxName is the longest VM name: a hostname label.
const maxName = 63

// validName also refuses a trailing '-', which nameRE lets through: the VM
// service refuses such a VM name and a hostname cannot end with one, so
// letting it pass here would fail the rollout half way instead of up front.
func validName(s string) bool {
	return nameRE.MatchString(s) && s[len(s)-1] != '-'
}

// vmName prefixes the stack's name because VM names are global on a host:
// two stacks may both have a "db", and `lodge list` must tell them apart.
// An index is added only for members with a count, so that the common
// single VM keeps the plain name a user would guess.
func vmName(stack, member string, index int) string {
	n := stack + "-" + member
	if index > 0 {
		n += "-" + strconv.Itoa(index)
	}
	return n
}

// count reads a member's count, taking the zero value of a File built by
// hand as one VM.
func (m *Member) count() int {
	return max(m.Count, 1)
}

// instancesOf expands the member at index i of f.VMs.
func (f *File) instancesOf(i int) []Instance {
	m := &f.VMs[i]
	n := m.count()
	if n == 1 {
		return []Instance{{Name: vmName(f.Name, m.Name, 0), Member: m.Name, Spec: m}}
	}
	out := make([]Instance, 0, n)
	for k := 1; k <= n; k++ {
		out = append(out, Instance{Name: vmName(f.Name, m.Name, k), Member: m.Name, Index: k, Spec: m})
	}
	return out
}

// Instances lists every VM of the stack, members in file order and each
// member's instances by index.
func (f *File) Instances() []Instance {
	var out []Instance
	for i := range f.VMs {
		out = append(out, f.instancesOf(i)...)
	}
	return out
}

// member finds a member by name.
func (f *File) member(name string) (int, bool) {
	for i := range f.VMs {
		if f.VMs[i].Name == name {
			return i, true
		}
	}
	return -1, false
}
