package integration

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// requireNetAdmin skips a test of private networks where the test cannot
// build bridges: they need root.
func requireNetAdmin(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("private networks need root (bridges, taps, iptables)")
	}
	if _, err := exec.LookPath("dnsmasq"); err != nil {
		t.Skip("private networks need dnsmasq (apt-get install dnsmasq-base)")
	}
}

// guestIP waits until NIC dev of vm has an IPv4 address and returns it.
func (h *host) guestIP(vm, dev string) string {
	h.t.Helper()
	var ip string
	eventually(h.t, 90*time.Second, vm+" "+dev+" to get an address by DHCP", func() bool {
		out, _, _ := h.lodge("exec", vm, "--", "sh", "-c", "ip -4 addr show "+dev+" | awk '$1 == \"inet\" { print $2 }'")
		ip, _, _ = strings.Cut(strings.TrimSpace(out), "/")
		return ip != ""
	})
	return ip
}

// reaches says whether vm can ping target (a name or an address) within
// a minute: a guest that has just booted, on a loaded host, may miss a
// ping or two while its neighbours learn of it. (In one CI run a db just
// rebuilt from its backup answered only after 30 s.)
func (h *host) reaches(vm, target string) bool {
	h.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if h.pings(vm, target) {
			return true
		}
		if time.Now().After(deadline) {
			// What the guest sees, so that a failure can be told apart:
			// a name that does not resolve, or an address that does not
			// answer.
			out, errOut, _ := h.lodge("exec", vm, "--", "sh", "-c", "cat /etc/resolv.conf; nslookup "+target+"; ip -4 addr; ip neigh; ping -c 1 -W 3 "+target)
			h.t.Logf("%s cannot reach %s:\n%s%s", vm, target, out, errOut)
			return false
		}
		time.Sleep(time.Second)
	}
}

// pings says whether one ping from vm to target is answered.
func (h *host) pings(vm, target string) bool {
	h.t.Helper()
	_, _, code := h.lodge("exec", vm, "--", "ping", "-c", "2", "-W", "3", target)
	return code == 0
}

func (h *host) network(name string) api.Network {
	h.t.Helper()
	var n api.Network
	mustJSON(h.t, h.must("net", "show", name, "-o", "json"), &n)
	return n
}

// dnsmasqPID is the pid of network n's dnsmasq, 0 if it is not running.
func dnsmasqPID(n api.Network, home string) int {
	raw, err := os.ReadFile(filepath.Join(home, "networks", n.Name, "dnsmasq.pid"))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || syscall.Kill(pid, 0) != nil {
		return 0
	}
	return pid
}

func bridgePorts(t *testing.T, bridge string) int {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show", "master", bridge).Output()
	if err != nil {
		t.Fatalf("ip link show master %s: %v", bridge, err)
	}
	return strings.Count(string(out), "\n")
}

