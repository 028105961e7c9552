package stack

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// lines keeps the test inputs readable: one argument per line of YAML.
func lines(ls ...string) string { return strings.Join(ls, "\n") + "\n" }

func mustParse(t *testing.T, src string) *File {
	t.Helper()
	f, err := Parse("s.yaml", []byte(src))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return f
}

func TestParseShop(t *testing.T) {
	data, err := os.ReadFile("testdata/shop.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f, err := Parse("testdata/shop.yaml", data)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if got, want := f.Name, "shop"; got != want {
		t.Fatalf("name: got %v, want %v", got, want)
	}
	if got, want := f.Timeout, 10*time.Minute; got != want {
		t.Fatalf("timeout: got %v, want %v", got, want)
	}
	if got, want := len(f.Networks), 1; got != want {
		t.Fatalf("networks: got %v, want %v", got, want)
	}
	if got, want := f.Networks[0], (Network{Name: "back", Subnet: "10.77.0.0/24", NAT: true}); got != want {
		t.Fatalf("network: got %v, want %v", got, want)
	}
	var names []string
	for _, m := range f.VMs {
		names = append(names, m.Name)
	}
	if got, want := strings.Join(names, " "), "dc db seed app"; got != want {
		t.Fatalf("members: got %v, want %v", got, want)
	}
	dc, db, seed, app := f.VMs[0], f.VMs[1], f.VMs[2], f.VMs[3]
	tests := []struct {
		what      string
		got, want any
	}{
		{"dc memory", dc.Memory, int64(1 << 30)},
		{"dc cpus", dc.CPUs, 1},
		{"dc count", dc.Count, 1},
		{"dc timeout", dc.Timeout, DefaultTimeout},
		{"dc health", dc.Health == nil, true},
		{"db memory", db.Memory, int64(512 << 20)},
		{"db disk", db.Disk, int64(8 << 30)},
		{"db depends_on", db.DependsOn["dc"], CondAgent},
		{"db tcp", db.Health.TCP, 1433},
		{"db interval", db.Health.Interval, DefaultHealthInterval},
		{"db health timeout", db.Health.Timeout, DefaultHealthTimeout},
		{"db retries", db.Health.Retries, DefaultHealthRetries},
		{"db start period", db.Health.StartPeriod, DefaultStartPeriod},
		{"seed oneshot", seed.Oneshot, true},
		{"seed memory", seed.Memory, int64(0)},
		{"app count", app.Count, 2},
		{"app networks", strings.Join(app.Networks, " "), "back nat"},
		{"app depends_on db", app.DependsOn["db"], CondHealthy},
		{"app depends_on seed", app.DependsOn["seed"], CondCompleted},
		{"app exec", app.Health.Exec, "systemctl is-active crm"},
		{"app interval", app.Health.Interval, 2 * time.Second},
		{"app health timeout", app.Health.Timeout, 120 * time.Second},
		{"app retries", app.Health.Retries, 3},
		{"app start period", app.Health.StartPeriod, time.Duration(0)},
		{"app cloud_init", app.CloudInit, "#cloud-config\nhostname: app\n"},
	}
	for _, tt := range tests {
		if got, want := tt.got, tt.want; got != want {
			t.Fatalf("%s: got %v, want %v", tt.what, got, want)
		}
	}
}

// designExample is the stack file of DESIGN.md with the test guest's
// image in place of images that only exist on a Windows shop's host.
const designExample = `name: shop
networks:
  back: {subnet: 10.77.0.0/24}
vms:
  dc:  {image: tiny, memory: 1G, networks: [back]}
  db:  {image: tiny, memory: 2G, networks: [back], depends_on: {dc: healthy},
        health: {tcp: 1433}}
  app: {image: tiny, memory: 1G, count: 2, networks: [back], depends_on: {db: healthy},
        health: {exec: "systemctl is-active crm"}}
`

