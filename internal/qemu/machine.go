// Package qemu starts and supervises QEMU processes. Each VM is its own
// daemonized QEMU with a QMP socket, an agent socket, a serial console
// socket and a pidfile in its run directory, so it outlives the daemon and
// a new daemon can find it again. The package knows nothing of HTTP or of
// the services above it.
package qemu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Disk buses a VM disk can sit on.
const (
	BusVirtio = "virtio"
	BusSCSI   = "scsi"
	BusIDE    = "ide"
	BusNVMe   = "nvme"
)

// Buses lists the supported disk buses.
var Buses = []string{BusVirtio, BusSCSI, BusIDE, BusNVMe}

// Disk is one disk attached to a machine.
type Disk struct {
	Name string
	Path string
	Bus  string
	// Format is the file's format; Lodge only attaches qcow2 and raw,
	// named explicitly so QEMU never guesses.
	Format   string
	ReadOnly bool
	// Backing is the chain of files under Path, nearest first, when the
	// caller read it; QEMU then opens each with Lodge's options instead
	// of its own defaults. Empty: QEMU follows the chain itself.
	Backing []BackingFile
}

// BackingFile is one file of a disk's backing chain.
type BackingFile struct {
	Path   string
	Format string
}

// NIC is one network card: on QEMU's user-mode NAT; with Tap set, on a
// tap device the caller opened (a private network's bridge); with Switch
// set, on a user-space switch, through a datagram socket at Port.
type NIC struct {
	MAC          string
	Tap          *os.File
	Switch, Port string
}

// Machine is everything needed to build a QEMU command line.
type Machine struct {
	Name string
	UUID string
	CPUs int
	// MaxCPUs above CPUs leaves room for CPUs plugged in while the guest
	// runs, one socket each; HotCPUs are those already plugged, which a
	// QEMU that loads the guest's saved state needs on its command line.
	MaxCPUs, HotCPUs int
	Memory           int64
	// MaxMemory above Memory adds a virtio-mem device that can plug in
	// the difference while the guest runs; see HotplugSize.
	MaxMemory int64
	// Dimms are the pc-dimms plugged into the running guest, in order;
	// a QEMU that loads its saved state needs them on its command line.
	Dimms   []int64
	Disks   []Disk
	NICs    []NIC
	SeedISO string
	// VsockCID adds a vhost-vsock device with this context id when not 0.
	VsockCID uint32
	// Incoming starts QEMU waiting for a saved state (migrate-incoming)
	// instead of booting.
	Incoming bool
	RunDir   string
	Accel    string
	CPUModel string
	// TCGCache caps TCG's translated-code cache when not 0. QEMU's default
	// is 1 GiB, and a guest's boot alone fills close to 100 MiB of it,
	// resident for as long as the VM runs.
	TCGCache  int64
	ExtraArgs []string
}

// Run-directory file names.
const (
	QMPSocket     = "qmp.sock"
	QGASocket     = "qga.sock"
	ConsoleSocket = "console.sock"
	SerialLog     = "serial.log"
	PIDFile       = "pid"
)

// Path returns a file in the run directory.
func (m Machine) Path(file string) string { return filepath.Join(m.RunDir, file) }

