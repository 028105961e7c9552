package stack

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/units"
)

// The fields each level of the file may have. Anything else is refused,
// since a misspelt field (dependson) silently ignored is a stack that
// starts in the wrong order.
var (
	topFields     = []string{"name", "networks", "vms", "timeout"}
	networkFields = []string{"subnet", "nat", "isolated"}
	memberFields  = []string{"image", "cpus", "memory", "max_memory", "disk", "disks", "networks", "count",
		"depends_on", "health", "oneshot", "cloud_init", "timeout"}
	healthFields = []string{"exec", "tcp", "interval", "timeout", "retries", "start_period"}
)

const badName = "not a valid name: use lower-case letters, digits and '-', starting with a letter or digit, not ending with '-', at most 63 characters"

// aliasBudget caps how many times YAML aliases are followed. Aliases are
// handy for sharing a member's settings, but each use walks the anchored
// node again, and a few nested ones make the walk exponential (the
// "billion laughs" file).
const aliasBudget = 1000

// Parse reads a stack file and checks everything the file can tell about
// itself. path is only used in messages.
//
// It returns one error, a single line, because that is what the CLI
// prints. The checks run in stages: the shape and values of every field,
// then what is missing, then the references between names (networks,
// depends_on, VM names after expansion), then dependency cycles. Each
// stage runs only when the ones before found nothing, and reports the
// error written first in the file. The stages are there so that the one
// error is a cause: a misspelt `helth:` on line 20 must be reported as
// such, not as "vm \"app\" has no health check" on line 9, which is only
// its consequence. Within a stage errors are independent, and the first
// in the file is where a reader starts.
func Parse(path string, data []byte) (*File, error) {
	root, err := decode(path, data)
	if err != nil {
		return nil, err
	}
	p := &parser{f: &File{Path: path, at: map[string]pos{}}, aliases: aliasBudget}
	p.e.path = path
	p.missing.path = path
	p.fatal.path = path
	p.top(root)
	if err := p.fatal.err(); err != nil {
		return nil, err
	}
	if err := p.e.err(); err != nil {
		return nil, err
	}
	if err := p.missing.err(); err != nil {
		return nil, err
	}
	if err := p.f.checkRefs(); err != nil {
		return nil, err
	}
	if err := p.f.checkCycles(); err != nil {
		return nil, err
	}
	return p.f, nil
}

// decode reads the one YAML document of the file.
func decode(path string, data []byte) (*yaml.Node, error) {
	root, err := decodeYAML(data)
	var se *syntaxErr
	switch {
	case errors.As(err, &se):
		return nil, syntaxError(path, data, se.err)
	case err != nil:
		return nil, err
	case root == nil:
		return nil, &Error{Path: path, Line: 1, Msg: "the file is empty: want at least name and vms", kind: errdefs.ErrInvalid}
	case root.Kind == yaml.DocumentNode:
		// A second document: yaml.Unmarshal would quietly drop it, and
		// with it whatever the user put there.
		n := root.Content[0]
		return nil, &Error{Path: path, Line: n.Line, Column: n.Column, Msg: "a second YAML document: a stack file holds one", kind: errdefs.ErrInvalid}
	}
	return root, nil
}

// syntaxErr marks an error of the YAML parser, as opposed to the file
// holding two documents.
type syntaxErr struct{ err error }

func (e *syntaxErr) Error() string { return e.err.Error() }

// decodeYAML returns the first document's top node, nil for an empty
// file, or a second document's DocumentNode when there is one.
func decodeYAML(data []byte) (root *yaml.Node, err error) {
	// yaml.v3 has panicked on crafted input before (CVE-2022-28948). The
	// file comes from users and is parsed inside the daemon, which must
	// not go down with it.
	defer func() {
		if r := recover(); r != nil {
			root, err = nil, &syntaxErr{fmt.Errorf("yaml: %v", r)}
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, &syntaxErr{err}
	}
	for {
		var more yaml.Node
		err := dec.Decode(&more)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, &syntaxErr{err}
		}
		if n := docContent(&more); n != nil {
			return &more, nil
		}
	}
	return docContent(&doc), nil
}

