// Package vswitch is an Ethernet switch in user space, for the private
// networks of a daemon that runs unprivileged: without CAP_NET_ADMIN it
// can create neither a Linux bridge nor taps to plug into one.
//
// Each VM NIC is a QEMU dgram netdev on unix sockets:
//
//	-netdev dgram,id=n0,local.type=unix,local.path=VM.sock,remote.type=unix,remote.path=SWITCH.sock
//
// QEMU sends each Ethernet frame as one datagram, with no header, to the
// switch's socket and takes each datagram that arrives at its own socket
// as one frame. The switch learns which MAC sits behind which VM socket
// and forwards as a hardware switch does.
//
// With no dnsmasq on such a network, the switch also plays the gateway:
// it answers ARP and ping for the gateway address, hands out the fixed
// leases by DHCP and answers DNS for the leases' names.
//
// Datagram sockets have no connection, so the VMs outlive the daemon's
// switch: while it is down their frames are lost, as on an unplugged
// cable, but QEMU keeps sending to the switch's path, and a new switch
// bound there receives again. It reaches the VMs at their sockets once
// told their paths with AddPort, before they have sent anything.
package vswitch

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// Lease is a fixed address the switch's DHCP server hands to a MAC, and
// the names its DNS server answers with that address.
type Lease struct {
	MAC   net.HardwareAddr
	IP    netip.Addr
	Names []string // hostname first, then aliases
}

// Config is what New needs to run a switch.
type Config struct {
	Socket  string       // unixgram path to bind (remove a stale file first)
	Subnet  netip.Prefix // IPv4, e.g. 10.77.0.0/24
	Gateway netip.Addr   // the services' address, e.g. 10.77.0.1
	// Leases returns the current fixed leases; called on every DHCP or DNS request, so changes apply at once.
	Leases func() []Lease
	Log    *slog.Logger // nil: slog.Default()
}

const (
	minFrame = 14 // an Ethernet header and nothing else
	maxFrame = 65535

	// maxMACs bounds the learning table, so that a guest sending from
	// ever new source MACs cannot grow the daemon without end. Past it,
	// new MACs are flooded to, as any MAC is before it is learnt.
	maxMACs = 4096
	// maxPorts bounds the ports, each a file descriptor, that senders
	// nobody added can make.
	maxPorts = 1024
)

type mac [6]byte

func (m mac) multicast() bool { return m[0]&1 != 0 } // broadcast included

func (m mac) String() string { return net.HardwareAddr(m[:]).String() }

// Switch is one network's switch. Serve runs it; AddPort and RemovePort
// may be called from any goroutine.
type Switch struct {
	cfg   Config
	log   *slog.Logger
	gwMAC mac
	conn  *net.UnixConn // receives the VMs' frames
	// out sends a frame to a port. It is a field so that the fuzz test can
	// run the frame handler with no sockets.
	out func(p *port, path string, frame []byte) error

	// mu guards the tables, and the ports' sockets while frames go out on
	// them: the sends never wait.
	mu    sync.Mutex
	ports map[string]*port // by the path of the VM's socket
	macs  map[mac]string   // learnt MAC → port path
}

// port is a VM's socket as the switch sees it. Each has its own socket to
// send from: frames queued to a VM that does not read (one that is paused,
// say) count against the send buffer of the socket they left by, so with
// one socket for all a few such VMs would starve the others.
type port struct {
	fd int // -1 until the first frame goes out
}

// New checks cfg and binds the switch's socket. A socket file left there
// by a switch that is gone is removed first.
func New(cfg Config) (*Switch, error) {
	if err := check(cfg); err != nil {
		return nil, fmt.Errorf("switch %q: %w: %w", cfg.Socket, errdefs.ErrInvalid, err)
	}
	if err := removeStale(cfg.Socket); err != nil {
		return nil, fmt.Errorf("switch %q: %w", cfg.Socket, err)
	}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: cfg.Socket, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("switch %q: bind: %w", cfg.Socket, err)
	}
	s := newSwitch(cfg)
	s.conn, s.out = conn, send
	return s, nil
}

// newSwitch is a switch with no socket.
func newSwitch(cfg Config) *Switch {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	return &Switch{
		cfg:   cfg,
		log:   log.With("component", "vswitch", "socket", cfg.Socket),
		gwMAC: gatewayMAC(cfg.Socket),
		ports: map[string]*port{},
		macs:  map[mac]string{},
	}
}

func check(cfg Config) error {
	switch {
	case cfg.Socket == "":
		return errors.New("no socket path")
	case !cfg.Subnet.IsValid():
		return errors.New("no subnet")
	case !cfg.Subnet.Addr().Is4():
		return fmt.Errorf("subnet %v is not IPv4", cfg.Subnet)
	case cfg.Subnet.Bits() > 30:
		return fmt.Errorf("subnet %v has no room for a gateway and a guest", cfg.Subnet)
	case !cfg.Gateway.Is4():
		return fmt.Errorf("gateway %v is not IPv4", cfg.Gateway)
	case !cfg.Subnet.Contains(cfg.Gateway):
		return fmt.Errorf("gateway %v is outside subnet %v", cfg.Gateway, cfg.Subnet)
	case cfg.Gateway == cfg.Subnet.Masked().Addr() || cfg.Gateway == broadcastAddr(cfg.Subnet):
		return fmt.Errorf("gateway %v is the network or broadcast address of %v", cfg.Gateway, cfg.Subnet)
	case cfg.Leases == nil:
		return errors.New("no Leases function")
	}
	return nil
}

func broadcastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	for i := p.Bits(); i < 32; i++ {
		a[i/8] |= 0x80 >> (i % 8)
	}
	return netip.AddrFrom4(a)
}

