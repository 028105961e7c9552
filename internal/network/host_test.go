package network

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestRules(t *testing.T) {
	const br = "lodge0a1b2c3d"
	sub := netip.MustParsePrefix("10.77.0.0/24")
	wiring := func(nat, isolated bool) Wiring {
		return Wiring{Name: "back", Bridge: br, Subnet: sub, Gateway: netip.MustParseAddr("10.77.0.1"), NAT: nat, Isolated: isolated}
	}
	type r struct{ table, chain, args string }
	bridged := r{"filter", "FORWARD", "-i " + br + " -o " + br + " -j ACCEPT"}
	rejectIn := r{"filter", "FORWARD", "-i " + br + " -j REJECT"}
	rejectOut := r{"filter", "FORWARD", "-o " + br + " -j REJECT"}
	tests := []struct {
		what          string
		nat, isolated bool
		want          []r
	}{
		{"plain", false, false, []r{bridged, rejectIn, rejectOut}},
		{"nat", true, false, []r{
			bridged,
			{"filter", "FORWARD", "-i " + br + " ! -o " + br + " -j ACCEPT"},
			{"filter", "FORWARD", "-o " + br + " ! -i " + br + " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"},
			{"nat", "POSTROUTING", "-s 10.77.0.0/24 ! -d 10.77.0.0/24 -j MASQUERADE"},
		}},
		{"isolated", false, true, []r{
			bridged, rejectIn, rejectOut,
			{"filter", "INPUT", "-i " + br + " -p udp --dport 67 -j ACCEPT"},
			{"filter", "INPUT", "-i " + br + " -p udp --dport 53 -j ACCEPT"},
			{"filter", "INPUT", "-i " + br + " -p tcp --dport 53 -j ACCEPT"},
			{"filter", "INPUT", "-i " + br + " -j DROP"},
		}},
	}
	comment := []string{"-m", "comment", "--comment", "lodge network back on " + br}
	for _, tt := range tests {
		rs := rules(wiring(tt.nat, tt.isolated))
		var got []r
		for _, x := range rs {
			if len(x.args) < len(comment) || !slices.Equal(x.args[len(x.args)-len(comment):], comment) {
				t.Errorf("%s: rule %s %s %q: want it to end with %q", tt.what, x.table, x.chain, x.args, comment)
				continue
			}
			got = append(got, r{x.table, x.chain, strings.Join(x.args[:len(x.args)-len(comment)], " ")})
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s: rules:\ngot  %q\nwant %q", tt.what, got, tt.want)
		}
	}

	// Each call builds fresh slices: the comment of one network never
	// leaks into another's rules.
	a := rules(Wiring{Name: "a", Bridge: "lodgea", Subnet: sub})
	b := rules(Wiring{Name: "b", Bridge: "lodgeb", Subnet: sub})
	if got, want := a[0].args[len(a[0].args)-1], "lodge network a on lodgea"; got != want {
		t.Errorf("comment of a after building b's rules: got %v, want %v", got, want)
	}
	if got, want := b[0].args[len(b[0].args)-1], "lodge network b on lodgeb"; got != want {
		t.Errorf("comment of b: got %v, want %v", got, want)
	}
}