// docContent is a document's top node, nil for an empty document (a bare
// `---`, or only comments).
func docContent(doc *yaml.Node) *yaml.Node {
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		return nil
	}
	n := doc.Content[0]
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" && n.Value == "" {
		return nil
	}
	return n
}

var yamlLineRE = regexp.MustCompile(`(?s)^yaml: line (\d+): (.*)$`)

// syntaxError turns yaml.v3's "yaml: line 3: ..." into the file:line form
// of every other message, with a line found by errorLine: the one yaml.v3
// gives is where the enclosing construct starts, counted from 0, which
// can be far above the mistake. There is no column to give.
func syntaxError(path string, data []byte, err error) error {
	msg := err.Error()
	e := &Error{Path: path, kind: errdefs.ErrInvalid}
	if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
		e.Line, _ = strconv.Atoi(m[1])
		msg = m[2]
	} else {
		msg = strings.TrimPrefix(msg, "yaml: ")
	}
	if l := errorLine(data); l > 0 {
		e.Line = l
	}
	e.Msg = "bad YAML: " + strings.ReplaceAll(msg, "\n", " ")
	return e
}

// errorScanBudget bounds the bytes errorLine parses again, which grows
// with the square of the file's length.
const errorScanBudget = 4 << 20

// errorLine finds the line of a syntax error as the line after the
// longest run of whole lines that parses. The parser reads in order and
// stops at the first bad token, so no longer prefix parses again once the
// bad line is in; a prefix may fail before that only inside a flow
// collection ({...} over several lines), and then the line found is
// where that collection starts, which is still the right place to look.
// 0 when the budget runs out.
func errorLine(data []byte) int {
	starts := []int{0}
	for i, b := range data {
		if b == '\n' && i+1 < len(data) {
			starts = append(starts, i+1)
		}
	}
	spent := 0
	for k := len(starts) - 1; k >= 1; k-- {
		prefix := data[:starts[k]]
		if spent += len(prefix); spent > errorScanBudget {
			return 0
		}
		if _, err := decodeYAML(prefix); err == nil {
			return k + 1
		}
	}
	return 1
}

type parser struct {
	f *File
	e errs
	// missing holds what is absent (a required field, a health probe).
	// It is reported only when e is empty: a field is most often missing
	// because it is misspelt, and "unknown field \"vm\" (did you mean
	// \"vms\"?)" tells more than "vms is required".
	missing errs
	// fatal stops the walk's findings from being reported: once aliases
	// are cut off, what follows is not what the user wrote.
	fatal   errs
	aliases int
}

// entry is one key: value pair of a mapping.
type entry struct {
	key  string
	k, v *yaml.Node
}

func posOf(n *yaml.Node) pos { return pos{n.Line, n.Column} }

// place builds the key of File.at. NUL cannot occur in a valid name, so
// the parts cannot run into each other.
func place(parts ...string) string { return strings.Join(parts, "\x00") }

// label prefixes a field with its object: `vm "db": memory`.
func label(obj, field string) string {
	if obj == "" {
		return field
	}
	return obj + ": " + field
}

func (p *parser) deref(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode {
		if p.aliases == 0 || n.Alias == nil {
			if n.Alias != nil {
				p.fatal.invalid(posOf(n), "too many YAML aliases (at most %d)", aliasBudget)
			}
			return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!null", Line: n.Line, Column: n.Column}
		}
		p.aliases--
		n = n.Alias
	}
	return n
}