// removeStale removes a socket file that nothing is bound to any more,
// such as a stopped daemon leaves behind. A switch that still serves
// there is left alone: taking its path would cut its VMs off unnoticed.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%w: the path exists and is not a socket", errdefs.ErrExists)
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	switch {
	case err == nil:
		_ = c.Close()
		return fmt.Errorf("%w: another switch is bound to the socket", errdefs.ErrInUse)
	case !errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("probe the existing socket: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

// gatewayMAC derives the gateway's MAC from the socket path so that it
// stays the same across daemon restarts: the guests' ARP caches stay
// right.
func gatewayMAC(path string) mac {
	sum := sha256.Sum256([]byte("lodge vswitch gateway\x00" + path))
	var m mac
	copy(m[:], sum[:])
	m[0] = m[0]&^1 | 2 // unicast, locally administered
	return m
}

// GatewayMAC is the MAC the switch answers from for the gateway address.
func (s *Switch) GatewayMAC() net.HardwareAddr {
	return net.HardwareAddr(append([]byte(nil), s.gwMAC[:]...))
}

// Serve forwards frames until ctx ends, then closes and removes the
// socket. It returns nil when ctx ends and an error if reading fails.
func (s *Switch) Serve(ctx context.Context) error {
	defer s.close()
	stop := context.AfterFunc(ctx, func() { _ = s.conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	// One byte more than the largest frame tells an oversized datagram,
	// which the read truncates, from one of exactly the largest size.
	buf := make([]byte, maxFrame+1)
	for {
		n, from, err := s.conn.ReadFromUnix(buf)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			return fmt.Errorf("switch %q: read: %w", s.cfg.Socket, err)
		}
		if from == nil || from.Name == "" {
			s.log.Debug("frame from an unbound socket: no port to answer", "bytes", n)
			continue
		}
		s.handle(from.Name, buf[:n])
	}
}

func (s *Switch) close() {
	_ = s.conn.Close()
	s.mu.Lock()
	for _, p := range s.ports {
		p.close()
	}
	s.mu.Unlock()
	if err := os.Remove(s.cfg.Socket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("remove socket", "err", err)
	}
}

// AddPort makes the VM socket at path a port, so that it gets flooded
// frames before it has sent any.
func (s *Switch) AddPort(path string) {
	if path == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.ports[path]; !ok {
		s.ports[path] = &port{fd: -1}
	}
}

// RemovePort forgets the port at path and the MACs learnt on it.
func (s *Switch) RemovePort(path string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.removeLocked(path)
}

func (s *Switch) removeLocked(path string) {
	if p := s.ports[path]; p != nil {
		p.close()
		delete(s.ports, path)
	}
	for m, p := range s.macs {
		if p == path {
			delete(s.macs, m)
		}
	}
}

// handle takes one frame that the socket at from sent.
func (s *Switch) handle(from string, frame []byte) {
	if len(frame) < minFrame || len(frame) > maxFrame {
		return
	}
	dst, src := mac(frame[0:6]), mac(frame[6:12])
	// As a Linux bridge does: such a source is no station's and would
	// only poison the table.
	if src.multicast() || src == (mac{}) {
		return
	}
	if !s.learn(from, src) {
		return
	}
	if dst == s.gwMAC || dst.multicast() {
		if reply := s.answer(frame); reply != nil {
			s.mu.Lock()
			s.deliverLocked(from, reply)
			s.mu.Unlock()
		}
		if dst == s.gwMAC {
			return
		}
	}
	s.forward(from, dst, frame)
}

// learn notes that src sits behind port. It is false if the port is
// new and there is no room for it.
func (s *Switch) learn(path string, src mac) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.ports[path]; !ok {
		if len(s.ports) >= maxPorts {
			s.log.Debug("too many ports: frame dropped", "port", path)
			return false
		}
		s.ports[path] = &port{fd: -1}
		s.log.Debug("port added", "port", path)
	}
	old, ok := s.macs[src]
	switch {
	case ok && old == path:
		return true
	case !ok && len(s.macs) >= maxMACs:
		return true
	case ok:
		s.log.Debug("MAC moved", "mac", src, "from", old, "to", path)
	}
	s.macs[src] = path
	return true
}

// forward sends frame to the port that dst was learnt on, or floods it
// to all ports; never back to the port it came from.
func (s *Switch) forward(from string, dst mac, frame []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if path, ok := s.macs[dst]; ok {
		if path != from {
			s.deliverLocked(path, frame)
		}
		return
	}
	for path := range s.ports {
		if path != from {
			s.deliverLocked(path, frame)
		}
	}
}

func (s *Switch) deliverLocked(path string, frame []byte) {
	p := s.ports[path]
	if p == nil { // removed since the frame came in
		return
	}
	err := s.out(p, path, frame)
	switch {
	case err == nil:
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		s.log.Debug("port gone: its VM has stopped", "port", path, "err", err)
		s.removeLocked(path)
	case errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.ENOBUFS):
		// The VM reads slower than the network sends: the frame is lost,
		// as on a congested link, rather than stalling the other ports.
	default:
		s.log.Debug("send", "port", path, "err", err)
	}
}

// send never waits: one VM that does not read must not stop the switch.
func send(p *port, path string, frame []byte) error {
	if p.fd < 0 {
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		p.fd = fd
	}
	return unix.Sendto(p.fd, frame, unix.MSG_DONTWAIT, &unix.SockaddrUnix{Name: path})
}

func (p *port) close() {
	if p.fd >= 0 {
		_ = unix.Close(p.fd)
		p.fd = -1
	}
}
