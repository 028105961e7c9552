package vswitch

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"golang.org/x/net/dns/dnsmessage"
)

func FuzzFrame(f *testing.F) {
	const sock = "/fuzz/sw"
	gw := gatewayMAC(sock)
	a := &vm{mac: hw("52:54:00:00:00:0a"), ip: netip.MustParseAddr("10.77.0.10")}
	lease := Lease{MAC: a.mac, IP: a.ip, Names: []string{"db", "sql"}}
	for _, seed := range [][]byte{
		arpRequest(f, a.mac, a.ip, testGateway),
		ping(f, a.mac, gw[:], a.ip, testGateway, 1, 2, "payload"),
		dhcpFrame(f, a, broadcast, unspecified, broadcastIP, layers.DHCPMsgTypeDiscover, "", 0),
		dhcpFrame(f, a, broadcast, unspecified, broadcastIP, layers.DHCPMsgTypeRequest, "", 0, ipOpt(layers.DHCPOptRequestIP, "10.77.0.10")),
		udp(f, a.mac, gw[:], a.ip, testGateway, 40000, 53, gopacket.Payload(dnsQuery(f, "db.", dnsmessage.TypeA))),
		udp(f, a.mac, gw[:], a.ip, testGateway, 40000, 53, gopacket.Payload(dnsQuery(f, "x.example.", dnsmessage.TypeAAAA))),
		raw(f, a.mac, broadcast, "hello"),
		make([]byte, 14),
		{},
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		s := newSwitch(Config{
			Socket: sock, Subnet: testSubnet, Gateway: testGateway, Log: discard,
			Leases: func() []Lease { return []Lease{lease} },
		})
		s.AddPort("/fuzz/b")
		s.out = func(p *port, path string, out []byte) error {
			if len(out) < minFrame {
				t.Fatalf("sent %d bytes to %s: want a frame", len(out), path)
			}
			// Only the gateway's replies go back to the sender: they must
			// be well formed whatever they answer.
			if path == "/fuzz/a" && binary.BigEndian.Uint16(out[12:14]) == etherIPv4 {
				checkIP(t, out)
			}
			return nil
		}
		s.handle("/fuzz/a", frame)
	})
}
