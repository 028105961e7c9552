package network

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/store"
)

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// newManager returns a Manager on a fresh in-memory store and home, with
// fake as its host.
func newManager(t *testing.T, fake *Fake) (*Manager, string) {
	t.Helper()
	home := t.TempDir()
	m := New(store.NewMemory(), home, fake, discard)
	t.Cleanup(m.Close)
	return m, home
}

func mustCreate(t *testing.T, m *Manager, req api.CreateNetwork) api.Network {
	t.Helper()
	n, err := m.Create(context.Background(), req)
	if err != nil {
		t.Fatalf("Create(%+v): %v", req, err)
	}
	return n
}

// attach attaches a NIC and closes and removes the fake's tap file when
// the test ends.
func attach(t *testing.T, m *Manager, vm string, names []string, nic NIC) (Attachment, error) {
	t.Helper()
	a, err := m.Attach(context.Background(), vm, names, nic)
	if a.Tap != nil {
		t.Cleanup(func() {
			_ = a.Tap.Close()
			_ = os.Remove(a.Tap.Name())
		})
	}
	return a, err
}

func mustAttach(t *testing.T, m *Manager, vm string, names []string, nic NIC) string {
	t.Helper()
	a, err := attach(t, m, vm, names, nic)
	if err != nil {
		t.Fatalf("Attach(%q, %v, %+v): %v", vm, names, nic, err)
	}
	if a.Tap == nil {
		t.Fatalf("Attach(%q): tap: got nil, want an open file", vm)
	}
	return a.IP
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return string(b)
}

func networkNames(t *testing.T, m *Manager) []string {
	t.Helper()
	all, err := m.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var names []string
	for _, n := range all {
		names = append(names, n.Name)
	}
	return names
}

func leases(t *testing.T, m *Manager, name string) []api.NetworkLease {
	t.Helper()
	n, err := m.Get(context.Background(), name)
	if err != nil {
		t.Fatalf("Get(%q): %v", name, err)
	}
	return n.Leases
}

func TestCreateExplicitSubnet(t *testing.T) {
	fake := &Fake{}
	m, home := newManager(t, fake)
	n := mustCreate(t, m, api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/24", NAT: true, Stack: "shop"})

	tests := []struct {
		what      string
		got, want any
	}{
		{"name", n.Name, "back"},
		{"subnet", n.Subnet, "10.77.0.0/24"},
		{"gateway", n.Gateway, "10.77.0.1"},
		{"nat", n.NAT, true},
		{"isolated", n.Isolated, false},
		{"builtin", n.Builtin, false},
		{"stack", n.Stack, "shop"},
		{"bridge prefix", strings.HasPrefix(n.Bridge, "lodge"), true},
		{"bridge fits IFNAMSIZ", len(n.Bridge) <= 15, true},
		{"created at set", n.CreatedAt.IsZero(), false},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s: got %v, want %v", tt.what, tt.got, tt.want)
		}
	}

	got, err := m.Get(context.Background(), "back")
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	if got.Subnet != n.Subnet || got.Gateway != n.Gateway || got.Bridge != n.Bridge || got.NAT != n.NAT || got.Stack != n.Stack {
		t.Fatalf("stored network: got %+v, want %+v", got, n)
	}

	w, ok := fake.IsUp[n.Bridge]
	if !ok {
		t.Fatalf("bridge %s up: got false, want true (up: %v)", n.Bridge, fake.IsUp)
	}
	want := Wiring{Name: "back", Bridge: n.Bridge, Subnet: netip.MustParsePrefix("10.77.0.0/24"), Gateway: netip.MustParseAddr("10.77.0.1"),
		NAT: true, Dir: filepath.Join(home, "networks", "back")}
	if w != want {
		t.Fatalf("wiring: got %+v, want %+v", w, want)
	}
	for _, f := range []string{"dhcp-hosts", "hosts"} {
		if got := readFile(t, filepath.Join(home, "networks", "back", f)); got != "" {
			t.Errorf("%s of a new network: got %q, want empty", f, got)
		}
	}
}

func TestCreateAcceptsBounds(t *testing.T) {
	tests := []struct {
		name, subnet, gateway string
	}{
		{strings.Repeat("a", 40), "10.1.0.0/16", "10.1.0.1"},
		{"0", "10.2.0.0/29", "10.2.0.1"},
		{"a-b-9", "192.168.50.0/24", "192.168.50.1"},
		{"pub", "172.16.8.0/22", "172.16.8.1"},
	}
	for _, tt := range tests {
		m, _ := newManager(t, &Fake{})
		n, err := m.Create(context.Background(), api.CreateNetwork{Name: tt.name, Subnet: tt.subnet})
		if err != nil {
			t.Errorf("Create(%q, %s): got %v, want no error", tt.name, tt.subnet, err)
			continue
		}
		if n.Gateway != tt.gateway {
			t.Errorf("Create(%q, %s): gateway: got %v, want %v", tt.name, tt.subnet, n.Gateway, tt.gateway)
		}
	}
}

