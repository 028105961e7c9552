package network

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/lodge-vm/lodge/internal/errdefs"
	"golang.org/x/sys/unix"
)

// Wiring is what the host needs to bring one network up.
type Wiring struct {
	Name          string
	Bridge        string
	Subnet        netip.Prefix
	Gateway       netip.Addr
	NAT, Isolated bool
	// Dir holds dnsmasq's configuration, hosts files, leases and pid.
	Dir string
}

// Used is a prefix the host already routes or has an address in.
type Used struct {
	Prefix netip.Prefix
	Where  string
}

// Host is the seam between the networks and the Linux host: bridges,
// taps, firewall rules and dnsmasq.
type Host interface {
	// Check says whether this daemon can build networks at all.
	Check() error
	// Used lists the prefixes the host already has.
	Used() ([]Used, error)
	// Up brings a network up; what is already up is left, and a running
	// dnsmasq rereads its hosts files.
	Up(ctx context.Context, w Wiring) error
	// Reload makes a running dnsmasq reread its hosts files. A lease it
	// holds that they no longer give (a deleted VM's address, now
	// another's) makes it restart without that lease, or it would refuse
	// the address to its new holder.
	Reload(ctx context.Context, w Wiring) error
	// Down removes a network from the host.
	Down(ctx context.Context, w Wiring) error
	// OpenTap creates a tap on bridge and returns its file; the tap lives
	// as long as a process holds it open.
	OpenTap(ctx context.Context, bridge, name string) (*os.File, error)
}

// Linux is the real Host.
type Linux struct {
	DNSMasq, IP, IPTables string
	Log                   *slog.Logger
}

var _ Host = (*Linux)(nil)

// NewLinux returns the real Host, with the tools found on PATH.
func NewLinux(log *slog.Logger) *Linux {
	if log == nil {
		log = slog.Default()
	}
	return &Linux{DNSMasq: "dnsmasq", IP: "ip", IPTables: "iptables", Log: log.With("component", "network")}
}

// Check implements Host.
func (l *Linux) Check() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: %w; this daemon runs as uid %d and has only the built-in %q network", errdefs.ErrInvalid, ErrPrivilege, os.Geteuid(), Builtin)
	}
	for _, tool := range []string{l.DNSMasq, l.IP, l.IPTables} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%w: %s is not installed (Debian: dnsmasq-base, iproute2, iptables)", errdefs.ErrInvalid, tool)
		}
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return fmt.Errorf("%w: /dev/net/tun: %w", errdefs.ErrInvalid, err)
	}
	return nil
}

// Used implements Host.
func (l *Linux) Used() ([]Used, error) {
	var out []Used
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	for _, ifc := range ifs {
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
				out = append(out, Used{Prefix: p.Masked(), Where: "interface " + ifc.Name})
			}
		}
	}
	routes, err := readRoutes("/proc/net/route")
	if err != nil {
		return nil, err
	}
	return append(out, routes...), nil
}

// readRoutes lists the IPv4 routes of the main table other than the
// default one.
func readRoutes(path string) ([]Used, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	var out []Used
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 8 {
			continue
		}
		dst, err1 := strconv.ParseUint(fs[1], 16, 32)
		mask, err2 := strconv.ParseUint(fs[7], 16, 32)
		if err1 != nil || err2 != nil || mask == 0 {
			continue
		}
		var a, m [4]byte
		binary.LittleEndian.PutUint32(a[:], uint32(dst))
		binary.LittleEndian.PutUint32(m[:], uint32(mask))
		bits, _ := net.IPv4Mask(m[0], m[1], m[2], m[3]).Size()
		out = append(out, Used{Prefix: netip.PrefixFrom(netip.AddrFrom4(a), bits).Masked(), Where: "route via " + fs[0]})
	}
	return out, sc.Err()
}

func (l *Linux) run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// Up implements Host.
func (l *Linux) Up(ctx context.Context, w Wiring) error {
	if l.run(ctx, l.IP, "link", "show", "dev", w.Bridge) != nil {
		if err := l.run(ctx, l.IP, "link", "add", "name", w.Bridge, "type", "bridge"); err != nil {
			return err
		}
	}
	bits := strconv.Itoa(w.Subnet.Bits())
	if err := l.run(ctx, l.IP, "addr", "replace", w.Gateway.String()+"/"+bits, "dev", w.Bridge); err != nil {
		return err
	}
	if err := l.run(ctx, l.IP, "link", "set", "dev", w.Bridge, "up"); err != nil {
		return err
	}
	if w.NAT {
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644); err != nil {
			return fmt.Errorf("enable IP forwarding for NAT: %w", err)
		}
	}
	if err := l.firewall(ctx, w); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(w.Dir, "dnsmasq.conf"), []byte(dnsmasqConf(w)), 0o644); err != nil {
		return err
	}
	if l.dnsmasqPID(w) > 0 {
		return l.Reload(ctx, w)
	}
	return l.startDNSMasq(ctx, w)
}

