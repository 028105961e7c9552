package ovf

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func needQemuImg(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Skip("qemu-img not installed: apt-get install qemu-utils")
	}
	return path
}

// runTool runs a command the test depends on and returns its output.
func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// pattern is a run of one byte value written into a test image.
type pattern struct {
	off, length int64
	value       byte
}

// makeImage creates a qcow2 image of size bytes, optionally on top of a
// qcow2 backing file, holding the given patterns. It uses qemu-io where
// available; otherwise it writes the full content as raw and converts it,
// and for an overlay lets a safe rebase reduce it to the difference.
func makeImage(t *testing.T, path string, size int64, backing string, pats ...pattern) {
	t.Helper()
	if _, err := exec.LookPath("qemu-io"); err == nil {
		args := []string{"create", "-q", "-f", "qcow2"}
		if backing != "" {
			args = append(args, "-b", backing, "-F", "qcow2")
		}
		runTool(t, "qemu-img", append(args, path, strconv.FormatInt(size, 10))...)
		for _, p := range pats {
			runTool(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -q -P 0x%02x %d %d", p.value, p.off, p.length), path)
		}
		return
	}
	raw := path + ".raw"
	if backing != "" {
		runTool(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", backing, raw)
	}
	writeRaw(t, raw, size, pats...)
	runTool(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
	if backing != "" {
		runTool(t, "qemu-img", "rebase", "-f", "qcow2", "-b", backing, "-F", "qcow2", path)
	}
	if err := os.Remove(raw); err != nil {
		t.Fatal(err)
	}
}

// writeRaw creates or extends a sparse raw image and writes patterns into it.
func writeRaw(t *testing.T, path string, size int64, pats ...pattern) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, p := range pats {
		if _, err := f.WriteAt(bytes.Repeat([]byte{p.value}, int(p.length)), p.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// testMachine has a qcow2 disk on virtio and a raw disk on IDE, so that
// both formats and both controller kinds are exercised.
func testMachine(t *testing.T) Machine {
	t.Helper()
	dir := t.TempDir()
	vda := filepath.Join(dir, "vda.qcow2")
	makeImage(t, vda, 64<<20, "", pattern{1 << 20, 4 << 20, 0x5a})
	vdb := filepath.Join(dir, "vdb.raw")
	writeRaw(t, vdb, 32<<20, pattern{0, 4096, 0x11}, pattern{20 << 20, 1 << 20, 0xa5})
	return Machine{
		Name:        "web-01",
		CPUs:        2,
		MemoryBytes: 1536 << 20,
		Firmware:    "efi",
		Disks: []ExportDisk{
			{Name: "vda", Source: vda, Format: "qcow2", Capacity: 64 << 20, Bus: "virtio"},
			{Name: "vdb", Source: vdb, Format: "raw", Capacity: 32 << 20, Bus: "ide"},
		},
		NICs: []ExportNIC{
			{MAC: "52:54:00:AB:CD:EF", Network: "lan"},
			{Network: ""},
		},
	}
}

// export writes m to an OVA file and returns its path and the progress
// reports. tmp must be empty afterwards, whatever happened.
func export(t *testing.T, m Machine) (string, [][2]int64) {
	t.Helper()
	tmp := t.TempDir()
	path := filepath.Join(t.TempDir(), m.Name+".ova")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	var reports [][2]int64
	err = WriteOVA(context.Background(), f, m, "", tmp, func(done, total int64) {
		reports = append(reports, [2]int64{done, total})
	})
	if cerr := f.Close(); cerr != nil {
		t.Fatal(cerr)
	}
	if err != nil {
		t.Fatalf("WriteOVA: %v", err)
	}
	if got := dirNames(t, tmp); len(got) > 0 {
		t.Errorf("tmpDir holds %q after WriteOVA, want nothing", got)
	}
	return path, reports
}

type ovaMember struct {
	hdr  *tar.Header
	data []byte
}

func readMembers(t *testing.T, path string) []ovaMember {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var out []ovaMember
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ovaMember{hdr, data})
	}
}

func TestWriteOVARoundTrip(t *testing.T) {
	needQemuImg(t)
	m := testMachine(t)
	ova, reports := export(t, m)

	dir := t.TempDir()
	d, paths, err := ReadOVA(context.Background(), ova, dir, 1<<30)
	if err != nil {
		t.Fatalf("ReadOVA: %v", err)
	}
	wantEq(t, "Name", d.Name, "web-01")
	wantEq(t, "CPUs", d.CPUs, 2)
	wantEq(t, "Memory", d.Memory, int64(1536<<20))
	wantEq(t, "OSType", d.OSType, "otherLinux64Guest")
	if len(d.Disks) != 2 || len(paths) != 2 {
		t.Fatalf("Disks = %+v, paths = %q, want two", d.Disks, paths)
	}
	for i, disk := range d.Disks {
		src := m.Disks[i]
		wantEq(t, "Disks["+strconv.Itoa(i)+"].File", disk.File, "web-01-"+src.Name+".vmdk")
		wantEq(t, "Disks["+strconv.Itoa(i)+"].Capacity", disk.Capacity, src.Capacity)
		wantEq(t, "Disks["+strconv.Itoa(i)+"].Format", disk.Format, vmdkStream)
		fi, err := os.Stat(paths[i])
		if err != nil {
			t.Fatal(err)
		}
		wantEq(t, "Disks["+strconv.Itoa(i)+"].FileSize", disk.FileSize, fi.Size())
		out := runTool(t, "qemu-img", "compare", "-f", src.Format, "-F", "vmdk", src.Source, paths[i])
		if !strings.Contains(out, "identical") {
			t.Errorf("qemu-img compare %s %s: %s", src.Source, paths[i], out)
		}
		info := runTool(t, "qemu-img", "info", paths[i])
		if !strings.Contains(info, "streamOptimized") {
			t.Errorf("%s is not a streamOptimized VMDK:\n%s", paths[i], info)
		}
	}

	fi, err := os.Stat(ova)
	if err != nil {
		t.Fatal(err)
	}
	if len(reports) < 2 {
		t.Fatalf("progress was reported %d times, want a start and some writes", len(reports))
	}
	if reports[0] != [2]int64{0, fi.Size()} {
		t.Errorf("first progress = %v, want [0 %d]", reports[0], fi.Size())
	}
	for i, r := range reports {
		if r[1] != fi.Size() {
			t.Errorf("progress %d has total %d, want the archive size %d throughout", i, r[1], fi.Size())
		}
		if i > 0 && r[0] < reports[i-1][0] {
			t.Errorf("progress went back from %d to %d", reports[i-1][0], r[0])
		}
	}
	if last := reports[len(reports)-1]; last[0] != fi.Size() {
		t.Errorf("last progress = %v, want done = %d", last, fi.Size())
	}
}

func TestWriteOVALayout(t *testing.T) {
	needQemuImg(t)
	m := testMachine(t)
	ova, _ := export(t, m)
	members := readMembers(t, ova)

	var names []string
	for _, mem := range members {
		names = append(names, mem.hdr.Name)
		if mem.hdr.Typeflag != tar.TypeReg || mem.hdr.Mode != 0o644 || mem.hdr.Format != tar.FormatUSTAR {
			t.Errorf("%s: type %q mode %o format %v, want a USTAR regular file with mode 644", mem.hdr.Name, mem.hdr.Typeflag, mem.hdr.Mode, mem.hdr.Format)
		}
	}
	wantNames := []string{"web-01.ovf", "web-01.mf", "web-01-vda.vmdk", "web-01-vdb.vmdk"}
	if !slices.Equal(names, wantNames) {
		t.Fatalf("members = %q, want %q", names, wantNames)
	}

	d, err := Parse(bytes.NewReader(members[0].data))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	for i, disk := range d.Disks {
		if got := int64(len(members[2+i].data)); disk.FileSize != got {
			t.Errorf("%s: References says %d bytes, the member has %d", disk.File, disk.FileSize, got)
		}
	}

	mf, err := ParseManifest(bytes.NewReader(members[1].data))
	if err != nil {
		t.Fatalf("ParseManifest: %v", err)
	}
	if len(mf) != 3 {
		t.Errorf("manifest lists %d files, want the descriptor and two disks:\n%s", len(mf), members[1].data)
	}
	for _, mem := range slices.Concat(members[:1], members[2:]) {
		want := sha256.Sum256(mem.data)
		if got := mf[mem.hdr.Name]; got.Algorithm != "SHA256" || !bytes.Equal(got.Sum, want[:]) {
			t.Errorf("manifest entry for %s = %s %x, want SHA256 %x", mem.hdr.Name, got.Algorithm, got.Sum, want)
		}
	}
	if !strings.HasPrefix(string(members[1].data), "SHA256(web-01.ovf)= ") {
		t.Errorf("manifest does not start with the descriptor's line:\n%s", members[1].data)
	}

	// The data written to vda is 4 MiB; what qemu-img reports for the raw
	// vdb depends on the file system's hole support, so only vda is checked.
	root, err := decodeTree(members[0].data)
	if err != nil {
		t.Fatal(err)
	}
	disk := root.child(nsOVF1, "DiskSection").child(nsOVF1, "Disk")
	wantEq(t, "vda populatedSize", disk.attr(nsOVF1, "populatedSize"), strconv.Itoa(4<<20))
}

// findItems returns the hardware items of a descriptor with the given
// resource type.
func findItems(t *testing.T, root *element, rt int) []*element {
	t.Helper()
	vhs := root.child(nsOVF1, "VirtualSystem").child(nsOVF1, "VirtualHardwareSection")
	var out []*element
	for _, it := range vhs.childrenNamed(nsOVF1, "Item") {
		if cimValue(it, "ResourceType") == strconv.Itoa(rt) {
			out = append(out, it)
		}
	}
	return out
}

// TestDescriptor checks the descriptor without converting anything, so it
// runs without qemu-img.
func TestDescriptor(t *testing.T) {
	m := Machine{
		Name:        "db",
		CPUs:        3,
		MemoryBytes: 1<<30 + 1, // rounds up to 1025 MiB
		Disks: []ExportDisk{
			{Name: "boot", Capacity: 8 << 30, Bus: "ide", Format: "raw", Source: "x"},
			{Name: "d1", Capacity: 1 << 30, Bus: "virtio", Format: "qcow2", Source: "x"},
			{Name: "d2", Capacity: 1 << 30, Bus: "ide", Format: "qcow2", Source: "x"},
			{Name: "d3", Capacity: 1 << 30, Bus: "ide", Format: "qcow2", Source: "x"},
			{Name: "d4", Capacity: 1 << 30, Bus: "nvme", Format: "qcow2", Source: "x"},
		},
		NICs: []ExportNIC{
			{MAC: "52-54-00-00-00-01", Network: `a<b&"c"`},
			{Network: `a<b&"c"`},
			{},
		},
	}
	for i := range 7 {
		m.Disks = append(m.Disks, ExportDisk{Name: "s" + strconv.Itoa(i), Capacity: 512, Bus: "scsi", Format: "raw", Source: "x"})
	}
	places, err := m.check()
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	disks := make([]packedDisk, len(m.Disks))
	for i, d := range m.Disks {
		disks[i] = packedDisk{file: "db-" + d.Name + ".vmdk", size: int64(1000 + i)}
	}
	desc, err := m.descriptor(disks, places)
	if err != nil {
		t.Fatalf("descriptor: %v", err)
	}
	text := string(desc)
	if !strings.HasPrefix(text, `<?xml version="1.0" encoding="UTF-8"?>`) {
		t.Errorf("descriptor does not start with an XML declaration:\n%.200s", text)
	}
	for _, want := range []string{`xmlns:vmw="` + nsVMW + `"`, `xmlns:rasd="` + nsRASD + `"`, `xmlns:vssd="` + nsVSSD + `"`, `ovf:capacityAllocationUnits="byte"`} {
		if !strings.Contains(text, want) {
			t.Errorf("descriptor lacks %s", want)
		}
	}
	if strings.Contains(text, "vmw:Config") {
		t.Errorf("BIOS machine has a vmw:Config:\n%s", text)
	}

	d, err := Parse(bytes.NewReader(desc))
	if err != nil {
		t.Fatalf("Parse: %v\n%s", err, text)
	}
	wantEq(t, "CPUs", d.CPUs, 3)
	wantEq(t, "Memory", d.Memory, int64(1025<<20))
	var files []string
	for i, disk := range d.Disks {
		files = append(files, disk.File)
		wantEq(t, disk.File+" Capacity", disk.Capacity, m.Disks[i].Capacity)
		wantEq(t, disk.File+" FileSize", disk.FileSize, int64(1000+i))
	}
	wantEq(t, "disk order", files, []string{"db-boot.vmdk", "db-d1.vmdk", "db-d2.vmdk", "db-d3.vmdk", "db-d4.vmdk",
		"db-s0.vmdk", "db-s1.vmdk", "db-s2.vmdk", "db-s3.vmdk", "db-s4.vmdk", "db-s5.vmdk", "db-s6.vmdk"})

	root, err := decodeTree(desc)
	if err != nil {
		t.Fatal(err)
	}
	// Every item lists its children in the schema's (alphabetical) order.
	vhs := root.child(nsOVF1, "VirtualSystem").child(nsOVF1, "VirtualHardwareSection")
	for _, it := range vhs.childrenNamed(nsOVF1, "Item") {
		var order []string
		for _, c := range it.children {
			order = append(order, c.name.Local)
		}
		if !slices.IsSorted(order) {
			t.Errorf("item %s children are out of schema order: %q", itemName(it, 0), order)
		}
	}

	scsi := findItems(t, root, rtSCSIController)
	if len(scsi) != 1 || cimValue(scsi[0], "ResourceSubType") != "lsilogic" {
		t.Fatalf("SCSI controllers = %d, want one LSI Logic", len(scsi))
	}
	ide := findItems(t, root, rtIDEController)
	if len(ide) != 2 || cimValue(ide[0], "Address") != "0" || cimValue(ide[1], "Address") != "1" {
		t.Fatalf("IDE controllers = %d, want two with Address 0 and 1", len(ide))
	}
	controller := map[string]string{
		cimValue(scsi[0], "InstanceID"): "scsi",
		cimValue(ide[0], "InstanceID"):  "ide0",
		cimValue(ide[1], "InstanceID"):  "ide1",
	}
	var slots []string
	for _, it := range findItems(t, root, rtDiskDrive) {
		slots = append(slots, fmt.Sprintf("%s %s:%s %s", cimValue(it, "ElementName"), controller[cimValue(it, "Parent")],
			cimValue(it, "AddressOnParent"), cimValue(it, "HostResource")))
	}
	wantEq(t, "disk slots", slots, []string{
		"boot ide0:0 ovf:/disk/vmdisk1", "d1 scsi:0 ovf:/disk/vmdisk2", "d2 ide0:1 ovf:/disk/vmdisk3",
		"d3 ide1:0 ovf:/disk/vmdisk4", "d4 scsi:1 ovf:/disk/vmdisk5",
		"s0 scsi:2 ovf:/disk/vmdisk6", "s1 scsi:3 ovf:/disk/vmdisk7", "s2 scsi:4 ovf:/disk/vmdisk8",
		"s3 scsi:5 ovf:/disk/vmdisk9", "s4 scsi:6 ovf:/disk/vmdisk10", "s5 scsi:8 ovf:/disk/vmdisk11",
		"s6 scsi:9 ovf:/disk/vmdisk12",
	})

	var nics []string
	for _, it := range findItems(t, root, rtEthernet) {
		nics = append(nics, fmt.Sprintf("%s %s %q", cimValue(it, "ResourceSubType"), cimValue(it, "Address"), cimValue(it, "Connection")))
	}
	wantEq(t, "NICs", nics, []string{`E1000 52:54:00:00:00:01 "a<b&\"c\""`, `E1000  "a<b&\"c\""`, `E1000  "VM Network"`})
	var networks []string
	for _, n := range root.child(nsOVF1, "NetworkSection").childrenNamed(nsOVF1, "Network") {
		networks = append(networks, n.attr(nsOVF1, "name"))
	}
	wantEq(t, "networks", networks, []string{`a<b&"c"`, "VM Network"})

	m.Firmware = "efi"
	desc, err = m.descriptor(disks, places)
	if err != nil {
		t.Fatal(err)
	}
	if root, err = decodeTree(desc); err != nil {
		t.Fatal(err)
	}
	cfg := root.child(nsOVF1, "VirtualSystem").child(nsOVF1, "VirtualHardwareSection").child(nsVMW, "Config")
	if cfg == nil || cfg.attr(nsVMW, "key") != "firmware" || cfg.attr(nsVMW, "value") != "efi" || cfg.attr(nsOVF1, "required") != "false" {
		t.Errorf("EFI machine lacks <vmw:Config ovf:required=\"false\" vmw:key=\"firmware\" vmw:value=\"efi\"/>:\n%s", desc)
	}
	if !strings.Contains(string(desc), "<vmw:Config ") {
		t.Errorf("vmw:Config is not written with the literal vmw prefix Proxmox looks for")
	}
}

func TestWriteOVARefuses(t *testing.T) {
	valid := func() Machine {
		return Machine{
			Name: "vm", CPUs: 1, MemoryBytes: 1 << 20,
			Disks: []ExportDisk{
				{Name: "vda", Source: "/nonexistent/a", Format: "qcow2", Capacity: 1 << 20, Bus: "virtio"},
				{Name: "vdb", Source: "/nonexistent/b", Format: "raw", Capacity: 1 << 20, Bus: "ide"},
			},
			NICs: []ExportNIC{{MAC: "52:54:00:00:00:01", Network: "lan"}},
		}
	}
	disks := func(n int, bus string) []ExportDisk {
		var out []ExportDisk
		for i := range n {
			out = append(out, ExportDisk{Name: "d" + strconv.Itoa(i), Source: "/x", Format: "raw", Capacity: 512, Bus: bus})
		}
		return out
	}
	tests := []struct {
		name   string
		change func(m *Machine)
		want   string
	}{
		{"empty name", func(m *Machine) { m.Name = "" }, "Machine.Name"},
		{"name with a slash", func(m *Machine) { m.Name = "a/b" }, "Machine.Name"},
		{"name with a space", func(m *Machine) { m.Name = "a b" }, "Machine.Name"},
		{"name with dots", func(m *Machine) { m.Name = ".." }, "Machine.Name"},
		{"name too long", func(m *Machine) { m.Name = strings.Repeat("a", 64) }, "Machine.Name"},
		{"no CPUs", func(m *Machine) { m.CPUs = 0 }, "Machine.CPUs"},
		{"negative CPUs", func(m *Machine) { m.CPUs = -1 }, "Machine.CPUs"},
		{"too many CPUs", func(m *Machine) { m.CPUs = maxCPUs + 1 }, "Machine.CPUs"},
		{"no memory", func(m *Machine) { m.MemoryBytes = 0 }, "Machine.MemoryBytes"},
		{"memory below 1 MiB", func(m *Machine) { m.MemoryBytes = 1<<20 - 1 }, "Machine.MemoryBytes"},
		{"too much memory", func(m *Machine) { m.MemoryBytes = maxMemory + 1 }, "Machine.MemoryBytes"},
		{"unknown firmware", func(m *Machine) { m.Firmware = "uefi" }, "Machine.Firmware"},
		{"no disks", func(m *Machine) { m.Disks = nil }, "Machine.Disks"},
		{"empty disk name", func(m *Machine) { m.Disks[1].Name = "" }, "Machine.Disks[1].Name"},
		{"upper-case disk name", func(m *Machine) { m.Disks[0].Name = "VDA" }, "Machine.Disks[0].Name"},
		{"disk name with a path", func(m *Machine) { m.Disks[0].Name = "../vda" }, "Machine.Disks[0].Name"},
		{"disk name too long", func(m *Machine) { m.Disks[0].Name = strings.Repeat("a", 32) }, "Machine.Disks[0].Name"},
		{"duplicate disk name", func(m *Machine) { m.Disks[1].Name = "vda" }, "Machine.Disks[1].Name"},
		{"no source", func(m *Machine) { m.Disks[0].Source = "" }, "Machine.Disks[0].Source"},
		{"unknown format", func(m *Machine) { m.Disks[0].Format = "vmdk" }, "Machine.Disks[0].Format"},
		{"no capacity", func(m *Machine) { m.Disks[0].Capacity = 0 }, "Machine.Disks[0].Capacity"},
		{"capacity not in sectors", func(m *Machine) { m.Disks[0].Capacity = 1000 }, "Machine.Disks[0].Capacity"},
		{"capacity too large", func(m *Machine) { m.Disks[0].Capacity = maxCapacity + 512 }, "Machine.Disks[0].Capacity"},
		{"unknown bus", func(m *Machine) { m.Disks[1].Bus = "sata" }, "Machine.Disks[1].Bus"},
		{"empty bus", func(m *Machine) { m.Disks[1].Bus = "" }, "Machine.Disks[1].Bus"},
		{"five IDE disks", func(m *Machine) { m.Disks = disks(5, "ide") }, "Machine.Disks[4].Bus"},
		{"sixteen SCSI disks", func(m *Machine) { m.Disks = disks(16, "nvme") }, "Machine.Disks[15].Bus"},
		{"bad MAC", func(m *Machine) { m.NICs[0].MAC = "zz" }, "Machine.NICs[0].MAC"},
		{"EUI-64 MAC", func(m *Machine) { m.NICs[0].MAC = "00:11:22:33:44:55:66:77" }, "Machine.NICs[0].MAC"},
		{"network with a newline", func(m *Machine) { m.NICs = append(m.NICs, ExportNIC{Network: "a\nb"}) }, "Machine.NICs[1].Network"},
		{"network not UTF-8", func(m *Machine) { m.NICs[0].Network = "\xff" }, "Machine.NICs[0].Network"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := valid()
			tt.change(&m)
			tmp := t.TempDir()
			var w bytes.Buffer
			// A qemu-img that does not exist would fail differently,
			// so a refusal must come from the checks.
			err := WriteOVA(context.Background(), &w, m, "/nonexistent/qemu-img", tmp, nil)
			if err == nil {
				t.Fatal("err = nil, want a refusal")
			}
			msg := err.Error()
			if !namesField(msg, tt.want) {
				t.Errorf("err = %q, want it to name %s", msg, tt.want)
			}
			if !strings.HasPrefix(msg, "ovf: export: ") || strings.Contains(msg, "\n") {
				t.Errorf("err = %q, want one line starting with \"ovf: export: \"", msg)
			}
			if w.Len() > 0 {
				t.Errorf("%d bytes were written to w", w.Len())
			}
			if got := dirNames(t, tmp); len(got) > 0 {
				t.Errorf("tmpDir holds %q", got)
			}
		})
	}
}

// namesField reports whether msg names field itself rather than only a
// longer field that starts with it.
func namesField(msg, field string) bool {
	i := strings.Index(msg, field)
	if i < 0 {
		return false
	}
	rest := msg[i+len(field):]
	return rest == "" || !strings.ContainsAny(rest[:1], "[.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
}

func TestWriteOVAConversionFails(t *testing.T) {
	needQemuImg(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	makeImage(t, img, 1<<20, "")
	notQcow2 := filepath.Join(dir, "b.raw")
	writeRaw(t, notQcow2, 1<<20)
	tests := []struct {
		name    string
		qemuImg string
		disk    ExportDisk
		want    []string
	}{
		{"missing source", "", ExportDisk{Name: "vda", Source: filepath.Join(dir, "nope.qcow2"), Format: "qcow2", Capacity: 1 << 20, Bus: "virtio"},
			[]string{`disk "vda"`, "qemu-img map", "nope.qcow2"}},
		{"wrong format", "", ExportDisk{Name: "vda", Source: notQcow2, Format: "qcow2", Capacity: 1 << 20, Bus: "virtio"},
			[]string{`disk "vda"`, "qemu-img map", "qcow2"}},
		{"capacity does not match", "", ExportDisk{Name: "vdb", Source: img, Format: "qcow2", Capacity: 2 << 20, Bus: "scsi"},
			[]string{`disk "vdb"`, "Capacity is 2097152", "virtual size of 1048576"}},
		{"no qemu-img", filepath.Join(dir, "no-qemu-img"), ExportDisk{Name: "vda", Source: img, Format: "qcow2", Capacity: 1 << 20, Bus: "virtio"},
			[]string{`disk "vda"`, "no-qemu-img"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := Machine{Name: "vm", CPUs: 1, MemoryBytes: 1 << 30, Disks: []ExportDisk{tt.disk}}
			tmp := t.TempDir()
			var w bytes.Buffer
			err := WriteOVA(context.Background(), &w, m, tt.qemuImg, tmp, nil)
			if err == nil {
				t.Fatal("err = nil, want a failure")
			}
			for _, want := range tt.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("err = %q, want it to contain %q", err, want)
				}
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("err = %q, want one line", err)
			}
			if w.Len() > 0 {
				t.Errorf("%d bytes were written to w", w.Len())
			}
			if got := dirNames(t, tmp); len(got) > 0 {
				t.Errorf("tmpDir holds %q", got)
			}
		})
	}
}

// cancelWriter cancels its context on the first write that carries VMDK
// data, standing in for a client that goes away while a disk streams.
type cancelWriter struct {
	bytes.Buffer
	cancel context.CancelFunc
}

func (w *cancelWriter) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("KDMV")) {
		w.cancel()
	}
	return w.Buffer.Write(p)
}