func TestCreatePicksSubnet(t *testing.T) {
	ctx := context.Background()
	check := func(what string, n api.Network) netip.Prefix {
		t.Helper()
		p, err := netip.ParsePrefix(n.Subnet)
		if err != nil {
			t.Fatalf("%s: subnet %q: %v", what, n.Subnet, err)
		}
		if got, want := p.Bits(), 24; got != want {
			t.Fatalf("%s: prefix length of %s: got %v, want %v", what, p, got, want)
		}
		if p.Masked() != p {
			t.Fatalf("%s: subnet %s: host bits set", what, p)
		}
		if !netip.MustParsePrefix("10.0.0.0/8").Contains(p.Addr()) {
			t.Fatalf("%s: subnet %s: got outside 10.0.0.0/8, want inside", what, p)
		}
		if got, want := n.Gateway, p.Addr().Next().String(); got != want {
			t.Fatalf("%s: gateway: got %v, want %v", what, got, want)
		}
		return p
	}

	m1, _ := newManager(t, &Fake{})
	first := check("fresh", mustCreate(t, m1, api.CreateNetwork{Name: "back"}))
	m2, _ := newManager(t, &Fake{})
	n2 := mustCreate(t, m2, api.CreateNetwork{Name: "back"})
	if got, want := check("second fresh manager", n2), first; got != want {
		t.Fatalf("same name, fresh manager: got %v, want %v", got, want)
	}

	// A second network of the first manager never overlaps the first.
	other := check("second network", mustCreate(t, m1, api.CreateNetwork{Name: "front"}))
	if other.Overlaps(first) {
		t.Fatalf("second network %s overlaps first %s", other, first)
	}

	// Prefixes the host has are avoided: the exact /24 and a wider one.
	a4 := first.Addr().As4()
	wide := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, a4[1], 0, 0}), 16)
	for _, used := range []netip.Prefix{first, wide} {
		fake := &Fake{UsedPrefixes: []Used{{Prefix: netip.MustParsePrefix("192.168.1.0/24"), Where: "interface eth0"}, {Prefix: used, Where: "route via eth1"}}}
		m, _ := newManager(t, fake)
		p := check("host has "+used.String(), mustCreate(t, m, api.CreateNetwork{Name: "back"}))
		if p.Overlaps(used) {
			t.Fatalf("host has %s: picked %s, want no overlap", used, p)
		}
	}

	// So are other networks'.
	m3, _ := newManager(t, &Fake{})
	mustCreate(t, m3, api.CreateNetwork{Name: "squat", Subnet: first.String()})
	if p := check("network has it", mustCreate(t, m3, api.CreateNetwork{Name: "back"})); p.Overlaps(first) {
		t.Fatalf("network squat has %s: picked %s, want no overlap", first, p)
	}

	// No room at all.
	full := &Fake{UsedPrefixes: []Used{{Prefix: netip.MustParsePrefix("10.0.0.0/8"), Where: "route via eth0"}}}
	m4, _ := newManager(t, full)
	_, err := m4.Create(ctx, api.CreateNetwork{Name: "back"})
	if !errors.Is(err, errdefs.ErrLimit) {
		t.Fatalf("Create with 10.0.0.0/8 taken: got %v, want %v", err, errdefs.ErrLimit)
	}
	if got, want := networkNames(t, m4), []string{Builtin}; !slices.Equal(got, want) {
		t.Fatalf("networks after a failed create: got %v, want %v", got, want)
	}
}

