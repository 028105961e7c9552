// Package ovf reads DMTF OVF descriptors (OVF 1.x and 2.x) and unpacks OVA
// archives, so that Lodge can import appliances exported by VMware,
// VirtualBox and Hyper-V tooling as plain disk images plus a CPU and memory
// hint.
//
// Appliances are downloaded from strangers, so the package is deliberately
// narrow and refuses rather than guesses: it refuses multi-VM appliances;
// compressed, chunked, blank and differencing disks; file references that are
// anything but a plain file name in the package's own directory; archive
// members that are not regular files or that the descriptor does not
// reference; duplicate identifiers or members; implausibly large numbers; and
// any file whose digest does not match the manifest. Every such refusal wraps
// ErrInvalid.
package ovf

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// The envelope namespaces of OVF 1.0/1.1 and of OVF 2.x. Anything else,
// including the pre-standard VMware 0.9 namespace, is refused.
const (
	nsOVF1 = "http://schemas.dmtf.org/ovf/envelope/1"
	nsOVF2 = "http://schemas.dmtf.org/ovf/envelope/2"
)

// nsCIM is the common prefix of the RASD, SASD, EPASD and VSSD namespaces.
// Item children are matched by this prefix rather than by exact namespace
// because exporters differ (VirtualBox, for one, appends ".xsd" to the SASD
// namespace in OVF 2.0 output).
const nsCIM = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/"

// maxDescriptor bounds how much of a descriptor is read into memory; real
// descriptors are a few kilobytes.
const maxDescriptor = 4 << 20

// ErrInvalid is wrapped by every error that is the appliance's fault rather
// than the host's, so that callers can report it as a bad request.
var ErrInvalid = errors.New("invalid OVF")

// invalid formats a one-line refusal that wraps ErrInvalid.
func invalid(format string, args ...any) error {
	return fmt.Errorf("ovf: %s: %w", fmt.Sprintf(format, args...), ErrInvalid)
}

// Descriptor is what Lodge needs from an OVF descriptor to create a VM.
type Descriptor struct {
	Name   string // VirtualSystem ovf:id, or its <Name> element if present
	OSType string // the guest OS hint; may be empty
	CPUs   int    // virtual CPUs; 0 if the descriptor does not say
	Memory int64  // bytes of guest memory; 0 if the descriptor does not say
	Disks  []Disk // in attachment order, then unattached disks in DiskSection order
}

// Disk is one virtual disk of the appliance and the file that holds it.
type Disk struct {
	ID       string // ovf:diskId
	File     string // plain file name of the disk image in the package
	Capacity int64  // virtual size in bytes
	Format   string // ovf:format URI as written
	FileSize int64  // ovf:size of the file, 0 if absent
}

// fileRef is one <File> of <References>. ReadOVA and ReadOVF need all of
// them, not only the disks, because every referenced file must be present and
// covered by the manifest.
type fileRef struct {
	id      string
	href    string
	size    int64
	hasSize bool
	disk    bool // some Disk uses it
}

// Parse reads an OVF descriptor and returns the single virtual system it
// describes. Any refusal wraps ErrInvalid.
func Parse(r io.Reader) (Descriptor, error) {
	data, err := readDescriptor(r)
	if err != nil {
		return Descriptor{}, err
	}
	d, _, err := parseDescriptor(data)
	return d, err
}

func readDescriptor(r io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxDescriptor+1))
	if err != nil {
		return nil, fmt.Errorf("ovf: read descriptor: %w", err)
	}
	if len(data) > maxDescriptor {
		return nil, invalid("descriptor is larger than %d MiB", maxDescriptor>>20)
	}
	return data, nil
}

// parser carries the envelope namespace, which also qualifies the ovf:
// attributes, through the walk.
type parser struct {
	ns string
}

