package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// writeStack writes a stack file and returns its path.
func writeStack(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestStack brings up a three-member chain: db waits for dc's agent, app
// for db's health check, which passes only once db has been up for 8
// seconds. The start times show the order held; a second up changes
// nothing; a failing health check stops a rollout with the reason; down
// stops dependents first and --delete removes the members.
func TestStack(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.importGuest()
	file := writeStack(t, "shop.yaml", `name: shop
vms:
  dc: {image: tiny, memory: 256M}
  db:
    image: tiny
    memory: 256M
    depends_on: {dc: agent}
    health: {exec: "test $(cut -d. -f1 /proc/uptime) -ge 8", interval: 1s}
    disks: [16M]
  app: {image: tiny, memory: 256M, depends_on: {db: healthy}}
`)
	// The events stream tells the order too, as a watching user sees it.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	seen := map[string]time.Time{}
	go func() {
		_ = h.c.Events(ctx, func(ev api.Event) {
			if strings.HasPrefix(ev.Kind, "stack-member-") {
				mu.Lock()
				seen[ev.Kind+" "+ev.Target] = ev.Time
				mu.Unlock()
			}
		})
	}()
	time.Sleep(200 * time.Millisecond) // the stream is up before the first event
	var st api.StackStatus
	mustJSON(t, h.must("stack", "up", file, "-o", "json"), &st)
	mu.Lock()
	dbHealthy, appStarting, dcStarting, dbStarting := seen["stack-member-ready shop-db"], seen["stack-member-starting shop-app"], seen["stack-member-starting shop-dc"], seen["stack-member-starting shop-db"]
	mu.Unlock()
	if dbHealthy.IsZero() || appStarting.IsZero() || appStarting.Before(dbHealthy) {
		t.Errorf("events: shop-db ready at %v, shop-app starting at %v: app must start after db is healthy", dbHealthy, appStarting)
	}
	if dcStarting.IsZero() || dbStarting.IsZero() || !dbStarting.After(dcStarting.Add(2*time.Second)) {
		t.Errorf("events: shop-dc starting at %v, shop-db at %v: db must wait for dc's agent", dcStarting, dbStarting)
	}
	byName := map[string]api.StackMember{}
	for _, m := range st.Members {
		byName[m.Name] = m
	}
	dc, db, app := byName["dc"], byName["db"], byName["app"]
	for _, m := range []api.StackMember{dc, db, app} {
		if m.State != api.StateRunning || m.StartedAt == nil || m.ReadyAt == nil {
			t.Fatalf("after up: %+v", st.Members)
		}
	}
	if dc.VM != "shop-dc" || h.show("shop-db").Stack != "shop" {
		t.Errorf("member names: %q, stack label %q", dc.VM, h.show("shop-db").Stack)
	}
	// db starts only once dc's agent answers (which takes the guest's
	// boot); app only once db's check passed (8 s after db's boot).
	if !db.StartedAt.After(dc.StartedAt.Add(2 * time.Second)) {
		t.Errorf("db started at %s, dc at %s: db did not wait for dc's agent", db.StartedAt, dc.StartedAt)
	}
	if app.StartedAt.Before(*db.ReadyAt) || db.ReadyAt.Before(db.StartedAt.Add(7*time.Second)) {
		t.Errorf("db started %s, healthy %s; app started %s: app did not wait for db's health", db.StartedAt, db.ReadyAt, app.StartedAt)
	}
	if db.Health != "healthy" {
		t.Errorf("db health: %q", db.Health)
	}
	if got := h.exec("shop-db", "cat", "/sys/block/vdb/size"); got != "32768" {
		t.Errorf("shop-db's data disk has %q sectors, want 32768 (16 MiB)", got)
	}

	// Idempotent: nothing is restarted.
	var again api.StackStatus
	mustJSON(t, h.must("stack", "up", file, "-o", "json"), &again)
	for i, m := range again.Members {
		if m.StartedAt == nil || !m.StartedAt.Equal(*st.Members[i].StartedAt) {
			t.Errorf("second up restarted %s: %v then %v", m.Name, st.Members[i].StartedAt, m.StartedAt)
		}
	}

	// A health check that never passes stops the rollout, naming it;
	// what came before is left running.
	bad := writeStack(t, "bad.yaml", `name: sick
vms:
  base: {image: tiny, memory: 256M, health: {exec: "exit 3", interval: 1s, retries: 2, start_period: 0s}, timeout: 10m}
  top: {image: tiny, memory: 256M, depends_on: {base: healthy}}
`)
	began := time.Now()
	_, errOut, code := h.lodge("stack", "up", bad)
	if code != 1 || !strings.Contains(errOut, `"sick-base" never became healthy: unhealthy: 2 checks failed in a row`) || !strings.Contains(errOut, "exit code 3") {
		t.Errorf("up with a failing health check: exit %d, %q", code, errOut)
	}
	// The retries end the wait, long before the member's timeout.
	if took := time.Since(began); took > 5*time.Minute {
		t.Errorf("the failing check took %s to stop the rollout", took)
	}
	if v := h.show("sick-base"); v.State != api.StateRunning {
		t.Errorf("the member before the failure: %s", v.State)
	}
	if v := h.show("sick-top"); v.State != api.StateStopped {
		t.Errorf("the member after the failure was started: %s", v.State)
	}

	// Bad files are refused before anything happens, with their line.
	for _, tc := range []struct{ body, want string }{
		{"name: c\nvms:\n  a: {image: tiny, depends_on: {b: started}}\n  b: {image: tiny, depends_on: {a: started}}\n", "cycle"},
		{"name: u\nvms:\n  a: {image: nosuch}\n", "nosuch"},
		{"name: y\nvms:\n  a: {image: tiny\n  b: [\n", ":"},
		{"name: n\nvms:\n  a: {image: tiny, networks: [back]}\n", "no such network"},
	} {
		p := writeStack(t, "x.yaml", tc.body)
		_, errOut, code := h.lodge("stack", "up", p)
		if code != 1 || !strings.Contains(errOut, tc.want) || !strings.Contains(errOut, "x.yaml") || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("up %q: exit %d, %q; want one line naming the file and %q", tc.body, code, errOut, tc.want)
		}
	}

	// An edited member is changed in place, not recreated: a running VM
	// is refused what it booted without room for, with the reason; a
	// stopped one takes it.
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	// Disks only grow: a file that shrinks db's data disk is refused in
	// one line, and nothing is touched.
	shrunk := writeStack(t, "shop3.yaml", strings.Replace(string(raw), "disks: [16M]", "disks: [8M]", 1))
	if _, errOut, code := h.lodge("stack", "up", shrunk); code != 1 || !strings.Contains(errOut, `vm "shop-db": data disks [16M] -> [8M]: data1 would shrink`) || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
		t.Errorf("up with a smaller data disk for db: exit %d, %q", code, errOut)
	}
	if v := h.show("shop-db"); len(v.Disks) != 2 || v.Disks[1].Size != 16<<20 || v.State != api.StateRunning {
		t.Errorf("db after a refused up: %d disks, %s", len(v.Disks), v.State)
	}
	// A grown disk and a new one are applied to the running member, which
	// sees both at once and is not restarted.
	grown := strings.Replace(string(raw), "disks: [16M]", "disks: [24M, 16M]", 1)
	before := h.show("shop-db")
	h.must("stack", "up", writeStack(t, "shop4.yaml", grown))
	after := h.show("shop-db")
	if len(after.Disks) != 3 || after.Disks[1].Size != 24<<20 || after.Disks[2].Size != 16<<20 || after.StartedAt == nil || !after.StartedAt.Equal(*before.StartedAt) {
		t.Errorf("db after up with disks [24M, 16M]: %+v, started %v (was %v)", after.Disks, after.StartedAt, before.StartedAt)
	}
	for dev, want := range map[string]string{"vdb": "49152", "vdc": "32768"} {
		eventually(t, 20*time.Second, "shop-db sees "+dev+" at "+want+" sectors", func() bool {
			out, _, _ := h.lodge("exec", "shop-db", "--", "cat", "/sys/block/"+dev+"/size")
			return strings.TrimSpace(out) == want
		})
	}
	raw = []byte(grown)
	edited := writeStack(t, "shop2.yaml", strings.Replace(string(raw), "    memory: 256M\n    depends_on", "    memory: 320M\n    depends_on", 1))
	uuid := h.show("shop-db").UUID
	if _, errOut, code := h.lodge("stack", "up", edited); code == 0 || !strings.Contains(errOut, `to vm "shop-db"`) || !strings.Contains(errOut, "while the VM is stopped") {
		t.Errorf("up with more memory for running db: exit %d, %q", code, errOut)
	}

	h.must("stack", "down", "shop")
	for _, vm := range []string{"shop-app", "shop-db", "shop-dc"} {
		if v := h.show(vm); v.State != api.StateStopped {
			t.Errorf("%s after down: %s", vm, v.State)
		}
	}
	h.must("stack", "up", edited)
	if v := h.show("shop-db"); v.Memory != 320<<20 || v.UUID != uuid || v.State != api.StateRunning {
		t.Errorf("db after up with 320M while stopped: memory %d, uuid %s (was %s), %s", v.Memory, v.UUID, uuid, v.State)
	}
	h.must("stack", "down", "shop", "--delete")
	if _, _, code := h.lodge("show", "shop-db"); code == 0 {
		t.Error("down --delete left shop-db")
	}
	if _, _, code := h.lodge("stack", "status", "shop"); code != 1 {
		t.Error("down --delete left the stack")
	}
}
