package vswitch

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"strings"
)

// DHCP message types (RFC 2132, option 53).
const (
	dhcpDiscover = 1
	dhcpOffer    = 2
	dhcpRequest  = 3
	dhcpAck      = 5
	dhcpNak      = 6
)

// DHCP options (RFC 2132).
const (
	optPad         = 0
	optSubnetMask  = 1
	optDNS         = 6
	optHostName    = 12
	optRequestedIP = 50
	optLeaseTime   = 51
	optMessageType = 53
	optServerID    = 54
	optEnd         = 255
)

const leaseSeconds = 3600

var dhcpCookie = []byte{99, 130, 83, 99}

// dhcp answers a DHCP message with the fixed lease of the client's MAC.
// The reply goes to that MAC, whatever the frame's source: a relay is
// never on these networks, so the two are the same.
func (s *Switch) dhcp(b []byte) []byte {
	// op BOOTREQUEST, Ethernet hardware addresses, and the magic cookie
	if len(b) < 240 || b[0] != 1 || b[1] != 1 || b[2] != 6 || !bytes.Equal(b[236:240], dhcpCookie) {
		return nil
	}
	opts, ok := dhcpOptions(b[240:])
	if !ok || len(opts[optMessageType]) != 1 {
		return nil
	}
	typ := opts[optMessageType][0]
	if typ != dhcpDiscover && typ != dhcpRequest {
		return nil
	}
	chaddr := mac(b[28:34])
	l, ok := s.lease(chaddr)
	if !ok {
		s.log.Debug("DHCP from a MAC with no lease", "mac", chaddr)
		return nil
	}
	if typ == dhcpDiscover {
		return s.dhcpReply(b, dhcpOffer, l)
	}
	// A REQUEST names the server it chose when it answers an OFFER:
	// another server's is not this one's to answer.
	if id := opts[optServerID]; len(id) == 4 && netip.AddrFrom4([4]byte(id)) != s.cfg.Gateway {
		return nil
	}
	// Selecting and rebooting clients ask for an address; renewing and
	// rebinding ones hold it in ciaddr.
	want := netip.AddrFrom4([4]byte(b[12:16]))
	if r := opts[optRequestedIP]; len(r) == 4 {
		want = netip.AddrFrom4([4]byte(r))
	}
	if want != l.IP {
		s.log.Info("DHCP NAK: the client asks for another address than its lease", "mac", chaddr, "asked", want, "lease", l.IP)
		return s.dhcpReply(b, dhcpNak, l)
	}
	s.log.Debug("DHCP ACK", "mac", chaddr, "ip", l.IP)
	return s.dhcpReply(b, dhcpAck, l)
}

// lease is the first of Leases() for m.
func (s *Switch) lease(m mac) (Lease, bool) {
	for _, l := range s.cfg.Leases() {
		if bytes.Equal(l.MAC, m[:]) && l.IP.Unmap().Is4() {
			l.IP = l.IP.Unmap()
			return l, true
		}
	}
	return Lease{}, false
}

// dhcpOptions splits options by code; a missing end option is forgiven.
func dhcpOptions(b []byte) (map[byte][]byte, bool) {
	opts := map[byte][]byte{}
	for len(b) > 0 {
		switch b[0] {
		case optPad:
			b = b[1:]
			continue
		case optEnd:
			return opts, true
		}
		if len(b) < 2 || len(b) < 2+int(b[1]) {
			return nil, false
		}
		if _, dup := opts[b[0]]; !dup {
			opts[b[0]] = b[2 : 2+int(b[1])]
		}
		b = b[2+int(b[1]):]
	}
	return opts, true
}

// dhcpReply is the frame of a reply of type typ to the request req (RFC
// 2131, table 3). There is no router option: these networks do not route
// out, and a default route through the gateway would only black-hole a
// guest's traffic that its other NICs could carry.
func (s *Switch) dhcpReply(req []byte, typ byte, l Lease) []byte {
	m := make([]byte, 240, 300)
	m[0], m[1], m[2] = 2, 1, 6 // BOOTREPLY, Ethernet
	copy(m[4:8], req[4:8])     // xid
	copy(m[10:12], req[10:12]) // flags
	copy(m[24:44], req[24:44]) // giaddr, chaddr
	copy(m[236:240], dhcpCookie)
	ciaddr := netip.AddrFrom4([4]byte(req[12:16]))
	if typ != dhcpNak {
		ip := l.IP.As4()
		copy(m[16:20], ip[:]) // yiaddr
	}
	if typ == dhcpAck {
		copy(m[12:16], req[12:16])
	}
	gw := s.cfg.Gateway.As4()
	m = append(m, optMessageType, 1, typ, optServerID, 4)
	m = append(m, gw[:]...)
	if typ != dhcpNak {
		m = append(m, optLeaseTime, 4)
		m = binary.BigEndian.AppendUint32(m, leaseSeconds)
		m = append(m, optSubnetMask, 4)
		m = binary.BigEndian.AppendUint32(m, ^uint32(0)<<(32-s.cfg.Subnet.Bits()))
		m = append(m, optDNS, 4)
		m = append(m, gw[:]...)
		if len(l.Names) > 0 {
			if name := strings.TrimSuffix(l.Names[0], "."); name != "" && len(name) <= 255 {
				m = append(m, optHostName, byte(len(name)))
				m = append(m, name...)
			}
		}
	}
	m = append(m, optEnd)
	// BOOTP's minimum message: some clients drop shorter ones.
	for len(m) < 300 {
		m = append(m, optPad)
	}
	// A client with no address yet cannot take a unicast; nor can one
	// that a NAK has just told its address is wrong.
	dst := ciaddr
	broadcast := binary.BigEndian.Uint16(req[10:12])&0x8000 != 0
	if typ == dhcpNak || broadcast || ciaddr.IsUnspecified() {
		dst = broadcastIP
	}
	return ether(mac(req[28:34]), s.gwMAC, etherIPv4, udpPacket(s.cfg.Gateway, dst, portDHCPServer, portDHCPClient, m))
}
