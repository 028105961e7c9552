package vswitch

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
)

var (
	discard = slog.New(slog.NewTextHandler(io.Discard, nil))

	testSubnet  = netip.MustParsePrefix("10.77.0.0/24")
	testGateway = netip.MustParseAddr("10.77.0.1")
	broadcast   = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
)

// quiet is how long a port must stay silent to count as having got
// nothing: the switch answers in microseconds.
const quiet = 300 * time.Millisecond

func hw(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

// rig is a running switch on real sockets in a short temporary directory:
// unix socket paths must fit in 108 bytes, which t.TempDir's may not.
type rig struct {
	t   *testing.T
	dir string
	sw  *Switch

	mu     sync.Mutex
	leases []Lease
}

func newRig(t *testing.T, leases ...Lease) *rig {
	t.Helper()
	dir, err := os.MkdirTemp("", "vsw")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	r := &rig{t: t, dir: dir, leases: leases}
	sw, err := New(Config{
		Socket: filepath.Join(dir, "sw"), Subnet: testSubnet, Gateway: testGateway,
		Leases: r.getLeases, Log: discard,
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	r.sw = sw
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sw.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return r
}

func (r *rig) getLeases() []Lease {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.leases)
}

func (r *rig) setLeases(ls ...Lease) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.leases = ls
}

// hasPort tells whether the switch has a port at path now.
func (r *rig) hasPort(path string) bool {
	r.sw.mu.Lock()
	defer r.sw.mu.Unlock()
	_, ok := r.sw.ports[path]
	return ok
}

// vm is a VM's NIC as QEMU's dgram netdev makes it: a socket of its own,
// which sends its frames to the switch's.
type vm struct {
	t    *testing.T
	name string
	path string
	mac  net.HardwareAddr
	ip   netip.Addr
	conn *net.UnixConn
	sw   *net.UnixAddr
}

func (r *rig) vm(name, mac, ip string) *vm {
	r.t.Helper()
	path := filepath.Join(r.dir, name)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		r.t.Fatalf("bind %s: %v", name, err)
	}
	r.t.Cleanup(func() { _ = conn.Close() })
	v := &vm{t: r.t, name: name, path: path, mac: hw(mac), conn: conn, sw: &net.UnixAddr{Name: r.sw.cfg.Socket, Net: "unixgram"}}
	if ip != "" {
		v.ip = netip.MustParseAddr(ip)
	}
	return v
}

func (v *vm) send(frame []byte) {
	v.t.Helper()
	if _, err := v.conn.WriteToUnix(frame, v.sw); err != nil {
		v.t.Fatalf("%s: send: %v", v.name, err)
	}
}

// next is the next frame the VM gets within d.
func (v *vm) next(d time.Duration) ([]byte, bool) {
	v.t.Helper()
	buf := make([]byte, 70000)
	_ = v.conn.SetReadDeadline(time.Now().Add(d))
	n, _, err := v.conn.ReadFromUnix(buf)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return nil, false
	}
	if err != nil {
		v.t.Fatalf("%s: receive: %v", v.name, err)
	}
	return buf[:n], true
}

// recv is the next frame the VM gets; the test fails if none comes.
func (v *vm) recv() []byte {
	v.t.Helper()
	f, ok := v.next(5 * time.Second)
	if !ok {
		v.t.Fatalf("%s: no frame came", v.name)
	}
	return f
}

// none fails the test if the VM gets a frame while the switch would have
// answered.
func (v *vm) none() {
	v.t.Helper()
	if f, ok := v.next(quiet); ok {
		v.t.Fatalf("%s: got a frame of %d bytes (%x), want none", v.name, len(f), f[:min(len(f), 64)])
	}
}

// serialize builds a frame from layers with lengths and checksums set.
func serialize(tb testing.TB, ls ...gopacket.SerializableLayer) []byte {
	tb.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		tb.Fatalf("serialize: %v", err)
	}
	return slices.Clone(buf.Bytes())
}