func TestDNSMasqConf(t *testing.T) {
	dir := filepath.Join("/var/lib/lodge", "networks", "back")
	tests := []struct {
		what       string
		subnet, gw string
		nat        bool
		want, not  []string
	}{
		{"nat /24", "10.77.0.0/24", "10.77.0.1", true,
			[]string{"dhcp-option=option:router,10.77.0.1", "dhcp-range=10.77.0.0,static,255.255.255.0,1h"},
			[]string{"no-resolv", "dhcp-option=option:router"}},
		{"plain /24", "10.77.0.0/24", "10.77.0.1", false,
			[]string{"dhcp-option=option:router", "no-resolv", "dhcp-range=10.77.0.0,static,255.255.255.0,1h"},
			[]string{"dhcp-option=option:router,10.77.0.1"}},
		{"plain /29", "10.88.0.8/29", "10.88.0.9", false,
			[]string{"dhcp-range=10.88.0.8,static,255.255.255.248,1h", "listen-address=10.88.0.9", "dhcp-option=option:dns-server,10.88.0.9"},
			nil},
		{"nat /16", "172.20.0.0/16", "172.20.0.1", true,
			[]string{"dhcp-range=172.20.0.0,static,255.255.0.0,1h", "dhcp-option=option:router,172.20.0.1"},
			[]string{"no-resolv"}},
	}
	common := []string{
		"interface=lodgeabc",
		"bind-interfaces",
		"except-interface=lo",
		"pid-file=" + filepath.Join(dir, "dnsmasq.pid"),
		"no-hosts",
		"addn-hosts=" + filepath.Join(dir, "hosts"),
		"dhcp-hostsfile=" + filepath.Join(dir, "dhcp-hosts"),
		"dhcp-leasefile=" + filepath.Join(dir, "leases"),
		"dhcp-authoritative",
	}
	for _, tt := range tests {
		w := Wiring{Name: "back", Bridge: "lodgeabc", Subnet: netip.MustParsePrefix(tt.subnet), Gateway: netip.MustParseAddr(tt.gw), NAT: tt.nat, Dir: dir}
		conf := dnsmasqConf(w)
		if !strings.HasSuffix(conf, "\n") {
			t.Errorf("%s: got no final newline, want one", tt.what)
		}
		lines := strings.Split(strings.TrimSuffix(conf, "\n"), "\n")
		for _, l := range append(slices.Clone(common), tt.want...) {
			if !slices.Contains(lines, l) {
				t.Errorf("%s: line %q: got absent, want present in\n%s", tt.what, l, conf)
			}
		}
		for _, l := range tt.not {
			if slices.Contains(lines, l) {
				t.Errorf("%s: line %q: got present, want absent in\n%s", tt.what, l, conf)
			}
		}
		var ranges int
		for _, l := range lines {
			if strings.HasPrefix(l, "dhcp-range=") {
				ranges++
			}
		}
		if ranges != 1 {
			t.Errorf("%s: dhcp-range lines: got %v, want 1", tt.what, ranges)
		}
	}
}