// Args builds the QEMU command line. The machine type is i440fx ("pc"):
// its PIIX IDE controller is the one that every guest kernel can drive,
// which the seed CD and the ide bus need (q35's AHCI is missing from
// Debian's cloud kernel).
func (m Machine) Args() ([]string, error) {
	if m.CPUs < 1 {
		return nil, fmt.Errorf("machine %q: cpus %d: must be at least 1", m.Name, m.CPUs)
	}
	if m.Memory < 16<<20 {
		return nil, fmt.Errorf("machine %q: memory %d: too small", m.Name, m.Memory)
	}
	accel := m.Accel
	if accel == "" {
		accel = "tcg"
	}
	args := []string{
		"-name", "guest=" + m.Name + ",debug-threads=on",
		"-uuid", m.UUID,
		"-machine", "pc", "-accel", m.accelOption(accel),
		"-m", m.memoryOption(),
		"-smp", m.smpOption(),
		"-nodefaults", "-no-user-config", "-display", "none",
		// -no-shutdown keeps QEMU alive after the guest powers off, so a
		// daemon that was away still sees a clean shutdown, not a crash.
		"-daemonize", "-no-shutdown", "-pidfile", m.Path(PIDFile),
		"-qmp", "unix:" + m.Path(QMPSocket) + ",server=on,wait=off",
		"-chardev", "socket,id=con0,path=" + m.Path(ConsoleSocket) + ",server=on,wait=off,logfile=" + m.Path(SerialLog) + ",logappend=on",
		"-serial", "chardev:con0",
		"-chardev", "socket,id=qga0,path=" + m.Path(QGASocket) + ",server=on,wait=off",
		"-device", "virtio-serial-pci,id=vser0",
		"-device", "virtserialport,bus=vser0.0,chardev=qga0,id=qga0port,name=org.qemu.guest_agent.0",
		"-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", "virtio-rng-pci,rng=rng0",
	}
	if m.CPUModel != "" {
		args = append(args, "-cpu", m.CPUModel)
	}
	for i := m.CPUs; i < m.CPUs+m.HotCPUs && i < m.MaxCPUs; i++ {
		args = append(args, "-device", m.CPUDevice(i))
	}
	if hot := m.HotplugSize(); hot > 0 {
		// The backend reserves no RAM: virtio-mem populates only the
		// blocks it plugs, and the guest starts with none of them.
		args = append(args,
			"-object", "memory-backend-ram,id="+HotplugDevice+"-mem,size="+strconv.FormatInt(hotplugRegion(hot)>>20, 10)+"M,reserve=off",
			"-device", "virtio-mem-pci,id="+HotplugDevice+",memdev="+HotplugDevice+"-mem,requested-size=0")
		for i, size := range m.Dimms {
			id := DimmID(i)
			args = append(args,
				"-object", "memory-backend-ram,id="+id+"-mem,size="+strconv.FormatInt(size>>20, 10)+"M",
				"-device", "pc-dimm,id="+id+",memdev="+id+"-mem")
		}
	}
	scsi := false
	for i, d := range m.Disks {
		if d.Format != "qcow2" && d.Format != "raw" {
			return nil, fmt.Errorf("machine %q: disk %q: format %q: want qcow2 or raw", m.Name, d.Name, d.Format)
		}
		node := "disk" + strconv.Itoa(i)
		ro := ""
		if d.ReadOnly {
			ro = ",read-only=on"
		}
		// The backing chain is named node by node, from the bottom, so
		// that each file gets the same options as the top.
		backing := ""
		for j := len(d.Backing) - 1; j >= 0; j-- {
			b := d.Backing[j]
			if b.Format != "qcow2" && b.Format != "raw" {
				return nil, fmt.Errorf("machine %q: disk %q: backing file %s: format %q: want qcow2 or raw", m.Name, d.Name, b.Path, b.Format)
			}
			bnode := node + "-b" + strconv.Itoa(j+1)
			below := ""
			if backing != "" {
				below = ",backing=" + backing
			}
			// A layer is read-only until a merge (block-stream into it)
			// needs to write it; auto-read-only opens its file read-only
			// until then, so that VMs on one image share it.
			args = append(args,
				"-blockdev", "driver=file,filename="+escape(b.Path)+",node-name="+bnode+"-file,cache.direct=off,drop-cache=off,auto-read-only=on",
				"-blockdev", "driver="+b.Format+",file="+bnode+"-file,node-name="+bnode+",read-only=on"+below)
			backing = bnode
		}
		top := ""
		if backing != "" {
			top = ",backing=" + backing
		}
		// drop-cache=off: a live memory snapshot ends like a migration,
		// and QEMU would otherwise drop the disk's page cache when it
		// takes the disk back (the guest would read it all from disk
		// again). Only a host that takes over shared storage needs that.
		args = append(args,
			"-blockdev", "driver=file,filename="+escape(d.Path)+",node-name="+node+"-file,cache.direct=off,discard=unmap,drop-cache=off"+ro,
			"-blockdev", "driver="+d.Format+",file="+node+"-file,node-name="+node+",discard=unmap"+ro+top)
		props, err := DiskDevice(d.Bus, node, i)
		if err != nil {
			return nil, fmt.Errorf("machine %q: disk %q: %w", m.Name, d.Name, err)
		}
		if d.Bus == BusSCSI && !scsi {
			args = append(args, "-device", "virtio-scsi-pci,id="+scsiController)
			scsi = true
		}
		dev := props[0].Value
		for _, p := range props[1:] {
			dev += "," + p.Name + "=" + p.Value
		}
		if i == 0 {
			dev += ",bootindex=0"
		}
		args = append(args, "-device", dev)
	}
	if m.SeedISO != "" {
		args = append(args,
			"-drive", "if=none,id=seed,file="+escape(m.SeedISO)+",format=raw,readonly=on,media=cdrom",
			"-device", "ide-cd,bus=ide.1,unit=0,drive=seed,id=seed-dev")
	}
	for i, n := range m.NICs {
		id := "net" + strconv.Itoa(i)
		netdev := "user,id=" + id
		switch {
		case n.Tap != nil:
			netdev = "tap,id=" + id + ",fd=" + strconv.Itoa(m.tapFD(i))
		case n.Switch != "":
			netdev = "dgram,id=" + id + ",local.type=unix,local.path=" + escape(n.Port) + ",remote.type=unix,remote.path=" + escape(n.Switch)
		}
		args = append(args,
			"-netdev", netdev,
			"-device", "virtio-net-pci,netdev="+id+",mac="+n.MAC+",id="+id+"-dev")
	}
	if m.VsockCID != 0 {
		args = append(args, "-device", "vhost-vsock-pci,id=vsock0,guest-cid="+strconv.FormatUint(uint64(m.VsockCID), 10))
	}
	if m.Incoming {
		args = append(args, "-incoming", "defer")
	}
	return append(args, m.ExtraArgs...), nil
}

