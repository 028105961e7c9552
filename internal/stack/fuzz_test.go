package stack

import (
	"os"
	"strings"
	"testing"
)

func FuzzParse(f *testing.F) {
	shop, err := os.ReadFile("testdata/shop.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(string(shop))
	for _, s := range []string{designExample, chain, diamond, independent, counted,
		"", "---\n", "name: s\nvms: {a: {image: t}}\n---\nx: 1\n", "name: s\nvms: {a: &a {image: t}, b: {<<: *a}}\n",
		"name: s\nvms:\n  a: {image: t, depends_on: {b: started}}\n  b: {image: t, depends_on: {a: started}}\n",
		"name: s\nvms:\n  a: {image: t, health: {tcp: 1}}\n  b: {image: t, count: 3, depends_on: {a: healthy}}\n  c: {image: t, oneshot: true, depends_on: {b: agent}}\n  d: {image: t, depends_on: {c: completed, a: started}}\n",
		"name: s\nnetworks: {n: {subnet: 10.0.0.0/8, isolated: true}}\nvms: {a: {image: t, networks: [n, nat], memory: 1G, max_memory: 2G, disk: 1T, cpus: 4}}\n",
		"name: s\nvms: {a: {image: t, disks: [1G, 512M]}, b: {image: t, disks: 3}}\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, src string) {
		file, err := Parse("f.yaml", []byte(src))
		if err != nil {
			if msg := err.Error(); !strings.HasPrefix(msg, "f.yaml") || strings.Contains(msg, "\n") {
				t.Fatalf("error %q: want one line starting with the file's name", msg)
			}
			return
		}
		insts := file.Instances()
		waveOf := map[string]int{}
		for w, wave := range file.Plan() {
			for _, s := range wave {
				if _, dup := waveOf[s.Instance.Name]; dup {
					t.Fatalf("%s planned twice", s.Instance.Name)
				}
				waveOf[s.Instance.Name] = w
			}
		}
		if got, want := len(waveOf), len(insts); got != want {
			t.Fatalf("planned instances: got %v, want %v", got, want)
		}
		for _, in := range insts {
			if _, ok := waveOf[in.Name]; !ok {
				t.Fatalf("%s is not in the plan", in.Name)
			}
		}
		for w, wave := range file.Plan() {
			for _, s := range wave {
				for _, x := range s.Waits {
					if dw, ok := waveOf[x.Instance]; !ok || dw >= w {
						t.Fatalf("%s (wave %d) waits on %s (wave %d, planned %v)", s.Instance.Name, w, x.Instance, dw, ok)
					}
				}
			}
		}
		if got, want := len(file.ReverseOrder()), len(insts); got != want {
			t.Fatalf("reverse order: got %v, want %v", got, want)
		}
		existing := make([]Existing, len(insts))
		for i, in := range insts {
			existing[i] = Existing{Name: in.Name, Image: in.Spec.Image, CPUs: in.Spec.CPUs, Memory: in.Spec.Memory, Networks: in.Spec.Networks, Running: true}
		}
		for _, c := range file.Diff(existing) {
			if c.Action != ActionNone {
				t.Fatalf("diff against itself: %s %s (%s)", c.Instance, c.Action, c.Why)
			}
		}
		_ = file.Validate(Env{ImageExists: func(string) bool { return true }, MemoryLimit: 1 << 30, DefaultMemory: func(string) int64 { return 1 << 62 }})
		for _, m := range file.VMs {
			_ = Dependents(file, m.Name)
		}
	})
}
