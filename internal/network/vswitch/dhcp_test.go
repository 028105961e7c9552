package vswitch

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/google/gopacket/layers"
)

const xid = 0x5eed1e55

// dhcpFrame is a client's DHCP message in a frame. ciaddr "" is none;
// opts are option code and value pairs.
func dhcpFrame(tb testing.TB, v *vm, dstMAC net.HardwareAddr, srcIP, dstIP netip.Addr, typ layers.DHCPMsgType, ciaddr string, flags uint16, opts ...layers.DHCPOption) []byte {
	ci := net.IPv4zero.To4()
	if ciaddr != "" {
		ci = net.ParseIP(ciaddr).To4()
	}
	msg := &layers.DHCPv4{
		Operation: layers.DHCPOpRequest, HardwareType: layers.LinkTypeEthernet, HardwareLen: 6,
		Xid: xid, Flags: flags, ClientIP: ci, ClientHWAddr: v.mac,
		Options: append([]layers.DHCPOption{layers.NewDHCPOption(layers.DHCPOptMessageType, []byte{byte(typ)})}, opts...),
	}
	return udp(tb, v.mac, dstMAC, srcIP, dstIP, 68, 67, msg)
}

func ipOpt(code layers.DHCPOpt, ip string) layers.DHCPOption {
	return layers.NewDHCPOption(code, net.ParseIP(ip).To4())
}

var unspecified = netip.IPv4Unspecified()

// dhcpReply is what the switch sent: its IP and UDP headers, and the
// message with its options by code.
type dhcpReply struct {
	eth  *layers.Ethernet
	ip   *layers.IPv4
	udp  *layers.UDP
	msg  *layers.DHCPv4
	opts map[layers.DHCPOpt][]byte
}

func parseDHCP(t *testing.T, f []byte) dhcpReply {
	t.Helper()
	checkIP(t, f)
	p := decode(t, f)
	r := dhcpReply{opts: map[layers.DHCPOpt][]byte{}}
	r.eth, _ = p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
	r.ip, _ = p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	r.udp, _ = p.Layer(layers.LayerTypeUDP).(*layers.UDP)
	r.msg, _ = p.Layer(layers.LayerTypeDHCPv4).(*layers.DHCPv4)
	if r.ip == nil || r.udp == nil || r.msg == nil {
		t.Fatalf("reply %x: want IPv4, UDP and DHCP", f)
	}
	for _, o := range r.msg.Options {
		r.opts[o.Type] = o.Data
	}
	return r
}

// u32 is a 4-byte option's value, 0 if it has another length.
func u32(b []byte) uint32 {
	if len(b) != 4 {
		return 0
	}
	return binary.BigEndian.Uint32(b)
}

func (r dhcpReply) msgType() layers.DHCPMsgType {
	if v := r.opts[layers.DHCPOptMessageType]; len(v) == 1 {
		return layers.DHCPMsgType(v[0])
	}
	return layers.DHCPMsgTypeUnspecified
}

