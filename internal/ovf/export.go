package ovf

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Machine is what an OVA export describes.
type Machine struct {
	// Name names the virtual system and the files of the package, so it
	// must be usable as a file name: letters, digits, '_' and '-', starting
	// with a letter or digit, at most 63 characters (which every Lodge VM
	// name is).
	Name        string
	CPUs        int
	MemoryBytes int64  // rounded up to whole MiB, the unit OVF readers expect
	Firmware    string // "bios" or "efi"; empty means "bios"
	Disks       []ExportDisk
	NICs        []ExportNIC
}

// ExportDisk is one disk of an exported machine. Disks are attached in
// slice order, which Proxmox takes as the boot order; VMware and
// VirtualBox apply their own controller rules.
type ExportDisk struct {
	Name     string // e.g. "vda"; file in the OVA is <vmname>-<name>.vmdk
	Source   string // path of a qcow2 (possibly the top of a backing chain) or raw image to read, or an nbd+unix:/// URI (Format raw)
	Format   string // qemu-img format of Source: "qcow2" or "raw"
	Capacity int64  // virtual size in bytes; must match Source
	Bus      string // virtio, scsi, ide or nvme
}

// ExportNIC is one network card of an exported machine.
type ExportNIC struct {
	MAC     string // e.g. "52:54:00:12:34:56"; empty lets the importer choose
	Network string // logical network name; empty means defaultNetwork
}

// Namespaces the writer declares besides the OVF 1.0 envelope. The vmw
// prefix is spelled exactly so because Proxmox looks up the firmware with a
// literal "vmw:" in its XPath.
const (
	nsRASD = nsCIM + "CIM_ResourceAllocationSettingData"
	nsVSSD = nsCIM + "CIM_VirtualSystemSettingData"
	nsVMW  = "http://www.vmware.com/schema/ovf"
)

// formatStreamVMDK is the ovf:format that VMware, VirtualBox and Proxmox
// all recognise for a compressed, sequentially readable VMDK.
const formatStreamVMDK = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

// Resource types the writer uses besides those the reader knows.
const (
	rtIDEController  = 5
	rtSCSIController = 6
	rtEthernet       = 10
)

// virtualSystemType names a VMware hardware family only. VMware refuses
// families it does not know (a bare "virtualbox-2.2" is the classic import
// failure), whereas VirtualBox and Proxmox accept any value. vmx-10
// (ESXi 5.5, Workstation 10) supports EFI and every device written here.
const virtualSystemType = "vmx-10"

// defaultNetwork is the Connection of a NIC without a network: ESXi's
// default port group has this name, and other importers ask the user to
// map networks anyway.
const defaultNetwork = "VM Network"

// Disk limits follow from the controllers written. There is one SCSI
// controller because VirtualBox refuses appliances with more; LSI Logic
// has units 0 to 15 and uses 7 itself. IDE has two controllers with a
// master and a slave each.
const (
	maxSCSIDisks = 15
	maxIDEDisks  = 4
	scsiSelfUnit = 7
)

// Name limits keep "<machine>-<disk>.vmdk" within the 100 bytes of a
// USTAR name field, which every tar reader handles.
var (
	machineNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)
	diskNameRE    = regexp.MustCompile(`^[a-z0-9_-]{1,31}$`)
)

// copyBlock is the unit of copying and of cancellation checks when hashing
// and archiving VMDKs; larger than blockSize because nothing here looks
// for holes, and fewer, larger writes keep the archive writer busy.
const copyBlock = 1 << 20

// maxStderr bounds how much of qemu-img's complaint goes into an error.
const maxStderr = 4 << 10

// waitDelay bounds how long a cancelled qemu-img may hold its output pipes
// open after it has been killed.
const waitDelay = 5 * time.Second

// ustarMaxSize is the largest size the 11 octal digits of a USTAR header
// can hold.
const ustarMaxSize = 1<<33 - 1