func TestCreateRefused(t *testing.T) {
	const taken = "10.50.0.0/24"
	tests := []struct {
		what   string
		req    api.CreateNetwork
		used   []Used
		denied bool
		want   error
	}{
		{"upper case", api.CreateNetwork{Name: "Back"}, nil, false, errdefs.ErrInvalid},
		{"underscore", api.CreateNetwork{Name: "back_end"}, nil, false, errdefs.ErrInvalid},
		{"too long", api.CreateNetwork{Name: strings.Repeat("a", 41)}, nil, false, errdefs.ErrInvalid},
		{"empty", api.CreateNetwork{Name: ""}, nil, false, errdefs.ErrInvalid},
		{"leading dash", api.CreateNetwork{Name: "-back"}, nil, false, errdefs.ErrInvalid},
		{"dot", api.CreateNetwork{Name: "back.end"}, nil, false, errdefs.ErrInvalid},
		{"built in", api.CreateNetwork{Name: "nat"}, nil, false, errdefs.ErrExists},
		{"exists", api.CreateNetwork{Name: "old"}, nil, false, errdefs.ErrExists},
		{"exists, other subnet", api.CreateNetwork{Name: "old", Subnet: "10.51.0.0/24"}, nil, false, errdefs.ErrExists},
		{"not CIDR", api.CreateNetwork{Name: "back", Subnet: "10.77.0.0"}, nil, false, errdefs.ErrInvalid},
		{"garbage", api.CreateNetwork{Name: "back", Subnet: "ten/24"}, nil, false, errdefs.ErrInvalid},
		{"IPv6", api.CreateNetwork{Name: "back", Subnet: "fd00:77::/64"}, nil, false, errdefs.ErrInvalid},
		{"IPv4-mapped IPv6", api.CreateNetwork{Name: "back", Subnet: "::ffff:10.77.0.0/120"}, nil, false, errdefs.ErrInvalid},
		{"/8", api.CreateNetwork{Name: "back", Subnet: "10.0.0.0/8"}, nil, false, errdefs.ErrInvalid},
		{"/15", api.CreateNetwork{Name: "back", Subnet: "10.76.0.0/15"}, nil, false, errdefs.ErrInvalid},
		{"/30", api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/30"}, nil, false, errdefs.ErrInvalid},
		{"/32", api.CreateNetwork{Name: "back", Subnet: "10.77.0.1/32"}, nil, false, errdefs.ErrInvalid},
		{"host bits", api.CreateNetwork{Name: "back", Subnet: "10.77.0.1/24"}, nil, false, errdefs.ErrInvalid},
		{"loopback", api.CreateNetwork{Name: "back", Subnet: "127.1.0.0/16"}, nil, false, errdefs.ErrInvalid},
		{"link local", api.CreateNetwork{Name: "back", Subnet: "169.254.0.0/16"}, nil, false, errdefs.ErrInvalid},
		{"multicast", api.CreateNetwork{Name: "back", Subnet: "239.1.0.0/16"}, nil, false, errdefs.ErrInvalid},
		{"public", api.CreateNetwork{Name: "back", Subnet: "8.8.8.0/24"}, nil, false, errdefs.ErrInvalid},
		{"zero", api.CreateNetwork{Name: "back", Subnet: "0.0.0.0/16"}, nil, false, errdefs.ErrInvalid},
		{"reserved", api.CreateNetwork{Name: "back", Subnet: "240.0.0.0/16"}, nil, false, errdefs.ErrInvalid},
		{"trailing dash", api.CreateNetwork{Name: "back-"}, nil, false, errdefs.ErrInvalid},
		{"overlaps network (wider)", api.CreateNetwork{Name: "back", Subnet: "10.50.0.0/16"}, nil, false, errdefs.ErrConflict},
		{"overlaps network (narrower)", api.CreateNetwork{Name: "back", Subnet: "10.50.0.128/25"}, nil, false, errdefs.ErrConflict},
		{"overlaps network (same)", api.CreateNetwork{Name: "back", Subnet: taken}, nil, false, errdefs.ErrConflict},
		{"overlaps host (wider)", api.CreateNetwork{Name: "back", Subnet: "192.168.0.0/16"},
			[]Used{{Prefix: netip.MustParsePrefix("192.168.1.0/24"), Where: "interface eth0"}}, false, errdefs.ErrConflict},
		{"overlaps host (narrower)", api.CreateNetwork{Name: "back", Subnet: "192.168.1.64/29"},
			[]Used{{Prefix: netip.MustParsePrefix("192.168.1.0/24"), Where: "interface eth0"}}, false, errdefs.ErrConflict},
		{"nat and isolated", api.CreateNetwork{Name: "back", NAT: true, Isolated: true}, nil, false, errdefs.ErrInvalid},
		{"unprivileged, nat", api.CreateNetwork{Name: "back", NAT: true}, nil, true, errdefs.ErrInvalid},
		{"unprivileged, bridge asked", api.CreateNetwork{Name: "back", Mode: ModeBridge}, nil, true, ErrPrivilege},
		{"user mode, nat", api.CreateNetwork{Name: "back", Mode: ModeUser, NAT: true}, nil, false, errdefs.ErrInvalid},
		{"unknown mode", api.CreateNetwork{Name: "back", Mode: "vde"}, nil, false, errdefs.ErrInvalid},
	}
	for _, tt := range tests {
		fake := &Fake{}
		m, home := newManager(t, fake)
		old := mustCreate(t, m, api.CreateNetwork{Name: "old", Subnet: taken})
		fake.UsedPrefixes, fake.Denied = tt.used, tt.denied

		n, err := m.Create(context.Background(), tt.req)
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: Create(%+v): got %v (%+v), want %v", tt.what, tt.req, err, n, tt.want)
			continue
		}
		if quoted := fmt.Sprintf("%q", tt.req.Name); !strings.Contains(err.Error(), quoted) {
			t.Errorf("%s: error %q: want it to name network %s", tt.what, err, quoted)
		}
		if got, want := networkNames(t, m), []string{Builtin, "old"}; !slices.Equal(got, want) {
			t.Errorf("%s: networks after a failed create: got %v, want %v", tt.what, got, want)
		}
		if got, err := m.Get(context.Background(), "old"); err != nil || got.Subnet != taken {
			t.Errorf("%s: old network after a failed create: got %+v, %v, want subnet %s", tt.what, got, err, taken)
		}
		if tt.req.Name != "old" && tt.req.Name != "" {
			if _, err := os.Stat(filepath.Join(home, "networks", tt.req.Name)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s: directory of the refused network: got %v, want %v", tt.what, err, os.ErrNotExist)
			}
		}
		if got, want := len(fake.IsUp), 1; got != want {
			t.Errorf("%s: bridges up: got %v, want %v (only %s)", tt.what, got, want, old.Bridge)
		}
	}
}

