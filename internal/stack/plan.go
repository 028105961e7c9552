package stack

import "slices"

// Step is one instance to bring up, with what it must wait for first.
type Step struct {
	Instance Instance
	Waits    []Wait
}

// Wait is a condition on one VM of the stack.
type Wait struct {
	// Instance is the VM name of the instance waited on.
	Instance  string
	Condition string
}

// Plan orders the rollout in waves: every step of a wave waits only on
// instances of earlier waves, so a wave's steps can start in parallel.
// A member waits on all the instances of each member it depends on. Waves
// are the longest path from a member with no dependencies (Kahn's
// algorithm), and steps within a wave keep file order.
//
// Waves are a safe order, not a schedule to follow to the letter: an
// orchestrator that starts each step as soon as its own Waits are met
// gets more parallelism than one that waits for a whole wave.
//
// Plan expects a File that Parse accepted; the members of a cycle in a
// File built by hand are left out rather than looping.
func (f *File) Plan() [][]Step {
	g := f.graph()
	insts := make([][]Instance, len(f.VMs))
	for i := range f.VMs {
		insts[i] = f.instancesOf(i)
	}
	left := make([]int, len(g))
	dependents := make([][]int, len(g))
	for i, es := range g {
		left[i] = len(es)
		for _, e := range es {
			dependents[e.to] = append(dependents[e.to], i)
		}
	}
	var wave []int
	for i := range g {
		if left[i] == 0 {
			wave = append(wave, i)
		}
	}
	var plan [][]Step
	for len(wave) > 0 {
		var steps []Step
		var next []int
		for _, i := range wave {
			for _, in := range insts[i] {
				steps = append(steps, Step{Instance: in, Waits: waitsOf(g[i], insts)})
			}
			for _, d := range dependents[i] {
				if left[d]--; left[d] == 0 {
					next = append(next, d)
				}
			}
		}
		plan = append(plan, steps)
		slices.Sort(next)
		wave = next
	}
	return plan
}

// waitsOf builds a fresh slice for every step, so that a caller who
// changes one step's waits does not change its siblings'.
func waitsOf(es []edge, insts [][]Instance) []Wait {
	var ws []Wait
	for _, e := range es {
		for _, in := range insts[e.to] {
			ws = append(ws, Wait{Instance: in.Name, Condition: e.cond})
		}
	}
	return ws
}

// ReverseOrder is the order for `stack down`: dependents stop before what
// they depend on, so that an app is not left talking to a database that
// went away under it. It is the plan read backwards.
func (f *File) ReverseOrder() []Instance {
	var out []Instance
	for _, wave := range f.Plan() {
		for _, s := range wave {
			out = append(out, s.Instance)
		}
	}
	slices.Reverse(out)
	return out
}

// Dependents lists, in file order, the members that depend on member,
// directly or through others: what `stack rebuild` must leave undisturbed
// and what would notice the member going away. Unknown members have none.
func Dependents(f *File, member string) []string {
	start, ok := f.member(member)
	if !ok {
		return nil
	}
	g := f.graph()
	dependents := make([][]int, len(g))
	for i, es := range g {
		for _, e := range es {
			dependents[e.to] = append(dependents[e.to], i)
		}
	}
	seen := make([]bool, len(g))
	seen[start] = true
	queue := []int{start}
	for len(queue) > 0 {
		v := queue[0]
		queue = queue[1:]
		for _, d := range dependents[v] {
			if !seen[d] {
				seen[d] = true
				queue = append(queue, d)
			}
		}
	}
	var out []string
	for i := range f.VMs {
		if seen[i] && i != start {
			out = append(out, f.VMs[i].Name)
		}
	}
	return out
}