// attachment places a disk on a controller.
type attachment struct {
	ide        bool
	controller int // IDE controller 0 or 1; always 0 for SCSI
	unit       int // AddressOnParent
}

// packedDisk is a converted disk waiting in the temporary directory.
type packedDisk struct {
	file      string // member name in the archive
	path      string
	size      int64
	sum       []byte // SHA256
	populated int64  // bytes of the virtual disk that hold data
}

// exportError formats a one-line export error; %w wraps as in fmt.Errorf.
func exportError(format string, args ...any) error {
	return fmt.Errorf("ovf: export: "+format, args...)
}

// WriteOVA writes an OVA (a tar holding the .ovf descriptor first, then a
// .mf manifest with SHA256 lines, then one streamOptimized VMDK per disk)
// to w.
//
// It converts each disk with qemu-img (binary given; "qemu-img" if empty)
// into a temporary file under tmpDir (os.TempDir() if empty), which it
// removes before it returns, even on error or cancel. The manifest must
// precede the VMDKs in the archive, so every disk is converted and hashed
// before the first byte goes to w: if m is refused or a conversion fails,
// nothing has been written. An error while writing leaves a partial
// archive in w, which the caller must discard.
//
// Progress, if non-nil, is called with bytes written to w so far and an
// estimated total. It is first called, with done 0, once the conversions
// are over; conversion itself reports nothing, since it writes nothing to
// w.
//
// Errors are single lines starting "ovf: export:" and name the offending
// field or disk; cancellation returns ctx.Err().
func WriteOVA(ctx context.Context, w io.Writer, m Machine, qemuImg, tmpDir string, progress func(done, total int64)) (err error) {
	places, err := m.check()
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if qemuImg == "" {
		qemuImg = "qemu-img"
	}
	if tmpDir == "" {
		tmpDir = os.TempDir()
	}
	// An absolute path keeps qemu-img from reading a "name:" prefix as a
	// protocol.
	if tmpDir, err = filepath.Abs(tmpDir); err != nil {
		return exportError("%w", err)
	}
	work, err := os.MkdirTemp(tmpDir, "ova-export-")
	if err != nil {
		return exportError("%w", err)
	}
	defer func() {
		if rerr := os.RemoveAll(work); rerr != nil && err == nil {
			err = exportError("remove temporary files: %w", rerr)
		}
	}()

	disks := make([]packedDisk, len(m.Disks))
	for i, d := range m.Disks {
		if err := ctx.Err(); err != nil {
			return err
		}
		disks[i], err = packDisk(ctx, qemuImg, work, m.Name, d, places[i])
		if err != nil {
			return err
		}
	}

	desc, err := m.descriptor(disks, places)
	if err != nil {
		return err
	}
	descName := m.Name + ".ovf"
	mfName := m.Name + ".mf"
	var mf bytes.Buffer
	descSum := sha256.Sum256(desc)
	fmt.Fprintf(&mf, "SHA256(%s)= %x\n", descName, descSum)
	for _, d := range disks {
		fmt.Fprintf(&mf, "SHA256(%s)= %x\n", d.file, d.sum)
	}

	sizes := []int64{int64(len(desc)), int64(mf.Len())}
	for _, d := range disks {
		sizes = append(sizes, d.size)
	}
	pw := &progressWriter{w: w, report: progress, total: archiveSize(sizes)}
	pw.start()
	tw := tar.NewWriter(pw)
	mtime := time.Now().Truncate(time.Second)
	if err := writeMember(tw, descName, desc, mtime); err != nil {
		return err
	}
	if err := writeMember(tw, mfName, mf.Bytes(), mtime); err != nil {
		return err
	}
	// The OVF specification wants the remaining files in References
	// order, which streaming importers rely on.
	for _, d := range disks {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := tw.WriteHeader(memberHeader(d.file, d.size, mtime)); err != nil {
			return exportError("write archive: %w", err)
		}
		if err := copyFile(ctx, tw, d.path, d.size); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return exportError("write archive: %w", err)
	}
	pw.finish()
	return nil
}

