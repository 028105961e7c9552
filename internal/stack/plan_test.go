package stack

import (
	"strings"
	"testing"
)

// planString writes a plan as waves separated by " | ", each step as
// NAME<WAIT:COND,WAIT:COND.
func planString(f *File) string {
	var waves []string
	for _, w := range f.Plan() {
		var steps []string
		for _, s := range w {
			var ws []string
			for _, x := range s.Waits {
				ws = append(ws, x.Instance+":"+x.Condition)
			}
			st := s.Instance.Name
			if len(ws) > 0 {
				st += "<" + strings.Join(ws, ",")
			}
			steps = append(steps, st)
		}
		waves = append(waves, strings.Join(steps, " "))
	}
	return strings.Join(waves, " | ")
}

const (
	chain = `name: s
vms:
  c: {image: tiny, depends_on: {b: agent}}
  b: {image: tiny, depends_on: {a: started}}
  a: {image: tiny}
`
	diamond = `name: s
vms:
  a: {image: tiny, health: {tcp: 80}}
  b: {image: tiny, depends_on: {a: healthy}}
  c: {image: tiny, depends_on: {a: started}, health: {tcp: 80}}
  d: {image: tiny, depends_on: {c: healthy, b: agent}}
`
	independent = `name: s
vms:
  x: {image: tiny}
  y: {image: tiny, count: 2}
  z: {image: tiny}
`
	counted = `name: s
vms:
  db: {image: tiny, count: 2}
  app: {image: tiny, count: 3, depends_on: {db: agent}}
  web: {image: tiny, depends_on: {app: started}}
`
)

func TestPlan(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"chain", chain, "s-a | s-b<s-a:started | s-c<s-b:agent"},
		{"diamond", diamond, "s-a | s-b<s-a:healthy s-c<s-a:started | s-d<s-b:agent,s-c:healthy"},
		{"independent members start together", independent, "s-x s-y-1 s-y-2 s-z"},
		{"counts: all instances are waited on", counted,
			"s-db-1 s-db-2 | s-app-1<s-db-1:agent,s-db-2:agent s-app-2<s-db-1:agent,s-db-2:agent s-app-3<s-db-1:agent,s-db-2:agent" +
				" | s-web<s-app-1:started,s-app-2:started,s-app-3:started"},
		{"the longest path decides the wave", `name: s
vms:
  a: {image: tiny}
  b: {image: tiny, depends_on: {a: started}}
  c: {image: tiny, depends_on: {a: started, b: started}}
  d: {image: tiny}
`, "s-a s-d | s-b<s-a:started | s-c<s-a:started,s-b:started"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := mustParse(t, tt.in)
			if got, want := planString(f), tt.want; got != want {
				t.Fatalf("plan: got %v, want %v", got, want)
			}
		})
	}
}

func TestPlanWaitsAreNotShared(t *testing.T) {
	f := mustParse(t, counted)
	plan := f.Plan()
	plan[1][0].Waits[0].Condition = "changed"
	if got, want := plan[1][1].Waits[0].Condition, CondAgent; got != want {
		t.Fatalf("sibling's wait: got %v, want %v", got, want)
	}
}

func TestPlanOfHandBuiltCycle(t *testing.T) {
	f := &File{Name: "s", VMs: []Member{
		{Name: "a", DependsOn: map[string]string{"b": CondStarted}},
		{Name: "b", DependsOn: map[string]string{"a": CondStarted}},
		{Name: "c", DependsOn: map[string]string{"nope": CondStarted}},
	}}
	if got, want := planString(f), "s-c"; got != want {
		t.Fatalf("plan: got %v, want %v", got, want)
	}
}

func TestReverseOrder(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"chain", chain, "s-c s-b s-a"},
		{"diamond", diamond, "s-d s-c s-b s-a"},
		{"counts", counted, "s-web s-app-3 s-app-2 s-app-1 s-db-2 s-db-1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, in := range mustParse(t, tt.in).ReverseOrder() {
				got = append(got, in.Name)
			}
			if got, want := strings.Join(got, " "), tt.want; got != want {
				t.Fatalf("reverse order: got %v, want %v", got, want)
			}
		})
	}
}

func TestDependents(t *testing.T) {
	tests := []struct {
		in, member, want string
	}{
		{diamond, "a", "b c d"},
		{diamond, "b", "d"},
		{diamond, "c", "d"},
		{diamond, "d", ""},
		{diamond, "nope", ""},
		{chain, "a", "c b"},
		{counted, "db", "app web"},
		{independent, "x", ""},
	}
	for _, tt := range tests {
		if got, want := strings.Join(Dependents(mustParse(t, tt.in), tt.member), " "), tt.want; got != want {
			t.Fatalf("Dependents(%s): got %v, want %v", tt.member, got, want)
		}
	}
}