func TestDHCP(t *testing.T) {
	const leaseIP = "10.77.0.10"
	tests := []struct {
		name string
		// the request: to the gateway's MAC and IP if unicast, else broadcast
		typ     layers.DHCPMsgType
		unicast bool
		ciaddr  string
		flags   uint16
		opts    []layers.DHCPOption
		// the reply, if any
		want   layers.DHCPMsgType
		wantTo string // IP destination
	}{
		{"discover gets an offer", layers.DHCPMsgTypeDiscover, false, "", 0, nil,
			layers.DHCPMsgTypeOffer, "255.255.255.255"},
		{"discover with the broadcast flag gets an offer", layers.DHCPMsgTypeDiscover, false, "", 0x8000, nil,
			layers.DHCPMsgTypeOffer, "255.255.255.255"},
		{"selecting request gets an ack", layers.DHCPMsgTypeRequest, false, "", 0,
			[]layers.DHCPOption{ipOpt(layers.DHCPOptRequestIP, leaseIP), ipOpt(layers.DHCPOptServerID, "10.77.0.1")},
			layers.DHCPMsgTypeAck, "255.255.255.255"},
		{"rebooting request gets an ack", layers.DHCPMsgTypeRequest, false, "", 0,
			[]layers.DHCPOption{ipOpt(layers.DHCPOptRequestIP, leaseIP)},
			layers.DHCPMsgTypeAck, "255.255.255.255"},
		{"renewing request gets an ack to its address", layers.DHCPMsgTypeRequest, true, leaseIP, 0, nil,
			layers.DHCPMsgTypeAck, leaseIP},
		{"renewing request with the broadcast flag gets a broadcast ack", layers.DHCPMsgTypeRequest, true, leaseIP, 0x8000, nil,
			layers.DHCPMsgTypeAck, "255.255.255.255"},
		{"request for another address gets a nak", layers.DHCPMsgTypeRequest, false, "", 0,
			[]layers.DHCPOption{ipOpt(layers.DHCPOptRequestIP, "10.77.0.99"), ipOpt(layers.DHCPOptServerID, "10.77.0.1")},
			layers.DHCPMsgTypeNak, "255.255.255.255"},
		{"renewing another address gets a nak", layers.DHCPMsgTypeRequest, true, "10.77.0.99", 0, nil,
			layers.DHCPMsgTypeNak, "255.255.255.255"},
		{"request to another server gets nothing", layers.DHCPMsgTypeRequest, false, "", 0,
			[]layers.DHCPOption{ipOpt(layers.DHCPOptRequestIP, leaseIP), ipOpt(layers.DHCPOptServerID, "10.77.0.2")},
			layers.DHCPMsgTypeUnspecified, ""},
		{"release gets nothing", layers.DHCPMsgTypeRelease, true, leaseIP, 0, nil,
			layers.DHCPMsgTypeUnspecified, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := newRig(t)
			a := r.vm("a", "52:54:00:00:00:0a", "")
			r.setLeases(
				Lease{MAC: hw("52:54:00:00:00:0b"), IP: netip.MustParseAddr("10.77.0.11"), Names: []string{"web"}},
				Lease{MAC: a.mac, IP: netip.MustParseAddr(leaseIP), Names: []string{"db", "sql"}},
			)
			dstMAC, srcIP, dstIP := broadcast, unspecified, broadcastIP
			if tt.unicast {
				dstMAC, srcIP, dstIP = r.sw.GatewayMAC(), netip.MustParseAddr(tt.ciaddr), testGateway
			}
			a.send(dhcpFrame(t, a, dstMAC, srcIP, dstIP, tt.typ, tt.ciaddr, tt.flags, tt.opts...))
			if tt.want == layers.DHCPMsgTypeUnspecified {
				a.none()
				return
			}
			rep := parseDHCP(t, a.recv())
			checks := []struct {
				what      string
				got, want any
			}{
				{"message type", rep.msgType(), tt.want},
				{"Ethernet source", rep.eth.SrcMAC.String(), r.sw.GatewayMAC().String()},
				{"Ethernet destination", rep.eth.DstMAC.String(), a.mac.String()},
				{"IP source", rep.ip.SrcIP.String(), "10.77.0.1"},
				{"IP destination", rep.ip.DstIP.String(), tt.wantTo},
				{"UDP ports", [2]layers.UDPPort{rep.udp.SrcPort, rep.udp.DstPort}, [2]layers.UDPPort{67, 68}},
				{"op", rep.msg.Operation, layers.DHCPOpReply},
				{"xid", rep.msg.Xid, uint32(xid)},
				{"flags", rep.msg.Flags, tt.flags},
				{"chaddr", rep.msg.ClientHWAddr.String(), a.mac.String()},
				{"server identifier", net.IP(rep.opts[layers.DHCPOptServerID]).String(), "10.77.0.1"},
				{"router option", rep.opts[layers.DHCPOptRouter] == nil, true},
			}
			if tt.want == layers.DHCPMsgTypeNak {
				checks = append(checks, []struct {
					what      string
					got, want any
				}{
					{"yiaddr", rep.msg.YourClientIP.String(), "0.0.0.0"},
					{"lease time", rep.opts[layers.DHCPOptLeaseTime] == nil, true},
				}...)
			} else {
				wantCI := "0.0.0.0"
				if tt.want == layers.DHCPMsgTypeAck && tt.ciaddr != "" {
					wantCI = tt.ciaddr
				}
				checks = append(checks, []struct {
					what      string
					got, want any
				}{
					{"yiaddr", rep.msg.YourClientIP.String(), leaseIP},
					{"ciaddr", rep.msg.ClientIP.String(), wantCI},
					{"lease time", u32(rep.opts[layers.DHCPOptLeaseTime]), uint32(3600)},
					{"subnet mask", net.IP(rep.opts[layers.DHCPOptSubnetMask]).String(), "255.255.255.0"},
					{"DNS server", net.IP(rep.opts[layers.DHCPOptDNS]).String(), "10.77.0.1"},
					{"host name", string(rep.opts[layers.DHCPOptHostname]), "db"},
				}...)
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Fatalf("%s: got %v, want %v", c.what, c.got, c.want)
				}
			}
		})
	}
}

