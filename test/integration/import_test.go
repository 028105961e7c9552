package integration

import (
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/api"
)

// convertGuest writes the tiny guest in another format, as Hyper-V,
// Virtual Server or VMware would hand it over.
func convertGuest(t *testing.T, h *host, format, opts, name string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), name)
	args := []string{"convert", "-q", "-f", "qcow2", "-O", format}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	if b, err := exec.Command("qemu-img", append(args, h.guest, out)...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert to %s: %v: %s", format, err, b)
	}
	return out
}

// TestImportFormats imports the guest as VHD, VHDX and VMDK and boots a
// VM from each.
func TestImportFormats(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	formats := []struct{ name, format, opts, file string }{
		{"vhd", "vpc", "subformat=dynamic", "guest.vhd"},
		{"vhdx", "vhdx", "", "guest.vhdx"},
		{"vmdk", "vmdk", "subformat=streamOptimized", "guest.vmdk"},
	}
	for _, f := range formats {
		src := convertGuest(t, h, f.format, f.opts, f.file)
		h.must("image", "import", src, "--name", f.name)
		var img api.Image
		mustJSON(t, h.must("image", "show", f.name, "-o", "json"), &img)
		if img.SourceFormat != f.format || img.Format != "qcow2" {
			t.Errorf("image %s: source format %q, format %q; want %s imported as qcow2", f.name, img.SourceFormat, img.Format, f.format)
		}
		h.must("create", "vm-"+f.name, "--image", f.name, "--memory", "256M", "--start")
	}
	for _, f := range formats {
		h.waitAgent("vm-" + f.name)
		if got := h.exec("vm-"+f.name, "hostname"); got != "vm-"+f.name {
			t.Errorf("VM from %s: hostname %q", f.name, got)
		}
	}
}

// TestImportRefusesForeignFiles feeds images whose headers point at host
// files: each is refused with a one-line error and leaves nothing behind.
func TestImportRefusesForeignFiles(t *testing.T) {
	t.Parallel()
	h := newHostNoProbe(t)
	dir := t.TempDir()
	backed := filepath.Join(dir, "backed.qcow2")
	if b, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow", backed, "1M").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, b)
	}
	dataFile := filepath.Join(dir, "datafile.qcow2")
	if b, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "host-file"), dataFile, "1M").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, b)
	}
	flat := filepath.Join(dir, "flat.vmdk")
	descriptor := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8 FLAT \"/etc/shadow\" 0\n\nddb.adapterType = \"ide\"\n"
	if err := os.WriteFile(flat, []byte(descriptor), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{"backing file": backed, "vmdk extent": flat, "data file": dataFile}
	for what, file := range cases {
		_, errOut, code := h.lodge("image", "import", file, "--name", "evil")
		if code != 1 || !strings.Contains(errOut, "refers to other files") || !strings.Contains(errOut, `"evil"`) || strings.Count(errOut, "\n") != 1 {
			t.Errorf("import of an image with a %s: exit %d, stderr %q", what, code, errOut)
		}
	}
	if left, _ := os.ReadDir(filepath.Join(h.home, "images")); len(left) != 0 {
		t.Errorf("refused imports left %v in the library", left)
	}
	if out := h.must("image", "list", "-o", "json"); strings.TrimSpace(out) != "[]" {
		t.Errorf("image list after refused imports = %s", out)
	}
}

// applianceOVF is an OVF 1.0 descriptor as VMware writes one, by hand:
// 2 vCPUs, 384 MB, one streamOptimized VMDK.
const applianceOVF = `<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="appliance-disk1.vmdk" ovf:id="file1" ovf:size="SIZE"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="CAPACITY" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network"><Description>The VM Network network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="appliance">
    <Info>A virtual machine</Info>
    <Name>appliance</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian10_64Guest">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>appliance</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-07</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>384MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>384</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
`

// writeOVA packs a descriptor, a manifest and a disk, descriptor first,
// as the OVF specification orders them. tamper changes the manifest's
// digest of the disk.
func writeOVA(t *testing.T, vmdk string, capacity int64, tamper bool) string {
	t.Helper()
	disk, err := os.ReadFile(vmdk)
	if err != nil {
		t.Fatal(err)
	}
	desc := strings.NewReplacer("SIZE", strconv.Itoa(len(disk)), "CAPACITY", strconv.FormatInt(capacity, 10)).Replace(applianceOVF)
	sum := sha256.Sum256(disk)
	if tamper {
		sum[0] ^= 0xff
	}
	descSum := sha256.Sum256([]byte(desc))
	manifest := fmt.Sprintf("SHA256(appliance.ovf)= %x\nSHA256(appliance-disk1.vmdk)= %x\n", descSum, sum)
	out := filepath.Join(t.TempDir(), "appliance.ova")
	writeTar(t, out, [2]string{"appliance.ovf", desc}, [2]string{"appliance.mf", manifest}, [2]string{"appliance-disk1.vmdk", string(disk)})
	return out
}

// TestImportOVA imports an appliance, takes its CPUs and memory from the
// descriptor, and boots it; a tampered one is refused.
func TestImportOVA(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	vmdk := convertGuest(t, h, "vmdk", "subformat=streamOptimized", "appliance-disk1.vmdk")
	var capacity struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	out, err := exec.Command("qemu-img", "info", "--output=json", h.guest).Output()
	if err != nil {
		t.Fatal(err)
	}
	mustJSON(t, string(out), &capacity)

	_, errOut, code := h.lodge("image", "import", writeOVA(t, vmdk, capacity.VirtualSize, true), "--name", "tampered")
	if code != 1 || !strings.Contains(errOut, "appliance-disk1.vmdk") || !strings.Contains(errOut, "manifest") {
		t.Errorf("import of an OVA whose disk does not match its manifest: exit %d, stderr %q", code, errOut)
	}

	h.must("image", "import", writeOVA(t, vmdk, capacity.VirtualSize, false), "--name", "appliance")
	var img api.Image
	mustJSON(t, h.must("image", "show", "appliance", "-o", "json"), &img)
	if img.CPUs != 2 || img.Memory != 384<<20 || img.SourceFormat != "ova/vmdk" {
		t.Errorf("appliance image = cpus %d memory %d source %q; want 2, 384M, ova/vmdk", img.CPUs, img.Memory, img.SourceFormat)
	}
	h.must("create", "app", "--image", "appliance", "--start")
	h.waitAgent("app")
	if v := h.show("app"); v.CPUs != 2 || v.Memory != 384<<20 {
		t.Errorf("VM from the appliance: cpus %d memory %d; want the descriptor's 2 and 384M", v.CPUs, v.Memory)
	}
	if got := h.exec("app", "sh", "-c", "grep -c ^processor /proc/cpuinfo"); got != "2" {
		t.Errorf("guest of the appliance sees %s CPUs, want 2", got)
	}
}