// Files are the open files QEMU inherits, from fd 3 on: the taps.
func (m Machine) Files() []*os.File {
	var out []*os.File
	for _, n := range m.NICs {
		if n.Tap != nil {
			out = append(out, n.Tap)
		}
	}
	return out
}

// tapFD is the descriptor NIC i's tap has in QEMU (see Files).
func (m Machine) tapFD(i int) int {
	fd := 3
	for _, n := range m.NICs[:i] {
		if n.Tap != nil {
			fd++
		}
	}
	return fd
}

func (m Machine) smpOption() string {
	if m.MaxCPUs > m.CPUs {
		return fmt.Sprintf("cpus=%d,maxcpus=%d,sockets=%d,cores=1,threads=1", m.CPUs, m.MaxCPUs, m.MaxCPUs)
	}
	return strconv.Itoa(m.CPUs)
}

// CPUID names the CPU in socket i.
func CPUID(i int) string { return "cpu" + strconv.Itoa(i) }

// CPUDriver is the device type of a plugged CPU of the machine's model.
func (m Machine) CPUDriver() string {
	model := m.CPUModel
	if model == "" {
		model = "qemu64"
	}
	return model + "-x86_64-cpu"
}

// CPUDevice is the -device value of the CPU in socket i.
func (m Machine) CPUDevice(i int) string {
	return fmt.Sprintf("%s,id=%s,socket-id=%d,core-id=0,thread-id=0", m.CPUDriver(), CPUID(i), i)
}

