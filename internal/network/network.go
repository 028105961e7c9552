// Package network runs Lodge's private networks. Each is a Linux bridge on
// the host with its own subnet; dnsmasq on the bridge hands each VM NIC
// the address Lodge chose for it and answers DNS for the VMs' names, so
// guests reach each other by name. NAT to the outside and isolation from
// the host are iptables rules. A VM's NIC is a tap device whose file the
// daemon opens and hands to QEMU, so the tap goes away with QEMU.
//
// The built-in "nat" network is not managed here: it is QEMU's user-mode
// NAT, private to each VM, which needs no privileges.
package network

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/store"
)

// Builtin is the network every VM may use without creating it.
const Builtin = "nat"

// ErrPrivilege means the daemon lacks the rights to build a bridge.
var ErrPrivilege = errors.New("private networks need root (CAP_NET_ADMIN)")

const bucket = "networks"

// record is a network as stored.
type record struct {
	api.Network
}

// Manager creates, deletes and wires up private networks.
type Manager struct {
	st   store.Store
	dir  string // $LODGE_HOME/networks
	home string
	host Host
	log  *slog.Logger

	// mu serialises changes to leases and to the host's side of
	// networks: two starts must not pick one address.
	mu sync.Mutex
	sw switches
}

// New returns a Manager for the daemon whose home is home.
func New(st store.Store, home string, host Host, log *slog.Logger) *Manager {
	if log == nil {
		log = slog.Default()
	}
	return &Manager{st: st, home: home, dir: filepath.Join(home, "networks"), host: host, log: log.With("component", "network")}
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$`)

// ValidName checks a network name: it becomes a DNS domain and a
// directory, so it is kept to lower-case letters, digits and '-'.
func ValidName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("network name %q: %w: use 1 to 40 lower-case letters, digits and '-', starting and ending with a letter or digit", name, errdefs.ErrInvalid)
	}
	return nil
}

// Supported says whether this daemon can build bridge networks, which
// NAT needs; user-mode networks work anywhere.
func (m *Manager) Supported() error { return m.host.Check() }

// Create makes a network and brings it up on the host.
func (m *Manager) Create(ctx context.Context, req api.CreateNetwork) (api.Network, error) {
	if err := ValidName(req.Name); err != nil {
		return api.Network{}, err
	}
	if req.Name == Builtin {
		return api.Network{}, fmt.Errorf("network %q: %w: it is built in", req.Name, errdefs.ErrExists)
	}
	if req.NAT && req.Isolated {
		return api.Network{}, fmt.Errorf("network %q: %w: --nat and --isolated contradict each other", req.Name, errdefs.ErrInvalid)
	}
	mode, err := m.mode(req)
	if err != nil {
		return api.Network{}, fmt.Errorf("network %q: %w", req.Name, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	all, err := m.list(ctx)
	if err != nil {
		return api.Network{}, err
	}
	for _, n := range all {
		if n.Name == req.Name {
			return api.Network{}, fmt.Errorf("network %q: %w", req.Name, errdefs.ErrExists)
		}
	}
	var subnet netip.Prefix
	if req.Subnet != "" {
		if subnet, err = parseSubnet(req.Subnet); err != nil {
			return api.Network{}, fmt.Errorf("network %q: %w", req.Name, err)
		}
		if err := m.free(all, subnet, mode); err != nil {
			return api.Network{}, fmt.Errorf("network %q: subnet %s: %w", req.Name, subnet, err)
		}
	} else if subnet, err = m.pickSubnet(req.Name, all, mode); err != nil {
		return api.Network{}, fmt.Errorf("network %q: %w", req.Name, err)
	}
	n := api.Network{
		Name: req.Name, Subnet: subnet.String(), Gateway: subnet.Addr().Next().String(), Mode: mode,
		NAT: req.NAT, Isolated: req.Isolated, Stack: req.Stack,
		CreatedAt: time.Now().UTC(),
	}
	if mode == ModeBridge {
		n.Bridge = m.bridgeName(req.Name)
	}
	// Record first: a network half set up on the host is found and
	// finished (or removed) from its record.
	if err := m.put(ctx, n); err != nil {
		return api.Network{}, err
	}
	if err := m.up(ctx, n); err != nil {
		m.down(context.WithoutCancel(ctx), n)
		_ = m.st.Update(context.WithoutCancel(ctx), func(tx store.Tx) error { return tx.Delete(bucket, n.Name) })
		_ = os.RemoveAll(m.netDir(n.Name))
		return api.Network{}, fmt.Errorf("network %q: %w", n.Name, err)
	}
	m.log.Info("created", "network", n.Name, "mode", n.Mode, "subnet", n.Subnet, "bridge", n.Bridge, "nat", n.NAT, "isolated", n.Isolated)
	return n, nil
}

// privateRanges are where a private network's subnet may lie: RFC 1918
// and the shared range of RFC 6598. Anything else would shadow real hosts.
var privateRanges = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"),
}

// parseSubnet accepts an IPv4 CIDR with room for a gateway and guests.
func parseSubnet(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	switch {
	case err != nil:
		return p, fmt.Errorf("subnet %q: %w: not a CIDR such as 10.77.0.0/24", s, errdefs.ErrInvalid)
	case !p.Addr().Is4():
		return p, fmt.Errorf("subnet %q: %w: only IPv4 subnets are supported", s, errdefs.ErrInvalid)
	case p.Bits() < 16 || p.Bits() > 29:
		return p, fmt.Errorf("subnet %q: %w: want a prefix from /16 to /29", s, errdefs.ErrInvalid)
	case p.Masked() != p:
		return p, fmt.Errorf("subnet %q: %w: host bits set; did you mean %s?", s, errdefs.ErrInvalid, p.Masked())
	case !slices.ContainsFunc(privateRanges, func(r netip.Prefix) bool { return r.Contains(p.Addr()) && r.Bits() <= p.Bits() }):
		return p, fmt.Errorf("subnet %q: %w: not in a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10)", s, errdefs.ErrInvalid)
	}
	return p, nil
}

// free refuses a subnet that overlaps another network or any address or
// route the host already has: guests would shadow real hosts.
func (m *Manager) free(all []api.Network, p netip.Prefix, mode string) error {
	for _, n := range all {
		if o, err := netip.ParsePrefix(n.Subnet); err == nil && o.Overlaps(p) {
			return fmt.Errorf("%w: overlaps network %q (%s)", errdefs.ErrConflict, n.Name, n.Subnet)
		}
	}
	if mode == ModeUser {
		// The host never sees a user-mode network's addresses.
		return nil
	}
	used, err := m.host.Used()
	if err != nil {
		return err
	}
	for _, u := range used {
		if u.Prefix.Overlaps(p) {
			return fmt.Errorf("%w: overlaps %s on the host's %s", errdefs.ErrConflict, u.Prefix, u.Where)
		}
	}
	return nil
}

// pickSubnet chooses a free /24 in 10.0.0.0/8, starting from one derived
// from the name so that a network gets the same subnet on every host.
func (m *Manager) pickSubnet(name string, all []api.Network, mode string) (netip.Prefix, error) {
	sum := sha256.Sum256([]byte(name))
	start := binary.BigEndian.Uint16(sum[:2])
	for i := range 1 << 16 {
		k := start + uint16(i)
		a, b := byte(k>>8), byte(k)
		if a == 0 || a == 255 {
			continue
		}
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, a, b, 0}), 24)
		if m.free(all, p, mode) == nil {
			return p, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("%w: no free /24 left in 10.0.0.0/8; give --subnet", errdefs.ErrLimit)
}

// bridgeName is unique per daemon home and network and fits IFNAMSIZ.
func (m *Manager) bridgeName(name string) string {
	sum := sha256.Sum256([]byte(m.home + "\x00" + name))
	return "lodge" + hex.EncodeToString(sum[:4])
}

// tapName names the tap of a VM's NIC, unique per home.
func (m *Manager) tapName(vm string, nic int) string {
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s\x00%s\x00%d", m.home, vm, nic)))
	return "lt" + hex.EncodeToString(sum[:6])
}

func (m *Manager) netDir(name string) string { return filepath.Join(m.dir, name) }

// wiring is what the host needs to know to bring a network up.
func (m *Manager) wiring(n api.Network) Wiring {
	p := netip.MustParsePrefix(n.Subnet)
	return Wiring{Name: n.Name, Bridge: n.Bridge, Subnet: p, Gateway: netip.MustParseAddr(n.Gateway), NAT: n.NAT, Isolated: n.Isolated, Dir: m.netDir(n.Name)}
}

// up brings a network up: in bridge mode on the host (bridge, firewall,
// files, dnsmasq), in user mode as a switch in the daemon.
func (m *Manager) up(ctx context.Context, n api.Network) error {
	if err := os.MkdirAll(m.netDir(n.Name), 0o755); err != nil {
		return err
	}
	if n.Mode == ModeUser {
		return m.startSwitch(n)
	}
	if err := m.writeHosts(n); err != nil {
		return err
	}
	return m.host.Up(ctx, m.wiring(n))
}

// down is up undone.
func (m *Manager) down(ctx context.Context, n api.Network) {
	if n.Mode == ModeUser {
		m.stopSwitch(n.Name)
		return
	}
	_ = m.host.Down(ctx, m.wiring(n))
}

// Recover brings every network up again, as after a host reboot or a
// daemon restart: what is already up is left as it is.
func (m *Manager) Recover(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	all, err := m.list(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range all {
		if err := m.up(ctx, n); err != nil {
			errs = append(errs, fmt.Errorf("network %q: bring up: %w", n.Name, err))
		}
	}
	return errors.Join(errs...)
}

// List returns the built-in network and every private one, by name.
func (m *Manager) List(ctx context.Context) ([]api.Network, error) {
	all, err := m.list(ctx)
	if err != nil {
		return nil, err
	}
	return append([]api.Network{builtin()}, all...), nil
}

func builtin() api.Network {
	return api.Network{Name: Builtin, Builtin: true, NAT: true}
}

func (m *Manager) list(ctx context.Context) ([]api.Network, error) {
	var out []api.Network
	err := m.st.View(ctx, func(tx store.Tx) error {
		recs, err := store.ListJSON[record](tx, bucket)
		for _, r := range recs {
			out = append(out, r.Network)
		}
		return err
	})
	return out, err
}

// Get returns one network.
func (m *Manager) Get(ctx context.Context, name string) (api.Network, error) {
	if name == Builtin {
		return builtin(), nil
	}
	var r record
	err := m.st.View(ctx, func(tx store.Tx) error { return store.GetJSON(tx, bucket, name, &r) })
	if errors.Is(err, store.ErrNotFound) {
		return api.Network{}, fmt.Errorf("network %q: %w", name, errdefs.ErrNotFound)
	}
	return r.Network, err
}

func (m *Manager) put(ctx context.Context, n api.Network) error {
	return m.st.Update(ctx, func(tx store.Tx) error { return store.PutJSON(tx, bucket, n.Name, record{n}) })
}

// Delete removes a network from the host and the store. users are the
// VMs that have a NIC on it: while there are any it is refused.
func (m *Manager) Delete(ctx context.Context, name string, users []string) error {
	if name == Builtin {
		return fmt.Errorf("network %q: %w: it is built in", name, errdefs.ErrInvalid)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	n, err := m.Get(ctx, name)
	if err != nil {
		return err
	}
	if len(users) > 0 {
		return fmt.Errorf("network %q: %w by vm %s", name, errdefs.ErrInUse, strings.Join(users, ", "))
	}
	if n.Mode == ModeUser {
		m.stopSwitch(n.Name)
	} else if err := m.host.Down(ctx, m.wiring(n)); err != nil {
		return fmt.Errorf("network %q: take down: %w", name, err)
	}
	if err := m.st.Update(ctx, func(tx store.Tx) error { return tx.Delete(bucket, name) }); err != nil {
		return err
	}
	_ = os.RemoveAll(m.netDir(name))
	m.log.Info("deleted", "network", name)
	return nil
}

// Check says whether VMs may attach to network name.
func (m *Manager) Check(ctx context.Context, name string) error {
	_, err := m.Get(ctx, name)
	return err
}

// NIC is one VM NIC to attach.
type NIC struct {
	Network string
	MAC     string
	// Index is the NIC's place on the VM, which names its tap.
	Index int
	// Port is where the NIC's datagram socket will be, for a user-mode
	// network; QEMU binds it.
	Port string
}

// Attachment is the host's side of a NIC on a private network: a tap
// (bridge mode) or the switch's socket (user mode).
type Attachment struct {
	// Tap is the open tap device for QEMU's -netdev tap,fd=.
	Tap *os.File
	// Switch is the switch's socket for QEMU's -netdev dgram.
	Switch string
	IP     string
}

// Attach leases an address for a VM's NIC (the one it had, if any),
// registers the VM's names with the network's DNS and opens a tap on the
// network's bridge. names are the VM's hostname first, then aliases.
func (m *Manager) Attach(ctx context.Context, vm string, names []string, nic NIC) (Attachment, error) {
	if nic.Network == Builtin {
		return Attachment{}, fmt.Errorf("vm %q: network %q: %w: it is QEMU's own NAT, with no tap", vm, Builtin, errdefs.ErrInvalid)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	n, err := m.Get(ctx, nic.Network)
	if err != nil {
		return Attachment{}, fmt.Errorf("vm %q: %w", vm, err)
	}
	lease, changed, err := assign(&n, vm, nic.MAC, names)
	if err != nil {
		return Attachment{}, fmt.Errorf("vm %q on network %q: %w", vm, n.Name, err)
	}
	if n.Mode == ModeUser {
		for i := range n.Leases {
			if n.Leases[i].MAC == lease.MAC && n.Leases[i].Port != nic.Port {
				n.Leases[i].Port, changed = nic.Port, true
			}
		}
	}
	if changed {
		if err := m.put(ctx, n); err != nil {
			return Attachment{}, err
		}
	}
	if n.Mode == ModeUser {
		if err := m.up(ctx, n); err != nil {
			return Attachment{}, fmt.Errorf("network %q: bring up: %w", n.Name, err)
		}
		m.addPort(n.Name, nic.Port)
		return Attachment{Switch: m.switchSocket(n.Name), IP: lease.IP}, nil
	}
	// A host rebooted since the network was made has lost the bridge.
	w := m.wiring(n)
	if err := os.MkdirAll(w.Dir, 0o755); err != nil {
		return Attachment{}, err
	}
	if err := m.writeHosts(n); err != nil {
		return Attachment{}, err
	}
	if err := m.host.Up(ctx, w); err != nil {
		return Attachment{}, fmt.Errorf("network %q: bring up: %w", n.Name, err)
	}
	tap, err := m.host.OpenTap(ctx, n.Bridge, m.tapName(vm, nic.Index))
	if err != nil {
		return Attachment{}, fmt.Errorf("vm %q on network %q: tap: %w", vm, n.Name, err)
	}
	return Attachment{Tap: tap, IP: lease.IP}, nil
}

// assign finds or makes the lease of vm's NIC with mac on n. An address
// is kept across restarts; a VM that changed its MAC (a clone, a new
// identity) gets its old lease back under the new MAC.
func assign(n *api.Network, vm, mac string, names []string) (api.NetworkLease, bool, error) {
	mac = strings.ToLower(mac)
	names = slices.Compact(slices.Clone(names))
	// DNS names are case-blind, and one name answers for one VM.
	for _, l := range n.Leases {
		if l.VM == vm || l.MAC == mac {
			continue
		}
		for _, name := range names {
			if slices.ContainsFunc(l.Names, func(o string) bool { return strings.EqualFold(o, name) }) {
				return api.NetworkLease{}, false, fmt.Errorf("%w: name %q is vm %q's", errdefs.ErrConflict, name, l.VM)
			}
		}
	}
	for i, l := range n.Leases {
		if l.MAC != mac {
			continue
		}
		if l.VM == vm && slices.Equal(l.Names, names) {
			return l, false, nil
		}
		// The MAC moved to another VM record (a move, or a copy with
		// its identity kept): the start's own conflict check made sure
		// the old holder is not running.
		n.Leases[i].VM, n.Leases[i].Names = vm, names
		return n.Leases[i], true, nil
	}
	for i, l := range n.Leases {
		if l.VM == vm {
			// The VM has a new MAC (a new identity): it keeps its
			// address and its names.
			n.Leases[i].MAC, n.Leases[i].Names = mac, names
			return n.Leases[i], true, nil
		}
	}
	ip, err := nextFree(*n)
	if err != nil {
		return api.NetworkLease{}, false, err
	}
	l := api.NetworkLease{VM: vm, MAC: mac, IP: ip.String(), Names: names}
	n.Leases = append(n.Leases, l)
	return l, true, nil
}

// nextFree is the lowest address after the gateway that no lease holds.
func nextFree(n api.Network) (netip.Addr, error) {
	p, err := netip.ParsePrefix(n.Subnet)
	if err != nil {
		return netip.Addr{}, err
	}
	taken := map[string]bool{n.Gateway: true}
	for _, l := range n.Leases {
		taken[l.IP] = true
	}
	last := lastAddr(p)
	for a := p.Addr().Next(); p.Contains(a) && a != last; a = a.Next() {
		if !taken[a.String()] {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%w: no free address left in %s", errdefs.ErrLimit, n.Subnet)
}

// lastAddr is a subnet's broadcast address.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	v := binary.BigEndian.Uint32(a[:]) | (1<<(32-p.Bits()) - 1)
	binary.BigEndian.PutUint32(a[:], v)
	return netip.AddrFrom4(a)
}

// Release drops vm's leases on every network, when the VM is deleted.
func (m *Manager) Release(ctx context.Context, vm string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	all, err := m.list(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range all {
		var ports []string
		for _, l := range n.Leases {
			if l.VM == vm && l.Port != "" {
				ports = append(ports, l.Port)
			}
		}
		kept := slices.DeleteFunc(slices.Clone(n.Leases), func(l api.NetworkLease) bool { return l.VM == vm })
		if len(kept) == len(n.Leases) {
			continue
		}
		n.Leases = kept
		if err := m.put(ctx, n); err != nil {
			errs = append(errs, err)
			continue
		}
		if n.Mode == ModeUser {
			// The switch reads the leases at each request; only the
			// ports go.
			for _, p := range ports {
				m.removePort(n.Name, p)
			}
			continue
		}
		if err := m.writeHosts(n); err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, m.host.Reload(ctx, m.wiring(n)))
	}
	return errors.Join(errs...)
}

// writeHosts writes what dnsmasq serves: each lease's fixed address for
// DHCP, and its names for DNS. dnsmasq rereads both on SIGHUP.
func (m *Manager) writeHosts(n api.Network) error {
	var dhcp, hosts strings.Builder
	for _, l := range n.Leases {
		fmt.Fprintf(&dhcp, "%s,%s", l.MAC, l.IP)
		if len(l.Names) > 0 {
			fmt.Fprintf(&dhcp, ",%s", l.Names[0])
		}
		dhcp.WriteString("\n")
		if len(l.Names) > 0 {
			fmt.Fprintf(&hosts, "%s %s\n", l.IP, strings.Join(l.Names, " "))
		}
	}
	dir := m.netDir(n.Name)
	if err := writeFileAtomic(filepath.Join(dir, "dhcp-hosts"), dhcp.String()); err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, "hosts"), hosts.String())
}

func writeFileAtomic(path, content string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
