// Package vm owns virtual machines: their spec and state in the store,
// their lifecycle (create, start, stop, pause, resume, delete), and the
// supervision of their QEMU processes through the driver. Every change of
// state is written to the store before it is carried out, so that an
// interrupted change can be finished or undone at the next start.
package vm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"sync"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/config"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/image"
	"github.com/lodge-vm/lodge/internal/network"
	"github.com/lodge-vm/lodge/internal/project"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/qga"
	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/storage"
	"github.com/lodge-vm/lodge/internal/store"
)

const bucket = "vms"

// Intents recorded before a multi-step change; see Recover.
const (
	intentCreating = "creating"
	intentDeleting = "deleting"
)

// record is what the store keeps for a VM.
type record struct {
	api.VM
	Pool      string `json:"pool"`
	ImagePath string `json:"image_path"`
	CloudInit string `json:"cloud_init,omitempty"`
	Intent    string `json:"intent,omitempty"`
	// IdentityPending is set on a clone until its guest is seen to have
	// taken its new identity; see settleIdentity.
	IdentityPending bool `json:"identity_pending,omitempty"`
	// NextDisks are the new tops a clone is switching the disks to.
	NextDisks []string `json:"next_disks,omitempty"`
	// BootMemory is the memory the running QEMU was started with (-m):
	// the balloon moves Memory below it.
	BootMemory int64 `json:"boot_memory,omitempty"`
	// BootMaxMemory is the most the running QEMU can reach by hot-plug
	// (its boot memory and virtio-mem's room), BootMemory when it has no
	// virtio-mem device.
	BootMaxMemory int64 `json:"boot_max_memory,omitempty"`
	// Dimms are the pc-dimms plugged into the running guest, in order,
	// for a guest without a virtio-mem driver.
	Dimms []int64 `json:"dimms,omitempty"`
	// BootCPUs and BootMaxCPUs are the running QEMU's -smp cpus and
	// maxcpus; HotCPUs are the CPUs plugged in since, in the sockets
	// after the boot CPUs.
	BootCPUs    int `json:"boot_cpus,omitempty"`
	BootMaxCPUs int `json:"boot_max_cpus,omitempty"`
	HotCPUs     int `json:"hot_cpus,omitempty"`
	// Wanted is the desired power state; State is what was last observed.
	Wanted string `json:"wanted"`
}

// Images resolves image names for the service and takes new ones.
type Images interface {
	// Resolve returns an image without its users (see image.Library).
	Resolve(ctx context.Context, name string) (api.Image, error)
	Publish(ctx context.Context, spec image.PublishSpec) (api.Image, error)
}

// Networks are the private networks VM NICs attach to; see
// internal/network. Without it only the built-in "nat" network exists.
type Networks interface {
	// Check says whether a network exists.
	Check(ctx context.Context, name string) error
	// Attach leases the NIC's address, registers names (hostname first)
	// with the network's DNS and opens its tap.
	Attach(ctx context.Context, vm string, names []string, nic network.NIC) (network.Attachment, error)
	// Release drops a deleted VM's leases.
	Release(ctx context.Context, vm string) error
}

var _ Networks = (*network.Manager)(nil)

// Volumes makes and inspects disk files.
type Volumes interface {
	CreateOverlay(ctx context.Context, backing, path string, size int64) error
	Resize(ctx context.Context, path string, size int64) error
	ConvertProgress(ctx context.Context, src, srcFormat, dst string, progress func(float64)) error
	HasData(ctx context.Context, path string) (bool, error)
	Rebase(ctx context.Context, path, backing string) error
	Info(ctx context.Context, path string) (storage.Info, error)
	SetBacking(ctx context.Context, path, backing string) error
	Check(ctx context.Context, path string) error
	Chain(ctx context.Context, path string) ([]storage.Info, error)
	AddBitmap(ctx context.Context, path, name string) error
	RemoveBitmap(ctx context.Context, path, name string) error
}

var (
	_ Volumes = (*storage.QEMUImg)(nil)
	_ Images  = (*image.Library)(nil)
)

// Pools resolves pool names.
type Pools interface {
	Get(ctx context.Context, name string) (storage.Pool, error)
}

// Publisher receives lifecycle events.
type Publisher interface {
	Publish(ev api.Event)
}

// Host describes the resources VMs draw on.
type Host struct {
	MemoryTotal int64
	MemoryLimit int64
	Overcommit  float64
	// VMOverhead is the host memory each running VM takes beyond its
	// guest's: QEMU itself, and TCG's code cache. It counts against the
	// limit, so that the limit holds for what VMs really take.
	VMOverhead int64
}