// entries lists a mapping's pairs, refusing a key given twice (yaml.v3
// only does so when decoding into a map or struct, not into a Node) and
// expanding merge keys (<<: *base) the way YAML defines them: keys written
// in the mapping win over merged ones. A null value counts as an empty
// mapping, so `back:` declares a network with no settings.
func (p *parser) entries(n *yaml.Node, obj, want string) ([]entry, bool) {
	at := posOf(n)
	n = p.deref(n)
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return nil, true
	}
	if n.Kind != yaml.MappingNode {
		p.e.invalid(at, "%s", label(obj, want))
		return nil, false
	}
	var out []entry
	seen := map[string]*yaml.Node{}
	var merges []*yaml.Node
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" {
			merges = append(merges, v)
			continue
		}
		kk := p.deref(k)
		if kk.Kind != yaml.ScalarNode {
			p.e.invalid(posOf(k), "%s", label(obj, "a key must be a plain name"))
			continue
		}
		if prev, ok := seen[kk.Value]; ok {
			p.e.invalid(posOf(k), "%s", label(obj, fmt.Sprintf("%q is given twice (first at line %d)", kk.Value, prev.Line)))
			continue
		}
		seen[kk.Value] = k
		out = append(out, entry{key: kk.Value, k: k, v: v})
	}
	for _, m := range merges {
		srcs := []*yaml.Node{m}
		if d := p.deref(m); d.Kind == yaml.SequenceNode {
			srcs = d.Content
		}
		for _, src := range srcs {
			sub, _ := p.entries(src, obj, "<<: want an alias of a mapping, e.g. <<: *base")
			for _, e := range sub {
				if _, ok := seen[e.key]; !ok {
					seen[e.key] = e.k
					out = append(out, e)
				}
			}
		}
	}
	return out, true
}

// fields is entries restricted to known field names.
func (p *parser) fields(n *yaml.Node, obj, want string, known []string) ([]entry, bool) {
	es, ok := p.entries(n, obj, want)
	out := es[:0]
	for _, e := range es {
		if !slices.Contains(known, e.key) {
			p.e.invalid(posOf(e.k), "%s", label(obj, fmt.Sprintf("unknown field %q%s", e.key, suggest(e.key, known))))
			continue
		}
		out = append(out, e)
	}
	return out, ok
}

// suggest names the known field closest to a typo, or lists them all.
func suggest(typo string, known []string) string {
	best, bestD := "", 3
	for _, k := range known {
		if d := distance(typo, k); d < bestD {
			best, bestD = k, d
		}
	}
	if best != "" {
		return fmt.Sprintf(" (did you mean %q?)", best)
	}
	return " (want " + strings.Join(known[:len(known)-1], ", ") + " or " + known[len(known)-1] + ")"
}