// check validates m and places its disks on controllers. Everything is
// checked before any work starts, so a refusal leaves no trace.
func (m *Machine) check() ([]attachment, error) {
	switch {
	case m.Name == "":
		return nil, exportError("Machine.Name is empty")
	case !machineNameRE.MatchString(m.Name):
		return nil, exportError("Machine.Name %q must be 1 to 63 letters, digits, '_' or '-', starting with a letter or digit", m.Name)
	case m.CPUs < 1 || m.CPUs > maxCPUs:
		return nil, exportError("Machine.CPUs is %d, want 1 to %d", m.CPUs, maxCPUs)
	case m.MemoryBytes < 1<<20:
		return nil, exportError("Machine.MemoryBytes is %d, want at least 1 MiB", m.MemoryBytes)
	case m.MemoryBytes > maxMemory:
		return nil, exportError("Machine.MemoryBytes is %d, more than %d GiB", m.MemoryBytes, maxMemory>>30)
	case m.Firmware != "" && m.Firmware != "bios" && m.Firmware != "efi":
		return nil, exportError("Machine.Firmware is %q, want \"bios\" or \"efi\"", m.Firmware)
	case len(m.Disks) == 0:
		return nil, exportError("Machine.Disks is empty; an appliance needs at least one disk")
	}
	places := make([]attachment, len(m.Disks))
	seen := map[string]bool{}
	ide, scsi := 0, 0
	for i, d := range m.Disks {
		field := fmt.Sprintf("Machine.Disks[%d]", i)
		switch {
		case !diskNameRE.MatchString(d.Name):
			return nil, exportError("%s.Name %q must be 1 to 31 of a-z, 0-9, '_' and '-'", field, d.Name)
		case seen[d.Name]:
			return nil, exportError("%s.Name %q is used by an earlier disk", field, d.Name)
		case d.Source == "":
			return nil, exportError("%s.Source is empty", field)
		case d.Format != "qcow2" && d.Format != "raw":
			return nil, exportError("%s.Format is %q, want \"qcow2\" or \"raw\"", field, d.Format)
		case d.Capacity <= 0 || d.Capacity%512 != 0:
			return nil, exportError("%s.Capacity is %d, want a positive multiple of 512 bytes", field, d.Capacity)
		case d.Capacity > maxCapacity:
			return nil, exportError("%s.Capacity is %d, more than %d TiB", field, d.Capacity, maxCapacity>>40)
		}
		seen[d.Name] = true
		switch d.Bus {
		case "ide":
			if ide == maxIDEDisks {
				return nil, exportError("%s.Bus: more than %d IDE disks", field, maxIDEDisks)
			}
			places[i] = attachment{ide: true, controller: ide / 2, unit: ide % 2}
			ide++
		case "virtio", "scsi", "nvme":
			if scsi == maxSCSIDisks {
				return nil, exportError("%s.Bus: more than %d virtio, scsi and nvme disks, which share one SCSI controller in the appliance", field, maxSCSIDisks)
			}
			unit := scsi
			if unit >= scsiSelfUnit {
				unit++
			}
			places[i] = attachment{unit: unit}
			scsi++
		default:
			return nil, exportError("%s.Bus is %q, want virtio, scsi, ide or nvme", field, d.Bus)
		}
	}
	for i, n := range m.NICs {
		field := fmt.Sprintf("Machine.NICs[%d]", i)
		if n.MAC != "" {
			if hw, err := net.ParseMAC(n.MAC); err != nil || len(hw) != 6 {
				return nil, exportError("%s.MAC %q is not a 48-bit MAC address", field, n.MAC)
			}
		}
		if !utf8.ValidString(n.Network) || strings.ContainsFunc(n.Network, unicode.IsControl) || len(n.Network) > 255 {
			return nil, exportError("%s.Network %q must be at most 255 bytes of printable UTF-8", field, n.Network)
		}
	}
	return places, nil
}