// Config wires a Service.
type Config struct {
	Home        string
	Store       store.Store
	Driver      qemu.Driver
	Volumes     Volumes
	Networks    Networks
	Images      Images
	Pools       Pools
	Events      Publisher
	Log         *slog.Logger
	Host        func() Host
	Accel       func(ctx context.Context) (qemu.Accel, error)
	StopTimeout time.Duration
	// TCGCache caps a TCG guest's translated-code cache.
	TCGCache int64
	// Vsock attaches each VM's vsock device; it needs /dev/vhost-vsock
	// (the vhost_vsock module). The CID is allocated either way.
	Vsock bool
	// IdentityGrace is how long a clone's guest has, once its agent is up,
	// to take its new hostname from the seed before Lodge applies the new
	// identity through the agent.
	IdentityGrace time.Duration
	// FleeceLimit bounds the fleecing files of a running VM's export or
	// backup; 0 means config.DefaultFleeceLimit.
	FleeceLimit int64
	// WriteSeed makes the NoCloud seed; a field so unit tests can skip xorriso.
	WriteSeed func(ctx context.Context, path string, instanceID, hostname string, userData []byte) error
}

// Service manages the VMs of one host.
type Service struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex
	busy      map[string]string
	instances map[string]*instance
}

// New returns a Service. Call Recover before serving requests.
func New(cfg Config) *Service {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 60 * time.Second
	}
	if cfg.IdentityGrace == 0 {
		cfg.IdentityGrace = 60 * time.Second
	}
	if cfg.FleeceLimit == 0 {
		cfg.FleeceLimit = config.DefaultFleeceLimit
	}
	return &Service{
		cfg:       cfg,
		log:       cfg.Log.With("component", "vm"),
		busy:      map[string]string{},
		instances: map[string]*instance{},
	}
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`)

// ValidateName refuses names that are not usable as a hostname or that
// could escape a directory (/, ..).
func ValidateName(kind, name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%s name %q: %w: use letters, digits and '-' (at most 63), starting and ending with a letter or digit", kind, name, errdefs.ErrInvalid)
	}
	return nil
}

// vmDir holds the spec copy and the seed; runDir holds sockets and logs.
func (s *Service) vmDir(name string) string  { return filepath.Join(s.cfg.Home, "vms", name) }
func (s *Service) runDir(name string) string { return filepath.Join(s.cfg.Home, "run", name) }

// lock marks a VM busy with an operation, refusing a second one.
func (s *Service) lock(name, op string) (func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.busy[name]; ok {
		return nil, fmt.Errorf("vm %q: %w: %s is in progress", name, errdefs.ErrBusy, cur)
	}
	s.busy[name] = op
	return func() {
		s.mu.Lock()
		delete(s.busy, name)
		s.mu.Unlock()
	}, nil
}

func (s *Service) load(ctx context.Context, name string) (record, error) {
	var r record
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, bucket, name, &r) })
	if errors.Is(err, store.ErrNotFound) {
		return r, fmt.Errorf("vm %q: %w", name, errdefs.ErrNotFound)
	}
	return r, err
}

// update changes a stored record in one transaction.
func (s *Service) update(ctx context.Context, name string, fn func(*record) error) (record, error) {
	return s.updateTx(ctx, name, func(_ store.Tx, r *record) error { return fn(r) })
}

// updateTx is update for changes that read more of the store.
func (s *Service) updateTx(ctx context.Context, name string, fn func(store.Tx, *record) error) (record, error) {
	var out record
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		if err := store.GetJSON(tx, bucket, name, &out); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return fmt.Errorf("vm %q: %w", name, errdefs.ErrNotFound)
			}
			return err
		}
		if err := fn(tx, &out); err != nil {
			return err
		}
		return store.PutJSON(tx, bucket, name, out)
	})
	return out, err
}

func (s *Service) all(ctx context.Context) ([]record, error) {
	var out []record
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		out, err = store.ListJSON[record](tx, bucket)
		return err
	})
	return out, err
}

// setState records an observed state and announces it.
func (s *Service) setState(ctx context.Context, name, state, reason string) {
	_, err := s.update(ctx, name, func(r *record) error {
		r.State, r.StateReason = state, reason
		switch state {
		case api.StateRunning:
			if r.StartedAt == nil {
				now := time.Now().UTC()
				r.StartedAt = &now
			}
		case api.StateStopped, api.StateError:
			r.StartedAt, r.PID = nil, 0
		}
		return nil
	})
	if err != nil {
		s.log.Error("record state", "vm", name, "state", state, "err", err)
		return
	}
	s.publish(name, "vm-state", state, reason)
}

func (s *Service) publish(target, kind, state, msg string) {
	if s.cfg.Events != nil {
		s.cfg.Events.Publish(api.Event{Time: time.Now().UTC(), Kind: kind, Target: target, State: state, Message: msg})
	}
}

// Get returns one VM. For a running VM whose agent is up it asks the
// guest for its addresses, briefly, so that show reports current IPs.
func (s *Service) Get(ctx context.Context, name string) (api.VM, error) {
	r, err := s.load(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	in := s.instance(name)
	if in != nil && in.agentUp() {
		s.refreshIPs(ctx, in)
	}
	v := s.view(r)
	if in != nil {
		bctx, cancel := context.WithTimeout(ctx, time.Second)
		if actual, err := qmp.QueryBalloon(bctx, in.mon); err == nil {
			v.MemoryActual = actual
		}
		if boot, ceiling := r.bootSizes(); ceiling > boot {
			if plugged, err := pluggedMemory(bctx, in.mon); err == nil {
				// The balloon's actual counts the dimms already.
				v.MemoryPlugged = plugged.total()
				v.MemoryActual += plugged.virtioMem
			}
		}
		if used, ok := guestUsed(bctx, in.mon); ok {
			v.MemoryUsed = used
		} else if used, ok := s.agentUsed(bctx, in); ok {
			v.MemoryUsed = used
		}
		cancel()
	}
	v.Snapshots = s.snapshotNames(ctx, name)
	return v, nil
}

func (s *Service) refreshIPs(ctx context.Context, in *instance) {
	actx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	// Never wait behind a long exec: skip the refresh if the agent is busy.
	if !in.agentMu.TryLock() {
		return
	}
	defer in.agentMu.Unlock()
	if in.agent == nil {
		a, err := s.cfg.Driver.Agent(actx, in.runDir)
		if err != nil {
			return
		}
		in.agent = a
	}
	ifaces, err := in.agent.NetworkInterfaces(actx)
	var qerr *qga.Error
	if err != nil && !errors.As(err, &qerr) {
		_ = in.agent.Close()
		in.agent = nil
	}
	if err != nil {
		return
	}
	ips := map[string]string{}
	for _, ifc := range ifaces {
		for _, addr := range ifc.IPAddresses {
			if addr.Type == "ipv4" && ips[ifc.HardwareAddress] == "" {
				ips[ifc.HardwareAddress] = addr.Address
			}
		}
	}
	in.ipMu.Lock()
	in.ips = ips
	in.ipMu.Unlock()
}

// List returns every VM, by name.
func (s *Service) List(ctx context.Context) ([]api.VM, error) {
	recs, err := s.all(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.VM, 0, len(recs))
	for _, r := range recs {
		if r.Intent == intentCreating {
			continue
		}
		out = append(out, s.view(r))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (s *Service) view(r record) api.VM {
	v := r.VM
	v.Project = project.Name(v.Project)
	s.mu.Lock()
	in := s.instances[r.Name]
	s.mu.Unlock()
	if in != nil {
		v.Agent = in.agentUp()
		v.NICs = append([]api.NIC(nil), v.NICs...)
		for i := range v.NICs {
			// What the guest reports wins; a private network's lease
			// is what it will get, shown before the agent is up.
			if ip := in.ip(v.NICs[i].MAC); ip != "" || v.NICs[i].Network == network.Builtin {
				v.NICs[i].IP = ip
			}
		}
	} else {
		v.NICs = append([]api.NIC(nil), v.NICs...)
		for i := range v.NICs {
			v.NICs[i].IP = ""
		}
	}
	if v.NICs == nil {
		v.NICs = []api.NIC{}
	}
	if v.Disks == nil {
		v.Disks = []api.Disk{}
	}
	return v
}

// MemoryAllocated sums the memory of VMs that hold host RAM now, each
// with what its QEMU takes beyond the guest's memory.
func (s *Service) MemoryAllocated(ctx context.Context) (int64, int, int, error) {
	recs, err := s.all(ctx)
	if err != nil {
		return 0, 0, 0, err
	}
	overhead := s.vmOverhead()
	var total int64
	running := 0
	for _, r := range recs {
		if holdsMemory(r.State) {
			total += r.Memory + overhead
			running++
		}
	}
	return total, running, len(recs), nil
}

func holdsMemory(state string) bool {
	switch state {
	case api.StateRunning, api.StatePaused, api.StateStarting, api.StateStopping:
		return true
	}
	return false
}

// UsersOfImage lists the VMs created from an image.
func (s *Service) UsersOfImage(ctx context.Context, image string) ([]string, error) {
	recs, err := s.all(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, r := range recs {
		if r.Image == image {
			out = append(out, r.Name)
		}
	}
	return out, nil
}

// UsersOfPool lists the VMs with a disk in a pool.
func (s *Service) UsersOfPool(ctx context.Context, pool string) ([]string, error) {
	recs, err := s.all(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, r := range recs {
		if r.Pool == pool {
			out = append(out, r.Name)
		}
	}
	return out, nil
}

func (s *Service) removeAll(path string) {
	if err := os.RemoveAll(path); err != nil {
		s.log.Warn("remove", "path", path, "err", err)
	}
}