// TestNetworks: VMs on a private network get the address Lodge leased
// them and reach each other by name; isolated and NAT networks do what
// they say; a killed daemon leaves DHCP and DNS running; a deleted VM's
// address goes to the next VM; a network in use cannot be deleted, and
// deleting it leaves nothing on the host.
func TestNetworks(t *testing.T) {
	t.Parallel()
	requireNetAdmin(t)
	h := newHost(t)
	h.importGuest()

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"net", "create", "Back"}, `network name "Back"`},
		{[]string{"net", "create", "nat"}, "built in"},
		{[]string{"net", "create", "x", "--subnet", "10.1.2.3/24"}, "host bits set"},
		{[]string{"net", "create", "x", "--subnet", "fd00::/64"}, "only IPv4"},
		{[]string{"net", "create", "x", "--subnet", "10.0.0.0/8"}, "/16 to /29"},
		{[]string{"net", "create", "x", "--nat", "--isolated"}, "contradict"},
		{[]string{"net", "delete", "nosuch"}, `network "nosuch": not found`},
		{[]string{"net", "delete", "nat"}, "built in"},
		{[]string{"create", "v", "--image", "tiny", "--net", "nosuch"}, `network "nosuch": not found`},
		{[]string{"create", "v", "--image", "tiny", "--net", "nat", "--net", "nat"}, "given twice"},
	} {
		_, errOut, code := h.lodge(tc.args...)
		if code == 0 || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("lodge %v: exit %d, %q; want one line with %q", tc.args, code, errOut, tc.want)
		}
	}
	if _, _, code := h.lodge("show", "v"); code == 0 {
		t.Error("a refused create left vm v behind")
	}

	h.must("net", "create", "back")
	h.must("net", "create", "iso", "--isolated")
	h.must("net", "create", "out", "--nat")
	back, iso, out := h.network("back"), h.network("iso"), h.network("out")
	subnet := netip.MustParsePrefix(back.Subnet)
	if _, errOut, code := h.lodge("net", "create", "again", "--subnet", back.Subnet); code == 0 || !strings.Contains(errOut, `overlaps network "back"`) {
		t.Errorf("a second network on %s: exit %d, %q", back.Subnet, code, errOut)
	}
	var list []api.Network
	mustJSON(t, h.must("net", "list", "-o", "json"), &list)
	if len(list) != 4 || list[0].Name != "nat" || !list[0].Builtin {
		t.Errorf("net list: %+v", list)
	}

	h.vm("a", "--net", "back", "--net", "iso")
	h.vm("b", "--net", "back", "--net", "nat", "--net", "out")
	aIP, bIP := h.guestIP("a", "eth0"), h.guestIP("b", "eth0")
	if want := h.show("a").NICs[0].IP; aIP != want || !subnet.Contains(netip.MustParseAddr(aIP)) {
		t.Errorf("a has %s on back (%s); lodge show says %s", aIP, back.Subnet, want)
	}
	if !h.reaches("a", "b") || !h.reaches("b", "a") {
		t.Errorf("a and b do not reach each other by name on network back")
	}
	if got := h.exec("a", "sh", "-c", "nslookup b "+back.Gateway+" | awk '/^Address/ { a = $2 } END { print a }'"); got != bIP {
		t.Errorf("back's DNS says b is %q; b has %s", got, bIP)
	}

	// Isolated: DHCP and DNS answer, the host does not.
	h.guestIP("a", "eth1")
	if h.pings("a", iso.Gateway) {
		t.Errorf("a reaches the host (%s) over isolated network iso", iso.Gateway)
	}
	// NAT: the host routes the guests out, and is reachable.
	h.guestIP("b", "eth2")
	if !h.reaches("b", out.Gateway) {
		t.Errorf("b does not reach the host (%s) over NAT network out", out.Gateway)
	}
	if rules, _ := exec.Command("iptables", "-w", "-t", "nat", "-S", "POSTROUTING").Output(); !strings.Contains(string(rules), "-s "+out.Subnet+" ! -d "+out.Subnet) {
		t.Errorf("no masquerade rule for %s:\n%s", out.Subnet, rules)
	}

	if _, errOut, code := h.lodge("net", "delete", "back"); code == 0 || !strings.Contains(errOut, "in use by vm a, b") {
		t.Errorf("deleting a network in use: exit %d, %q", code, errOut)
	}

	// A killed daemon leaves the guests their DHCP and DNS.
	h.killDaemon()
	if dnsmasqPID(back, h.home) == 0 {
		t.Error("dnsmasq of back died with the daemon")
	}
	h.startDaemon()
	if !h.reaches("a", "b") {
		t.Error("after a daemon restart a no longer reaches b by name")
	}

	// b's address goes to the next VM, which DHCP must not refuse it.
	h.must("delete", "--force", "b")
	h.vm("c", "--net", "back")
	if got := h.guestIP("c", "eth0"); got != bIP {
		t.Errorf("c got %s on back; b's freed address was %s", got, bIP)
	}
	if !h.reaches("c", "a") {
		t.Error("c does not reach a by name")
	}

	// Stopped VMs leave no tap on the bridge.
	if got := bridgePorts(t, back.Bridge); got != 2 {
		t.Errorf("back's bridge has %d ports with a and c running", got)
	}
	h.must("stop", "--force", "a")
	h.must("stop", "--force", "c")
	if got := bridgePorts(t, back.Bridge); got != 0 {
		t.Errorf("back's bridge has %d ports with no VM running", got)
	}

	h.must("delete", "a")
	h.must("delete", "c")
	pid := dnsmasqPID(back, h.home)
	if pid == 0 {
		t.Fatal("back has no dnsmasq running")
	}
	for _, n := range []string{"back", "iso", "out"} {
		h.must("net", "delete", n)
	}
	if err := exec.Command("ip", "link", "show", "dev", back.Bridge).Run(); err == nil {
		t.Errorf("bridge %s left after net delete", back.Bridge)
	}
	// Ended, then reaped by init.
	eventually(t, 10*time.Second, "dnsmasq of back to go after net delete", func() bool { return syscall.Kill(pid, 0) != nil })
	if rules, _ := exec.Command("iptables", "-w", "-S").Output(); strings.Contains(string(rules), back.Bridge) {
		t.Errorf("iptables rules of %s left after net delete", back.Bridge)
	}
}

