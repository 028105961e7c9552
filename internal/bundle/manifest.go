package bundle

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"time"
)

// Entry names inside the archive. Anything else is refused on import.
const (
	ManifestName = "lodge.json"
	SumsName     = "lodge.sums"
)

// DiskEntry names a disk's sparse raw image in the archive.
func DiskEntry(disk string) string { return "disks/" + disk + ".raw" }

// BaseEntry names, in a bundle with snapshots, what a disk's layers are
// layered on (its image, flattened) as a sparse raw image.
func BaseEntry(disk string) string { return "base/" + disk + ".raw" }

// LayerEntry names one qcow2 layer file of a bundle with snapshots.
func LayerEntry(id string) string { return "layers/" + id + ".qcow2" }

// MemoryEntry names a snapshot's memory state.
func MemoryEntry(snap string) string { return "memory/" + snap + ".mem" }

// Manifest is the bundle's first entry: everything needed to recreate the
// machine except its disks' contents.
type Manifest struct {
	// Format is the bundle format version (FormatVersion when written).
	Format    int       `json:"format"`
	CreatedAt time.Time `json:"created_at"`
	// Consistency says how the disks were captured: "stopped" (the VM was
	// off), "frozen" (running, filesystems frozen by the guest agent) or
	// "crash" (running, no agent: what a power cut would leave).
	Consistency string `json:"consistency"`
	VM          VMSpec `json:"vm"`
	Disks       []Disk `json:"disks"`
	// With snapshots, each disk is a tree of qcow2 layers on a base, and
	// the snapshots name the layer each disk was at. Without, each disk is
	// one flattened raw image (Disk.Entry).
	Layers    []Layer    `json:"layers,omitempty"`
	Snapshots []Snapshot `json:"snapshots,omitempty"`
	// CurrentSnapshot is the snapshot the VM's state descends from.
	CurrentSnapshot string `json:"current_snapshot,omitempty"`
}

// Layer is one qcow2 file of a disk's tree: a snapshot's frozen layer, or
// the disk's current top.
type Layer struct {
	ID   string `json:"id"`
	Disk string `json:"disk"`
	// Parent is the layer this one is layered on; "" for the disk's base.
	Parent string `json:"parent,omitempty"`
	Entry  string `json:"entry"`
	// Size is the file's length; Data what of it is stored.
	Size int64 `json:"size"`
	Data int64 `json:"data"`
}

