package vswitch

import (
	"encoding/binary"
	"net/netip"
)

const (
	etherIPv4 = 0x0800
	etherARP  = 0x0806

	protoICMP = 1
	protoUDP  = 17

	portDNS        = 53
	portDHCPServer = 67
	portDHCPClient = 68
)

var broadcastIP = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// answer is the gateway's reply to frame, or nil if the gateway has none.
func (s *Switch) answer(frame []byte) []byte {
	src := mac(frame[6:12])
	body := frame[minFrame:]
	switch binary.BigEndian.Uint16(frame[12:14]) {
	case etherARP:
		return s.arp(src, body)
	case etherIPv4:
		p, ok := parseIPv4(body)
		if !ok {
			return nil
		}
		switch p.proto {
		case protoICMP:
			return s.ping(src, p)
		case protoUDP:
			return s.udp(src, p)
		}
	}
	return nil
}

func (s *Switch) arp(src mac, b []byte) []byte {
	if len(b) < 28 {
		return nil
	}
	hw, proto, hlen, plen, op := binary.BigEndian.Uint16(b[0:2]), binary.BigEndian.Uint16(b[2:4]), b[4], b[5], binary.BigEndian.Uint16(b[6:8])
	if hw != 1 || proto != etherIPv4 || hlen != 6 || plen != 4 || op != 1 {
		return nil
	}
	if netip.AddrFrom4([4]byte(b[24:28])) != s.cfg.Gateway {
		return nil
	}
	r := make([]byte, 28)
	copy(r[0:6], b[0:6]) // Ethernet, IPv4, 6, 4
	binary.BigEndian.PutUint16(r[6:8], 2)
	copy(r[8:14], s.gwMAC[:])
	gw := s.cfg.Gateway.As4()
	copy(r[14:18], gw[:])
	copy(r[18:28], b[8:18]) // the asker's MAC and address
	return ether(src, s.gwMAC, etherARP, r)
}

// ping answers an ICMP echo request to the gateway.
func (s *Switch) ping(src mac, p ipv4) []byte {
	b := p.payload
	if p.dst != s.cfg.Gateway || len(b) < 8 || b[0] != 8 || b[1] != 0 {
		return nil
	}
	r := append([]byte(nil), b...)
	r[0] = 0 // echo reply
	r[2], r[3] = 0, 0
	binary.BigEndian.PutUint16(r[2:4], checksum(sum16(0, r)))
	return ether(src, s.gwMAC, etherIPv4, ipv4Packet(s.cfg.Gateway, p.src, protoICMP, r))
}

func (s *Switch) udp(src mac, p ipv4) []byte {
	b := p.payload
	if len(b) < 8 {
		return nil
	}
	n := int(binary.BigEndian.Uint16(b[4:6]))
	if n < 8 || n > len(b) {
		return nil
	}
	sport, dport, data := binary.BigEndian.Uint16(b[0:2]), binary.BigEndian.Uint16(b[2:4]), b[8:n]
	switch {
	case dport == portDHCPServer && (p.dst == broadcastIP || p.dst == s.cfg.Gateway):
		return s.dhcp(data)
	case dport == portDNS && p.dst == s.cfg.Gateway:
		r := s.dns(data)
		if r == nil {
			return nil
		}
		return ether(src, s.gwMAC, etherIPv4, udpPacket(s.cfg.Gateway, p.src, portDNS, sport, r))
	}
	return nil
}

// ether frames payload, padded to the 60 bytes an Ethernet frame has at
// least.
func ether(dst, src mac, typ uint16, payload []byte) []byte {
	f := make([]byte, max(minFrame+len(payload), 60))
	copy(f[0:6], dst[:])
	copy(f[6:12], src[:])
	binary.BigEndian.PutUint16(f[12:14], typ)
	copy(f[minFrame:], payload)
	return f
}

type ipv4 struct {
	src, dst netip.Addr
	proto    byte
	payload  []byte
}

// parseIPv4 takes an IPv4 packet as a host would: a bad header checksum
// or a fragment is dropped, since the services never need one.
func parseIPv4(b []byte) (ipv4, bool) {
	if len(b) < 20 || b[0]>>4 != 4 {
		return ipv4{}, false
	}
	hl, total := int(b[0]&0x0f)*4, int(binary.BigEndian.Uint16(b[2:4]))
	if hl < 20 || total < hl || total > len(b) {
		return ipv4{}, false
	}
	if binary.BigEndian.Uint16(b[6:8])&0x3fff != 0 { // more fragments, or an offset
		return ipv4{}, false
	}
	if checksum(sum16(0, b[:hl])) != 0 {
		return ipv4{}, false
	}
	return ipv4{
		src:     netip.AddrFrom4([4]byte(b[12:16])),
		dst:     netip.AddrFrom4([4]byte(b[16:20])),
		proto:   b[9],
		payload: b[hl:total],
	}, true
}

func ipv4Packet(src, dst netip.Addr, proto byte, payload []byte) []byte {
	b := make([]byte, 20+len(payload))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:4], uint16(len(b)))
	b[6] = 0x40 // don't fragment
	b[8] = 64
	b[9] = proto
	s4, d4 := src.As4(), dst.As4()
	copy(b[12:16], s4[:])
	copy(b[16:20], d4[:])
	binary.BigEndian.PutUint16(b[10:12], checksum(sum16(0, b[:20])))
	copy(b[20:], payload)
	return b
}

func udpPacket(src, dst netip.Addr, sport, dport uint16, payload []byte) []byte {
	u := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(u[0:2], sport)
	binary.BigEndian.PutUint16(u[2:4], dport)
	binary.BigEndian.PutUint16(u[4:6], uint16(len(u)))
	copy(u[8:], payload)
	s4, d4 := src.As4(), dst.As4()
	sum := sum16(0, s4[:])
	sum = sum16(sum, d4[:])
	sum += protoUDP + uint32(len(u))
	c := checksum(sum16(sum, u))
	if c == 0 {
		c = 0xffff // zero would mean "no checksum"
	}
	binary.BigEndian.PutUint16(u[6:8], c)
	return ipv4Packet(src, dst, protoUDP, u)
}

// sum16 adds b to sum as big-endian 16-bit words, the Internet checksum's
// way.
func sum16(sum uint32, b []byte) uint32 {
	for len(b) >= 2 {
		sum += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	return sum
}

func checksum(sum uint32) uint16 {
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
