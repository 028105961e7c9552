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
	Entry string `json:"entry"`
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
		case d.Entry != DiskEntry(d.Name):
			return bad(f+".entry", "%q; want %q", d.Entry, DiskEntry(d.Name))
		case d.Data < 0 || d.Data > d.Size:
			return bad(f+".data", "%d bytes is outside 0-size", d.Data)
		}
		names[d.Name] = true
	}
	return nil
}