// packDisk converts one disk into work and hashes the result.
func packDisk(ctx context.Context, qemuImg, work, machine string, d ExportDisk, at attachment) (packedDisk, error) {
	// An absolute path keeps qemu-img from reading a name that starts
	// with '-' as an option or one with a ':' as a protocol. An NBD URI
	// (a running VM's point-in-time view) is meant as one.
	src := d.Source
	if !strings.HasPrefix(src, "nbd+unix:///") {
		var err error
		if src, err = filepath.Abs(d.Source); err != nil {
			return packedDisk{}, exportError("disk %q: %w", d.Name, err)
		}
	}
	virtual, populated, err := mapImage(ctx, qemuImg, src, d)
	if err != nil {
		return packedDisk{}, err
	}
	if virtual != d.Capacity {
		return packedDisk{}, exportError("disk %q: Capacity is %d bytes, but %s has a virtual size of %d", d.Name, d.Capacity, src, virtual)
	}
	p := packedDisk{
		file:      machine + "-" + d.Name + ".vmdk",
		populated: populated,
	}
	p.path = filepath.Join(work, p.file)
	// The adapter type in the VMDK's own descriptor matters to VMware
	// when the disk is later attached outside this appliance.
	adapter := "lsilogic"
	if at.ide {
		adapter = "ide"
	}
	if err := runQemuImg(ctx, qemuImg, d.Name, nil, "convert", "-U", "-f", d.Format, "-O", "vmdk",
		"-o", "subformat=streamOptimized,adapter_type="+adapter, src, p.path); err != nil {
		return packedDisk{}, err
	}
	if p.size, p.sum, err = hashFile(ctx, p.path); err != nil {
		return packedDisk{}, err
	}
	return p, nil
}

// mapImage returns the virtual size of an image and how many of its bytes
// hold data, following the backing chain as the conversion will.
func mapImage(ctx context.Context, qemuImg, src string, d ExportDisk) (virtual, populated int64, err error) {
	err = runQemuImg(ctx, qemuImg, d.Name, func(r io.Reader) error {
		var perr error
		virtual, populated, perr = parseMap(r)
		return perr
	}, "map", "--output=json", "-U", "-f", d.Format, src)
	return virtual, populated, err
}

// parseMap sums the extents of qemu-img map's JSON output. It decodes one
// extent at a time because a large, fragmented image has millions.
func parseMap(r io.Reader) (virtual, populated int64, err error) {
	dec := json.NewDecoder(r)
	unreadable := func(err error) error {
		return fmt.Errorf("unreadable output: %s", oneLine(err.Error()))
	}
	if tok, err := dec.Token(); err != nil {
		return 0, 0, unreadable(err)
	} else if tok != json.Delim('[') {
		return 0, 0, fmt.Errorf("output is not a JSON array")
	}
	for dec.More() {
		var e struct {
			Start, Length int64
			Data          bool
		}
		if err := dec.Decode(&e); err != nil {
			return 0, 0, unreadable(err)
		}
		if e.Start < 0 || e.Length < 0 || e.Start > maxCapacity || e.Length > maxCapacity {
			return 0, 0, fmt.Errorf("extent at %d of length %d is out of range", e.Start, e.Length)
		}
		virtual = max(virtual, e.Start+e.Length)
		if e.Data {
			populated += e.Length
		}
	}
	if _, err := dec.Token(); err != nil {
		return 0, 0, unreadable(err)
	}
	return virtual, populated, nil
}

