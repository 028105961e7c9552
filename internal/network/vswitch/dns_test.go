package vswitch

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"golang.org/x/net/dns/dnsmessage"
)

const queryID = 0x4242

func dnsQuery(tb testing.TB, name string, typ dnsmessage.Type) []byte {
	tb.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: queryID, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		tb.Fatal(err)
	}
	if err := b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}); err != nil {
		tb.Fatal(err)
	}
	q, err := b.Finish()
	if err != nil {
		tb.Fatal(err)
	}
	return q
}

func TestDNS(t *testing.T) {
	leases := []Lease{
		{MAC: hw("52:54:00:00:00:0a"), IP: netip.MustParseAddr("10.77.0.10"), Names: []string{"db", "sql."}},
		{MAC: hw("52:54:00:00:00:0b"), IP: netip.MustParseAddr("10.77.0.11"), Names: []string{"web1", "www"}},
		{MAC: hw("52:54:00:00:00:0c"), IP: netip.MustParseAddr("10.77.0.12"), Names: []string{"web2", "WWW."}},
	}
	tests := []struct {
		name  string
		typ   dnsmessage.Type
		rcode dnsmessage.RCode
		auth  bool
		want  []string // the A records' addresses
	}{
		{"db.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, []string{"10.77.0.10"}},
		{"DB.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, []string{"10.77.0.10"}},
		{"sql.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, []string{"10.77.0.10"}},
		{"Sql.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, []string{"10.77.0.10"}},
		{"www.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, []string{"10.77.0.11", "10.77.0.12"}},
		{"db.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, true, nil},
		{"db.", dnsmessage.TypeMX, dnsmessage.RCodeSuccess, true, nil},
		{"nosuch.", dnsmessage.TypeA, dnsmessage.RCodeNameError, true, nil},
		{"nosuch.", dnsmessage.TypeAAAA, dnsmessage.RCodeNameError, true, nil},
		{"example.com.", dnsmessage.TypeA, dnsmessage.RCodeRefused, false, nil},
		{"db.example.com.", dnsmessage.TypeA, dnsmessage.RCodeRefused, false, nil},
		{".", dnsmessage.TypeNS, dnsmessage.RCodeRefused, false, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name+" "+tt.typ.String(), func(t *testing.T) {
			r := newRig(t, leases...)
			a := r.vm("a", "52:54:00:00:00:0a", "10.77.0.10")
			a.send(udp(t, a.mac, r.sw.GatewayMAC(), a.ip, testGateway, 40000, 53, gopacket.Payload(dnsQuery(t, tt.name, tt.typ))))
			f := a.recv()
			checkIP(t, f)
			p := decode(t, f)
			eth := p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
			ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
			u, _ := p.Layer(layers.LayerTypeUDP).(*layers.UDP)
			if ip == nil || u == nil {
				t.Fatalf("reply %x: want IPv4 and UDP", f)
			}
			var m dnsmessage.Message
			if err := m.Unpack(u.Payload); err != nil {
				t.Fatalf("reply: %v", err)
			}
			var got []string
			for _, rr := range m.Answers {
				a, ok := rr.Body.(*dnsmessage.AResource)
				if !ok {
					t.Fatalf("answer %v: want an A record", rr)
				}
				if rr.Header.TTL != 60 || !strings.EqualFold(rr.Header.Name.String(), tt.name) {
					t.Fatalf("answer header: got %v, want name %s, TTL 60", rr.Header, tt.name)
				}
				got = append(got, netip.AddrFrom4(a.A).String())
			}
			slices.Sort(got)
			checks := []struct {
				what      string
				got, want any
			}{
				{"Ethernet source", eth.SrcMAC.String(), r.sw.GatewayMAC().String()},
				{"Ethernet destination", eth.DstMAC.String(), a.mac.String()},
				{"IP source", ip.SrcIP.String(), "10.77.0.1"},
				{"IP destination", ip.DstIP.String(), "10.77.0.10"},
				{"UDP ports", [2]layers.UDPPort{u.SrcPort, u.DstPort}, [2]layers.UDPPort{53, 40000}},
				{"id", m.ID, uint16(queryID)},
				{"response", m.Response, true},
				{"recursion desired", m.RecursionDesired, true},
				{"rcode", m.RCode, tt.rcode},
				{"authoritative", m.Authoritative, tt.auth},
				{"question", len(m.Questions) == 1 && m.Questions[0].Name.String() == tt.name && m.Questions[0].Type == tt.typ, true},
				{"answers", strings.Join(got, " "), strings.Join(tt.want, " ")},
				{"authorities and additionals", len(m.Authorities) + len(m.Additionals), 0},
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Fatalf("%s: got %v, want %v", c.what, c.got, c.want)
				}
			}
		})
	}
}

func TestDNSDropsMalformed(t *testing.T) {
	response := dnsQuery(t, "db.", dnsmessage.TypeA)
	response[2] |= 0x80 // QR
	noQuestion := dnsQuery(t, "db.", dnsmessage.TypeA)[:12]
	noQuestion[5] = 0 // QDCOUNT 0
	truncated := dnsQuery(t, "db.", dnsmessage.TypeA)
	truncated = truncated[:len(truncated)-3]
	tests := []struct {
		name    string
		payload []byte
	}{
		{"garbage", []byte("this is not DNS at all")},
		{"empty", nil},
		{"a response", response},
		{"no question", noQuestion},
		{"a truncated question", truncated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := newRig(t, Lease{MAC: hw("52:54:00:00:00:0a"), IP: netip.MustParseAddr("10.77.0.10"), Names: []string{"db"}})
			a := r.vm("a", "52:54:00:00:00:0a", "10.77.0.10")
			a.send(udp(t, a.mac, r.sw.GatewayMAC(), a.ip, testGateway, 40000, 53, gopacket.Payload(tt.payload)))
			a.none()
		})
	}
}

// TestDNSOnlyAtTheGateway checks that a query to another address is
// forwarded as any frame, not answered.
func TestDNSOnlyAtTheGateway(t *testing.T) {
	r := newRig(t, Lease{MAC: hw("52:54:00:00:00:0a"), IP: netip.MustParseAddr("10.77.0.10"), Names: []string{"db"}})
	a := r.vm("a", "52:54:00:00:00:0a", "10.77.0.10")
	b := r.vm("b", "52:54:00:00:00:0b", "10.77.0.11")
	r.sw.AddPort(b.path)
	q := udp(t, a.mac, b.mac, a.ip, b.ip, 40000, 53, gopacket.Payload(dnsQuery(t, "db.", dnsmessage.TypeA)))
	a.send(q)
	if got := b.recv(); string(got) != string(q) {
		t.Fatalf("b: got %x, want the query %x", got, q)
	}
	a.none()
}
