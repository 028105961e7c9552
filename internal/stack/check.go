package stack

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/units"
)

// pos says where a part of the file was written; the zero pos (no line)
// for a File that was not parsed.
func (f *File) pos(parts ...string) pos {
	return f.at[place(parts...)]
}

// edge is one depends_on entry, resolved to the dependency's index in
// f.VMs.
type edge struct {
	to   int
	cond string
}

// graph gives each member's dependencies in file order, so that
// everything built from it (waits, cycle paths) comes out the same on
// every run. Unknown names and self references are left out: Parse
// refuses them, and a File built by hand must not make Plan loop.
func (f *File) graph() [][]edge {
	index := make(map[string]int, len(f.VMs))
	for i := range f.VMs {
		if _, dup := index[f.VMs[i].Name]; !dup {
			index[f.VMs[i].Name] = i
		}
	}
	g := make([][]edge, len(f.VMs))
	for i := range f.VMs {
		for dep, cond := range f.VMs[i].DependsOn {
			if j, ok := index[dep]; ok && j != i {
				g[i] = append(g[i], edge{to: j, cond: cond})
			}
		}
		slices.SortFunc(g[i], func(a, b edge) int { return a.to - b.to })
	}
	return g
}

// checkRefs is Parse's second stage: names that point at other names.
func (f *File) checkRefs() error {
	c := errs{path: f.Path}
	nets := map[string]bool{BuiltinNetwork: true}
	for _, n := range f.Networks {
		nets[n.Name] = true
	}
	index := make(map[string]int, len(f.VMs))
	for i := range f.VMs {
		index[f.VMs[i].Name] = i
	}
	// owner catches two members expanding to one VM name: "app" with a
	// count of 2 and a member called "app-1".
	owner := map[string]string{}
	for i := range f.VMs {
		m := &f.VMs[i]
		obj := fmt.Sprintf("vm %q", m.Name)
		for k, n := range m.Networks {
			if !nets[n] {
				c.invalid(f.pos("vms", m.Name, "networks", strconv.Itoa(k)), "%s: networks: %q: no such network (declare it under networks:, or use the built-in %s)", obj, n, BuiltinNetwork)
			}
		}
		deps := make([]string, 0, len(m.DependsOn))
		for dep := range m.DependsOn {
			deps = append(deps, dep)
		}
		slices.Sort(deps)
		for _, dep := range deps {
			cond := m.DependsOn[dep]
			at := f.pos("vms", m.Name, "depends_on", dep)
			j, ok := index[dep]
			switch {
			case dep == m.Name:
				c.invalid(at, "%s: depends_on %q: a vm cannot depend on itself", obj, dep)
			case !ok:
				c.invalid(at, "%s: depends_on %q: no such vm", obj, dep)
			case cond == CondHealthy && f.VMs[j].Health == nil:
				c.invalid(at, "%s: depends_on %q: healthy, but vm %q has no health check (add health: {exec: ...} or {tcp: ...})", obj, dep, dep)
			case cond == CondCompleted && !f.VMs[j].Oneshot:
				c.invalid(at, "%s: depends_on %q: completed, but vm %q is not oneshot (add oneshot: true if it powers itself off when done)", obj, dep, dep)
			}
		}
		for _, in := range f.instancesOf(i) {
			at := f.pos("vms", m.Name)
			if len(in.Name) > maxName {
				c.invalid(at, "%s: its VM name %q is longer than %d characters; shorten the stack's or the vm's name", obj, in.Name, maxName)
				break
			}
			if other, dup := owner[in.Name]; dup {
				c.invalid(at, "%s: its VM name %q is also vm %q's", obj, in.Name, other)
				break
			}
			owner[in.Name] = m.Name
		}
	}
	return c.err()
}

// checkCycles is Parse's last stage. Of all the cycles, it reports the
// shortest one through the member written first, starting from that
// member, so that the message is the same however the file's maps are
// iterated.
func (f *File) checkCycles() error {
	g := f.graph()
	comp := components(g)
	size := map[int]int{}
	for _, c := range comp {
		size[c]++
	}
	for i := range f.VMs {
		if size[comp[i]] < 2 {
			continue
		}
		path := shortestCycle(g, comp, i)
		names := make([]string, len(path))
		for k, j := range path {
			names[k] = f.VMs[j].Name
		}
		c := errs{path: f.Path}
		c.invalid(f.pos("vms", f.VMs[i].Name, "depends_on"), "vm %q: dependency cycle %s", f.VMs[i].Name, strings.Join(names, " -> "))
		return c.err()
	}
	return nil
}