// runQemuImg runs qemu-img, handing its standard output to consume if that
// is not nil. A failure carries qemu-img's own complaint, which is what
// tells the user which file or option it disliked.
func runQemuImg(ctx context.Context, qemuImg, disk string, consume func(io.Reader) error, args ...string) error {
	cmd := exec.CommandContext(ctx, qemuImg, args...)
	stderr := &limitedBuffer{limit: maxStderr}
	cmd.Stderr = stderr
	cmd.WaitDelay = waitDelay
	var stdout io.ReadCloser
	if consume != nil {
		var err error
		if stdout, err = cmd.StdoutPipe(); err != nil {
			return exportError("disk %q: qemu-img %s: %w", disk, args[0], err)
		}
	}
	err := cmd.Start()
	var consumeErr error
	if err == nil {
		if consume != nil {
			consumeErr = consume(stdout)
			// Wait closes the pipe, so whatever consume left unread
			// must be drained first or qemu-img could block writing it.
			_, _ = io.Copy(io.Discard, stdout)
		}
		err = cmd.Wait()
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return ctxErr
	}
	if err != nil {
		if msg := oneLine(stderr.String()); msg != "" {
			return exportError("disk %q: qemu-img %s: %w: %s", disk, args[0], err, msg)
		}
		return exportError("disk %q: qemu-img %s: %w", disk, args[0], err)
	}
	if consumeErr != nil {
		return exportError("disk %q: qemu-img %s: %v", disk, args[0], consumeErr)
	}
	return nil
}