func parseDescriptor(data []byte) (Descriptor, []*fileRef, error) {
	root, err := decodeTree(data)
	if err != nil {
		return Descriptor{}, nil, err
	}
	ns := root.name.Space
	if root.name.Local != "Envelope" || (ns != nsOVF1 && ns != nsOVF2) {
		return Descriptor{}, nil, invalid("root element %q in namespace %q is not an OVF 1.x or 2.x Envelope", root.name.Local, ns)
	}
	p := parser{ns: ns}
	files, err := p.references(root)
	if err != nil {
		return Descriptor{}, nil, err
	}
	disks, order, err := p.disks(root, files)
	if err != nil {
		return Descriptor{}, nil, err
	}
	vs, err := p.virtualSystem(root)
	if err != nil {
		return Descriptor{}, nil, err
	}
	d := Descriptor{Name: vs.attr(p.ns, "id")}
	if n := vs.child(p.ns, "Name"); n != nil && n.value() != "" {
		d.Name = n.value()
	}
	if sec := vs.child(p.ns, "OperatingSystemSection"); sec != nil {
		d.OSType = p.osType(sec)
	}
	attached, err := p.hardware(vs, p.configuration(root), disks, &d)
	if err != nil {
		return Descriptor{}, nil, err
	}
	for _, id := range attached {
		d.Disks = append(d.Disks, disks[id])
	}
	for _, id := range order {
		if !slices.Contains(attached, id) {
			d.Disks = append(d.Disks, disks[id])
		}
	}
	list := make([]*fileRef, 0, len(files))
	for _, f := range files {
		list = append(list, f)
	}
	slices.SortFunc(list, func(a, b *fileRef) int { return strings.Compare(a.href, b.href) })
	return d, list, nil
}

// references reads <References>, keyed by ovf:id. Files are checked here,
// whether or not a disk uses them, because ReadOVA and ReadOVF must find
// every one of them next to the descriptor.
func (p *parser) references(root *element) (map[string]*fileRef, error) {
	files := map[string]*fileRef{}
	hrefs := map[string]string{}
	for _, refs := range root.childrenNamed(p.ns, "References") {
		for _, f := range refs.childrenNamed(p.ns, "File") {
			id := f.attr(p.ns, "id")
			if id == "" {
				return nil, invalid("References: a File has no ovf:id")
			}
			if files[id] != nil {
				return nil, invalid("file %q: ovf:id is used twice", id)
			}
			href := f.attr(p.ns, "href")
			if !isPlainName(href) {
				return nil, invalid("file %q: href %q is not a plain file name", id, href)
			}
			if other, ok := hrefs[href]; ok {
				return nil, invalid("file %q: href %q is also used by file %q", id, href, other)
			}
			if c := f.attr(p.ns, "compression"); c != "" && c != "identity" {
				return nil, invalid("file %q: compressed disks are not supported (ovf:compression %q)", id, c)
			}
			if c := f.attr(p.ns, "chunkSize"); c != "" {
				return nil, invalid("file %q: chunked files are not supported (ovf:chunkSize %q)", id, c)
			}
			ref := &fileRef{id: id, href: href}
			if s := f.attr(p.ns, "size"); s != "" {
				n, err := parseCount(s)
				if err == nil && n > maxCapacity {
					err = errTooLarge
				}
				if err != nil {
					return nil, invalid("file %q: ovf:size %q %v", id, s, err)
				}
				ref.size, ref.hasSize = n, true
			}
			files[id] = ref
			hrefs[href] = id
		}
	}
	return files, nil
}

// disks reads <DiskSection>, returning the disks by ovf:diskId and the
// order in which they are listed.
func (p *parser) disks(root *element, files map[string]*fileRef) (map[string]Disk, []string, error) {
	disks := map[string]Disk{}
	var order []string
	usedBy := map[string]string{}
	for _, sec := range root.childrenNamed(p.ns, "DiskSection") {
		for _, e := range sec.childrenNamed(p.ns, "Disk") {
			id := e.attr(p.ns, "diskId")
			if id == "" {
				return nil, nil, invalid("DiskSection: a Disk has no ovf:diskId")
			}
			if _, dup := disks[id]; dup {
				return nil, nil, invalid("disk %q: ovf:diskId is used twice", id)
			}
			if e.attr(p.ns, "parentRef") != "" {
				return nil, nil, invalid("disk %q: differencing disks (ovf:parentRef) are not supported", id)
			}
			ref := e.attr(p.ns, "fileRef")
			if ref == "" {
				return nil, nil, invalid("disk %q: no ovf:fileRef; blank disks are not supported", id)
			}
			f := files[ref]
			if f == nil {
				return nil, nil, invalid("disk %q: file reference %q names no File in References", id, ref)
			}
			if other, ok := usedBy[ref]; ok {
				return nil, nil, invalid("disk %q: file %q is already used by disk %q", id, ref, other)
			}
			capacity, err := p.capacity(e)
			if err != nil {
				return nil, nil, invalid("disk %q: %v", id, err)
			}
			f.disk = true
			usedBy[ref] = id
			disks[id] = Disk{
				ID:       id,
				File:     f.href,
				Capacity: capacity,
				Format:   e.attr(p.ns, "format"),
				FileSize: f.size,
			}
			order = append(order, id)
		}
	}
	if len(order) == 0 {
		return nil, nil, invalid("DiskSection: the appliance has no disk")
	}
	return disks, order, nil
}