// TestStackNetwork: a stack's declared network is made for it, its
// members reach each other by member name on it, and down --delete
// removes it with the members.
func TestStackNetwork(t *testing.T) {
	t.Parallel()
	requireNetAdmin(t)
	h := newHost(t)
	h.importGuest()
	file := writeStack(t, "web.yaml", `name: web
networks:
  back: {}
vms:
  db: {image: tiny, memory: 256M, networks: [back], health: {exec: "true"}}
  app: {image: tiny, memory: 256M, count: 2, networks: [back, nat], depends_on: {db: healthy}}
`)
	var st api.StackStatus
	mustJSON(t, h.must("stack", "up", file, "-o", "json"), &st)
	back := h.network("web-back")
	if back.Stack != "web" {
		t.Errorf("web-back belongs to stack %q", back.Stack)
	}
	subnet := netip.MustParsePrefix(back.Subnet)
	for _, m := range st.Members {
		if len(m.IPs) == 0 || !subnet.Contains(netip.MustParseAddr(m.IPs[0])) {
			t.Errorf("member %s: IPs %v, want one in %s first", m.Name, m.IPs, back.Subnet)
		}
	}
	h.guestIP("web-app-1", "eth0")
	for _, name := range []string{"db", "app-2", "web-db"} {
		if !h.reaches("web-app-1", name) {
			t.Errorf("web-app-1 does not reach %s by name", name)
		}
	}
	if _, errOut, code := h.lodge("net", "delete", "web-back"); code == 0 || !strings.Contains(errOut, "in use") {
		t.Errorf("deleting the stack's network under its members: exit %d, %q", code, errOut)
	}

	var again api.StackStatus
	mustJSON(t, h.must("stack", "up", file, "-o", "json"), &again)
	for i, m := range again.Members {
		if !m.StartedAt.Equal(*st.Members[i].StartedAt) {
			t.Errorf("second up restarted %s", m.Name)
		}
	}

	// Rebuild db from its backup, then from its image: it keeps its
	// identity and address, and app is not disturbed.
	before := h.show("web-db")
	app := h.show("web-app-1")
	h.exec("web-db", "sh", "-c", "echo one >/root/mark && sync")
	h.must("backup", "create", "web-db")
	h.exec("web-db", "sh", "-c", "echo two >/root/mark && sync")
	h.must("stack", "rebuild", "web", "db", "--from-backup")
	if got := h.exec("web-db", "cat", "/root/mark"); got != "one" {
		t.Errorf("db rebuilt from its backup holds %q, want the backup's \"one\"", got)
	}
	h.must("stack", "rebuild", "web", "db")
	if _, _, code := h.lodge("exec", "web-db", "--", "test", "-e", "/root/mark"); code == 0 {
		t.Error("db rebuilt from its image still has the file written after it was created")
	}
	after := h.show("web-db")
	if after.UUID != before.UUID || after.NICs[0].MAC != before.NICs[0].MAC || after.NICs[0].IP != before.NICs[0].IP || after.Hostname != before.Hostname {
		t.Errorf("rebuilt db: uuid %s mac %s ip %s host %s; before %s %s %s %s", after.UUID, after.NICs[0].MAC, after.NICs[0].IP, after.Hostname,
			before.UUID, before.NICs[0].MAC, before.NICs[0].IP, before.Hostname)
	}
	if got := h.guestIP("web-db", "eth0"); got != before.NICs[0].IP {
		t.Errorf("rebuilt db has %s on back, had %s", got, before.NICs[0].IP)
	}
	if v := h.show("web-app-1"); v.State != api.StateRunning || !v.StartedAt.Equal(*app.StartedAt) {
		t.Errorf("the rebuild disturbed app-1: %s, started %v (was %v)", v.State, v.StartedAt, app.StartedAt)
	}
	if !h.reaches("web-app-1", "db") {
		t.Error("app-1 does not reach the rebuilt db by name")
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"stack", "rebuild", "web", "nosuch"}, `member "nosuch": not found`},
		{[]string{"stack", "rebuild", "nosuch", "db"}, "nosuch"},
		{[]string{"stack", "rebuild", "web", "app-1", "--from-backup"}, "has no backup"},
	} {
		if _, errOut, code := h.lodge(tc.args...); code == 0 || !strings.Contains(errOut, tc.want) {
			t.Errorf("lodge %v: exit %d, %q; want %q", tc.args, code, errOut, tc.want)
		}
	}
	if v := h.show("web-app-1"); v.State != api.StateRunning {
		t.Errorf("a refused rebuild of app-1 left it %s", v.State)
	}

	// An edited file: db moves to another image and onto a second
	// network. The image change needs --recreate, and without it nothing
	// changes.
	h.must("image", "import", h.guest, "--name", "tiny2")
	edited := writeStack(t, "web2.yaml", `name: web
networks:
  back: {}
  front: {}
vms:
  db: {image: tiny2, memory: 256M, networks: [back, front], health: {exec: "true"}}
  app: {image: tiny, memory: 256M, count: 2, networks: [back, nat], depends_on: {db: healthy}}
`)
	h.exec("web-db", "sh", "-c", "echo three >/root/mark && sync")
	before = h.show("web-db")
	if _, errOut, code := h.lodge("stack", "up", edited); code != 1 || !strings.Contains(errOut, `image "tiny" -> "tiny2"`) || !strings.Contains(errOut, "--recreate") {
		t.Errorf("up with a new image for db, without --recreate: exit %d, %q", code, errOut)
	}
	if v := h.show("web-db"); v.Image != "tiny" || !v.StartedAt.Equal(*before.StartedAt) || len(v.NICs) != 1 {
		t.Errorf("a refused up changed db: image %s, started %v (was %v), %d NICs", v.Image, v.StartedAt, before.StartedAt, len(v.NICs))
	}
	h.must("stack", "up", edited, "--recreate")
	after = h.show("web-db")
	switch {
	case after.Image != "tiny2" || after.State != api.StateRunning:
		t.Errorf("recreated db: image %s, %s", after.Image, after.State)
	case after.UUID != before.UUID || after.Hostname != before.Hostname:
		t.Errorf("recreated db: uuid %s host %s; before %s %s", after.UUID, after.Hostname, before.UUID, before.Hostname)
	case len(after.NICs) != 2 || after.NICs[0].MAC != before.NICs[0].MAC || after.NICs[1].Network != "web-front" || after.NICs[1].MAC == before.NICs[0].MAC:
		t.Errorf("recreated db's NICs: %+v; before %+v", after.NICs, before.NICs)
	}
	if _, _, code := h.lodge("exec", "web-db", "--", "test", "-e", "/root/mark"); code == 0 {
		t.Error("db recreated on tiny2 still has the file written on its old disk")
	}
	front := netip.MustParsePrefix(h.network("web-front").Subnet)
	if ip := h.guestIP("web-db", "eth1"); !front.Contains(netip.MustParseAddr(ip)) {
		t.Errorf("db's second NIC has %s, want an address in %s", ip, front)
	}
	if v := h.show("web-app-1"); v.State != api.StateRunning || !v.StartedAt.Equal(*app.StartedAt) {
		t.Errorf("recreating db disturbed app-1: %s, started %v (was %v)", v.State, v.StartedAt, app.StartedAt)
	}
	// Off the second network again: no --recreate needed, and the NIC on
	// back keeps its MAC.
	raw, err := os.ReadFile(edited)
	if err != nil {
		t.Fatal(err)
	}
	back1 := writeStack(t, "web3.yaml", strings.Replace(string(raw), "networks: [back, front]", "networks: [back]", 1))
	h.must("stack", "up", back1)
	if v := h.show("web-db"); len(v.NICs) != 1 || v.NICs[0].MAC != before.NICs[0].MAC || v.State != api.StateRunning {
		t.Errorf("db after leaving front: %+v, %s", v.NICs, v.State)
	}

	h.must("stack", "down", "web", "--delete")
	if _, _, code := h.lodge("net", "show", "web-back"); code == 0 {
		t.Error("down --delete left network web-back")
	}
	if err := exec.Command("ip", "link", "show", "dev", back.Bridge).Run(); err == nil {
		t.Errorf("bridge %s left after down --delete", back.Bridge)
	}
}