// Snapshot is one snapshot of the tree.
type Snapshot struct {
	Name        string            `json:"name"`
	Parent      string            `json:"parent,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	Description string            `json:"description,omitempty"`
	Layers      map[string]string `json:"layers"` // disk → layer ID
	// Memory holds the running guest's state, when taken with it.
	Memory *MemoryState `json:"memory,omitempty"`
}

// MemoryState is a memory snapshot's state file and the machine shape it
// needs to be loaded into.
type MemoryState struct {
	Entry         string  `json:"entry"`
	Size          int64   `json:"size"`
	Data          int64   `json:"data"`
	CPUs          int     `json:"cpus"`
	MaxCPUs       int     `json:"max_cpus,omitempty"`
	BootCPUs      int     `json:"boot_cpus,omitempty"`
	BootMaxCPUs   int     `json:"boot_max_cpus,omitempty"`
	HotCPUs       int     `json:"hot_cpus,omitempty"`
	MemorySize    int64   `json:"memory_size"`
	MaxMemorySize int64   `json:"max_memory_size,omitempty"`
	Target        int64   `json:"target,omitempty"`
	MaxMemory     int64   `json:"max_memory,omitempty"`
	Dimms         []int64 `json:"dimms,omitempty"`
	Paused        bool    `json:"paused,omitempty"`
}

// VMSpec is the machine's configuration and identity.
type VMSpec struct {
	Name       string `json:"name"`
	UUID       string `json:"uuid"`
	Hostname   string `json:"hostname"`
	InstanceID string `json:"instance_id"`
	Image      string `json:"image,omitempty"`
	CPUs       int    `json:"cpus"`
	MaxCPUs    int    `json:"max_cpus,omitempty"`
	Memory     int64  `json:"memory"`
	MaxMemory  int64  `json:"max_memory,omitempty"`
	MinMemory  int64  `json:"min_memory,omitempty"`
	CloudInit  string `json:"cloud_init,omitempty"`
	NICs       []NIC  `json:"nics,omitempty"`
}

// NIC is one network card.
type NIC struct {
	Network string `json:"network"`
	MAC     string `json:"mac"`
}

// Disk is one disk: its settings and where its data is in the archive.
type Disk struct {
	Name  string `json:"name"`
	Bus   string `json:"bus"`
	Size  int64  `json:"size"`
	Entry string `json:"entry,omitempty"`
	// Base and Top, with snapshots: the base's entry ("" when the layers
	// stand on nothing) and the layer that is the disk now.
	Base string `json:"base,omitempty"`
	Top  string `json:"top,omitempty"`
	// BaseSize is the base's own size: an image smaller than the disk
	// its layers grew to.
	BaseSize int64 `json:"base_size,omitempty"`
	// Data is how many bytes of the disk are stored (its data regions);
	// the rest reads as zeros.
	Data int64 `json:"data"`
}

// Bounds on what a manifest may ask for. They are far above any real
// machine and far below what would hurt the host to even consider.
const (
	maxManifest  = 1 << 20
	maxDisks     = 16
	maxNICs      = 16
	maxCPUs      = 1024
	maxMemory    = 16 << 40
	maxDiskSize  = 64 << 40
	minDiskSize  = 1 << 20
	maxCloudInit = 256 << 10
)

var (
	nameRE     = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	diskNameRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,15}$`)
	uuidRE     = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	macRE      = regexp.MustCompile(`^[0-9a-f]{2}(:[0-9a-f]{2}){5}$`)
	hostRE     = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$`)
	netRE      = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
)

var buses = map[string]bool{"virtio": true, "scsi": true, "ide": true, "nvme": true}

// ParseManifest decodes and checks a manifest. Unknown fields are
// refused: a newer writer's field that this reader would drop could
// change what the machine is.
func ParseManifest(b []byte) (Manifest, error) {
	var m Manifest
	if len(b) > maxManifest {
		return m, corrupt("manifest is %d bytes, over %d", len(b), maxManifest)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return m, corrupt("manifest: %v", err)
	}
	if dec.More() {
		return m, corrupt("manifest: data after the JSON object")
	}
	if err := m.Validate(); err != nil {
		return m, err
	}
	return m, nil
}

// Validate checks every field against its range.
func (m Manifest) Validate() error {
	bad := func(field string, format string, args ...any) error {
		return corrupt("manifest field %s: %s", field, fmt.Sprintf(format, args...))
	}
	v := m.VM
	switch {
	case m.Format < 1 || m.Format > FormatVersion:
		return bad("format", "version %d; this lodge reads 1 to %d", m.Format, FormatVersion)
	case m.Consistency != "stopped" && m.Consistency != "frozen" && m.Consistency != "crash":
		return bad("consistency", "%q is not stopped, frozen or crash", m.Consistency)
	case !nameRE.MatchString(v.Name):
		return bad("vm.name", "%q is not a valid VM name", v.Name)
	case !uuidRE.MatchString(v.UUID):
		return bad("vm.uuid", "%q is not a lowercase UUID", v.UUID)
	case v.InstanceID != "" && !uuidRE.MatchString(v.InstanceID):
		return bad("vm.instance_id", "%q is not a lowercase UUID", v.InstanceID)
	case v.Hostname != "" && !hostRE.MatchString(v.Hostname):
		return bad("vm.hostname", "%q is not a host name", v.Hostname)
	case v.CPUs < 1 || v.CPUs > maxCPUs:
		return bad("vm.cpus", "%d is outside 1-%d", v.CPUs, maxCPUs)
	case v.MaxCPUs != 0 && (v.MaxCPUs < v.CPUs || v.MaxCPUs > maxCPUs):
		return bad("vm.max_cpus", "%d is outside %d-%d", v.MaxCPUs, v.CPUs, maxCPUs)
	case v.Memory < 16<<20 || v.Memory > maxMemory:
		return bad("vm.memory", "%d bytes is outside 16 MiB-16 TiB", v.Memory)
	case v.MaxMemory != 0 && (v.MaxMemory < v.Memory || v.MaxMemory > maxMemory):
		return bad("vm.max_memory", "%d bytes is below memory or above 16 TiB", v.MaxMemory)
	case v.MinMemory < 0 || v.MinMemory > v.Memory:
		return bad("vm.min_memory", "%d bytes is outside 0-memory", v.MinMemory)
	case len(v.CloudInit) > maxCloudInit:
		return bad("vm.cloud_init", "%d bytes, over %d", len(v.CloudInit), maxCloudInit)
	case len(v.Image) > 255:
		return bad("vm.image", "name too long")
	case len(v.NICs) > maxNICs:
		return bad("vm.nics", "%d cards, over %d", len(v.NICs), maxNICs)
	case len(m.Disks) == 0 || len(m.Disks) > maxDisks:
		return bad("disks", "%d disks; want 1-%d", len(m.Disks), maxDisks)
	}
	macs := map[string]bool{}
	for i, n := range v.NICs {
		if !macRE.MatchString(n.MAC) || macs[n.MAC] {
			return bad(fmt.Sprintf("vm.nics[%d].mac", i), "%q is not a lowercase MAC, or repeats one", n.MAC)
		}
		if n.Network != "" && !netRE.MatchString(n.Network) {
			return bad(fmt.Sprintf("vm.nics[%d].network", i), "%q is not a network name", n.Network)
		}
		macs[n.MAC] = true
	}
	names := map[string]bool{}
	for i, d := range m.Disks {
		f := fmt.Sprintf("disks[%d]", i)
		switch {
		case !diskNameRE.MatchString(d.Name) || names[d.Name]:
			return bad(f+".name", "%q is not a disk name, or repeats one", d.Name)
		case !buses[d.Bus]:
			return bad(f+".bus", "%q is not virtio, scsi, ide or nvme", d.Bus)
		case d.Size < minDiskSize || d.Size > maxDiskSize || d.Size%512 != 0:
			return bad(f+".size", "%d bytes is not a multiple of 512 in 1 MiB-64 TiB", d.Size)
		case len(m.Layers) == 0 && d.Entry != DiskEntry(d.Name):
			return bad(f+".entry", "%q; want %q", d.Entry, DiskEntry(d.Name))
		case len(m.Layers) > 0 && (d.Entry != "" || (d.Base != "" && d.Base != BaseEntry(d.Name))):
			return bad(f+".base", "%q; want %q and no flattened entry", d.Base, BaseEntry(d.Name))
		case d.Base != "" && (d.BaseSize < 512 || d.BaseSize > d.Size || d.BaseSize%512 != 0):
			return bad(f+".base_size", "%d bytes is not a multiple of 512 up to the disk's size", d.BaseSize)
		case d.Base == "" && d.BaseSize != 0:
			return bad(f+".base_size", "a size for no base")
		case d.Data < 0 || d.Data > d.Size:
			return bad(f+".data", "%d bytes is outside 0-size", d.Data)
		}
		names[d.Name] = true
	}
	return m.validateTree(names, bad)
}

var layerIDRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

// Bounds on a snapshot tree.
const (
	maxLayers    = 1024
	maxSnapshots = 256
	maxLayerFile = 2 * maxDiskSize
)

// validateTree checks the layers and snapshots: every reference resolves
// to something earlier in its list, on the right disk, so the tree has no
// cycle and nothing dangles.
func (m Manifest) validateTree(disks map[string]bool, bad func(string, string, ...any) error) error {
	if len(m.Layers) == 0 {
		if len(m.Snapshots) > 0 || m.CurrentSnapshot != "" {
			return bad("snapshots", "snapshots without layers")
		}
		for i, d := range m.Disks {
			if d.Top != "" || d.Base != "" {
				return bad(fmt.Sprintf("disks[%d].top", i), "a top layer without layers")
			}
		}
		return nil
	}
	if len(m.Layers) > maxLayers || len(m.Snapshots) > maxSnapshots {
		return bad("layers", "%d layers and %d snapshots; at most %d and %d", len(m.Layers), len(m.Snapshots), maxLayers, maxSnapshots)
	}
	layerDisk := map[string]string{}
	for i, l := range m.Layers {
		f := fmt.Sprintf("layers[%d]", i)
		switch {
		case !layerIDRE.MatchString(l.ID) || layerDisk[l.ID] != "":
			return bad(f+".id", "%q is not a layer id, or repeats one", l.ID)
		case !disks[l.Disk]:
			return bad(f+".disk", "%q is not a disk", l.Disk)
		case l.Parent != "" && layerDisk[l.Parent] != l.Disk:
			return bad(f+".parent", "%q is not an earlier layer of disk %q", l.Parent, l.Disk)
		case l.Entry != LayerEntry(l.ID):
			return bad(f+".entry", "%q; want %q", l.Entry, LayerEntry(l.ID))
		case l.Size < 0 || l.Size > maxLayerFile || l.Data < 0 || l.Data > RoundBlock(l.Size):
			return bad(f+".size", "%d bytes with %d stored is out of range", l.Size, l.Data)
		}
		layerDisk[l.ID] = l.Disk
	}
	tops := map[string]bool{}
	for i, d := range m.Disks {
		if layerDisk[d.Top] != d.Name {
			return bad(fmt.Sprintf("disks[%d].top", i), "%q is not a layer of disk %q", d.Top, d.Name)
		}
		tops[d.Top] = true
	}
	snaps := map[string]bool{}
	for i, sn := range m.Snapshots {
		f := fmt.Sprintf("snapshots[%d]", i)
		switch {
		case !nameRE.MatchString(sn.Name) || snaps[sn.Name]:
			return bad(f+".name", "%q is not a snapshot name, or repeats one", sn.Name)
		case sn.Parent != "" && !snaps[sn.Parent]:
			return bad(f+".parent", "%q is not an earlier snapshot", sn.Parent)
		case len(sn.Layers) != len(m.Disks):
			return bad(f+".layers", "names %d disks, the VM has %d", len(sn.Layers), len(m.Disks))
		}
		for disk, id := range sn.Layers {
			if layerDisk[id] != disk || tops[id] {
				return bad(f+".layers", "%q is not a frozen layer of disk %q", id, disk)
			}
		}
		if mem := sn.Memory; mem != nil {
			switch {
			case mem.Entry != MemoryEntry(sn.Name):
				return bad(f+".memory.entry", "%q; want %q", mem.Entry, MemoryEntry(sn.Name))
			case mem.Size < 0 || mem.Size > 2*maxMemory || mem.Data < 0 || mem.Data > RoundBlock(mem.Size):
				return bad(f+".memory.size", "%d bytes with %d stored is out of range", mem.Size, mem.Data)
			case mem.CPUs < 1 || mem.CPUs > maxCPUs || mem.MaxCPUs < 0 || mem.MaxCPUs > maxCPUs || mem.BootCPUs < 0 || mem.BootCPUs > maxCPUs ||
				mem.BootMaxCPUs < 0 || mem.BootMaxCPUs > maxCPUs || mem.HotCPUs < 0 || mem.HotCPUs > maxCPUs:
				return bad(f+".memory.cpus", "out of range")
			case mem.MemorySize < 16<<20 || mem.MemorySize > maxMemory || mem.MaxMemorySize < 0 || mem.MaxMemorySize > maxMemory ||
				mem.Target < 0 || mem.Target > maxMemory || mem.MaxMemory < 0 || mem.MaxMemory > maxMemory || len(mem.Dimms) > 8:
				return bad(f+".memory.memory_size", "out of range")
			}
			for _, dm := range mem.Dimms {
				if dm <= 0 || dm > maxMemory {
					return bad(f+".memory.dimms", "%d bytes is out of range", dm)
				}
			}
		}
		snaps[sn.Name] = true
	}
	if m.CurrentSnapshot != "" && !snaps[m.CurrentSnapshot] {
		return bad("current_snapshot", "%q is not a snapshot", m.CurrentSnapshot)
	}
	return nil
}

// EntrySpec is one data entry the archive holds after the manifest.
type EntrySpec struct {
	Name     string
	RealSize int64 // the file's length, holes included
	Data     int64 // bytes stored
}

// Entries lists the data entries a bundle with manifest m holds, in
// archive order: each disk flattened; or, with snapshots, each disk's base,
// then the layers, then the memory states.
func (m Manifest) Entries() []EntrySpec {
	var out []EntrySpec
	if len(m.Layers) == 0 {
		for _, d := range m.Disks {
			out = append(out, EntrySpec{d.Entry, d.Size, d.Data})
		}
		return out
	}
	for _, d := range m.Disks {
		if d.Base != "" {
			out = append(out, EntrySpec{d.Base, d.BaseSize, d.Data})
		}
	}
	// Files are carried rounded up to whole 512-byte blocks, which GNU
	// tar's sparse regions need; the importer cuts them back to Size.
	for _, l := range m.Layers {
		out = append(out, EntrySpec{l.Entry, RoundBlock(l.Size), l.Data})
	}
	for _, sn := range m.Snapshots {
		if sn.Memory != nil {
			out = append(out, EntrySpec{sn.Memory.Entry, RoundBlock(sn.Memory.Size), sn.Memory.Data})
		}
	}
	return out
}

// RoundBlock rounds n up to a whole number of 512-byte blocks.
func RoundBlock(n int64) int64 { return (n + block - 1) &^ (block - 1) }

// setData records how much of entry name is stored.
func (m *Manifest) setData(name string, n int64) {
	for i := range m.Disks {
		if m.Disks[i].Entry == name || m.Disks[i].Base == name {
			m.Disks[i].Data = n
		}
	}
	for i := range m.Layers {
		if m.Layers[i].Entry == name {
			m.Layers[i].Data = n
		}
	}
	for i := range m.Snapshots {
		if mem := m.Snapshots[i].Memory; mem != nil && mem.Entry == name {
			mem.Data = n
		}
	}
}