func (m Machine) accelOption(accel string) string {
	if accel == "tcg" && m.TCGCache > 0 {
		return "tcg,tb-size=" + strconv.FormatInt(max(m.TCGCache>>20, 1), 10)
	}
	return accel
}

// HotplugDevice is the QOM id of the virtio-mem device.
const HotplugDevice = "hotmem0"

// HotplugBlock is the granularity virtio-mem plugs in: QEMU's default
// block size on x86, the size of a transparent huge page.
const HotplugBlock = 2 << 20

// HotplugSize is how much memory the virtio-mem device can plug: the
// room between Memory and MaxMemory, in whole blocks.
func (m Machine) HotplugSize() int64 {
	if m.MaxMemory <= m.Memory {
		return 0
	}
	return (m.MaxMemory - m.Memory) &^ (HotplugBlock - 1)
}

// DimmBlock is the granularity of pc-dimms: Linux on x86 adds memory in
// 128 MiB blocks, aligned to them, and leaves a smaller dimm offline.
const DimmBlock = 128 << 20

// DimmSlots is how many pc-dimms a guest can take.
const DimmSlots = 8

// DimmID names the i-th pc-dimm.
func DimmID(i int) string { return "dimm" + strconv.Itoa(i) }

// hotplugRegion is the address space each of virtio-mem and the pc-dimms
// get: whole dimm blocks, so that the dimms placed after virtio-mem's
// region stay aligned.
func hotplugRegion(hot int64) int64 {
	return (hot + DimmBlock - 1) &^ (DimmBlock - 1)
}

// The hot-plug address space holds virtio-mem's region and, after it,
// as much again for pc-dimms, used with guests that have no virtio-mem
// driver. It is address space only: nothing is allocated for it.
func (m Machine) memoryOption() string {
	boot := m.Memory >> 20
	if hot := m.HotplugSize(); hot > 0 {
		return fmt.Sprintf("%dM,slots=%d,maxmem=%dM", boot, DimmSlots, boot+2*hotplugRegion(hot)>>20)
	}
	return strconv.FormatInt(boot, 10) + "M"
}

// escape doubles commas, which QEMU's option syntax uses as separators.
// scsiController is the id of the SCSI controller a machine whose disks
// are on SCSI has.
const scsiController = "scsi0"

// Prop is one property of a device.
type Prop struct{ Name, Value string }

// DiskDevice is the device that puts block node node on bus as the
// machine's disk i: its properties in order, the driver first. The
// command line and a hot-plug into a running machine both use it, so that
// a disk plugged in is where the next boot puts it.
func DiskDevice(bus, node string, i int) ([]Prop, error) {
	ids := []Prop{{"drive", node}, {"id", node + "-dev"}}
	switch bus {
	case BusVirtio, "":
		return append([]Prop{{"driver", "virtio-blk-pci"}}, ids...), nil
	case BusSCSI:
		return append([]Prop{{"driver", "scsi-hd"}, {"bus", scsiController + ".0"}}, ids...), nil
	case BusIDE:
		// ide.1 unit 0 is the seed CD, so disks take ide.0 and then
		// ide.1 unit 1.
		if i > 2 {
			return nil, errors.New("the IDE bus takes at most 3 disks")
		}
		ideBus, unit := "ide.0", i
		if i == 2 {
			ideBus, unit = "ide.1", 1
		}
		return append([]Prop{{"driver", "ide-hd"}, {"bus", ideBus}, {"unit", strconv.Itoa(unit)}}, ids...), nil
	case BusNVMe:
		return append([]Prop{{"driver", "nvme"}, {"serial", "lodge" + strconv.Itoa(i)}}, ids...), nil
	}
	return nil, fmt.Errorf("unknown bus %q (want %s)", bus, strings.Join(Buses, ", "))
}

func escape(path string) string { return strings.ReplaceAll(path, ",", ",,") }