func TestReadRoutes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "route")
	table := strings.Join([]string{
		"Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT",
		"eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0",  // default: skipped
		"eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0",  // 192.168.1.0/24
		"docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0", // 172.17.0.0/16
		"wg0\t0000080A\t00000000\t0001\t0\t0\t0\t0000FCFF\t0\t0\t0",     // 10.8.0.0/14
		"tun0\t0909090A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0",    // 10.9.9.9/32
		"eth1\t0302010A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0",    // 10.1.2.3 masked to 10.1.0.0/16
		"short\t0000000A",
		"bad\tZZZZZZZZ\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0",
		"",
	}, "\n")
	if err := os.WriteFile(path, []byte(table), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := readRoutes(path)
	if err != nil {
		t.Fatalf("readRoutes: %v", err)
	}
	want := []Used{
		{netip.MustParsePrefix("192.168.1.0/24"), "route via eth0"},
		{netip.MustParsePrefix("172.17.0.0/16"), "route via docker0"},
		{netip.MustParsePrefix("10.8.0.0/14"), "route via wg0"},
		{netip.MustParsePrefix("10.9.9.9/32"), "route via tun0"},
		{netip.MustParsePrefix("10.1.0.0/16"), "route via eth1"},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("routes:\ngot  %v\nwant %v", got, want)
	}

	// Only a header: no routes.
	only := filepath.Join(t.TempDir(), "route")
	if err := os.WriteFile(only, []byte(strings.SplitN(table, "\n", 2)[0]+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := readRoutes(only); err != nil || len(got) != 0 {
		t.Fatalf("header only: got %v, %v, want no routes", got, err)
	}

	if _, err := readRoutes(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: got %v, want %v", err, os.ErrNotExist)
	}
}

func TestPruneLeases(t *testing.T) {
	const (
		hosts = "52:54:00:ab:cd:01,10.77.0.2,web\n52:54:00:00:00:02,10.77.0.3\n"
		web   = "1700000000 52:54:00:ab:cd:01 10.77.0.2 web 01:52:54:00:ab:cd:01"
		db    = "1700000000 52:54:00:00:00:02 10.77.0.3 db *"
		upper = "1700000000 52:54:00:AB:CD:01 10.77.0.2 web *"
		moved = "1700000000 52:54:00:ab:cd:01 10.77.0.9 web *"
		gone  = "1700000000 52:54:00:00:00:09 10.77.0.4 old *"
	)
	tests := []struct {
		what              string
		hosts, leases     *string
		wantKept, wantAll []string
	}{
		{"all given", ptr(hosts), ptr(web + "\n" + db + "\n"), []string{web, db}, []string{web, db}},
		{"one gone", ptr(hosts), ptr(web + "\n" + gone + "\n" + db + "\n"), []string{web, db}, []string{web, gone, db}},
		{"address changed", ptr(hosts), ptr(moved + "\n" + db + "\n"), []string{db}, []string{moved, db}},
		{"upper-case MAC in dhcp-hosts", ptr(strings.ToUpper(hosts)), ptr(web + "\n"), []string{web}, []string{web}},
		{"upper-case MAC in leases", ptr(hosts), ptr(upper + "\n"), []string{upper}, []string{upper}},
		{"blank lines", ptr(hosts), ptr("\n" + web + "\n\n" + gone + "\n\n"), []string{web}, []string{web, gone}},
		{"no lease file", ptr(hosts), nil, nil, nil},
		{"empty lease file", ptr(hosts), ptr(""), nil, nil},
		{"no dhcp-hosts", nil, ptr(web + "\n" + db + "\n"), nil, []string{web, db}},
		{"empty dhcp-hosts", ptr(""), ptr(web + "\n"), nil, []string{web}},
		{"neither file", nil, nil, nil, nil},
	}
	for _, tt := range tests {
		dir := t.TempDir()
		if tt.hosts != nil {
			if err := os.WriteFile(filepath.Join(dir, "dhcp-hosts"), []byte(*tt.hosts), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if tt.leases != nil {
			if err := os.WriteFile(filepath.Join(dir, "leases"), []byte(*tt.leases), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		kept, all, err := pruneLeases(dir)
		if err != nil {
			t.Errorf("%s: pruneLeases: got %v, want no error", tt.what, err)
			continue
		}
		if !slices.Equal(kept, tt.wantKept) {
			t.Errorf("%s: kept: got %q, want %q", tt.what, kept, tt.wantKept)
		}
		if !slices.Equal(all, tt.wantAll) {
			t.Errorf("%s: all: got %q, want %q", tt.what, all, tt.wantAll)
		}
		stale, err := staleLeases(dir)
		if want := len(tt.wantKept) != len(tt.wantAll); err != nil || stale != want {
			t.Errorf("%s: staleLeases: got %v, %v, want %v", tt.what, stale, err, want)
		}
	}

	// A dhcp-hosts that cannot be read is an error, not "nothing given".
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "dhcp-hosts"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, _, err := pruneLeases(dir); err == nil {
		t.Fatalf("dhcp-hosts a directory: got no error, want one")
	}
}

func ptr(s string) *string { return &s }

func TestLastAddr(t *testing.T) {
	tests := []struct{ prefix, want string }{
		{"10.77.0.0/24", "10.77.0.255"},
		{"10.88.0.0/29", "10.88.0.7"},
		{"10.88.0.8/29", "10.88.0.15"},
		{"172.16.0.0/16", "172.16.255.255"},
		{"192.168.4.0/22", "192.168.7.255"},
		{"10.0.0.0/8", "10.255.255.255"},
		{"10.1.2.3/32", "10.1.2.3"},
		{"0.0.0.0/0", "255.255.255.255"},
		{"10.77.0.5/24", "10.77.0.255"},
	}
	for _, tt := range tests {
		if got := lastAddr(netip.MustParsePrefix(tt.prefix)); got.String() != tt.want {
			t.Errorf("lastAddr(%s): got %v, want %v", tt.prefix, got, tt.want)
		}
	}
}