// components labels each node with its strongly connected component
// (Tarjan's algorithm): a member is on a cycle when its component has
// more than one member, since self references are refused before.
func components(g [][]edge) []int {
	n := len(g)
	index := make([]int, n)
	low := make([]int, n)
	comp := make([]int, n)
	onStack := make([]bool, n)
	for i := range index {
		index[i] = -1
	}
	var stack []int
	next, ncomp := 0, 0
	var visit func(v int)
	visit = func(v int) {
		index[v], low[v] = next, next
		next++
		stack = append(stack, v)
		onStack[v] = true
		for _, e := range g[v] {
			w := e.to
			switch {
			case index[w] < 0:
				visit(w)
				low[v] = min(low[v], low[w])
			case onStack[w]:
				low[v] = min(low[v], index[w])
			}
		}
		if low[v] == index[v] {
			for {
				w := stack[len(stack)-1]
				stack = stack[:len(stack)-1]
				onStack[w] = false
				comp[w] = ncomp
				if w == v {
					break
				}
			}
			ncomp++
		}
	}
	for v := range g {
		if index[v] < 0 {
			visit(v)
		}
	}
	return comp
}

// shortestCycle finds, breadth first within start's component, the
// shortest way from start back to itself, as a path that begins and ends
// with start.
func shortestCycle(g [][]edge, comp []int, start int) []int {
	prev := map[int]int{}
	queue := []int{start}
	for len(queue) > 0 {
		v := queue[0]
		queue = queue[1:]
		for _, e := range g[v] {
			w := e.to
			if comp[w] != comp[start] {
				continue
			}
			if w == start {
				path := []int{start}
				for u := v; u != start; u = prev[u] {
					path = append(path, u)
				}
				path = append(path, start)
				slices.Reverse(path)
				return path
			}
			if _, seen := prev[w]; !seen {
				prev[w] = v
				queue = append(queue, w)
			}
		}
	}
	return []int{start, start}
}

// Env is what the host knows and the file cannot: which images exist and
// how much memory the stack may take.
type Env struct {
	// ImageExists says whether an image of that name is in the library;
	// nil skips the check.
	ImageExists func(string) bool
	// MemoryLimit is the memory, in bytes, that all the stack's VMs may
	// hold together while running: the host's limit less what VMs outside
	// the stack hold. 0 means no limit.
	MemoryLimit int64
	// DefaultMemory gives the memory a VM of that image starts with when
	// the file says none (the image's own, or the daemon's default); nil
	// counts such VMs as 0.
	DefaultMemory func(image string) int64
	// VMOverhead is the host memory each running VM costs beyond its
	// guest's, counted as the daemon counts it against the limit.
	VMOverhead int64
}

// Validate checks the file against the host. Unknown images come first,
// in file order, since an image also decides the memory a VM gets when
// the file says none; then the total memory, pointed at the vms: line
// because it belongs to no single member.
func (f *File) Validate(env Env) error {
	c := errs{path: f.Path}
	if env.ImageExists != nil {
		for i := range f.VMs {
			m := &f.VMs[i]
			if !env.ImageExists(m.Image) {
				c.add(f.pos("vms", m.Name, "image"), errdefs.ErrNotFound, "vm %q: image %q: no such image", m.Name, m.Image)
			}
		}
		if err := c.err(); err != nil {
			return err
		}
	}
	if env.MemoryLimit <= 0 {
		return nil
	}
	var total int64
	n := 0
	for i := range f.VMs {
		m := &f.VMs[i]
		mem := m.Memory
		if mem == 0 && env.DefaultMemory != nil {
			mem = env.DefaultMemory(m.Image)
		}
		total = addSat(total, mulSat(int64(m.count()), addSat(mem, env.VMOverhead)))
		n += m.count()
	}
	if total > env.MemoryLimit {
		c.add(f.pos("vms"), errdefs.ErrLimit, "vms: the stack's %d VMs need %s of memory, over the limit of %s", n, units.FormatSize(total), units.FormatSize(env.MemoryLimit))
	}
	return c.err()
}

// mulSat and addSat stop at MaxInt64: sizes may be near it, and a total
// that wrapped round to a small number would pass the limit.
func mulSat(a, b int64) int64 {
	if a > 0 && b > math.MaxInt64/a {
		return math.MaxInt64
	}
	return a * b
}

func addSat(a, b int64) int64 {
	if b > 0 && a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}