// raw is a frame of an EtherType that the switch only forwards.
func raw(tb testing.TB, src, dst net.HardwareAddr, payload string) []byte {
	return serialize(tb, &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: 0x88b5}, gopacket.Payload(payload))
}

func arpRequest(tb testing.TB, src net.HardwareAddr, srcIP, target netip.Addr) []byte {
	s, t := srcIP.As4(), target.As4()
	return serialize(tb,
		&layers.Ethernet{SrcMAC: src, DstMAC: broadcast, EthernetType: layers.EthernetTypeARP},
		&layers.ARP{
			AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
			Operation: layers.ARPRequest, SourceHwAddress: src, SourceProtAddress: s[:],
			DstHwAddress: make([]byte, 6), DstProtAddress: t[:],
		})
}

func ping(tb testing.TB, src, dst net.HardwareAddr, srcIP, dstIP netip.Addr, id, seq uint16, payload string) []byte {
	return serialize(tb,
		&layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: layers.EthernetTypeIPv4},
		&layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: srcIP.AsSlice(), DstIP: dstIP.AsSlice()},
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: id, Seq: seq},
		gopacket.Payload(payload))
}

// udp is a UDP datagram in a frame, its checksum set.
func udp(tb testing.TB, src, dst net.HardwareAddr, srcIP, dstIP netip.Addr, sport, dport uint16, payload gopacket.SerializableLayer) []byte {
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: srcIP.AsSlice(), DstIP: dstIP.AsSlice()}
	u := &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: layers.UDPPort(dport)}
	_ = u.SetNetworkLayerForChecksum(ip)
	return serialize(tb, &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: layers.EthernetTypeIPv4}, ip, u, payload)
}

// decode parses a frame the switch sent.
func decode(t *testing.T, f []byte) gopacket.Packet {
	t.Helper()
	p := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
	if e := p.ErrorLayer(); e != nil {
		t.Fatalf("decode %x: %v", f, e.Error())
	}
	return p
}

// checkIP fails the test unless the frame's IPv4 header checksum and,
// for UDP and ICMP, the payload's are right; worked out here rather than
// trusted to the code under test or to gopacket, which does not check.
func checkIP(t *testing.T, f []byte) {
	t.Helper()
	if len(f) < 34 || binary.BigEndian.Uint16(f[12:14]) != 0x0800 {
		t.Fatalf("frame %x: want IPv4", f)
	}
	ip := f[14:]
	hl, total := int(ip[0]&0x0f)*4, int(binary.BigEndian.Uint16(ip[2:4]))
	if total > len(ip) || hl < 20 || hl > total {
		t.Fatalf("IPv4 header length %d, total %d, in %d bytes", hl, total, len(ip))
	}
	if got, want := onesSum(ip[:hl]), uint16(0xffff); got != want {
		t.Fatalf("IPv4 header checksum: sum %#04x, want %#04x", got, want)
	}
	body := ip[hl:total]
	switch ip[9] {
	case 1:
		if got, want := onesSum(body), uint16(0xffff); got != want {
			t.Fatalf("ICMP checksum: sum %#04x, want %#04x", got, want)
		}
	case 17:
		if binary.BigEndian.Uint16(body[6:8]) == 0 {
			t.Fatalf("UDP checksum: zero (none), want one")
		}
		pseudo := append(slices.Clone(ip[12:20]), 0, 17, byte(len(body)>>8), byte(len(body)))
		if got, want := onesSum(append(pseudo, body...)), uint16(0xffff); got != want {
			t.Fatalf("UDP checksum: sum %#04x, want %#04x", got, want)
		}
	}
}

// onesSum is the ones' complement sum of b's 16-bit words: 0xffff over
// data that holds its right checksum.
func onesSum(b []byte) uint16 {
	var sum uint64
	for i := 0; i < len(b); i += 2 {
		w := uint64(b[i]) << 8
		if i+1 < len(b) {
			w |= uint64(b[i+1])
		}
		sum += w
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}