func TestCreateUpFails(t *testing.T) {
	ctx := context.Background()
	fake := &Fake{FailUp: true}
	m, home := newManager(t, fake)
	_, err := m.Create(ctx, api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/24"})
	if err == nil || !strings.Contains(err.Error(), "fake: bridge refused") {
		t.Fatalf("Create with Up failing: got %v, want the host's error", err)
	}
	if !strings.Contains(err.Error(), `"back"`) {
		t.Fatalf("error %q: want it to name network \"back\"", err)
	}
	if got, want := networkNames(t, m), []string{Builtin}; !slices.Equal(got, want) {
		t.Fatalf("networks after a failed create: got %v, want %v", got, want)
	}
	if _, err := m.Get(ctx, "back"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Get after a failed create: got %v, want %v", err, errdefs.ErrNotFound)
	}
	if _, err := os.Stat(filepath.Join(home, "networks", "back")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("directory after a failed create: got %v, want %v", err, os.ErrNotExist)
	}
	if got, want := len(fake.IsUp), 0; got != want {
		t.Fatalf("bridges up after a failed create: got %v, want %v", got, want)
	}

	// Nothing is left that blocks the name or the subnet.
	fake.FailUp = false
	n := mustCreate(t, m, api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/24"})
	if _, ok := fake.IsUp[n.Bridge]; !ok {
		t.Fatalf("bridge %s up after retry: got false, want true", n.Bridge)
	}
}

func TestListAndGet(t *testing.T) {
	ctx := context.Background()
	m, _ := newManager(t, &Fake{})
	all, err := m.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if got, want := len(all), 1; got != want {
		t.Fatalf("networks of a fresh manager: got %v, want %v", got, want)
	}
	if got, want := all[0], (api.Network{Name: Builtin, Builtin: true, NAT: true}); got.Name != want.Name || got.Builtin != want.Builtin || got.NAT != want.NAT {
		t.Fatalf("first network: got %+v, want %+v", got, want)
	}

	nat, err := m.Get(ctx, Builtin)
	if err != nil || nat.Name != Builtin || !nat.Builtin || !nat.NAT || nat.Subnet != "" {
		t.Fatalf("Get(nat): got %+v, %v, want the built-in NAT network", nat, err)
	}
	if err := m.Check(ctx, Builtin); err != nil {
		t.Fatalf("Check(nat): got %v, want nil", err)
	}

	_, err = m.Get(ctx, "nope")
	if !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Get(nope): got %v, want %v", err, errdefs.ErrNotFound)
	}
	if !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("Get(nope) error %q: want it to name the network", err)
	}
	if err := m.Check(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Check(nope): got %v, want %v", err, errdefs.ErrNotFound)
	}

	mustCreate(t, m, api.CreateNetwork{Name: "zeta"})
	mustCreate(t, m, api.CreateNetwork{Name: "alpha", Isolated: true})
	if got, want := networkNames(t, m), []string{Builtin, "alpha", "zeta"}; !slices.Equal(got, want) {
		t.Fatalf("networks: got %v, want %v", got, want)
	}
	if err := m.Check(ctx, "alpha"); err != nil {
		t.Fatalf("Check(alpha): got %v, want nil", err)
	}
}