// distance is the Levenshtein distance, enough to catch dependson,
// depends-on and memroy.
func distance(a, b string) int {
	if len(a) > 64 {
		return len(a)
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

func (p *parser) scalar(n *yaml.Node, what, want string) (*yaml.Node, bool) {
	at := posOf(n)
	n = p.deref(n)
	if n.Kind != yaml.ScalarNode {
		p.e.invalid(at, "%s: want %s", what, want)
		return nil, false
	}
	return n, true
}

// str reads a string; a null value is the empty string.
func (p *parser) str(n *yaml.Node, what string) (string, bool) {
	s, ok := p.scalar(n, what, "a string")
	if !ok {
		return "", false
	}
	if s.ShortTag() == "!!null" {
		return "", true
	}
	return s.Value, true
}

// integer insists on a YAML integer: a quoted "2" is more likely a
// mistake than a number.
func (p *parser) integer(n *yaml.Node, what string) (int, bool) {
	s, ok := p.scalar(n, what, "a whole number")
	if !ok {
		return 0, false
	}
	var v int
	if s.ShortTag() != "!!int" || s.Decode(&v) != nil {
		p.e.invalid(posOf(n), "%s %q: not a whole number", what, s.Value)
		return 0, false
	}
	return v, true
}

// boolean takes true and false only. yaml.v3 would turn "yes" and "on"
// into true as well, but only for some spellings, which is a trap.
func (p *parser) boolean(n *yaml.Node, what string) bool {
	s, ok := p.scalar(n, what, "true or false")
	if !ok {
		return false
	}
	var v bool
	if s.ShortTag() != "!!bool" || s.Decode(&v) != nil {
		p.e.invalid(posOf(n), "%s %q: want true or false", what, s.Value)
		return false
	}
	return v
}

func (p *parser) size(n *yaml.Node, what string) int64 {
	s, ok := p.str(n, what)
	if !ok {
		return 0
	}
	v, err := units.ParseSize(s)
	switch {
	case err != nil:
		p.e.invalid(posOf(n), "%s %v", what, err)
	case v <= 0:
		p.e.invalid(posOf(n), "%s %q: must be more than 0", what, s)
	}
	return v
}

func (p *parser) duration(n *yaml.Node, what string) (time.Duration, bool) {
	return p.durationFrom(n, what, time.Nanosecond, "must be more than 0")
}

// grace is a duration that may be zero.
func (p *parser) grace(n *yaml.Node, what string) (time.Duration, bool) {
	return p.durationFrom(n, what, 0, "must not be negative")
}

func (p *parser) durationFrom(n *yaml.Node, what string, least time.Duration, below string) (time.Duration, bool) {
	s, ok := p.str(n, what)
	if !ok {
		return 0, false
	}
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		p.e.invalid(posOf(n), "%s %q: not a duration (use e.g. 30s, 5m or 1h30m)", what, s)
		return 0, false
	case d < least:
		p.e.invalid(posOf(n), "%s %q: %s", what, s, below)
		return 0, false
	}
	return d, true
}

func (p *parser) top(root *yaml.Node) {
	es, ok := p.fields(root, "", "the stack file: want a mapping with name, vms and optionally networks and timeout", topFields)
	if !ok {
		return
	}
	var haveName, haveVMs bool
	for _, e := range es {
		p.f.at[place(e.key)] = posOf(e.k)
		switch e.key {
		case "name":
			haveName = true
			s, ok := p.str(e.v, "name")
			if !ok {
				continue
			}
			if !validName(s) {
				p.e.invalid(posOf(e.v), "name %q: %s", s, badName)
			}
			p.f.Name = s
		case "networks":
			p.networks(e.v)
		case "vms":
			haveVMs = true
			p.vms(e)
		case "timeout":
			p.f.Timeout, _ = p.duration(e.v, "timeout")
		}
	}
	if !haveName {
		p.missing.invalid(posOf(root), "name is required: the stack's name, which prefixes its VMs' names")
	}
	if !haveVMs {
		p.missing.invalid(posOf(root), "vms is required: a stack has at least one vm")
	}
}

func (p *parser) networks(v *yaml.Node) {
	es, _ := p.entries(v, "networks", "want a mapping of network names, e.g. back: {subnet: 10.77.0.0/24}")
	for _, e := range es {
		obj := fmt.Sprintf("network %q", e.key)
		switch {
		case e.key == BuiltinNetwork:
			p.e.invalid(posOf(e.k), "%s: the name is the built-in network's; use it without declaring it", obj)
		case !validName(e.key):
			p.e.invalid(posOf(e.k), "%s: %s", obj, badName)
		}
		nw := Network{Name: e.key}
		fs, _ := p.fields(e.v, obj, "want a mapping such as {subnet: 10.77.0.0/24, nat: true}", networkFields)
		for _, fl := range fs {
			what := label(obj, fl.key)
			switch fl.key {
			case "subnet":
				s, ok := p.str(fl.v, what)
				if !ok {
					continue
				}
				if why := checkSubnet(s); why != "" {
					p.e.invalid(posOf(fl.v), "%s %q: %s", what, s, why)
				}
				nw.Subnet = s
			case "nat":
				nw.NAT = p.boolean(fl.v, what)
			case "isolated":
				nw.Isolated = p.boolean(fl.v, what)
			}
		}
		p.f.Networks = append(p.f.Networks, nw)
	}
}

// checkSubnet wants an IPv4 network address with room for a gateway and
// guests, since addresses are handed out by DHCPv4.
func checkSubnet(s string) string {
	pr, err := netip.ParsePrefix(s)
	switch {
	case err != nil:
		return "not a CIDR (e.g. 10.77.0.0/24)"
	case !pr.Addr().Is4():
		return "want an IPv4 CIDR (e.g. 10.77.0.0/24)"
	case pr.Bits() > 30:
		return "too small: want at most /30"
	case pr.Masked() != pr:
		return fmt.Sprintf("host bits are set (did you mean %s?)", pr.Masked())
	}
	return ""
}

func (p *parser) vms(e entry) {
	es, ok := p.entries(e.v, "vms", "want a mapping of vm names, e.g. db: {image: debian}")
	if !ok {
		return
	}
	if len(es) == 0 {
		p.missing.invalid(posOf(e.k), "vms: the stack has no vms")
		return
	}
	total, each := 0, true
	for _, me := range es {
		m := p.member(me)
		total += m.Count
		each = each && m.Count <= MaxInstances
		p.f.VMs = append(p.f.VMs, m)
	}
	if each && total > MaxInstances {
		p.e.invalid(posOf(e.k), "vms: the stack expands to %d VMs, more than %d", total, MaxInstances)
	}
}

func (p *parser) member(e entry) Member {
	obj := fmt.Sprintf("vm %q", e.key)
	p.f.at[place("vms", e.key)] = posOf(e.k)
	if !validName(e.key) {
		p.e.invalid(posOf(e.k), "%s: %s", obj, badName)
	}
	m := Member{Name: e.key, Count: DefaultCount, Timeout: DefaultTimeout}
	var haveImage bool
	var maxMemAt pos
	fs, _ := p.fields(e.v, obj, "want a mapping such as {image: debian, memory: 1G}", memberFields)
	for _, fl := range fs {
		what := label(obj, fl.key)
		p.f.at[place("vms", e.key, fl.key)] = posOf(fl.k)
		switch fl.key {
		case "image":
			haveImage = true
			m.Image, _ = p.str(fl.v, what)
			// Validate's "no such image" points at the name itself.
			p.f.at[place("vms", e.key, "image")] = posOf(fl.v)
			if m.Image == "" {
				p.e.invalid(posOf(fl.v), "%s: must not be empty", what)
			}
		case "cpus":
			if v, ok := p.integer(fl.v, what); ok {
				if v < 1 {
					p.e.invalid(posOf(fl.v), "%s %d: must be at least 1", what, v)
				}
				m.CPUs = v
			}
		case "memory":
			m.Memory = p.size(fl.v, what)
		case "max_memory":
			m.MaxMemory = p.size(fl.v, what)
			maxMemAt = posOf(fl.v)
		case "disk":
			m.Disk = p.size(fl.v, what)
		case "disks":
			m.Disks = p.sizeList(fl.v, what)
		case "networks":
			m.Networks = p.netList(fl.v, what, e.key)
		case "count":
			if v, ok := p.integer(fl.v, what); ok {
				switch {
				case v < 1:
					p.e.invalid(posOf(fl.v), "%s %d: must be at least 1", what, v)
				case v > MaxInstances:
					p.e.invalid(posOf(fl.v), "%s %d: at most %d", what, v, MaxInstances)
				}
				m.Count = v
			}
		case "depends_on":
			m.DependsOn = p.dependsOn(fl.v, what, e.key)
		case "health":
			m.Health = p.health(fl, what)
		case "oneshot":
			m.Oneshot = p.boolean(fl.v, what)
		case "cloud_init":
			m.CloudInit, _ = p.str(fl.v, what)
		case "timeout":
			if d, ok := p.duration(fl.v, what); ok {
				m.Timeout = d
			}
		}
	}
	if !haveImage {
		p.missing.invalid(posOf(e.k), "%s: image is required", obj)
	}
	if m.MaxMemory > 0 && m.Memory > 0 && m.MaxMemory < m.Memory {
		p.e.invalid(maxMemAt, "%s: max_memory %s is below memory %s", obj, units.FormatSize(m.MaxMemory), units.FormatSize(m.Memory))
	}
	return m
}

// sizeList reads a member's data disks: a list of sizes, each a whole
// number of 512-byte sectors and at least 1 MiB, at most
// api.MaxDataDisks: what create takes.
func (p *parser) sizeList(v *yaml.Node, what string) []int64 {
	items := p.sequence(v, what, "a list of sizes, e.g. [10G]")
	if len(items) > api.MaxDataDisks {
		p.e.invalid(posOf(v), "%s: %d data disks, at most %d", what, len(items), api.MaxDataDisks)
	}
	var out []int64
	for _, item := range items {
		size := p.size(item, what)
		if size > 0 && !api.DataDiskSizeOK(size) {
			p.e.invalid(posOf(item), "%s %s: want at least %s, in whole 512-byte sectors", what, units.FormatSize(size), units.FormatSize(api.MinDataDisk))
		}
		out = append(out, size)
	}
	return out
}

// sequence is the items of a YAML list; null is an empty list, and
// anything else is refused as not what was wanted.
func (p *parser) sequence(v *yaml.Node, what, want string) []*yaml.Node {
	at := posOf(v)
	v = p.deref(v)
	if v.Kind == yaml.ScalarNode && v.ShortTag() == "!!null" {
		return nil
	}
	if v.Kind != yaml.SequenceNode {
		p.e.invalid(at, "%s: want %s", what, want)
		return nil
	}
	return v.Content
}

func (p *parser) netList(v *yaml.Node, what, member string) []string {
	var out []string
	for _, item := range p.sequence(v, what, "a list of network names, e.g. [back]") {
		s, ok := p.str(item, what)
		if !ok {
			continue
		}
		p.f.at[place("vms", member, "networks", strconv.Itoa(len(out)))] = posOf(item)
		out = append(out, s)
	}
	return out
}

func (p *parser) dependsOn(v *yaml.Node, what, member string) map[string]string {
	es, _ := p.entries(v, what, "want a mapping of vm: condition, e.g. {db: healthy}")
	if len(es) == 0 {
		return nil
	}
	out := make(map[string]string, len(es))
	for _, d := range es {
		p.f.at[place("vms", member, "depends_on", d.key)] = posOf(d.k)
		dwhat := fmt.Sprintf("%s %q", what, d.key)
		c, ok := p.str(d.v, dwhat)
		if !ok {
			continue
		}
		switch c {
		case CondStarted, CondAgent, CondHealthy, CondCompleted:
			out[d.key] = c
		default:
			p.e.invalid(posOf(d.v), "%s: unknown condition %q (want started, agent, healthy or completed)", dwhat, c)
		}
	}
	return out
}

func (p *parser) health(fl entry, what string) *Health {
	h := &Health{Interval: DefaultHealthInterval, Timeout: DefaultHealthTimeout, Retries: DefaultHealthRetries, StartPeriod: DefaultStartPeriod}
	fs, ok := p.fields(fl.v, what, "want {exec: COMMAND} or {tcp: PORT}", healthFields)
	probes := 0
	for _, hf := range fs {
		hwhat := label(what, hf.key)
		switch hf.key {
		case "exec":
			probes++
			h.Exec, _ = p.str(hf.v, hwhat)
			if h.Exec == "" {
				p.e.invalid(posOf(hf.v), "%s: must not be empty", hwhat)
			}
		case "tcp":
			probes++
			if v, ok := p.integer(hf.v, hwhat); ok {
				if v < 1 || v > 65535 {
					p.e.invalid(posOf(hf.v), "%s %d: want a port from 1 to 65535", hwhat, v)
				}
				h.TCP = v
			}
		case "interval":
			if d, ok := p.duration(hf.v, hwhat); ok {
				h.Interval = d
			}
		case "timeout":
			if d, ok := p.duration(hf.v, hwhat); ok {
				h.Timeout = d
			}
		case "start_period":
			if d, ok := p.grace(hf.v, hwhat); ok {
				h.StartPeriod = d
			}
		case "retries":
			if v, ok := p.integer(hf.v, hwhat); ok {
				if v < 1 {
					p.e.invalid(posOf(hf.v), "%s %d: must be at least 1", hwhat, v)
				}
				h.Retries = v
			}
		}
	}
	switch {
	case ok && probes == 0:
		p.missing.invalid(posOf(fl.k), "%s: give exactly one of exec and tcp", what)
	case probes > 1:
		p.e.invalid(posOf(fl.k), "%s: give exactly one of exec and tcp", what)
	}
	return h
}