// rule is one iptables rule of a network.
type rule struct {
	table, chain string
	args         []string
}

// rules are a network's iptables rules, in the order they must take at
// the top of their chains. Traffic between guests on the bridge is let
// through first, for hosts that pass bridged traffic to iptables
// (br_netfilter, as Docker loads).
func rules(w Wiring) []rule {
	br, sub := w.Bridge, w.Subnet.String()
	rs := []rule{{"filter", "FORWARD", []string{"-i", br, "-o", br, "-j", "ACCEPT"}}}
	if w.NAT {
		rs = append(rs,
			rule{"filter", "FORWARD", []string{"-i", br, "!", "-o", br, "-j", "ACCEPT"}},
			rule{"filter", "FORWARD", []string{"-o", br, "!", "-i", br, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"}},
			rule{"nat", "POSTROUTING", []string{"-s", sub, "!", "-d", sub, "-j", "MASQUERADE"}})
	} else {
		rs = append(rs,
			rule{"filter", "FORWARD", []string{"-i", br, "-j", "REJECT"}},
			rule{"filter", "FORWARD", []string{"-o", br, "-j", "REJECT"}})
	}
	if w.Isolated {
		rs = append(rs,
			rule{"filter", "INPUT", []string{"-i", br, "-p", "udp", "--dport", "67", "-j", "ACCEPT"}},
			rule{"filter", "INPUT", []string{"-i", br, "-p", "udp", "--dport", "53", "-j", "ACCEPT"}},
			rule{"filter", "INPUT", []string{"-i", br, "-p", "tcp", "--dport", "53", "-j", "ACCEPT"}},
			rule{"filter", "INPUT", []string{"-i", br, "-j", "DROP"}})
	}
	for i := range rs {
		rs[i].args = append(rs[i].args, "-m", "comment", "--comment", "lodge network "+w.Name+" on "+br)
	}
	return rs
}

// firewall puts a network's rules in place. Unless all are there, in
// order, they are all removed and inserted afresh.
func (l *Linux) firewall(ctx context.Context, w Wiring) error {
	rs := rules(w)
	all := true
	for _, r := range rs {
		if l.run(ctx, l.IPTables, append([]string{"-w", "-t", r.table, "-C", r.chain}, r.args...)...) != nil {
			all = false
			break
		}
	}
	if all {
		return nil
	}
	l.dropRules(ctx, rs)
	// Inserting each at the top, last first, leaves them in order.
	for i := len(rs) - 1; i >= 0; i-- {
		r := rs[i]
		if err := l.run(ctx, l.IPTables, append([]string{"-w", "-t", r.table, "-I", r.chain, "1"}, r.args...)...); err != nil {
			return err
		}
	}
	return nil
}

func (l *Linux) dropRules(ctx context.Context, rs []rule) {
	for _, r := range rs {
		for l.run(ctx, l.IPTables, append([]string{"-w", "-t", r.table, "-D", r.chain}, r.args...)...) == nil {
		}
	}
}

// dnsmasqConf serves DHCP with fixed addresses only (dhcp-hosts) and DNS
// for the guests' names (hosts). A network without NAT advertises no
// router, so a guest that also has a NAT NIC keeps its way out, and
// answers only its own names.
func dnsmasqConf(w Wiring) string {
	mask := net.CIDRMask(w.Subnet.Bits(), 32)
	lines := []string{
		"interface=" + w.Bridge,
		"bind-interfaces",
		"except-interface=lo",
		"listen-address=" + w.Gateway.String(),
		"pid-file=" + filepath.Join(w.Dir, "dnsmasq.pid"),
		"user=root",
		"no-hosts",
		"addn-hosts=" + filepath.Join(w.Dir, "hosts"),
		"dhcp-hostsfile=" + filepath.Join(w.Dir, "dhcp-hosts"),
		"dhcp-leasefile=" + filepath.Join(w.Dir, "leases"),
		"dhcp-range=" + w.Subnet.Addr().String() + ",static," + net.IP(mask).String() + ",1h",
		"dhcp-authoritative",
		"dhcp-option=option:dns-server," + w.Gateway.String(),
		"domain-needed",
		"bogus-priv",
		"log-facility=" + filepath.Join(w.Dir, "dnsmasq.log"),
	}
	if w.NAT {
		lines = append(lines, "dhcp-option=option:router,"+w.Gateway.String())
	} else {
		lines = append(lines, "dhcp-option=option:router", "no-resolv")
	}
	return strings.Join(lines, "\n") + "\n"
}

// dnsmasqPID is the pid of this network's running dnsmasq, or 0.
func (l *Linux) dnsmasqPID(w Wiring) int {
	raw, err := os.ReadFile(filepath.Join(w.Dir, "dnsmasq.pid"))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || pid <= 0 {
		return 0
	}
	// Pids are reused: it must be dnsmasq with this network's file.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cmdline, []byte(filepath.Join(w.Dir, "dnsmasq.conf"))) {
		return 0
	}
	return pid
}

func (l *Linux) startDNSMasq(ctx context.Context, w Wiring) error {
	_ = os.Remove(filepath.Join(w.Dir, "dnsmasq.pid"))
	kept, all, err := pruneLeases(w.Dir)
	if err != nil {
		return err
	}
	if len(kept) != len(all) {
		if err := writeFileAtomic(filepath.Join(w.Dir, "leases"), strings.Join(kept, "\n")+"\n"); err != nil {
			return err
		}
	}
	// dnsmasq forks into the background and outlives the daemon, as
	// QEMU does: VMs keep their DHCP and DNS across daemon restarts.
	cmd := exec.CommandContext(ctx, l.DNSMasq, "--conf-file="+filepath.Join(w.Dir, "dnsmasq.conf"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("start dnsmasq on %s: %w: %s", w.Bridge, err, strings.TrimSpace(out.String()))
	}
	for range 50 {
		if l.dnsmasqPID(w) > 0 {
			l.Log.Info("dnsmasq started", "network", w.Name, "bridge", w.Bridge, "pid", l.dnsmasqPID(w))
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("start dnsmasq on %s: it wrote no pid file", w.Bridge)
}

// Reload implements Host.
func (l *Linux) Reload(ctx context.Context, w Wiring) error {
	pid := l.dnsmasqPID(w)
	if pid == 0 {
		return nil
	}
	stale, err := staleLeases(w.Dir)
	if err != nil {
		return err
	}
	if !stale {
		return syscall.Kill(pid, syscall.SIGHUP)
	}
	// dnsmasq reads its lease file only when it starts.
	l.stopDNSMasq(w)
	return l.startDNSMasq(ctx, w)
}

// staleLeases says whether dnsmasq's lease file holds a lease that the
// dhcp-hosts file does not give.
func staleLeases(dir string) (bool, error) {
	kept, all, err := pruneLeases(dir)
	return len(kept) != len(all), err
}

// pruneLeases reads dnsmasq's lease file ("expiry mac ip name id") and
// returns all its lines and those dhcp-hosts ("mac,ip,name") still gives.
func pruneLeases(dir string) (kept, all []string, err error) {
	hosts, err := os.ReadFile(filepath.Join(dir, "dhcp-hosts"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, nil, err
	}
	given := map[string]bool{}
	for _, line := range strings.Split(string(hosts), "\n") {
		if fs := strings.Split(line, ","); len(fs) >= 2 {
			given[strings.ToLower(fs[0])+" "+fs[1]] = true
		}
	}
	raw, err := os.ReadFile(filepath.Join(dir, "leases"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		if line == "" {
			continue
		}
		all = append(all, line)
		if fs := strings.Fields(line); len(fs) >= 3 && given[strings.ToLower(fs[1])+" "+fs[2]] {
			kept = append(kept, line)
		}
	}
	return kept, all, nil
}

func (l *Linux) stopDNSMasq(w Wiring) {
	pid := l.dnsmasqPID(w)
	if pid == 0 {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	for i := 0; i < 100 && l.dnsmasqPID(w) > 0; i++ {
		time.Sleep(20 * time.Millisecond)
	}
	if pid := l.dnsmasqPID(w); pid > 0 {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// Down implements Host.
func (l *Linux) Down(ctx context.Context, w Wiring) error {
	l.stopDNSMasq(w)
	l.dropRules(ctx, rules(w))
	if l.run(ctx, l.IP, "link", "show", "dev", w.Bridge) == nil {
		return l.run(ctx, l.IP, "link", "del", "dev", w.Bridge)
	}
	return nil
}

// ifreq is struct ifreq as TUNSETIFF reads it.
type ifreq struct {
	name  [unix.IFNAMSIZ]byte
	flags uint16
	_     [22]byte
}

// OpenTap implements Host.
func (l *Linux) OpenTap(ctx context.Context, bridge, name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	var req ifreq
	copy(req.name[:], name)
	req.flags = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(unix.TUNSETIFF), uintptr(unsafe.Pointer(&req))); e != 0 {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("create tap %s: %w", name, e)
	}
	f := os.NewFile(uintptr(fd), "/dev/net/tun:"+name)
	if err := l.run(ctx, l.IP, "link", "set", "dev", name, "master", bridge, "up"); err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}