func TestAttach(t *testing.T) {
	fake := &Fake{}
	m, home := newManager(t, fake)
	n := mustCreate(t, m, api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/24"})
	dir := filepath.Join(home, "networks", "back")
	// As after a reboot: the bridge and the files are gone.
	fake.IsUp = nil
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	const mac1, mac2 = "52:54:00:00:00:01", "52:54:00:ab:cd:02"

	if got, want := mustAttach(t, m, "web", []string{"web", "www"}, NIC{Network: "back", MAC: mac1}), "10.77.0.2"; got != want {
		t.Fatalf("first NIC: got %v, want %v", got, want)
	}
	if got, want := mustAttach(t, m, "db", []string{"db"}, NIC{Network: "back", MAC: mac2, Index: 1}), "10.77.0.3"; got != want {
		t.Fatalf("second VM: got %v, want %v", got, want)
	}
	// Again, as on a restart, and with the MAC in upper case.
	if got, want := mustAttach(t, m, "web", []string{"web", "www"}, NIC{Network: "back", MAC: mac1}), "10.77.0.2"; got != want {
		t.Fatalf("same VM and MAC again: got %v, want %v", got, want)
	}
	if got, want := mustAttach(t, m, "db", []string{"db"}, NIC{Network: "back", MAC: strings.ToUpper(mac2), Index: 1}), "10.77.0.3"; got != want {
		t.Fatalf("same MAC in upper case: got %v, want %v", got, want)
	}
	if got, want := len(leases(t, m, "back")), 2; got != want {
		t.Fatalf("leases: got %v, want %v", got, want)
	}
	if got, want := leases(t, m, "back")[1].MAC, mac2; got != want {
		t.Fatalf("MAC of db's lease after an upper-case attach: got %v, want %v", got, want)
	}

	if got, want := len(fake.Taps), 4; got != want {
		t.Fatalf("taps opened: got %v, want %v", got, want)
	}
	for _, tap := range fake.Taps {
		if len(tap) > 15 || len(tap) == 0 {
			t.Fatalf("tap name %q: got %d chars, want 1 to 15", tap, len(tap))
		}
	}
	if fake.Taps[0] != fake.Taps[2] || fake.Taps[0] == fake.Taps[1] {
		t.Fatalf("tap names: got %v, want one per VM NIC, the same on a restart", fake.Taps)
	}
	if _, ok := fake.IsUp[n.Bridge]; !ok {
		t.Fatalf("bridge %s up after attach: got false, want true", n.Bridge)
	}

	if got, want := readFile(t, filepath.Join(dir, "dhcp-hosts")), mac1+",10.77.0.2,web\n"+mac2+",10.77.0.3,db\n"; got != want {
		t.Fatalf("dhcp-hosts: got %q, want %q", got, want)
	}
	if got, want := readFile(t, filepath.Join(dir, "hosts")), "10.77.0.2 web www\n10.77.0.3 db\n"; got != want {
		t.Fatalf("hosts: got %q, want %q", got, want)
	}

	// New names for the same NIC are written out.
	mustAttach(t, m, "db", []string{"db", "sql"}, NIC{Network: "back", MAC: mac2, Index: 1})
	if got, want := readFile(t, filepath.Join(dir, "hosts")), "10.77.0.2 web www\n10.77.0.3 db sql\n"; got != want {
		t.Fatalf("hosts after new names: got %q, want %q", got, want)
	}

	// A VM without names gets an address but no DNS entry.
	if got, want := mustAttach(t, m, "anon", nil, NIC{Network: "back", MAC: "52:54:00:00:00:03"}), "10.77.0.4"; got != want {
		t.Fatalf("VM without names: got %v, want %v", got, want)
	}
	if got, want := readFile(t, filepath.Join(dir, "dhcp-hosts")), mac1+",10.77.0.2,web\n"+mac2+",10.77.0.3,db\n52:54:00:00:00:03,10.77.0.4\n"; got != want {
		t.Fatalf("dhcp-hosts with a nameless VM: got %q, want %q", got, want)
	}
	if got, want := readFile(t, filepath.Join(dir, "hosts")), "10.77.0.2 web www\n10.77.0.3 db sql\n"; got != want {
		t.Fatalf("hosts with a nameless VM: got %q, want %q", got, want)
	}

	if _, err := attach(t, m, "web", []string{"web"}, NIC{Network: "nope", MAC: mac1}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Attach to an unknown network: got %v, want %v", err, errdefs.ErrNotFound)
	}

	// A host that cannot bring the bridge up opens no tap.
	fake.FailUp = true
	taps := len(fake.Taps)
	if _, err := attach(t, m, "web", []string{"web", "www"}, NIC{Network: "back", MAC: mac1}); err == nil || !strings.Contains(err.Error(), "fake: bridge refused") {
		t.Fatalf("Attach with Up failing: got %v, want the host's error", err)
	}
	if got, want := len(fake.Taps), taps; got != want {
		t.Fatalf("taps after a failed attach: got %v, want %v", got, want)
	}
}

func TestAttachNewMAC(t *testing.T) {
	m, home := newManager(t, &Fake{})
	mustCreate(t, m, api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/24"})
	mustAttach(t, m, "web", []string{"web"}, NIC{Network: "back", MAC: "52:54:00:00:00:01"})
	mustAttach(t, m, "db", []string{"db"}, NIC{Network: "back", MAC: "52:54:00:00:00:02"})

	if got, want := mustAttach(t, m, "web", []string{"web"}, NIC{Network: "back", MAC: "52:54:00:00:00:aa"}), "10.77.0.2"; got != want {
		t.Fatalf("VM with a new MAC: got %v, want %v", got, want)
	}
	ls := leases(t, m, "back")
	if got, want := len(ls), 2; got != want {
		t.Fatalf("leases: got %v (%+v), want %v", got, ls, want)
	}
	if got, want := ls[0], (api.NetworkLease{VM: "web", MAC: "52:54:00:00:00:aa", IP: "10.77.0.2", Names: []string{"web"}}); got.VM != want.VM || got.MAC != want.MAC || got.IP != want.IP || !slices.Equal(got.Names, want.Names) {
		t.Fatalf("lease: got %+v, want %+v", got, want)
	}
	if got, want := readFile(t, filepath.Join(home, "networks", "back", "dhcp-hosts")), "52:54:00:00:00:aa,10.77.0.2,web\n52:54:00:00:00:02,10.77.0.3,db\n"; got != want {
		t.Fatalf("dhcp-hosts: got %q, want %q", got, want)
	}
}

func TestAttachMACMoved(t *testing.T) {
	m, home := newManager(t, &Fake{})
	mustCreate(t, m, api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/24"})
	mustAttach(t, m, "web", []string{"web"}, NIC{Network: "back", MAC: "52:54:00:00:00:01"})
	mustAttach(t, m, "db", []string{"db"}, NIC{Network: "back", MAC: "52:54:00:00:00:02"})

	// web was moved to a record named web2, identity and all.
	if got, want := mustAttach(t, m, "web2", []string{"web2"}, NIC{Network: "back", MAC: "52:54:00:00:00:01"}), "10.77.0.2"; got != want {
		t.Fatalf("moved MAC: got %v, want %v", got, want)
	}
	ls := leases(t, m, "back")
	if got, want := len(ls), 2; got != want {
		t.Fatalf("leases: got %v (%+v), want %v", got, ls, want)
	}
	for _, l := range ls {
		if l.VM == "web" {
			t.Fatalf("leases: got one still held by web (%+v), want it moved to web2", ls)
		}
	}
	if got, want := ls[0].VM, "web2"; got != want {
		t.Fatalf("holder of 10.77.0.2: got %v, want %v", got, want)
	}
	if got, want := readFile(t, filepath.Join(home, "networks", "back", "hosts")), "10.77.0.2 web2\n10.77.0.3 db\n"; got != want {
		t.Fatalf("hosts: got %q, want %q", got, want)
	}
}

func TestAttachNameTaken(t *testing.T) {
	fake := &Fake{}
	m, home := newManager(t, fake)
	mustCreate(t, m, api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/24"})
	mustAttach(t, m, "web", []string{"web", "www"}, NIC{Network: "back", MAC: "52:54:00:00:00:01"})

	mustAttach(t, m, "other", []string{"other"}, NIC{Network: "back", MAC: "52:54:00:00:00:02"})
	before := readFile(t, filepath.Join(home, "networks", "back", "dhcp-hosts"))
	// Refused on every path: a new lease, a lease kept with new names,
	// a lease kept under a new MAC; and whatever the case.
	for _, tc := range []struct {
		names []string
		mac   string
	}{{[]string{"www"}, "52:54:00:00:00:02"}, {[]string{"other", "web"}, "52:54:00:00:00:02"}, {[]string{"WEB"}, "52:54:00:00:00:02"}, {[]string{"other", "www"}, "52:54:00:00:00:09"}} {
		names := tc.names
		_, err := attach(t, m, "other", names, NIC{Network: "back", MAC: tc.mac})
		if !errors.Is(err, errdefs.ErrConflict) {
			t.Fatalf("Attach(other, %v): got %v, want %v", names, err, errdefs.ErrConflict)
		}
		if !strings.Contains(err.Error(), `"web"`) || !strings.Contains(err.Error(), `"other"`) {
			t.Fatalf("Attach(other, %v) error %q: want it to name both VMs", names, err)
		}
	}
	if got, want := len(leases(t, m, "back")), 2; got != want {
		t.Fatalf("leases after refusals: got %v, want %v", got, want)
	}
	if got, want := len(fake.Taps), 2; got != want {
		t.Fatalf("taps after refusals: got %v, want %v", got, want)
	}
	if got := readFile(t, filepath.Join(home, "networks", "back", "dhcp-hosts")); got != before {
		t.Fatalf("dhcp-hosts after refusals: got %q, want %q", got, before)
	}
}

func TestAttachExhausted(t *testing.T) {
	m, _ := newManager(t, &Fake{})
	mustCreate(t, m, api.CreateNetwork{Name: "tiny", Subnet: "10.88.0.0/29"})
	for i := 2; i <= 6; i++ {
		vm := fmt.Sprintf("vm%d", i)
		got := mustAttach(t, m, vm, []string{vm}, NIC{Network: "tiny", MAC: fmt.Sprintf("52:54:00:00:00:%02x", i)})
		if want := fmt.Sprintf("10.88.0.%d", i); got != want {
			t.Fatalf("%s: got %v, want %v", vm, got, want)
		}
	}
	_, err := attach(t, m, "vm7", []string{"vm7"}, NIC{Network: "tiny", MAC: "52:54:00:00:00:07"})
	if !errors.Is(err, errdefs.ErrLimit) {
		t.Fatalf("sixth guest on a /29: got %v, want %v", err, errdefs.ErrLimit)
	}
	if got, want := len(leases(t, m, "tiny")), 5; got != want {
		t.Fatalf("leases: got %v, want %v", got, want)
	}
	// A guest that has its lease still gets it.
	if got, want := mustAttach(t, m, "vm6", []string{"vm6"}, NIC{Network: "tiny", MAC: "52:54:00:00:00:06"}), "10.88.0.6"; got != want {
		t.Fatalf("vm6 again on a full network: got %v, want %v", got, want)
	}
}

func TestNextFreeSkipsTaken(t *testing.T) {
	n := api.Network{Subnet: "10.9.0.0/24", Gateway: "10.9.0.1", Leases: []api.NetworkLease{{IP: "10.9.0.2"}, {IP: "10.9.0.4"}}}
	got, err := nextFree(n)
	if err != nil || got != netip.MustParseAddr("10.9.0.3") {
		t.Fatalf("nextFree: got %v, %v, want 10.9.0.3", got, err)
	}
}

func TestRelease(t *testing.T) {
	ctx := context.Background()
	fake := &Fake{}
	m, home := newManager(t, fake)
	mustCreate(t, m, api.CreateNetwork{Name: "a", Subnet: "10.1.0.0/24"})
	mustCreate(t, m, api.CreateNetwork{Name: "b", Subnet: "10.2.0.0/24"})
	mustCreate(t, m, api.CreateNetwork{Name: "c", Subnet: "10.3.0.0/24"})
	mustAttach(t, m, "web", []string{"web"}, NIC{Network: "a", MAC: "52:54:00:00:00:01"})
	mustAttach(t, m, "web", []string{"web"}, NIC{Network: "b", MAC: "52:54:00:00:00:02", Index: 1})
	mustAttach(t, m, "db", []string{"db"}, NIC{Network: "a", MAC: "52:54:00:00:00:03"})
	mustAttach(t, m, "db", []string{"db"}, NIC{Network: "c", MAC: "52:54:00:00:00:04", Index: 1})

	if err := m.Release(ctx, "web"); err != nil {
		t.Fatalf("Release(web): %v", err)
	}
	if got, want := fake.Reloads, 2; got != want {
		t.Fatalf("reloads: got %v, want %v (a and b)", got, want)
	}
	for _, tt := range []struct {
		net         string
		vms         []string
		dhcp, hosts string
	}{
		{"a", []string{"db"}, "52:54:00:00:00:03,10.1.0.3,db\n", "10.1.0.3 db\n"},
		{"b", nil, "", ""},
		{"c", []string{"db"}, "52:54:00:00:00:04,10.3.0.2,db\n", "10.3.0.2 db\n"},
	} {
		var vms []string
		for _, l := range leases(t, m, tt.net) {
			vms = append(vms, l.VM)
		}
		if !slices.Equal(vms, tt.vms) {
			t.Fatalf("network %s: lease holders: got %v, want %v", tt.net, vms, tt.vms)
		}
		dir := filepath.Join(home, "networks", tt.net)
		if got := readFile(t, filepath.Join(dir, "dhcp-hosts")); got != tt.dhcp {
			t.Fatalf("network %s: dhcp-hosts: got %q, want %q", tt.net, got, tt.dhcp)
		}
		if got := readFile(t, filepath.Join(dir, "hosts")); got != tt.hosts {
			t.Fatalf("network %s: hosts: got %q, want %q", tt.net, got, tt.hosts)
		}
	}

	// The freed address is handed out again, and the name too.
	if got, want := mustAttach(t, m, "cache", []string{"web"}, NIC{Network: "a", MAC: "52:54:00:00:00:05"}), "10.1.0.2"; got != want {
		t.Fatalf("after release: got %v, want %v", got, want)
	}

	// A VM without leases changes nothing.
	if err := m.Release(ctx, "ghost"); err != nil {
		t.Fatalf("Release(ghost): %v", err)
	}
	if got, want := fake.Reloads, 2; got != want {
		t.Fatalf("reloads after releasing a VM without leases: got %v, want %v", got, want)
	}
}

func TestDelete(t *testing.T) {
	ctx := context.Background()
	fake := &Fake{}
	m, home := newManager(t, fake)
	n := mustCreate(t, m, api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/24"})
	keep := mustCreate(t, m, api.CreateNetwork{Name: "keep", Subnet: "10.78.0.0/24"})
	dir := filepath.Join(home, "networks", "back")

	err := m.Delete(ctx, "back", []string{"web", "db"})
	if !errors.Is(err, errdefs.ErrInUse) {
		t.Fatalf("Delete with users: got %v, want %v", err, errdefs.ErrInUse)
	}
	if msg := err.Error(); !strings.Contains(msg, "web") || !strings.Contains(msg, "db") || !strings.Contains(msg, `"back"`) {
		t.Fatalf("Delete with users: error %q: want it to name the network and web and db", msg)
	}
	if _, err := m.Get(ctx, "back"); err != nil {
		t.Fatalf("Get after a refused delete: got %v, want nil", err)
	}
	if _, ok := fake.IsUp[n.Bridge]; !ok {
		t.Fatalf("bridge after a refused delete: got down, want up")
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("directory after a refused delete: got %v, want it there", err)
	}

	if err := m.Delete(ctx, "back", nil); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if got, want := networkNames(t, m), []string{Builtin, "keep"}; !slices.Equal(got, want) {
		t.Fatalf("networks after delete: got %v, want %v", got, want)
	}
	if _, err := m.Get(ctx, "back"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Get after delete: got %v, want %v", err, errdefs.ErrNotFound)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("directory after delete: got %v, want %v", err, os.ErrNotExist)
	}
	if _, ok := fake.IsUp[n.Bridge]; ok {
		t.Fatalf("bridge %s after delete: got up, want down", n.Bridge)
	}
	if _, ok := fake.IsUp[keep.Bridge]; !ok {
		t.Fatalf("other bridge %s after delete: got down, want up", keep.Bridge)
	}

	// Its subnet is free again.
	mustCreate(t, m, api.CreateNetwork{Name: "again", Subnet: "10.77.0.0/24"})

	if err := m.Delete(ctx, Builtin, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("Delete(nat): got %v, want %v", err, errdefs.ErrInvalid)
	}
	if got, want := networkNames(t, m)[0], Builtin; got != want {
		t.Fatalf("first network after Delete(nat): got %v, want %v", got, want)
	}
	if err := m.Delete(ctx, "nope", nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Delete(nope): got %v, want %v", err, errdefs.ErrNotFound)
	}
	if err := m.Delete(ctx, "back", nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Delete(back) twice: got %v, want %v", err, errdefs.ErrNotFound)
	}
}

func TestRecover(t *testing.T) {
	ctx := context.Background()
	st := store.NewMemory()
	home := t.TempDir()
	m := New(st, home, &Fake{}, discard)
	a := mustCreate(t, m, api.CreateNetwork{Name: "a", Subnet: "10.1.0.0/24", NAT: true})
	b := mustCreate(t, m, api.CreateNetwork{Name: "b", Isolated: true})
	mustAttach(t, m, "web", []string{"web"}, NIC{Network: "a", MAC: "52:54:00:00:00:01"})

	// After a reboot: no bridges, and the files are gone with /run, say.
	if err := os.RemoveAll(filepath.Join(home, "networks")); err != nil {
		t.Fatal(err)
	}
	fake := &Fake{}
	m = New(st, home, fake, discard)
	if err := m.Recover(ctx); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if got, want := len(fake.IsUp), 2; got != want {
		t.Fatalf("bridges up: got %v, want %v", got, want)
	}
	for _, n := range []api.Network{a, b} {
		w, ok := fake.IsUp[n.Bridge]
		if !ok {
			t.Fatalf("bridge %s of %s: got down, want up", n.Bridge, n.Name)
		}
		if w.Name != n.Name || w.Subnet.String() != n.Subnet || w.NAT != n.NAT || w.Isolated != n.Isolated {
			t.Fatalf("wiring of %s: got %+v, want %+v", n.Name, w, n)
		}
	}
	if got, want := readFile(t, filepath.Join(home, "networks", "a", "dhcp-hosts")), "52:54:00:00:00:01,10.1.0.2,web\n"; got != want {
		t.Fatalf("dhcp-hosts after recover: got %q, want %q", got, want)
	}

	// A host that fails names the network.
	fake.FailUp = true
	err := m.Recover(ctx)
	if err == nil || !strings.Contains(err.Error(), `"a"`) || !strings.Contains(err.Error(), `"b"`) {
		t.Fatalf("Recover with Up failing: got %v, want an error naming a and b", err)
	}
}

func TestNames(t *testing.T) {
	m1 := New(store.NewMemory(), "/var/lib/lodge", &Fake{}, discard)
	m2 := New(store.NewMemory(), "/home/u/.lodge", &Fake{}, discard)
	long := strings.Repeat("n", 40)
	for _, tt := range []struct {
		what, got, prefix string
	}{
		{"bridge", m1.bridgeName(long), "lodge"},
		{"tap", m1.tapName(long, 31), "lt"},
	} {
		if len(tt.got) > 15 || !strings.HasPrefix(tt.got, tt.prefix) {
			t.Errorf("%s name %q: got %d chars, want at most 15 starting %q", tt.what, tt.got, len(tt.got), tt.prefix)
		}
	}
	if got, want := m1.bridgeName("back"), newBridge(t, m1.home, "back"); got != want {
		t.Errorf("bridge name of back in one home, asked twice: got %s, want %s", got, want)
	}
	if m1.bridgeName("back") == m2.bridgeName("back") {
		t.Errorf("bridge name of back in two homes: got %s for both, want different", m1.bridgeName("back"))
	}
	if m1.bridgeName("back") == m1.bridgeName("front") {
		t.Errorf("bridge name of back and front: got %s for both, want different", m1.bridgeName("back"))
	}
	if m1.tapName("web", 0) == m1.tapName("web", 1) || m1.tapName("web", 0) == m1.tapName("db", 0) || m1.tapName("web", 0) == m2.tapName("web", 0) {
		t.Errorf("tap names: got a clash, want one per home, VM and NIC")
	}
}

func TestSupported(t *testing.T) {
	for _, denied := range []bool{false, true} {
		m, _ := newManager(t, &Fake{Denied: denied})
		err := m.Supported()
		if got, want := errors.Is(err, ErrPrivilege), denied; got != want || (err != nil) != denied {
			t.Errorf("Supported with Denied=%v: got %v, want privilege error %v", denied, err, want)
		}
	}
}

func TestAttachBuiltin(t *testing.T) {
	m, _ := newManager(t, &Fake{})
	_, err := attach(t, m, "web", []string{"web"}, NIC{Network: Builtin, MAC: "52:54:00:00:00:01"})
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("Attach to %q: got %v, want %v", Builtin, err, errdefs.ErrInvalid)
	}
}

// newBridge is the bridge name a fresh manager on home gives network.
func newBridge(t *testing.T, home, network string) string {
	t.Helper()
	return New(store.NewMemory(), home, &Fake{}, nil).bridgeName(network)
}

// TestUserMode: without the rights for a bridge, a network is a switch in
// the daemon: no bridge, a socket for QEMU, leases kept as in bridge
// mode, and the socket gone with the network.
func TestUserMode(t *testing.T) {
	fake := &Fake{Denied: true}
	m, home := newManager(t, fake)
	n := mustCreate(t, m, api.CreateNetwork{Name: "back", Subnet: "10.77.0.0/24"})
	if n.Mode != ModeUser || n.Bridge != "" || len(fake.IsUp) != 0 {
		t.Fatalf("network made without privileges: got mode %q bridge %q, %d bridges up; want user, none, 0", n.Mode, n.Bridge, len(fake.IsUp))
	}
	sock := filepath.Join(home, "networks", "back", "switch.sock")
	if st, err := os.Stat(sock); err != nil || st.Mode()&os.ModeSocket == 0 {
		t.Fatalf("switch socket %s: got %v, want a socket", sock, err)
	}
	port := filepath.Join(home, "web.sock")
	a, err := m.Attach(context.Background(), "web", []string{"web"}, NIC{Network: "back", MAC: "52:54:00:00:00:01", Port: port})
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if a.Switch != sock || a.Tap != nil || a.IP != "10.77.0.2" {
		t.Fatalf("attachment: got switch %q tap %v ip %s, want %s, none, 10.77.0.2", a.Switch, a.Tap, a.IP, sock)
	}
	if got := leases(t, m, "back"); len(got) != 1 || got[0].Port != port {
		t.Fatalf("leases: got %+v, want one with port %s", got, port)
	}
	if got := m.switchLeases("back"); len(got) != 1 || got[0].IP.String() != "10.77.0.2" || got[0].Names[0] != "web" {
		t.Fatalf("what the switch serves: got %+v", got)
	}
	if err := m.Release(context.Background(), "web"); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if got := m.switchLeases("back"); len(got) != 0 {
		t.Fatalf("what the switch serves after release: got %+v, want nothing", got)
	}
	if err := m.Delete(context.Background(), "back", nil); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("switch socket after delete: got %v, want it gone", err)
	}
}
