// Package daemon is the host daemon: it owns the store, recovers
// interrupted work, re-attaches to running VMs and serves the REST API on
// a unix socket. Long calls run as operations that clients wait on.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/lodge-vm/lodge/internal/backup/manager"
	"github.com/lodge-vm/lodge/internal/config"
	"github.com/lodge-vm/lodge/internal/identity"
	"github.com/lodge-vm/lodge/internal/image"
	"github.com/lodge-vm/lodge/internal/network"
	"github.com/lodge-vm/lodge/internal/pool"
	"github.com/lodge-vm/lodge/internal/project"
	"github.com/lodge-vm/lodge/internal/qemu"
	"github.com/lodge-vm/lodge/internal/storage"
	"github.com/lodge-vm/lodge/internal/store"
	"github.com/lodge-vm/lodge/internal/units"
	"github.com/lodge-vm/lodge/internal/vm"
)

// Daemon is one running host daemon.
type Daemon struct {
	cfg      config.Config
	log      *slog.Logger
	store    store.Store
	driver   *qemu.QEMU
	vms      *vm.Service
	images   *image.Library
	pools    *pool.Registry
	projects *project.Registry
	ops      *operations
	events   *bus
	qemuVer  string
	memTot   int64

	limitsMu sync.Mutex
	limits   hostLimits

	// token and listenAddr are set when the API is served over TCP.
	token      string
	listenAddr string
	transfers  *transfers
	backups    *manager.Manager
	networks   *network.Manager

	accelMu sync.Mutex
	accel   qemu.Accel
	// accelSettled is closed once there is a verdict and no probe is
	// running; a new probe replaces it with an open one.
	accelSettled chan struct{}
	probeRunning bool
}

// New prepares the daemon: directories, store, recovery. It fails fast if
// another daemon owns the home.
func New(ctx context.Context, cfg config.Config, log *slog.Logger) (*Daemon, error) {
	for _, dir := range []string{cfg.Home, filepath.Join(cfg.Home, "images"), filepath.Join(cfg.Home, "vms"), filepath.Join(cfg.Home, "run")} {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", dir, err)
		}
	}
	st, err := store.OpenBolt(filepath.Join(cfg.Home, "state.db"))
	if err != nil {
		if errors.Is(err, store.ErrLocked) {
			return nil, fmt.Errorf("another lodge daemon is using %s: %w", cfg.Home, err)
		}
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: log.With("component", "daemon"), store: st, events: newBus(), memTot: memTotal()}
	d.driver = qemu.New(cfg.QEMU, log)
	img := storage.NewQEMUImg(cfg.QEMUImg)
	d.images = image.New(cfg.Home, st, img, log)
	if d.pools, err = pool.New(ctx, cfg.Home, st); err != nil {
		_ = st.Close()
		return nil, err
	}
	d.networks = network.New(st, cfg.Home, network.NewLinux(log), log)
	d.vms = vm.New(vm.Config{
		Home: cfg.Home, Store: st, Driver: d.driver, Volumes: img, Images: d.images, Pools: d.pools, Networks: d.networks,
		Events: d.events, Log: log, Host: d.host, Accel: d.waitAccel, StopTimeout: cfg.StopTimeout,
		IdentityGrace: cfg.IdentityGrace, TCGCache: int64(cfg.TCGCache), FleeceLimit: int64(cfg.FleeceLimit),
		Vsock: hasVhostVsock(),
		WriteSeed: func(ctx context.Context, path, instanceID, hostname string, userData []byte) error {
			return identity.WriteSeedISO(ctx, path, identity.Seed{InstanceID: instanceID, Hostname: hostname, UserData: userData})
		},
	})
	d.images.Users = d.vms.UsersOfImage
	d.pools.Users = d.vms.UsersOfPool
	if d.backups, err = manager.New(ctx, cfg.Home, st, d.vms, log); err != nil {
		_ = st.Close()
		return nil, err
	}
	d.projects = project.New(st)
	d.projects.Usage, d.projects.Members = d.vms.ProjectUsage, vm.ProjectMembersTx
	if v, err := d.driver.Version(ctx); err == nil {
		d.qemuVer = strings.TrimPrefix(v, "QEMU emulator version ")
	} else {
		d.log.Warn("qemu not found; VMs cannot start", "binary", cfg.QEMU, "err", err)
	}
	if err := d.loadLimits(ctx); err != nil {
		_ = st.Close()
		return nil, err
	}
	if err := d.images.Recover(ctx); err != nil {
		_ = st.Close()
		return nil, fmt.Errorf("recover images: %w", err)
	}
	// Networks first: a VM that was running keeps its tap, but its DHCP
	// and DNS must be there for it.
	if err := d.networks.Recover(ctx); err != nil {
		d.log.Error("networks not brought up", "err", err)
	}
	if err := d.vms.Recover(ctx); err != nil {
		_ = st.Close()
		return nil, fmt.Errorf("recover vms: %w", err)
	}
	return d, nil
}

// Run serves the API until ctx ends, then lets go of the VMs (they keep
// running) and closes the store.
func (d *Daemon) Run(ctx context.Context) error {
	d.ops = newOperations(ctx, d.events)
	d.initAccel(ctx)
	go d.autoBalloonLoop(ctx)
	go d.backupLoop(ctx)
	ln, err := listen(d.cfg.Socket)
	if err != nil {
		return err
	}
	d.transfers = newTransfers(ctx, d)
	handler := d.routes()
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	var remote *http.Server
	if d.cfg.Listen != "" {
		if remote, err = d.serveRemote(ctx, handler); err != nil {
			_ = ln.Close()
			return err
		}
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	d.log.Info("serving", "socket", d.cfg.Socket, "home", d.cfg.Home, "pid", os.Getpid())
	select {
	case <-ctx.Done():
	case err := <-errc:
		d.shutdown()
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if remote != nil {
		_ = remote.Shutdown(sctx)
	}
	_ = srv.Shutdown(sctx)
	d.shutdown()
	return nil
}

func (d *Daemon) shutdown() {
	d.ops.wait()
	d.vms.Close()
	d.networks.Close()
	_ = d.store.Close()
	_ = os.Remove(d.cfg.Socket)
	d.log.Info("stopped; VMs keep running")
}

// listen opens the API socket, replacing a stale one left by a killed
// daemon but never one a live daemon answers on.
func listen(path string) (net.Listener, error) {
	d := net.Dialer{Timeout: time.Second}
	if c, err := d.DialContext(context.Background(), "unix", path); err == nil {
		_ = c.Close()
		return nil, fmt.Errorf("listen %s: another lodge daemon is answering there", path)
	}
	_ = os.Remove(path)
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(context.Background(), "unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		_ = ln.Close()
		return nil, err
	}
	return ln, nil
}

func memTotal() int64 {
	n, _ := meminfo("/proc/meminfo", "MemTotal")
	return n
}

// meminfo reads one field of a /proc/meminfo-style file, in bytes.
func meminfo(path, field string) (int64, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	n, err := units.MeminfoField(raw, field)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	return n, nil
}

// hasVhostVsock reports whether VMs can have a vsock device here.
func hasVhostVsock() bool {
	f, err := os.OpenFile("/dev/vhost-vsock", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	_ = f.Close()
	return true
}