func (p *parser) capacity(e *element) (int64, error) {
	s := e.attr(p.ns, "capacity")
	n, err := parseCount(s)
	if err != nil {
		return 0, fmt.Errorf("ovf:capacity %q %w", s, err)
	}
	unit := int64(1)
	if u := e.attr(p.ns, "capacityAllocationUnits"); u != "" {
		var ok bool
		if unit, ok = parseUnits(u); !ok {
			return 0, fmt.Errorf("ovf:capacityAllocationUnits %q is not a known unit of bytes", u)
		}
	}
	c, err := scale(n, unit, maxCapacity)
	if err != nil {
		return 0, fmt.Errorf("capacity %s × %d bytes is more than %d TiB", s, unit, maxCapacity>>40)
	}
	return c, nil
}

// virtualSystem finds the one VirtualSystem, looking through collections so
// that a collection wrapping a single machine still imports.
func (p *parser) virtualSystem(root *element) (*element, error) {
	var found []*element
	var walk func(e *element)
	walk = func(e *element) {
		for _, c := range e.children {
			if c.name.Space != p.ns {
				continue
			}
			switch c.name.Local {
			case "VirtualSystem":
				found = append(found, c)
			case "VirtualSystemCollection":
				walk(c)
			}
		}
	}
	walk(root)
	switch len(found) {
	case 0:
		return nil, invalid("Envelope: no VirtualSystem")
	case 1:
		return found[0], nil
	default:
		return nil, invalid("VirtualSystemCollection: multi-VM appliances are not supported (%d virtual systems)", len(found))
	}
}

// osType prefers a machine-readable type over the free-text Description.
// VMware writes it as vmw:osType, so any namespace is accepted after ovf:.
func (p *parser) osType(sec *element) string {
	if v := strings.TrimSpace(sec.attr(p.ns, "osType")); v != "" {
		return v
	}
	for _, a := range sec.attrs {
		if a.Name.Local == "osType" && strings.TrimSpace(a.Value) != "" {
			return strings.TrimSpace(a.Value)
		}
	}
	if d := sec.child(p.ns, "Description"); d != nil {
		return d.value()
	}
	return ""
}

// configuration returns the deployment option whose items count: the one
// marked default, else the first. Without it, an appliance offering "small"
// and "large" configurations would have the CPUs of both summed.
func (p *parser) configuration(root *element) string {
	sec := root.child(p.ns, "DeploymentOptionSection")
	if sec == nil {
		return ""
	}
	first := ""
	for i, c := range sec.childrenNamed(p.ns, "Configuration") {
		id := c.attr(p.ns, "id")
		if i == 0 {
			first = id
		}
		if d := c.attr(p.ns, "default"); d == "true" || d == "1" {
			return id
		}
	}
	return first
}

// applies reports whether an item describes the machine as deployed: items
// of other deployment options and the min/max bounds of a range do not.
func (p *parser) applies(item *element, config string) bool {
	switch item.attr(p.ns, "bound") {
	case "min", "max":
		return false
	}
	cfg := item.attr(p.ns, "configuration")
	return cfg == "" || slices.Contains(strings.Fields(cfg), config)
}

// Resource types of CIM_ResourceAllocationSettingData that Lodge reads.
const (
	rtProcessor   = 3
	rtMemory      = 4
	rtDiskDrive   = 17
	rtLogicalDisk = 31
)

