package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"sync"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/network/vswitch"
)

// Modes of a private network.
const (
	// ModeBridge is a Linux bridge with dnsmasq and taps: root only.
	ModeBridge = "bridge"
	// ModeUser is a switch inside the daemon, which VMs reach through
	// QEMU's dgram netdev on unix sockets: any user, no NAT.
	ModeUser = "user"
)

// mode chooses how a network is built: as a bridge where the daemon may
// build one, in user mode otherwise. NAT needs the bridge.
func (m *Manager) mode(req api.CreateNetwork) (string, error) {
	hostErr := m.host.Check()
	switch req.Mode {
	case "":
		if hostErr == nil {
			return ModeBridge, nil
		}
		if req.NAT {
			return "", fmt.Errorf("--nat: %w (without it the network is made in user mode, inside the daemon)", hostErr)
		}
		m.log.Info("private network in user mode", "network", req.Name, "why", hostErr)
		return ModeUser, nil
	case ModeBridge:
		return ModeBridge, hostErr
	case ModeUser:
		if req.NAT {
			return "", fmt.Errorf("%w: a user-mode network cannot route out; give the VMs a nat NIC as well", errdefs.ErrInvalid)
		}
		return ModeUser, nil
	}
	return "", fmt.Errorf("mode %q: %w: want bridge or user", req.Mode, errdefs.ErrInvalid)
}

// switches are the running switches of user-mode networks, by network.
type switches struct {
	mu  sync.Mutex
	all map[string]*runningSwitch
}

type runningSwitch struct {
	sw     *vswitch.Switch
	cancel context.CancelFunc
	done   chan struct{}
}

func (m *Manager) switchSocket(name string) string {
	return filepath.Join(m.netDir(name), "switch.sock")
}

// startSwitch runs network n's switch unless it runs already. It serves
// until the network is deleted or the daemon closes the manager; the
// VMs' QEMUs keep their sockets, so a new daemon's switch reaches them
// again at the ports their leases record.
func (m *Manager) startSwitch(n api.Network) error {
	m.sw.mu.Lock()
	defer m.sw.mu.Unlock()
	if m.sw.all == nil {
		m.sw.all = map[string]*runningSwitch{}
	}
	if _, ok := m.sw.all[n.Name]; ok {
		return nil
	}
	subnet, err := netip.ParsePrefix(n.Subnet)
	if err != nil {
		return err
	}
	gw, err := netip.ParseAddr(n.Gateway)
	if err != nil {
		return err
	}
	name := n.Name
	sw, err := vswitch.New(vswitch.Config{
		Socket: m.switchSocket(name), Subnet: subnet, Gateway: gw, Log: m.log,
		Leases: func() []vswitch.Lease { return m.switchLeases(name) },
	})
	if err != nil {
		return err
	}
	for _, l := range n.Leases {
		if l.Port != "" {
			sw.AddPort(l.Port)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	rs := &runningSwitch{sw: sw, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(rs.done)
		if err := sw.Serve(ctx); err != nil {
			m.log.Error("switch stopped", "network", name, "err", err)
		}
	}()
	m.sw.all[name] = rs
	m.log.Info("switch started", "network", name, "socket", m.switchSocket(name))
	return nil
}

func (m *Manager) stopSwitch(name string) {
	m.sw.mu.Lock()
	rs := m.sw.all[name]
	delete(m.sw.all, name)
	m.sw.mu.Unlock()
	if rs != nil {
		rs.cancel()
		<-rs.done
	}
}

func (m *Manager) addPort(network, port string) {
	m.sw.mu.Lock()
	defer m.sw.mu.Unlock()
	if rs := m.sw.all[network]; rs != nil && port != "" {
		rs.sw.AddPort(port)
	}
}

func (m *Manager) removePort(network, port string) {
	m.sw.mu.Lock()
	defer m.sw.mu.Unlock()
	if rs := m.sw.all[network]; rs != nil && port != "" {
		rs.sw.RemovePort(port)
	}
}

// switchLeases is what a switch serves DHCP and DNS from: the network's
// leases as stored now.
func (m *Manager) switchLeases(network string) []vswitch.Lease {
	n, err := m.Get(context.Background(), network)
	if err != nil {
		if !errors.Is(err, errdefs.ErrNotFound) {
			m.log.Warn("read leases", "network", network, "err", err)
		}
		return nil
	}
	out := make([]vswitch.Lease, 0, len(n.Leases))
	for _, l := range n.Leases {
		mac, err1 := net.ParseMAC(l.MAC)
		ip, err2 := netip.ParseAddr(l.IP)
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, vswitch.Lease{MAC: mac, IP: ip, Names: l.Names})
	}
	return out
}

// Close stops the switches of user-mode networks: the daemon is going.
func (m *Manager) Close() {
	m.sw.mu.Lock()
	names := make([]string, 0, len(m.sw.all))
	for name := range m.sw.all {
		names = append(names, name)
	}
	m.sw.mu.Unlock()
	for _, name := range names {
		m.stopSwitch(name)
	}
}