func TestWriteOVACancel(t *testing.T) {
	needQemuImg(t)
	m := testMachine(t)

	t.Run("before it starts", func(t *testing.T) {
		tmp := t.TempDir()
		var w bytes.Buffer
		err := WriteOVA(cancelledContext(), &w, m, "", tmp, nil)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
		if w.Len() > 0 {
			t.Errorf("%d bytes were written to w", w.Len())
		}
		if got := dirNames(t, tmp); len(got) > 0 {
			t.Errorf("tmpDir holds %q", got)
		}
	})

	t.Run("while copying a disk", func(t *testing.T) {
		// Random data does not compress, so this disk's VMDK spans
		// several copy blocks.
		raw := filepath.Join(t.TempDir(), "big.raw")
		if err := os.WriteFile(raw, randomBytes(7, 3*copyBlock), 0o644); err != nil {
			t.Fatal(err)
		}
		big := Machine{Name: "big", CPUs: 1, MemoryBytes: 1 << 30,
			Disks: []ExportDisk{{Name: "vda", Source: raw, Format: "raw", Capacity: 3 * copyBlock, Bus: "virtio"}}}
		tmp := t.TempDir()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		w := &cancelWriter{cancel: cancel}
		err := WriteOVA(ctx, w, big, "", tmp, nil)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
		if got := dirNames(t, tmp); len(got) > 0 {
			t.Errorf("tmpDir holds %q", got)
		}
		i := bytes.Index(w.Bytes(), []byte("KDMV"))
		if i < 0 {
			t.Fatal("no VMDK data was written")
		}
		if got := w.Len() - i; got != copyBlock {
			t.Errorf("%d bytes of VMDK were written, want the one block in flight when the context was cancelled (%d)", got, copyBlock)
		}
	})

	t.Run("while converting", func(t *testing.T) {
		if runtime.GOOS == "windows" {
			t.Skip("needs a shell script as qemu-img")
		}
		qemuImg := needQemuImg(t)
		// This qemu-img maps for real but never finishes a conversion,
		// so only cancellation can end it.
		fake := filepath.Join(t.TempDir(), "qemu-img")
		script := fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = convert ]; then\n  : > \"$(eval echo \\${$#})\"\n  exec sleep 60\nfi\nexec %q \"$@\"\n", qemuImg)
		if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		tmp := t.TempDir()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		timer := time.AfterFunc(500*time.Millisecond, cancel)
		defer timer.Stop()
		start := time.Now()
		var w bytes.Buffer
		err := WriteOVA(ctx, &w, m, fake, tmp, nil)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
		if elapsed := time.Since(start); elapsed > 20*time.Second {
			t.Errorf("WriteOVA took %v to notice the cancellation", elapsed)
		}
		if w.Len() > 0 {
			t.Errorf("%d bytes were written to w", w.Len())
		}
		if got := dirNames(t, tmp); len(got) > 0 {
			t.Errorf("tmpDir holds %q", got)
		}
	})
}