// TestDHCPUnknownMAC checks that a MAC with no lease gets no answer, so
// that a DHCP server elsewhere on the path, if any, is not outbid.
func TestDHCPUnknownMAC(t *testing.T) {
	r := newRig(t, Lease{MAC: hw("52:54:00:00:00:0b"), IP: netip.MustParseAddr("10.77.0.11"), Names: []string{"web"}})
	a := r.vm("a", "52:54:00:00:00:0a", "")
	a.send(dhcpFrame(t, a, broadcast, unspecified, broadcastIP, layers.DHCPMsgTypeDiscover, "", 0))
	a.none()
}

// TestDHCPLeaseChange checks that a lease is read anew for each request.
func TestDHCPLeaseChange(t *testing.T) {
	r := newRig(t)
	a := r.vm("a", "52:54:00:00:00:0a", "")
	tests := []struct {
		ip, name string
	}{
		{"10.77.0.10", "db"},
		{"10.77.0.20", "db2"},
	}
	for _, tt := range tests {
		r.setLeases(Lease{MAC: a.mac, IP: netip.MustParseAddr(tt.ip), Names: []string{tt.name}})
		a.send(dhcpFrame(t, a, broadcast, unspecified, broadcastIP, layers.DHCPMsgTypeDiscover, "", 0))
		rep := parseDHCP(t, a.recv())
		if got, want := rep.msg.YourClientIP.String(), tt.ip; got != want {
			t.Fatalf("offer: got %v, want %v", got, want)
		}
		if got, want := string(rep.opts[layers.DHCPOptHostname]), tt.name; got != want {
			t.Fatalf("host name: got %v, want %v", got, want)
		}
	}
}

// TestDHCPMinimumSize checks that replies have BOOTP's 300 bytes, which
// some clients insist on.
func TestDHCPMinimumSize(t *testing.T) {
	r := newRig(t, Lease{MAC: hw("52:54:00:00:00:0a"), IP: netip.MustParseAddr("10.77.0.10")})
	a := r.vm("a", "52:54:00:00:00:0a", "")
	a.send(dhcpFrame(t, a, broadcast, unspecified, broadcastIP, layers.DHCPMsgTypeDiscover, "", 0))
	rep := parseDHCP(t, a.recv())
	if got := len(rep.udp.Payload); got < 300 {
		t.Fatalf("DHCP message: got %d bytes, want at least 300", got)
	}
	if _, ok := rep.opts[layers.DHCPOptHostname]; ok {
		t.Fatalf("host name of a lease with no names: got %q, want none", rep.opts[layers.DHCPOptHostname])
	}
}
