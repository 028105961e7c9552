package vswitch

import (
	"bytes"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/gopacket/layers"
)

func TestARP(t *testing.T) {
	tests := []struct {
		name      string
		target    string
		unicast   bool // to the gateway's MAC, as Linux checks a cached entry
		wantReply bool
		wantFlood bool
	}{
		{"for the gateway", "10.77.0.1", false, true, true},
		{"for the gateway, unicast", "10.77.0.1", true, true, false},
		{"for another VM", "10.77.0.11", false, false, true},
		{"for an address off the subnet", "192.168.1.1", false, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := newRig(t)
			a := r.vm("a", "52:54:00:00:00:0a", "10.77.0.10")
			b := r.vm("b", "52:54:00:00:00:0b", "10.77.0.11")
			r.sw.AddPort(a.path)
			r.sw.AddPort(b.path)
			req := arpRequest(t, a.mac, a.ip, netip.MustParseAddr(tt.target))
			if tt.unicast {
				copy(req[0:6], r.sw.GatewayMAC())
			}
			a.send(req)
			if tt.wantFlood {
				if got := b.recv(); !bytes.Equal(got, req) {
					t.Fatalf("b: got %x, want the request %x", got, req)
				}
			} else {
				b.none()
			}
			if !tt.wantReply {
				a.none()
				return
			}
			f := a.recv()
			p := decode(t, f)
			eth := p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
			arp, ok := p.Layer(layers.LayerTypeARP).(*layers.ARP)
			if !ok {
				t.Fatalf("reply %x: no ARP", f)
			}
			gw := r.sw.GatewayMAC()
			checks := []struct {
				what      string
				got, want any
			}{
				{"Ethernet source", eth.SrcMAC.String(), gw.String()},
				{"Ethernet destination", eth.DstMAC.String(), a.mac.String()},
				{"operation", arp.Operation, uint16(layers.ARPReply)},
				{"sender MAC", net.HardwareAddr(arp.SourceHwAddress).String(), gw.String()},
				{"sender IP", net.IP(arp.SourceProtAddress).String(), "10.77.0.1"},
				{"target MAC", net.HardwareAddr(arp.DstHwAddress).String(), a.mac.String()},
				{"target IP", net.IP(arp.DstProtAddress).String(), a.ip.String()},
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Fatalf("%s: got %v, want %v", c.what, c.got, c.want)
				}
			}
		})
	}
}

func TestPing(t *testing.T) {
	tests := []struct {
		name      string
		to        string
		payload   string
		wantReply bool
	}{
		{"the gateway", "10.77.0.1", "abcdefghijklmnopqrstuvwxyz0123456789", true},
		{"the gateway, odd payload", "10.77.0.1", "odd", true},
		{"the gateway, no payload", "10.77.0.1", "", true},
		{"the gateway, large payload", "10.77.0.1", strings.Repeat("p", 1472), true},
		{"another address through the gateway's MAC", "10.77.0.99", "x", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := newRig(t)
			a := r.vm("a", "52:54:00:00:00:0a", "10.77.0.10")
			b := r.vm("b", "52:54:00:00:00:0b", "10.77.0.11")
			r.sw.AddPort(a.path)
			r.sw.AddPort(b.path)
			a.send(ping(t, a.mac, r.sw.GatewayMAC(), a.ip, netip.MustParseAddr(tt.to), 0x1234, 7, tt.payload))
			b.none() // for the gateway: not forwarded
			if !tt.wantReply {
				a.none()
				return
			}
			f := a.recv()
			checkIP(t, f)
			p := decode(t, f)
			eth := p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
			ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
			icmp, _ := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
			if ip == nil || icmp == nil {
				t.Fatalf("reply %x: want IPv4 and ICMP", f)
			}
			checks := []struct {
				what      string
				got, want any
			}{
				{"Ethernet source", eth.SrcMAC.String(), r.sw.GatewayMAC().String()},
				{"Ethernet destination", eth.DstMAC.String(), a.mac.String()},
				{"IP source", ip.SrcIP.String(), "10.77.0.1"},
				{"IP destination", ip.DstIP.String(), a.ip.String()},
				{"type", icmp.TypeCode.Type(), uint8(layers.ICMPv4TypeEchoReply)},
				{"code", icmp.TypeCode.Code(), uint8(0)},
				{"id", icmp.Id, uint16(0x1234)},
				{"seq", icmp.Seq, uint16(7)},
				{"payload", string(icmp.Payload), tt.payload},
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Fatalf("%s: got %v, want %v", c.what, c.got, c.want)
				}
			}
		})
	}
}