// TestStackBackupRestore backs a stack up at one point into a repository
// and brings it back from there into a fresh LODGE_HOME, which has never
// seen its image: members keep their data, identities and names.
func TestStackBackupRestore(t *testing.T) {
	t.Parallel()
	requireNetAdmin(t)
	src := newHost(t)
	src.importGuest()
	file := writeStack(t, "crm.yaml", `name: crm
networks:
  back: {}
vms:
  db: {image: tiny, memory: 256M, networks: [back]}
  app: {image: tiny, memory: 256M, networks: [back], depends_on: {db: agent}}
`)
	src.must("stack", "up", file)
	shared := filepath.Join(t.TempDir(), "shared")
	src.must("backup", "repo", "add", "shared", shared)
	src.exec("crm-db", "sh", "-c", "echo rows >/root/data && sync")
	src.exec("crm-app", "sh", "-c", "echo config >/root/data && sync")
	db := src.show("crm-db")

	if _, errOut, code := src.lodge("stack", "backup", "nosuch"); code == 0 || !strings.Contains(errOut, `stack "nosuch": not found`) {
		t.Errorf("backup of an unknown stack: exit %d, %q", code, errOut)
	}
	var sb api.StackBackup
	mustJSON(t, src.must("stack", "backup", "crm", "--repo", "shared", "-o", "json"), &sb)
	if len(sb.Members) != 2 || sb.Members["crm-db"] == "" || sb.Members["crm-app"] == "" {
		t.Fatalf("stack backup members: %v", sb.Members)
	}
	if _, errOut, code := src.lodge("stack", "restore", "crm", "--repo", "shared"); code == 0 || !strings.Contains(errOut, "already exists") {
		t.Errorf("restore over the stack itself: exit %d, %q", code, errOut)
	}
	src.must("stack", "down", "crm")

	dst := newHost(t)
	dst.must("backup", "repo", "add", "shared", shared)
	var list []api.StackBackup
	mustJSON(t, dst.must("stack", "backups", "crm", "--repo", "shared", "-o", "json"), &list)
	if len(list) != 1 || list[0].ID != sb.ID {
		t.Errorf("the other host lists %+v; want %s", list, sb.ID)
	}
	if _, errOut, code := dst.lodge("stack", "restore", "other", "--repo", "shared"); code == 0 || !strings.Contains(errOut, "no stack backup") {
		t.Errorf("restore of a stack with no backup: exit %d, %q", code, errOut)
	}
	var st api.StackStatus
	mustJSON(t, dst.must("stack", "restore", "crm", "--repo", "shared", "-o", "json"), &st)
	for _, m := range st.Members {
		if m.State != api.StateRunning {
			t.Errorf("restored member %s: %s", m.Name, m.State)
		}
	}
	if got := dst.exec("crm-db", "cat", "/root/data"); got != "rows" {
		t.Errorf("restored db holds %q", got)
	}
	if got := dst.exec("crm-app", "cat", "/root/data"); got != "config" {
		t.Errorf("restored app holds %q", got)
	}
	if v := dst.show("crm-db"); v.UUID != db.UUID || v.NICs[0].MAC != db.NICs[0].MAC || v.NICs[0].Network != "crm-back" || v.Stack != "crm" {
		t.Errorf("restored db: uuid %s mac %s on %s, stack %q; want %s %s on crm-back, crm", v.UUID, v.NICs[0].MAC, v.NICs[0].Network, v.Stack, db.UUID, db.NICs[0].MAC)
	}
	dst.guestIP("crm-app", "eth0")
	if !dst.reaches("crm-app", "db") {
		t.Error("the restored app does not reach db by name")
	}
	// Up again changes nothing: the restored members count as the file's.
	mustJSON(t, dst.must("stack", "up", file, "-o", "json"), &st)
	if v := dst.show("crm-db"); v.UUID != db.UUID {
		t.Errorf("up after the restore replaced db")
	}
}
