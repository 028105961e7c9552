package integration

import (
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/api"
)

// TestProjectQuotas: a project's limits hold for create, clone, set and
// moves between projects, for a running VM's memory as for a stopped
// one's; refusals give the numbers and change nothing; the limits survive
// a daemon crash.
func TestProjectQuotas(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.importGuest()
	var p api.Project
	mustJSON(t, h.must("project", "create", "team", "memory=640M", "cpus=4", "vms=3", "disk=20G", "-o", "json"), &p)
	if p.Limits != (api.ProjectLimits{Memory: 640 << 20, CPUs: 4, VMs: 3, Disk: 20 << 30}) {
		t.Fatalf("created limits %+v", p.Limits)
	}
	h.must("create", "web", "--image", "tiny", "--memory", "256M", "--max-memory", "512M", "--project", "team", "--start")
	h.must("create", "db", "--image", "tiny", "--memory", "256M", "--cpus", "2", "--project", "team")
	h.waitAgent("web")

	refusals := []struct {
		args []string
		want string
	}{
		{[]string{"create", "app", "--image", "tiny", "--memory", "512M", "--project", "team"}, `project "team": over the project quota: memory quota 640M, used 512M, requested 512M more`},
		{[]string{"create", "app", "--image", "tiny", "--memory", "128M", "--disk", "8G", "--project", "team"}, "disk quota 20G, used 16G, requested 8G more"},
		{[]string{"create", "app", "--image", "tiny", "--memory", "64M", "--cpus", "2", "--disk", "1G", "--project", "team"}, "cpus quota 4, used 3, requested 2 more"},
		{[]string{"clone", "db", "db2"}, "memory quota 640M, used 512M, requested 256M more"},
		{[]string{"set", "db", "max_memory=512M", "memory=512M"}, "memory quota 640M, used 512M, requested 256M more"},
		// Growing a running guest is held to the quota as well.
		{[]string{"set", "web", "memory=512M"}, "memory quota 640M, used 512M, requested 256M more"},
	}
	for _, c := range refusals {
		_, errOut, code := h.lodge(c.args...)
		if code != 1 || !strings.Contains(errOut, c.want) || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("lodge %v: exit %d, %q; want one line with %q", c.args, code, errOut, c.want)
		}
	}
	if v := h.show("web"); v.Memory != 256<<20 || v.MemoryActual > 260<<20 || v.Project != "team" {
		t.Errorf("refused growth left web at memory %d, actual %d, project %q", v.Memory, v.MemoryActual, v.Project)
	}
	var vms []api.VM
	mustJSON(t, h.must("list", "-o", "json"), &vms)
	if len(vms) != 2 {
		t.Errorf("refusals left %d VMs, want 2", len(vms))
	}

	// Moving db out makes room for web to grow while it runs.
	h.must("set", "db", "project=default")
	h.must("set", "web", "memory=512M")
	if got := h.show("web").MemoryActual; got < 508<<20 {
		t.Errorf("web has %d after growing into the room", got)
	}
	mustJSON(t, h.must("project", "show", "team", "-o", "json"), &p)
	if p.Usage != (api.ProjectLimits{Memory: 512 << 20, CPUs: 1, VMs: 1, Disk: 8 << 30}) {
		t.Errorf("team usage %+v", p.Usage)
	}

	bad := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"project", "create", "team"}, 1, "already exists"},
		{[]string{"project", "create", "no/slash"}, 1, "use letters, digits"},
		{[]string{"project", "set", "team", "memory=1M"}, 1, "at least 64M"},
		{[]string{"project", "set", "team", "memory=lots"}, 2, "not a size"},
		{[]string{"project", "set", "team", "colour=red"}, 2, "unknown setting"},
		{[]string{"project", "delete", "team"}, 1, "in use by vm [web]"},
		{[]string{"project", "delete", "default"}, 1, "cannot be removed"},
		{[]string{"create", "x", "--image", "tiny", "--project", "nope"}, 1, `project "nope": not found`},
		{[]string{"set", "db", "project=nope"}, 1, `project "nope": not found`},
	}
	for _, c := range bad {
		_, errOut, code := h.lodge(c.args...)
		if code != c.code || !strings.Contains(errOut, c.want) {
			t.Errorf("lodge %v: exit %d, %q; want exit %d with %q", c.args, code, errOut, c.code, c.want)
		}
	}

	h.killDaemon()
	h.startDaemon()
	mustJSON(t, h.must("project", "show", "team", "-o", "json"), &p)
	if p.Limits.Memory != 640<<20 || p.Limits.CPUs != 4 {
		t.Fatalf("limits after a daemon crash: %+v", p.Limits)
	}
	h.must("stop", "web", "--force")
	h.must("set", "web", "project=default")
	h.must("project", "delete", "team")
	if _, errOut, code := h.lodge("project", "show", "team"); code != 1 || !strings.Contains(errOut, "not found") {
		t.Fatalf("show after delete: exit %d, %q", code, errOut)
	}
}
