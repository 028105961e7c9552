package network

import (
	"errors"
	"testing"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

func FuzzParseSubnet(f *testing.F) {
	for _, s := range []string{
		"10.77.0.0/24", "10.1.0.0/16", "10.88.0.8/29", "192.168.50.0/24", "172.16.0.0/12",
		"", "10.77.0.0", "10.77.0.1/24", "10.0.0.0/8", "10.77.0.0/30", "10.77.0.0/33",
		"fd00::/64", "::ffff:10.77.0.0/120", "127.0.0.0/16", "169.254.0.0/16", "224.0.0.0/16",
		"10.77.0.0/024", "010.77.0.0/24", " 10.77.0.0/24", "10.77.0.0/24 ", "fe80::1%eth0/64", "1.2.3.4/-1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := parseSubnet(s)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalid) {
				t.Fatalf("parseSubnet(%q): error %v: want it to wrap %v", s, err, errdefs.ErrInvalid)
			}
			return
		}
		if !p.IsValid() || !p.Addr().Is4() {
			t.Fatalf("parseSubnet(%q) = %v: want an IPv4 prefix", s, p)
		}
		if p.Masked() != p {
			t.Fatalf("parseSubnet(%q) = %v: host bits set, want %v", s, p, p.Masked())
		}
		if b := p.Bits(); b < 16 || b > 29 {
			t.Fatalf("parseSubnet(%q) = %v: prefix length %d, want 16 to 29", s, p, b)
		}
		if a := p.Addr(); a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() {
			t.Fatalf("parseSubnet(%q) = %v: want a unicast, non-loopback, non-link-local range", s, p)
		}
		if last := lastAddr(p); !p.Contains(last) || last == p.Addr() || last.Prev() == p.Addr().Next() {
			t.Fatalf("parseSubnet(%q) = %v: broadcast %v leaves no guest address", s, p, last)
		}
	})
}