func TestWriteOVABackingChain(t *testing.T) {
	needQemuImg(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	makeImage(t, base, 64<<20, "", pattern{1 << 20, 4 << 20, 0x5a}, pattern{40 << 20, 1 << 20, 0x33})
	top := filepath.Join(dir, "top.qcow2")
	makeImage(t, top, 64<<20, base, pattern{3 << 20, 1 << 20, 0xa5}, pattern{50 << 20, 64 << 10, 0x77})
	if info := runTool(t, "qemu-img", "info", top); !strings.Contains(info, "base.qcow2") {
		t.Fatalf("overlay has no backing file:\n%s", info)
	}
	flat := filepath.Join(dir, "flat.raw")
	runTool(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, flat)

	ova, _ := export(t, Machine{Name: "chain", CPUs: 1, MemoryBytes: 256 << 20,
		Disks: []ExportDisk{{Name: "vda", Source: top, Format: "qcow2", Capacity: 64 << 20, Bus: "scsi"}}})
	// The source chain goes away, so the comparison below can only succeed
	// if the VMDK holds the base's data itself.
	for _, f := range []string{top, base} {
		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
	}
	out := t.TempDir()
	_, paths, err := ReadOVA(context.Background(), ova, out, 1<<30)
	if err != nil {
		t.Fatalf("ReadOVA: %v", err)
	}
	if got := runTool(t, "qemu-img", "compare", "-f", "raw", "-F", "vmdk", flat, paths[0]); !strings.Contains(got, "identical") {
		t.Errorf("qemu-img compare: %s", got)
	}
	members := readMembers(t, ova)
	root, err := decodeTree(members[0].data)
	if err != nil {
		t.Fatal(err)
	}
	// 4 MiB + 1 MiB from the base, 64 KiB more from the overlay; the
	// overlay's other write lands inside the base's first extent.
	disk := root.child(nsOVF1, "DiskSection").child(nsOVF1, "Disk")
	wantEq(t, "populatedSize", disk.attr(nsOVF1, "populatedSize"), strconv.Itoa(5<<20+64<<10))
}

// TestWriteOVAManifestCatchesCorruption shows that the manifest the writer
// produces is one ReadOVA checks, not just one it parses.
func TestWriteOVAManifestCatchesCorruption(t *testing.T) {
	needQemuImg(t)
	ova, _ := export(t, testMachine(t))
	members := readMembers(t, ova)
	last := &members[len(members)-1]
	last.data[len(last.data)/2] ^= 0x01
	bad := filepath.Join(t.TempDir(), "bad.ova")
	f, err := os.Create(bad)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	for _, mem := range members {
		if err := tw.WriteHeader(mem.hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(mem.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	_, _, err = ReadOVA(context.Background(), bad, t.TempDir(), 1<<30)
	checkInvalid(t, err, "web-01-vdb.vmdk: SHA256 digest does not match the manifest")
}

func TestMemberHeader(t *testing.T) {
	mtime := time.Unix(1700000000, 0)
	tests := []struct {
		name     string
		size     int64
		format   tar.Format
		base256  bool
		magicGNU bool
	}{
		{"small", 12345, tar.FormatUSTAR, false, false},
		{"largest USTAR", ustarMaxSize, tar.FormatUSTAR, false, false},
		{"9 GiB", 9 << 30, tar.FormatGNU, true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hdr := memberHeader("vm-vda.vmdk", tt.size, mtime)
			if hdr.Format != tt.format {
				t.Errorf("Format = %v, want %v", hdr.Format, tt.format)
			}
			var b bytes.Buffer
			if err := tar.NewWriter(&b).WriteHeader(hdr); err != nil {
				t.Fatalf("WriteHeader: %v", err)
			}
			// One header block and nothing else: no PAX extension,
			// which VirtualBox cannot read.
			if b.Len() != 512 {
				t.Fatalf("header is %d bytes, want one 512-byte block", b.Len())
			}
			raw := b.Bytes()
			if got := raw[124]&0x80 != 0; got != tt.base256 {
				t.Errorf("size field base-256 = %v, want %v", got, tt.base256)
			}
			if got := string(raw[257:265]) == "ustar  \x00"; got != tt.magicGNU {
				t.Errorf("magic = %q, GNU = %v, want %v", raw[257:265], got, tt.magicGNU)
			}
			got, err := tar.NewReader(io.MultiReader(&b, zeroReader{})).Next()
			if err != nil {
				t.Fatalf("Next: %v", err)
			}
			if got.Size != tt.size || got.Name != "vm-vda.vmdk" || got.Mode != 0o644 || !got.ModTime.Equal(mtime) {
				t.Errorf("read back %+v", got)
			}
		})
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func TestParseMap(t *testing.T) {
	tests := []struct {
		name               string
		in                 string
		virtual, populated int64
		wantErr            string
	}{
		{"qcow2", `[{ "start": 0, "length": 1048576, "depth": 0, "present": false, "zero": true, "data": false},
{ "start": 1048576, "length": 4194304, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 5242880, "length": 61865984, "depth": 1, "present": true, "zero": false, "data": true, "offset": 5636096}]`,
			67108864, 4194304 + 61865984, ""},
		{"empty image", `[]`, 0, 0, ""},
		{"not JSON", `qemu-img: oops`, 0, 0, "unreadable output"},
		{"not an array", `{"start": 0}`, 0, 0, "not a JSON array"},
		{"truncated", `[{"start": 0, "length": 512, "data": true}`, 0, 0, "unreadable output"},
		{"negative", `[{"start": -512, "length": 512, "data": true}]`, 0, 0, "out of range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			virtual, populated, err := parseMap(strings.NewReader(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("err = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseMap: %v", err)
			}
			if virtual != tt.virtual || populated != tt.populated {
				t.Errorf("parseMap = %d, %d, want %d, %d", virtual, populated, tt.virtual, tt.populated)
			}
		})
	}
}