// limitedBuffer keeps the first limit bytes written to it and drops the
// rest, so that a chatty child cannot grow an error without bound.
type limitedBuffer struct {
	buf   bytes.Buffer
	limit int
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.limit - b.buf.Len(); room > 0 {
		b.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (b *limitedBuffer) String() string { return b.buf.String() }

// hashFile reads a converted disk once, for its size and digest; the only
// other read is the copy into the archive.
func hashFile(ctx context.Context, path string) (int64, []byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, nil, exportError("%w", err)
	}
	defer func() { _ = f.Close() }()
	h := sha256.New()
	buf := make([]byte, copyBlock)
	var size int64
	for {
		if err := ctx.Err(); err != nil {
			return 0, nil, err
		}
		n, err := f.Read(buf)
		_, _ = h.Write(buf[:n]) // hashes never fail
		size += int64(n)
		if errors.Is(err, io.EOF) {
			return size, h.Sum(nil), nil
		}
		if err != nil {
			return 0, nil, exportError("read %s: %w", filepath.Base(path), err)
		}
	}
}

// copyFile copies exactly size bytes of path to w in blocks, checking ctx
// between blocks so that cancelling a large export takes effect promptly.
func copyFile(ctx context.Context, w io.Writer, path string, size int64) error {
	f, err := os.Open(path)
	if err != nil {
		return exportError("%w", err)
	}
	defer func() { _ = f.Close() }()
	buf := make([]byte, copyBlock)
	for left := size; left > 0; {
		if err := ctx.Err(); err != nil {
			return err
		}
		b := buf[:min(left, int64(len(buf)))]
		if _, err := io.ReadFull(f, b); err != nil {
			return exportError("read %s: %w", filepath.Base(path), err)
		}
		if _, err := w.Write(b); err != nil {
			return exportError("write archive: %w", err)
		}
		left -= int64(len(b))
	}
	return nil
}

// memberHeader describes one archive member. USTAR holds sizes below
// 8 GiB; beyond that the GNU base-256 size field is used rather than the
// PAX header Go would choose, because VirtualBox's tar reader refuses PAX
// headers but reads base-256 numbers.
func memberHeader(name string, size int64, mtime time.Time) *tar.Header {
	format := tar.FormatUSTAR
	if size > ustarMaxSize {
		format = tar.FormatGNU
	}
	return &tar.Header{
		Typeflag: tar.TypeReg,
		Name:     name,
		Mode:     0o644,
		Size:     size,
		ModTime:  mtime,
		Format:   format,
	}
}

func writeMember(tw *tar.Writer, name string, data []byte, mtime time.Time) error {
	if err := tw.WriteHeader(memberHeader(name, int64(len(data)), mtime)); err != nil {
		return exportError("write archive: %w", err)
	}
	if _, err := tw.Write(data); err != nil {
		return exportError("write archive: %w", err)
	}
	return nil
}

// archiveSize is the length of a tar holding members of the given sizes:
// each takes one header block and its data padded to whole blocks (the
// headers chosen by memberHeader never need extension blocks), and two
// zero blocks end the archive.
func archiveSize(sizes []int64) int64 {
	total := int64(2 * 512)
	for _, s := range sizes {
		total += 512 + (s+511)/512*512
	}
	return total
}

// progressWriter counts what reaches w and reports it.
type progressWriter struct {
	w           io.Writer
	report      func(done, total int64)
	done, total int64
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.done += int64(n)
	if p.report != nil && n > 0 {
		// The total is computed, not measured; should it ever fall
		// short, the bar stops at full rather than running past it.
		p.total = max(p.total, p.done)
		p.report(p.done, p.total)
	}
	return n, err
}

func (p *progressWriter) start() {
	if p.report != nil {
		p.report(0, p.total)
	}
}

// finish makes the last report say done == total even if the estimate
// was off.
func (p *progressWriter) finish() {
	if p.report != nil && p.total != p.done {
		p.total = p.done
		p.report(p.done, p.total)
	}
}

// The descriptor types below map one to one onto OVF 1.0 elements. Names
// carry their prefixes literally, declared once on the Envelope, because
// encoding/xml would otherwise invent prefixes of its own and some readers
// (Proxmox's XPath, for one) match prefixes, not namespaces. Child elements
// are in schema order, which VMware's validating reader enforces.

type xEnvelope struct {
	XMLName        xml.Name         `xml:"Envelope"`
	NS             string           `xml:"xmlns,attr"`
	NSOVF          string           `xml:"xmlns:ovf,attr"`
	NSRASD         string           `xml:"xmlns:rasd,attr"`
	NSVSSD         string           `xml:"xmlns:vssd,attr"`
	NSVMW          string           `xml:"xmlns:vmw,attr"`
	References     []xFile          `xml:"References>File"`
	DiskSection    xDiskSection     `xml:"DiskSection"`
	NetworkSection *xNetworkSection `xml:"NetworkSection"`
	VirtualSystem  xVirtualSystem   `xml:"VirtualSystem"`
}

type xFile struct {
	Href string `xml:"ovf:href,attr"`
	ID   string `xml:"ovf:id,attr"`
	Size int64  `xml:"ovf:size,attr"`
}

type xDiskSection struct {
	Info  string  `xml:"Info"`
	Disks []xDisk `xml:"Disk"`
}

type xDisk struct {
	Capacity      int64  `xml:"ovf:capacity,attr"`
	CapacityUnits string `xml:"ovf:capacityAllocationUnits,attr"`
	DiskID        string `xml:"ovf:diskId,attr"`
	FileRef       string `xml:"ovf:fileRef,attr"`
	Format        string `xml:"ovf:format,attr"`
	PopulatedSize int64  `xml:"ovf:populatedSize,attr,omitempty"`
}

type xNetworkSection struct {
	Info     string     `xml:"Info"`
	Networks []xNetwork `xml:"Network"`
}

type xNetwork struct {
	Name        string `xml:"ovf:name,attr"`
	Description string `xml:"Description"`
}

type xVirtualSystem struct {
	ID       string     `xml:"ovf:id,attr"`
	Info     string     `xml:"Info"`
	Name     string     `xml:"Name"`
	OS       xOSSection `xml:"OperatingSystemSection"`
	Hardware xHardware  `xml:"VirtualHardwareSection"`
}

type xOSSection struct {
	ID          int    `xml:"ovf:id,attr"`
	OSType      string `xml:"vmw:osType,attr"`
	Info        string `xml:"Info"`
	Description string `xml:"Description"`
}

type xHardware struct {
	Info   string          `xml:"Info"`
	System xSystem         `xml:"System"`
	Items  []xItem         `xml:"Item"`
	Config []xVMwareConfig `xml:"vmw:Config"`
}

type xSystem struct {
	ElementName             string `xml:"vssd:ElementName"`
	InstanceID              string `xml:"vssd:InstanceID"`
	VirtualSystemIdentifier string `xml:"vssd:VirtualSystemIdentifier"`
	VirtualSystemType       string `xml:"vssd:VirtualSystemType"`
}

// xItem lists its fields alphabetically, which is the order of the CIM
// schema's sequence.
type xItem struct {
	Address             string `xml:"rasd:Address,omitempty"`
	AddressOnParent     string `xml:"rasd:AddressOnParent,omitempty"`
	AllocationUnits     string `xml:"rasd:AllocationUnits,omitempty"`
	AutomaticAllocation string `xml:"rasd:AutomaticAllocation,omitempty"`
	Connection          string `xml:"rasd:Connection,omitempty"`
	Description         string `xml:"rasd:Description,omitempty"`
	ElementName         string `xml:"rasd:ElementName"`
	HostResource        string `xml:"rasd:HostResource,omitempty"`
	InstanceID          string `xml:"rasd:InstanceID"`
	Parent              string `xml:"rasd:Parent,omitempty"`
	ResourceSubType     string `xml:"rasd:ResourceSubType,omitempty"`
	ResourceType        int    `xml:"rasd:ResourceType"`
	VirtualQuantity     string `xml:"rasd:VirtualQuantity,omitempty"`
}

// xVMwareConfig is a VMware extension; ovf:required="false" tells other
// readers they may ignore it, as the OVF specification lets them.
type xVMwareConfig struct {
	Required string `xml:"ovf:required,attr"`
	Key      string `xml:"vmw:key,attr"`
	Value    string `xml:"vmw:value,attr"`
}

// descriptor renders the OVF descriptor for m and its converted disks.
func (m *Machine) descriptor(disks []packedDisk, places []attachment) ([]byte, error) {
	env := xEnvelope{
		NS:     nsOVF1,
		NSOVF:  nsOVF1,
		NSRASD: nsRASD,
		NSVSSD: nsVSSD,
		NSVMW:  nsVMW,
		DiskSection: xDiskSection{
			Info: "Virtual disk information",
		},
		VirtualSystem: xVirtualSystem{
			ID:   m.Name,
			Info: "A virtual machine",
			Name: m.Name,
			// CIM operating system 101 is "Linux 64-Bit"; VMware prefers
			// its own osType, the others read the number.
			OS: xOSSection{
				ID:          101,
				OSType:      "otherLinux64Guest",
				Info:        "The kind of installed guest operating system",
				Description: "Linux 64-Bit",
			},
			Hardware: xHardware{
				Info: "Virtual hardware requirements",
				System: xSystem{
					ElementName:             "Virtual Hardware Family",
					InstanceID:              "0",
					VirtualSystemIdentifier: m.Name,
					VirtualSystemType:       virtualSystemType,
				},
			},
		},
	}
	for i, d := range disks {
		n := strconv.Itoa(i + 1)
		env.References = append(env.References, xFile{Href: d.file, ID: "file" + n, Size: d.size})
		env.DiskSection.Disks = append(env.DiskSection.Disks, xDisk{
			Capacity:      m.Disks[i].Capacity,
			CapacityUnits: "byte",
			DiskID:        "vmdisk" + n,
			FileRef:       "file" + n,
			Format:        formatStreamVMDK,
			PopulatedSize: d.populated,
		})
	}

	hw := &env.VirtualSystem.Hardware
	nextID := 0
	add := func(it xItem) string {
		nextID++
		it.InstanceID = strconv.Itoa(nextID)
		hw.Items = append(hw.Items, it)
		return it.InstanceID
	}
	add(xItem{
		AllocationUnits: "hertz * 10^6",
		Description:     "Number of Virtual CPUs",
		ElementName:     fmt.Sprintf("%d virtual CPU(s)", m.CPUs),
		ResourceType:    rtProcessor,
		VirtualQuantity: strconv.Itoa(m.CPUs),
	})
	// VirtualBox accepts memory only in a few spellings of megabytes, this
	// among them, and Proxmox takes the quantity as megabytes whatever
	// the unit says.
	mib := (m.MemoryBytes + 1<<20 - 1) >> 20
	add(xItem{
		AllocationUnits: "byte * 2^20",
		Description:     "Memory Size",
		ElementName:     fmt.Sprintf("%dMB of memory", mib),
		ResourceType:    rtMemory,
		VirtualQuantity: strconv.FormatInt(mib, 10),
	})

	// Every bus but IDE becomes LSI Logic SCSI: it is the one SCSI
	// controller VMware, VirtualBox and Proxmox all read, and Linux has
	// its driver. VirtualBox's way of writing virtio-scsi (ResourceType 20,
	// "VirtioSCSI") is refused by VMware and taken for SATA by Proxmox.
	var scsiID string
	var ideIDs [2]string
	for _, at := range places {
		switch {
		case !at.ide && scsiID == "":
			scsiID = add(xItem{
				Address:         "0",
				Description:     "SCSI Controller",
				ElementName:     "SCSI Controller 0",
				ResourceSubType: "lsilogic",
				ResourceType:    rtSCSIController,
			})
		case at.ide && ideIDs[at.controller] == "":
			// Address tells VirtualBox which controller is primary.
			ideIDs[at.controller] = add(xItem{
				Address:      strconv.Itoa(at.controller),
				Description:  "IDE Controller",
				ElementName:  fmt.Sprintf("IDE %d", at.controller),
				ResourceType: rtIDEController,
			})
		}
	}
	for i, at := range places {
		parent := scsiID
		if at.ide {
			parent = ideIDs[at.controller]
		}
		add(xItem{
			AddressOnParent: strconv.Itoa(at.unit),
			ElementName:     m.Disks[i].Name,
			HostResource:    "ovf:/disk/vmdisk" + strconv.Itoa(i+1),
			Parent:          parent,
			ResourceType:    rtDiskDrive,
		})
	}

	// E1000 is the one adapter all three importers know and every guest
	// has a driver for; virtio-net has no OVF name VMware accepts.
	var networks []string
	for i, n := range m.NICs {
		network := n.Network
		if network == "" {
			network = defaultNetwork
		}
		if !slices.Contains(networks, network) {
			networks = append(networks, network)
		}
		var mac string
		if n.MAC != "" {
			addr, _ := net.ParseMAC(n.MAC) // check has parsed it already
			mac = addr.String()
		}
		add(xItem{
			Address:             mac,
			AutomaticAllocation: "true",
			Connection:          network,
			Description:         fmt.Sprintf("E1000 ethernet adapter on %q", network),
			ElementName:         fmt.Sprintf("Network adapter %d", i+1),
			ResourceSubType:     "E1000",
			ResourceType:        rtEthernet,
		})
	}
	if len(networks) > 0 {
		sec := &xNetworkSection{Info: "The list of logical networks"}
		for _, n := range networks {
			sec.Networks = append(sec.Networks, xNetwork{Name: n, Description: fmt.Sprintf("The %s network", n)})
		}
		env.NetworkSection = sec
	}

	// OVF has no firmware setting. VMware's extension is the only one
	// other importers look for (Proxmox does); VirtualBox reads firmware
	// from its own vbox:Machine section only.
	if m.Firmware == "efi" {
		hw.Config = append(hw.Config, xVMwareConfig{Required: "false", Key: "firmware", Value: "efi"})
	}

	var b bytes.Buffer
	b.WriteString(xml.Header)
	enc := xml.NewEncoder(&b)
	enc.Indent("", "  ")
	if err := enc.Encode(env); err != nil {
		return nil, exportError("encode descriptor: %w", err)
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}