func TestParseDesignExample(t *testing.T) {
	_, err := Parse("shop.yaml", []byte(designExample))
	got, want := fmt.Sprint(err), `shop.yaml:6:65: vm "db": depends_on "dc": healthy, but vm "dc" has no health check (add health: {exec: ...} or {tcp: ...})`
	if got != want {
		t.Fatalf("DESIGN example as written: got %v, want %v", got, want)
	}
	fixed := strings.Replace(designExample, "{dc: healthy}", "{dc: agent}", 1)
	f := mustParse(t, fixed)
	if got, want := planString(f), "shop-dc | shop-db<shop-dc:agent | shop-app-1<shop-db:healthy shop-app-2<shop-db:healthy"; got != want {
		t.Fatalf("plan: got %v, want %v", got, want)
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want string
	}{
		{"bad YAML: unclosed flow mapping", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny",
		), `s.yaml:3: bad YAML: did not find expected ',' or '}'`},
		{"bad YAML: indentation", lines(
			"name: shop",
			"vms:",
			"  db:",
			"    image: tiny",
			"   memory: 1G",
		), `s.yaml:5: bad YAML: did not find expected key`},
		{"bad YAML: tab", lines(
			"name: shop",
			"vms:",
			"\tdb: {image: tiny}",
		), `s.yaml:3: bad YAML: found character that cannot start any token`},
		{"empty file", "# nothing yet\n", `s.yaml:1: the file is empty: want at least name and vms`},
		{"second document", lines(
			"name: shop",
			"vms: {db: {image: tiny}}",
			"---",
			"name: other",
		), `s.yaml:4:1: a second YAML document: a stack file holds one`},
		{"not a mapping", "- name: shop\n", `s.yaml:1:1: the stack file: want a mapping with name, vms and optionally networks and timeout`},
		{"unknown top-level field", lines(
			"name: shop",
			"vm: {db: {image: tiny}}",
		), `s.yaml:2:1: unknown field "vm" (did you mean "vms"?)`},
		{"unknown member field", lines(
			"name: shop",
			"vms:",
			"  dc: {image: tiny}",
			"  db: {image: tiny, dependson: {dc: started}}",
		), `s.yaml:4:21: vm "db": unknown field "dependson" (did you mean "depends_on"?)`},
		{"unknown field, nothing close", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, health: {port: 1433}}",
		), `s.yaml:3:30: vm "db": health: unknown field "port" (want exec, tcp, interval, timeout, retries or start_period)`},
		{"field twice", lines(
			"name: shop",
			"vms:",
			"  db:",
			"    image: tiny",
			"    memory: 1G",
			"    memory: 2G",
		), `s.yaml:6:5: vm "db": "memory" is given twice (first at line 5)`},
		{"missing name", lines(
			"vms:",
			"  db: {image: tiny}",
		), `s.yaml:1:1: name is required: the stack's name, which prefixes its VMs' names`},
		{"missing vms", lines(
			"name: shop",
		), `s.yaml:1:1: vms is required: a stack has at least one vm`},
		{"no vms", lines(
			"name: shop",
			"vms: {}",
		), `s.yaml:2:1: vms: the stack has no vms`},
		{"missing image", lines(
			"name: shop",
			"vms:",
			"  db: {memory: 1G}",
		), `s.yaml:3:3: vm "db": image is required`},
		{"bad stack name", lines(
			"name: Shop",
			"vms: {db: {image: tiny}}",
		), `s.yaml:1:7: name "Shop": ` + badName},
		{"bad member name", lines(
			"name: shop",
			"vms:",
			"  db_1: {image: tiny}",
		), `s.yaml:3:3: vm "db_1": ` + badName},
		{"name ending with a dash", lines(
			"name: shop",
			"vms:",
			"  db-: {image: tiny}",
		), `s.yaml:3:3: vm "db-": ` + badName},
		{"name too long once expanded", lines(
			"name: "+strings.Repeat("s", 50),
			"vms:",
			"  application: {image: tiny, count: 2}",
		), `s.yaml:3:3: vm "application": its VM name "` + strings.Repeat("s", 50) + `-application-1" is longer than 63 characters; shorten the stack's or the vm's name`},
		{"two members, one VM name", lines(
			"name: shop",
			"vms:",
			"  app-1: {image: tiny}",
			"  app: {image: tiny, count: 2}",
		), `s.yaml:4:3: vm "app": its VM name "shop-app-1" is also vm "app-1"'s`},
		{"unknown network", lines(
			"name: shop",
			"networks: {back: {}}",
			"vms:",
			"  db: {image: tiny, networks: [back, front]}",
		), `s.yaml:4:38: vm "db": networks: "front": no such network (declare it under networks:, or use the built-in nat)`},
		{"declaring the built-in network", lines(
			"name: shop",
			"networks:",
			"  nat: {subnet: 10.0.0.0/24}",
			"vms: {db: {image: tiny}}",
		), `s.yaml:3:3: network "nat": the name is the built-in network's; use it without declaring it`},
		{"subnet with host bits", lines(
			"name: shop",
			"networks:",
			"  back: {subnet: 10.77.0.1/24}",
			"vms: {db: {image: tiny}}",
		), `s.yaml:3:18: network "back": subnet "10.77.0.1/24": host bits are set (did you mean 10.77.0.0/24?)`},
		{"IPv6 subnet", lines(
			"name: shop",
			"networks:",
			"  back: {subnet: 'fd00::/64'}",
			"vms: {db: {image: tiny}}",
		), `s.yaml:3:18: network "back": subnet "fd00::/64": want an IPv4 CIDR (e.g. 10.77.0.0/24)`},
		{"networks not a list", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, networks: nat}",
		), `s.yaml:3:31: vm "db": networks: want a list of network names, e.g. [back]`},
		{"image not a string", lines(
			"name: shop",
			"vms:",
			"  db: {image: [tiny]}",
		), `s.yaml:3:15: vm "db": image: want a string`},
		{"not a boolean", lines(
			"name: shop",
			"networks:",
			"  back: {nat: yes}",
			"vms: {db: {image: tiny}}",
		), `s.yaml:3:15: network "back": nat "yes": want true or false`},
		{"depends_on an unknown vm", lines(
			"name: shop",
			"vms:",
			"  dc: {image: tiny}",
			"  db:",
			"    image: tiny",
			"    depends_on:",
			"      dcc: agent",
		), `s.yaml:7:7: vm "db": depends_on "dcc": no such vm`},
		{"depends_on itself", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, depends_on: {db: started}}",
		), `s.yaml:3:34: vm "db": depends_on "db": a vm cannot depend on itself`},
		{"depends_on as a list", lines(
			"name: shop",
			"vms:",
			"  dc: {image: tiny}",
			"  db: {image: tiny, depends_on: [dc]}",
		), `s.yaml:4:33: vm "db": depends_on: want a mapping of vm: condition, e.g. {db: healthy}`},
		{"unknown condition", lines(
			"name: shop",
			"vms:",
			"  dc: {image: tiny}",
			"  db: {image: tiny, depends_on: {dc: ready}}",
		), `s.yaml:4:38: vm "db": depends_on "dc": unknown condition "ready" (want started, agent, healthy or completed)`},
		{"healthy without a health check", lines(
			"name: shop",
			"vms:",
			"  dc: {image: tiny}",
			"  db: {image: tiny, depends_on: {dc: healthy}}",
		), `s.yaml:4:34: vm "db": depends_on "dc": healthy, but vm "dc" has no health check (add health: {exec: ...} or {tcp: ...})`},
		{"completed on a VM that is not oneshot", lines(
			"name: shop",
			"vms:",
			"  seed: {image: tiny}",
			"  db: {image: tiny, depends_on: {seed: completed}}",
		), `s.yaml:4:34: vm "db": depends_on "seed": completed, but vm "seed" is not oneshot (add oneshot: true if it powers itself off when done)`},
		{"cycle", lines(
			"name: shop",
			"vms:",
			"  a:",
			"    image: tiny",
			"    depends_on: {b: started}",
			"  b: {image: tiny, depends_on: {c: started}}",
			"  c: {image: tiny, depends_on: {a: agent}}",
		), `s.yaml:5:5: vm "a": dependency cycle a -> b -> c -> a`},
		{"cycle reported at its first member, shortest way round", lines(
			"name: shop",
			"vms:",
			"  x: {image: tiny, depends_on: {c: started}}",
			"  c: {image: tiny, depends_on: {a: started}}",
			"  a: {image: tiny, depends_on: {b: started}}",
			"  b: {image: tiny, depends_on: {c: started, a: started}}",
		), `s.yaml:4:20: vm "c": dependency cycle c -> a -> b -> c`},
		{"count 0", lines(
			"name: shop",
			"vms:",
			"  app: {image: tiny, count: 0}",
		), `s.yaml:3:29: vm "app": count 0: must be at least 1`},
		{"count not a number", lines(
			"name: shop",
			"vms:",
			"  app: {image: tiny, count: two}",
		), `s.yaml:3:29: vm "app": count "two": not a whole number`},
		{"count too large", lines(
			"name: shop",
			"vms:",
			"  app: {image: tiny, count: 5000}",
		), `s.yaml:3:29: vm "app": count 5000: at most 1000`},
		{"too many VMs in all", lines(
			"name: shop",
			"vms:",
			"  a: {image: tiny, count: 600}",
			"  b: {image: tiny, count: 600}",
		), `s.yaml:2:1: vms: the stack expands to 1200 VMs, more than 1000`},
		{"cpus 0", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, cpus: 0}",
		), `s.yaml:3:27: vm "db": cpus 0: must be at least 1`},
		{"bad size", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, memory: 1X}",
		), `s.yaml:3:29: vm "db": memory "1X": not a size: unknown unit "x"`},
		{"zero size", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, disk: 0}",
		), `s.yaml:3:27: vm "db": disk "0": must be more than 0`},
		{"disks not a list", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, disks: 5G}",
		), `s.yaml:3:28: vm "db": disks: want a list of sizes, e.g. [10G]`},
		{"data disk too small", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, disks: [1G, 100K]}",
		), `s.yaml:3:33: vm "db": disks 100K: want at least 1M, in whole 512-byte sectors`},
		{"max_memory below memory", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, memory: 2G, max_memory: 1G}",
		), `s.yaml:3:45: vm "db": max_memory 1G is below memory 2G`},
		{"bad duration", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, timeout: 5}",
		), `s.yaml:3:30: vm "db": timeout "5": not a duration (use e.g. 30s, 5m or 1h30m)`},
		{"bad stack timeout", lines(
			"name: shop",
			"vms: {db: {image: tiny}}",
			"timeout: -1m",
		), `s.yaml:3:10: timeout "-1m": must be more than 0`},
		{"negative start period", lines(
			"name: shop",
			"vms: {db: {image: tiny, health: {exec: true, start_period: -5s}}}",
		), `s.yaml:2:60: vm "db": health: start_period "-5s": must not be negative`},
		{"health with both probes", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, health: {tcp: 1433, exec: true}}",
		), `s.yaml:3:21: vm "db": health: give exactly one of exec and tcp`},
		{"health with no probe", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, health: {interval: 5s}}",
		), `s.yaml:3:21: vm "db": health: give exactly one of exec and tcp`},
		{"port out of range", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, health: {tcp: 70000}}",
		), `s.yaml:3:35: vm "db": health: tcp 70000: want a port from 1 to 65535`},
		{"a typo is reported before what it causes", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, depends_on: {app: healthy}}",
			"  app:",
			"    image: tiny",
			"    helth: {tcp: 80}",
		), `s.yaml:6:5: vm "app": unknown field "helth" (did you mean "health"?)`},
		{"within a stage, the first in the file", lines(
			"name: shop",
			"vms:",
			"  db: {image: tiny, memory: lots}",
			"  app: {image: tiny, cpus: many}",
		), `s.yaml:3:29: vm "db": memory "lots": not a size (use a number with an optional K, M, G or T suffix, e.g. 512M)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("s.yaml", []byte(tt.in))
			if got, want := fmt.Sprint(err), tt.want; got != want {
				t.Fatalf("error: got %v, want %v", got, want)
			}
			if got, want := errors.Is(err, errdefs.ErrInvalid), true; got != want {
				t.Fatalf("errors.Is(err, ErrInvalid): got %v, want %v", got, want)
			}
			if got, want := strings.Contains(err.Error(), "\n"), false; got != want {
				t.Fatalf("error has several lines: got %v, want %v", got, want)
			}
		})
	}
}

func TestParseAliasesAndMerge(t *testing.T) {
	f := mustParse(t, lines(
		"name: shop",
		"vms:",
		"  dc: &base {image: tiny, memory: 1G, networks: [nat]}",
		"  db: {<<: *base, memory: 2G}",
	))
	db := f.VMs[1]
	if got, want := db.Image, "tiny"; got != want {
		t.Fatalf("merged image: got %v, want %v", got, want)
	}
	if got, want := db.Memory, int64(2<<30); got != want {
		t.Fatalf("memory written beside the merge: got %v, want %v", got, want)
	}
	if got, want := strings.Join(db.Networks, " "), "nat"; got != want {
		t.Fatalf("merged networks: got %v, want %v", got, want)
	}
}

// TestParseAliasBomb: each member merges the one before ten times, so
// walking x11 would follow ten billion aliases without a budget.
func TestParseAliasBomb(t *testing.T) {
	src := "name: shop\nvms:\n  x0: &x0 {image: tiny}\n"
	for i := 1; i <= 11; i++ {
		prev := fmt.Sprintf("*x%d", i-1)
		src += fmt.Sprintf("  x%d: &x%d {<<: [%s]}\n", i, i, strings.Repeat(prev+", ", 9)+prev)
	}
	_, err := Parse("s.yaml", []byte(src))
	// Where the budget runs out depends on the walk, so only the message
	// is checked.
	if got, want := strings.HasSuffix(fmt.Sprint(err), ": too many YAML aliases (at most 1000)"), true; got != want {
		t.Fatalf("alias bomb refused (%v): got %v, want %v", err, got, want)
	}
}

func TestParseDataDisks(t *testing.T) {
	f := mustParse(t, lines(
		"name: s",
		"vms:",
		"  db: {image: tiny, disks: [1G, 512M]}",
		"  app: {image: tiny}",
	))
	if got, want := f.VMs[0].Disks, []int64{1 << 30, 512 << 20}; !slices.Equal(got, want) {
		t.Fatalf("db disks: got %v, want %v", got, want)
	}
	if got := f.VMs[1].Disks; len(got) != 0 {
		t.Fatalf("app disks: got %v, want none", got)
	}
}

func TestParseDefaults(t *testing.T) {
	f := mustParse(t, lines(
		"name: s",
		"vms:",
		"  a:",
		"    image: tiny",
		"    health: {exec: 'true'}",
	))
	a := f.VMs[0]
	if got, want := a.Count, 1; got != want {
		t.Fatalf("count: got %v, want %v", got, want)
	}
	if got, want := a.Timeout, 5*time.Minute; got != want {
		t.Fatalf("timeout: got %v, want %v", got, want)
	}
	if got, want := *a.Health, (Health{Exec: "true", Interval: 2 * time.Second, Timeout: 10 * time.Second, Retries: 3, StartPeriod: 30 * time.Second}); got != want {
		t.Fatalf("health: got %v, want %v", got, want)
	}
	if got, want := f.Timeout, time.Duration(0); got != want {
		t.Fatalf("stack timeout: got %v, want %v", got, want)
	}
}

func TestInstances(t *testing.T) {
	f := mustParse(t, lines(
		"name: shop",
		"vms:",
		"  db: {image: tiny}",
		"  app: {image: tiny, count: 3}",
		"  one: {image: tiny, count: 1}",
	))
	var got []string
	for _, in := range f.Instances() {
		got = append(got, in.Name+"/"+in.Member+"/"+strconv.Itoa(in.Index)+"/"+in.Spec.Name)
	}
	want := "shop-db/db/0/db shop-app-1/app/1/app shop-app-2/app/2/app shop-app-3/app/3/app shop-one/one/0/one"
	if got := strings.Join(got, " "); got != want {
		t.Fatalf("instances: got %v, want %v", got, want)
	}
}

func TestValidate(t *testing.T) {
	src := lines(
		"name: shop",
		"vms:",
		"  dc: {image: tiny, memory: 1G}",
		"  db: {image: sql, memory: 2G}",
		"  app: {image: crm, count: 2}",
	)
	known := func(names ...string) func(string) bool {
		return func(s string) bool { return strings.Contains(" "+strings.Join(names, " ")+" ", " "+s+" ") }
	}
	tests := []struct {
		name string
		env  Env
		want string
		kind error
	}{
		{"nothing to check", Env{}, "", nil},
		{"all images known, no limit", Env{ImageExists: known("tiny", "sql", "crm")}, "", nil},
		{"unknown images: the first", Env{ImageExists: known("tiny")}, `s.yaml:4:15: vm "db": image "sql": no such image`, errdefs.ErrNotFound},
		{"under the limit", Env{MemoryLimit: 3 << 30}, "", nil},
		{"over the limit with defaults", Env{MemoryLimit: 3 << 30, DefaultMemory: func(string) int64 { return 512 << 20 }},
			`s.yaml:2:1: vms: the stack's 4 VMs need 4G of memory, over the limit of 3G`, errdefs.ErrLimit},
		{"over the limit with overhead", Env{MemoryLimit: 3 << 30, VMOverhead: 100 << 20},
			`s.yaml:2:1: vms: the stack's 4 VMs need 3.4G of memory, over the limit of 3G`, errdefs.ErrLimit},
		{"images before memory", Env{ImageExists: known("tiny", "sql"), MemoryLimit: 1},
			`s.yaml:5:16: vm "app": image "crm": no such image`, errdefs.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := mustParse(t, src)
			err := f.Validate(tt.env)
			got := ""
			if err != nil {
				got = err.Error()
			}
			if want := tt.want; got != want {
				t.Fatalf("Validate: got %v, want %v", got, want)
			}
			if got, want := tt.kind == nil || errors.Is(err, tt.kind), true; got != want {
				t.Fatalf("errors.Is(%v, %v): got %v, want %v", err, tt.kind, got, want)
			}
		})
	}
}

func TestValidateWithoutPositions(t *testing.T) {
	f := &File{Name: "shop", Path: "built", VMs: []Member{{Name: "db", Image: "sql"}}}
	err := f.Validate(Env{ImageExists: func(string) bool { return false }})
	if got, want := err.Error(), `built: vm "db": image "sql": no such image`; got != want {
		t.Fatalf("error: got %v, want %v", got, want)
	}
}
