package ovf

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const vmdkStream = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

func readTestdata(t testing.TB, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// edit applies old/new replacement pairs, each of which must match exactly
// once, so that a test cannot silently stop testing what it says.
func edit(t testing.TB, doc string, pairs ...string) string {
	t.Helper()
	for i := 0; i+1 < len(pairs); i += 2 {
		if n := strings.Count(doc, pairs[i]); n != 1 {
			t.Fatalf("edit: %q occurs %d times, want 1", pairs[i], n)
		}
		doc = strings.Replace(doc, pairs[i], pairs[i+1], 1)
	}
	return doc
}

func TestParseTestdata(t *testing.T) {
	tests := []struct {
		file string
		want Descriptor
	}{
		{"ovf1-vmware.ovf", Descriptor{
			Name:   "web01",
			OSType: "debian10_64Guest",
			CPUs:   2,
			Memory: 1024 << 20,
			Disks: []Disk{{
				ID: "vmdisk1", File: "web01-disk1.vmdk", Capacity: 16 << 30,
				Format: vmdkStream, FileSize: 318767104,
			}},
		}},
		{"ovf2-sasd.ovf", Descriptor{
			Name:   "db-appliance",
			OSType: "RedHat Enterprise Linux 9 64-Bit",
			CPUs:   4,
			Memory: 8 << 30,
			Disks: []Disk{
				{ID: "os", File: "db-os.vmdk", Capacity: 20 << 30, Format: vmdkStream, FileSize: 2147483648},
				{ID: "data", File: "db-data.vmdk", Capacity: 100 << 30, Format: vmdkStream, FileSize: 65536},
			},
		}},
		{"vbox.ovf", Descriptor{
			Name:   "devbox",
			OSType: "Debian_64",
			CPUs:   1,
			Memory: 2048 << 20,
			Disks: []Disk{{
				ID: "vmdisk1", File: "devbox-disk001.vmdk", Capacity: 21474836480,
				Format: vmdkStream,
			}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			got, err := Parse(strings.NewReader(readTestdata(t, tt.file)))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Parse:\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

// TestParseVariants checks the less common spellings that real exporters
// produce, each as a small edit of the VMware descriptor.
func TestParseVariants(t *testing.T) {
	base := readTestdata(t, "ovf1-vmware.ovf")
	baseDisk := Disk{ID: "vmdisk1", File: "web01-disk1.vmdk", Capacity: 16 << 30, Format: vmdkStream, FileSize: 318767104}
	tests := []struct {
		name  string
		edits []string
		check func(t *testing.T, d Descriptor)
	}{
		{"name from ovf:id", []string{"<Name>web01</Name>", "", `<VirtualSystem ovf:id="web01">`, `<VirtualSystem ovf:id="vm-7">`},
			func(t *testing.T, d Descriptor) { wantEq(t, "Name", d.Name, "vm-7") }},
		{"Name element wins", []string{"<Name>web01</Name>", "<Name>Web Server</Name>"},
			func(t *testing.T, d Descriptor) { wantEq(t, "Name", d.Name, "Web Server") }},
		{"OS description without osType", []string{` vmw:osType="debian10_64Guest"`, ""},
			func(t *testing.T, d Descriptor) { wantEq(t, "OSType", d.OSType, "Debian GNU/Linux 10 (64-bit)") }},
		{"ovf:osType preferred", []string{` vmw:osType="debian10_64Guest"`, ` vmw:osType="debian10_64Guest" ovf:osType="debian10"`},
			func(t *testing.T, d Descriptor) { wantEq(t, "OSType", d.OSType, "debian10") }},
		{"no OperatingSystemSection", []string{`<OperatingSystemSection ovf:id="96" vmw:osType="debian10_64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian GNU/Linux 10 (64-bit)</Description>
    </OperatingSystemSection>`, ""},
			func(t *testing.T, d Descriptor) { wantEq(t, "OSType", d.OSType, "") }},
		{"memory without units means megabytes", []string{"<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>", ""},
			func(t *testing.T, d Descriptor) { wantEq(t, "Memory", d.Memory, int64(1024<<20)) }},
		{"memory in MegaBytes", []string{"byte * 2^20", "MegaBytes"},
			func(t *testing.T, d Descriptor) { wantEq(t, "Memory", d.Memory, int64(1024<<20)) }},
		{"memory in MB", []string{"byte * 2^20", "MB"},
			func(t *testing.T, d Descriptor) { wantEq(t, "Memory", d.Memory, int64(1024<<20)) }},
		{"memory in byte*2^30", []string{"byte * 2^20", "byte*2^30", "<rasd:VirtualQuantity>1024</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>4</rasd:VirtualQuantity>"},
			func(t *testing.T, d Descriptor) { wantEq(t, "Memory", d.Memory, int64(4<<30)) }},
		{"memory in GigaBytes", []string{"byte * 2^20", "GigaBytes", "<rasd:VirtualQuantity>1024</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>3</rasd:VirtualQuantity>"},
			func(t *testing.T, d Descriptor) { wantEq(t, "Memory", d.Memory, int64(3<<30)) }},
		{"memory in bytes", []string{"byte * 2^20", "byte", "<rasd:VirtualQuantity>1024</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>536870912</rasd:VirtualQuantity>"},
			func(t *testing.T, d Descriptor) { wantEq(t, "Memory", d.Memory, int64(512<<20)) }},
		{"no CPU item", []string{"<rasd:ResourceType>3</rasd:ResourceType>", "<rasd:ResourceType>1</rasd:ResourceType>"},
			func(t *testing.T, d Descriptor) { wantEq(t, "CPUs", d.CPUs, 0) }},
		{"capacity in bytes by default", []string{`ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30"`, `ovf:capacity="17179869184"`},
			func(t *testing.T, d Descriptor) { wantEq(t, "Capacity", d.Disks[0].Capacity, int64(16<<30)) }},
		{"identity compression", []string{`ovf:id="file1"`, `ovf:id="file1" ovf:compression="identity"`},
			func(t *testing.T, d Descriptor) { wantEq(t, "Disks", d.Disks, []Disk{baseDisk}) }},
		{"no ovf:size", []string{` ovf:size="318767104"`, ""},
			func(t *testing.T, d Descriptor) { wantEq(t, "FileSize", d.Disks[0].FileSize, int64(0)) }},
		{"HostResource /disk/", []string{"ovf:/disk/vmdisk1", "/disk/vmdisk1"},
			func(t *testing.T, d Descriptor) { wantEq(t, "Disks", d.Disks, []Disk{baseDisk}) }},
		{"ovf:-prefixed elements", []string{`<References>`, `<ovf:References>`, `</References>`, `</ovf:References>`},
			func(t *testing.T, d Descriptor) { wantEq(t, "Disks", d.Disks, []Disk{baseDisk}) }},
		{"collection of one", []string{`<VirtualSystem ovf:id="web01">`, `<VirtualSystemCollection ovf:id="vapp"><Info>vApp</Info><VirtualSystem ovf:id="web01">`,
			`</VirtualSystem>`, `</VirtualSystem></VirtualSystemCollection>`},
			func(t *testing.T, d Descriptor) { wantEq(t, "Name", d.Name, "web01") }},
		{"unattached disk comes last", []string{
			`<File ovf:href="web01-disk1.vmdk"`, `<File ovf:href="spare.vmdk" ovf:id="file0"/><File ovf:href="web01-disk1.vmdk"`,
			`<Disk ovf:capacity="16"`, `<Disk ovf:capacity="1" ovf:diskId="spare" ovf:fileRef="file0" ovf:format="raw"/><Disk ovf:capacity="16"`},
			func(t *testing.T, d Descriptor) {
				wantEq(t, "Disks", d.Disks, []Disk{baseDisk, {ID: "spare", File: "spare.vmdk", Capacity: 1, Format: "raw"}})
			}},
		{"deployment options", []string{
			`<NetworkSection>`, `<DeploymentOptionSection><Info>Sizes</Info>
      <Configuration ovf:id="small"><Label>Small</Label><Description>1 CPU</Description></Configuration>
      <Configuration ovf:default="true" ovf:id="large"><Label>Large</Label><Description>8 CPUs</Description></Configuration>
    </DeploymentOptionSection>
    <NetworkSection>`,
			`<Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>`, `<Item ovf:configuration="small">
        <rasd:ElementName>1 CPU</rasd:ElementName>
        <rasd:InstanceID>91</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item ovf:configuration="medium large">
        <rasd:ElementName>8 CPUs</rasd:ElementName>
        <rasd:InstanceID>92</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>8</rasd:VirtualQuantity>
      </Item>
      <Item ovf:bound="max">
        <rasd:ElementName>up to 64 CPUs</rasd:ElementName>
        <rasd:InstanceID>93</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>64</rasd:VirtualQuantity>
      </Item>
      <Item ovf:configuration="small">
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>`},
			func(t *testing.T, d Descriptor) { wantEq(t, "CPUs", d.CPUs, 8) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Parse(strings.NewReader(edit(t, base, tt.edits...)))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			tt.check(t, d)
		})
	}
}

func wantEq[T any](t *testing.T, what string, got, want T) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s = %+v, want %+v", what, got, want)
	}
}

func TestParseRefuses(t *testing.T) {
	base := readTestdata(t, "ovf1-vmware.ovf")
	sasd := readTestdata(t, "ovf2-sasd.ovf")
	tests := []struct {
		name string
		doc  string
		want string // substring of the message
	}{
		{"empty", "", "no root element"},
		{"not XML", "this is not XML <", "not well-formed XML"},
		{"unclosed", base[:len(base)/2], "not well-formed XML"},
		{"HTML root", "<html><body/></html>", `root element "html"`},
		{"Envelope without namespace", "<Envelope><VirtualSystem/></Envelope>", "not an OVF 1.x or 2.x Envelope"},
		{"VMware 0.9 namespace", strings.ReplaceAll(base, "http://schemas.dmtf.org/ovf/envelope/1", "http://www.vmware.com/schema/ovf/1/envelope"),
			"not an OVF 1.x or 2.x Envelope"},
		{"doctype", edit(t, base, "<!--Hand", `<!DOCTYPE Envelope [<!ENTITY big "aaaa">]><!--Hand`), "document type declaration"},
		{"undefined entity", edit(t, base, "<Name>web01</Name>", "<Name>&big;</Name>"), "not well-formed XML"},
		{"latin-1", edit(t, base, `encoding="UTF-8"`, `encoding="ISO-8859-1"`), "not well-formed XML"},
		{"too deep", strings.Repeat("<a>", 100) + strings.Repeat("</a>", 100), "deeper than"},
		{"too many elements", "<a>" + strings.Repeat("<b/>", maxElements) + "</a>", "more than 50000 elements"},
		{"too large", edit(t, base, "<!--Hand", "<!--"+strings.Repeat("x", maxDescriptor)+"Hand"), "larger than 4 MiB"},
		{"no VirtualSystem", edit(t, base, `<VirtualSystem ovf:id="web01">`, `<vmw:Other ovf:id="web01">`, `</VirtualSystem>`, `</vmw:Other>`),
			"Envelope: no VirtualSystem"},
		{"empty collection", edit(t, base, `<VirtualSystem ovf:id="web01">`, `<VirtualSystemCollection ovf:id="c"><vmw:Other ovf:id="web01">`, `</VirtualSystem>`, `</vmw:Other></VirtualSystemCollection>`),
			"Envelope: no VirtualSystem"},
		{"two virtual systems", edit(t, base,
			`</VirtualSystem>`, `</VirtualSystem></VirtualSystemCollection>`,
			`<VirtualSystem ovf:id="web01">`, `<VirtualSystemCollection ovf:id="vapp"><Info>vApp</Info><VirtualSystem ovf:id="db01"><Info>db</Info></VirtualSystem><VirtualSystem ovf:id="web01">`),
			"multi-VM appliances are not supported"},
		{"nested collections", edit(t, base,
			`<VirtualSystem ovf:id="web01">`, `<VirtualSystemCollection ovf:id="a"><VirtualSystemCollection ovf:id="b"><VirtualSystem ovf:id="db01"/></VirtualSystemCollection><VirtualSystem ovf:id="web01">`,
			`</VirtualSystem>`, `</VirtualSystem></VirtualSystemCollection>`),
			"multi-VM appliances are not supported"},
		{"no disk", edit(t, base, `<Disk ovf:capacity="16"`, `<vmw:NotADisk ovf:capacity="16"`), "DiskSection: the appliance has no disk"},
		{"no DiskSection", edit(t, base, "<DiskSection>", "<vmw:DiskSection>", "</DiskSection>", "</vmw:DiskSection>"), "no disk"},
		{"dangling fileRef", edit(t, base, `ovf:fileRef="file1"`, `ovf:fileRef="file9"`),
			`disk "vmdisk1": file reference "file9" names no File in References`},
		{"no fileRef", edit(t, base, ` ovf:fileRef="file1"`, ""), `disk "vmdisk1": no ovf:fileRef`},
		{"no diskId", edit(t, base, ` ovf:diskId="vmdisk1"`, ""), "a Disk has no ovf:diskId"},
		{"differencing disk", edit(t, base, `ovf:diskId="vmdisk1"`, `ovf:diskId="vmdisk1" ovf:parentRef="base"`), "differencing disks"},
		{"absolute href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="/etc/shadow"`), `file "file1": href "/etc/shadow" is not a plain file name`},
		{"parent href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="../web01-disk1.vmdk"`), "is not a plain file name"},
		{"dotdot inside href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="web01..vmdk"`), "is not a plain file name"},
		{"directory href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="disks/web01-disk1.vmdk"`), "is not a plain file name"},
		{"backslash href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="disks\web01-disk1.vmdk"`), "is not a plain file name"},
		{"windows drive href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="C:web01-disk1.vmdk"`), "is not a plain file name"},
		{"http href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="http://example.com/web01-disk1.vmdk"`), "is not a plain file name"},
		{"file URL href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="file:web01-disk1.vmdk"`), "is not a plain file name"},
		{"empty href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href=""`), "is not a plain file name"},
		{"dot href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="."`), "is not a plain file name"},
		{"control character href", edit(t, base, `ovf:href="web01-disk1.vmdk"`, `ovf:href="web01&#10;disk1.vmdk"`), "is not a plain file name"},
		{"gzip", edit(t, base, `ovf:id="file1"`, `ovf:id="file1" ovf:compression="gzip"`), `file "file1": compressed disks are not supported`},
		{"chunked", edit(t, base, `ovf:id="file1"`, `ovf:id="file1" ovf:chunkSize="2147483648"`), `file "file1": chunked files are not supported`},
		{"file without id", edit(t, base, ` ovf:id="file1"`, ""), "File has no ovf:id"},
		{"duplicate file id", edit(t, base, `<File ovf:href="web01-disk1.vmdk"`, `<File ovf:href="other.vmdk" ovf:id="file1"/><File ovf:href="web01-disk1.vmdk"`),
			`file "file1": ovf:id is used twice`},
		{"duplicate href", edit(t, base, `<File ovf:href="web01-disk1.vmdk"`, `<File ovf:href="web01-disk1.vmdk" ovf:id="file2"/><File ovf:href="web01-disk1.vmdk"`),
			`href "web01-disk1.vmdk" is also used by file "file2"`},
		{"duplicate diskId", edit(t, base,
			`<File ovf:href="web01-disk1.vmdk"`, `<File ovf:href="other.vmdk" ovf:id="file2"/><File ovf:href="web01-disk1.vmdk"`,
			`<Disk ovf:capacity="16"`, `<Disk ovf:capacity="1" ovf:diskId="vmdisk1" ovf:fileRef="file2"/><Disk ovf:capacity="16"`),
			`disk "vmdisk1": ovf:diskId is used twice`},
		{"file shared by two disks", edit(t, base,
			`<Disk ovf:capacity="16"`, `<Disk ovf:capacity="1" ovf:diskId="vmdisk0" ovf:fileRef="file1"/><Disk ovf:capacity="16"`),
			`disk "vmdisk1": file "file1" is already used by disk "vmdisk0"`},
		{"negative file size", edit(t, base, `ovf:size="318767104"`, `ovf:size="-1"`), `ovf:size "-1" is negative`},
		{"huge file size", edit(t, base, `ovf:size="318767104"`, `ovf:size="9223372036854775807"`), `ovf:size "9223372036854775807" is too large`},
		{"negative capacity", edit(t, base, `ovf:capacity="16"`, `ovf:capacity="-16"`), `disk "vmdisk1": ovf:capacity "-16" is negative`},
		{"capacity property", edit(t, base, `ovf:capacity="16"`, `ovf:capacity="${disk.size}"`), "is not a whole number"},
		{"missing capacity", edit(t, base, `ovf:capacity="16" `, ""), `ovf:capacity "" is not a whole number`},
		{"capacity overflows int64", edit(t, base, `ovf:capacity="16"`, `ovf:capacity="99999999999999999999"`), "is too large"},
		{"capacity over 2^50", edit(t, base, `ovf:capacity="16"`, `ovf:capacity="1048577"`), `disk "vmdisk1": capacity 1048577`},
		{"capacity units unknown", edit(t, base, `ovf:capacityAllocationUnits="byte * 2^30"`, `ovf:capacityAllocationUnits="furlongs"`), "not a known unit"},
		{"capacity units overflow", edit(t, base, `ovf:capacityAllocationUnits="byte * 2^30"`, `ovf:capacityAllocationUnits="byte * 2^63"`), "not a known unit"},
		{"too many CPUs", edit(t, base, "<rasd:VirtualQuantity>2</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>1025</rasd:VirtualQuantity>"),
			`item "2 virtual CPU(s)": more than 1024 virtual CPUs`},
		{"CPU count overflows", edit(t, base, "<rasd:VirtualQuantity>2</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>99999999999999999999</rasd:VirtualQuantity>"),
			"is too large"},
		{"negative CPUs", edit(t, base, "<rasd:VirtualQuantity>2</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>-2</rasd:VirtualQuantity>"),
			`item "2 virtual CPU(s)": VirtualQuantity "-2" is negative`},
		{"CPUs summed over 1024", edit(t, base, "<rasd:VirtualQuantity>2</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>1000</rasd:VirtualQuantity>",
			"<rasd:InstanceID>3</rasd:InstanceID>", "<rasd:InstanceID>3</rasd:InstanceID><rasd:VirtualQuantity>100</rasd:VirtualQuantity>",
			"<rasd:ResourceType>6</rasd:ResourceType>", "<rasd:ResourceType>3</rasd:ResourceType>"),
			`item "SCSI Controller 0": more than 1024 virtual CPUs`},
		{"too much memory", edit(t, base, "<rasd:VirtualQuantity>1024</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>16777217</rasd:VirtualQuantity>"),
			`item "1024MB of memory": more than 16384 GiB of memory`},
		{"negative memory", edit(t, base, "<rasd:VirtualQuantity>1024</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>-1024</rasd:VirtualQuantity>"), "is negative"},
		{"memory units unknown", edit(t, base, "byte * 2^20", "hertz * 10^6"), `AllocationUnits "hertz * 10^6" is not a known unit of bytes`},
		{"unknown disk attached", edit(t, base, "ovf:/disk/vmdisk1", "ovf:/disk/vmdisk2"), `item "Hard disk 1": HostResource "ovf:/disk/vmdisk2" names no Disk`},
		{"disk attached twice", edit(t, sasd, "ovf:/disk/data", "ovf:/disk/os"), `item "Hard disk 2": disk "os" is already attached by item "Hard disk 1"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(strings.NewReader(tt.doc))
			checkInvalid(t, err, tt.want)
		})
	}
}

// checkInvalid asserts the conventions every refusal follows: it wraps
// ErrInvalid and is a single line that names its object.
func checkInvalid(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("err = nil, want an error containing %q", want)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("err = %v, want it to wrap ErrInvalid", err)
	}
	msg := err.Error()
	if !strings.Contains(msg, want) {
		t.Errorf("err = %q, want it to contain %q", msg, want)
	}
	if !strings.HasPrefix(msg, "ovf: ") || strings.Contains(msg, "\n") || strings.HasSuffix(msg, ".") {
		t.Errorf("err = %q, want one line starting with \"ovf: \" and no trailing period", msg)
	}
}

func TestParseUnits(t *testing.T) {
	tests := []struct {
		in   string
		want int64 // 0 means refused
	}{
		{"byte", 1},
		{"bytes", 1},
		{"byte * 2^10", 1 << 10},
		{"byte * 2^20", 1 << 20},
		{"byte*2^30", 1 << 30},
		{"  BYTE  *  2^40 ", 1 << 40},
		{"byte * 10^3", 1000},
		{"byte * 1024", 1024},
		{"byte * 2^10 * 1024", 1 << 20},
		{"KiloBytes", 1 << 10},
		{"MegaBytes", 1 << 20},
		{"MB", 1 << 20},
		{"GigaBytes", 1 << 30},
		{"GB", 1 << 30},
		{"TeraBytes", 1 << 40},
		{"", 0},
		{"hertz * 10^6", 0},
		{"byte * 2^", 0},
		{"byte * ^20", 0},
		{"byte2^20", 0},
		{"byte * 2^20 *", 0},
		{"byte * 2^51", 0},
		{"byte * 2^-1", 0},
		{"byte * 0", 0},
		{"byte * 10^30", 0},
		{"byte * 2^30 * 2^30", 0},
		{"PetaBytes", 0},
	}
	for _, tt := range tests {
		got, ok := parseUnits(tt.in)
		if ok != (tt.want != 0) || got != tt.want {
			t.Errorf("parseUnits(%q) = %d, %v; want %d", tt.in, got, ok, tt.want)
		}
	}
}

func TestIsPlainName(t *testing.T) {
	for name, want := range map[string]bool{
		"disk1.vmdk": true, "web 01-disk1.vmdk": true, "ünïcode.vmdk": true, ".hidden": true,
		"": false, ".": false, "..": false, "../x": false, "a/b": false, `a\b`: false, "a..b": false,
		"/abs": false, "C:x": false, "http://x": false, "a\x00b": false, "a\nb": false, "\xff": false,
		strings.Repeat("a", 256): false,
	} {
		if got := isPlainName(name); got != want {
			t.Errorf("isPlainName(%q) = %v, want %v", name, got, want)
		}
	}
}