// hardware reads the first VirtualHardwareSection into d and returns the
// disk ids in the order items attach them. Only the first section counts:
// further sections are alternatives for other virtualization platforms, not
// additional hardware.
func (p *parser) hardware(vs *element, config string, disks map[string]Disk, d *Descriptor) ([]string, error) {
	vhs := vs.child(p.ns, "VirtualHardwareSection")
	if vhs == nil {
		return nil, nil
	}
	var attached []string
	attachedBy := map[string]string{}
	var cpus, memory int64
	index := 0
	for _, item := range vhs.children {
		if item.name.Space != p.ns || (item.name.Local != "Item" && item.name.Local != "StorageItem") {
			continue
		}
		index++
		if !p.applies(item, config) {
			continue
		}
		name := itemName(item, index)
		rt, rtErr := parseCount(cimValue(item, "ResourceType"))
		if rtErr != nil {
			rt = -1 // not a resource Lodge reads, unless it is a StorageItem
		}
		switch {
		case item.name.Local == "StorageItem" || rt == rtDiskDrive || rt == rtLogicalDisk:
			for _, hr := range cimValues(item, "HostResource") {
				id, ok := diskRef(hr)
				if !ok {
					continue
				}
				if _, ok := disks[id]; !ok {
					return nil, invalid("item %s: HostResource %q names no Disk in DiskSection", name, hr)
				}
				if other, ok := attachedBy[id]; ok {
					return nil, invalid("item %s: disk %q is already attached by item %s", name, id, other)
				}
				attachedBy[id] = name
				attached = append(attached, id)
			}
		case rt == rtProcessor:
			n, err := quantity(item)
			if err != nil {
				return nil, invalid("item %s: %v", name, err)
			}
			if n > maxCPUs-cpus {
				return nil, invalid("item %s: more than %d virtual CPUs", name, maxCPUs)
			}
			cpus += n
		case rt == rtMemory:
			n, err := quantity(item)
			if err != nil {
				return nil, invalid("item %s: %v", name, err)
			}
			// VMware omits the units at times and always means megabytes.
			unit := int64(1 << 20)
			if u := cimValue(item, "AllocationUnits"); u != "" {
				var ok bool
				if unit, ok = parseUnits(u); !ok {
					return nil, invalid("item %s: AllocationUnits %q is not a known unit of bytes", name, u)
				}
			}
			m, err := scale(n, unit, maxMemory-memory)
			if err != nil {
				return nil, invalid("item %s: more than %d GiB of memory", name, maxMemory>>30)
			}
			memory += m
		}
	}
	d.CPUs = int(cpus)
	d.Memory = memory
	return attached, nil
}

// quantity reads VirtualQuantity; a missing one counts as nothing rather
// than as an error because the item still describes valid hardware.
func quantity(item *element) (int64, error) {
	s := cimValue(item, "VirtualQuantity")
	if s == "" {
		return 0, nil
	}
	n, err := parseCount(s)
	if err != nil {
		return 0, fmt.Errorf("VirtualQuantity %q %w", s, err)
	}
	return n, nil
}

// diskRef extracts the disk id from a HostResource. "ovf://disk/" is the
// spelling of early OVF 1.0 drafts that some tools still write.
func diskRef(hr string) (string, bool) {
	for _, prefix := range []string{"ovf:/disk/", "ovf://disk/", "/disk/"} {
		if id, ok := strings.CutPrefix(hr, prefix); ok && id != "" {
			return id, true
		}
	}
	return "", false
}

func cimValues(item *element, local string) []string {
	var out []string
	for _, c := range item.children {
		if c.name.Local == local && strings.HasPrefix(c.name.Space, nsCIM) {
			out = append(out, c.value())
		}
	}
	return out
}

func cimValue(item *element, local string) string {
	if v := cimValues(item, local); len(v) > 0 {
		return v[0]
	}
	return ""
}

// itemName names an item in messages the way the exporter's UI would.
func itemName(item *element, index int) string {
	// index counts from one, as a reader of the descriptor would.
	if n := cimValue(item, "ElementName"); n != "" {
		return fmt.Sprintf("%q", n)
	}
	if id := cimValue(item, "InstanceID"); id != "" {
		return fmt.Sprintf("with InstanceID %q", id)
	}
	return fmt.Sprintf("#%d", index)
}
