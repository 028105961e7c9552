package ovf

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const ovaTemplate = `<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References>
%s  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
%s  </DiskSection>
  <VirtualSystem ovf:id="test-vm">
    <Info>A virtual machine</Info>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <Item>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
%s    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
`

type testFile struct {
	name string
	data []byte
	disk bool // a Disk uses it; otherwise it is a plain referenced file
}

// makeDescriptor writes a descriptor that references files in order and
// attaches the disks in reverse, so that order mistakes show.
func makeDescriptor(files ...testFile) []byte {
	var refs, disks, items strings.Builder
	for i, f := range files {
		fmt.Fprintf(&refs, "    <File ovf:href=%q ovf:id=\"file%d\" ovf:size=\"%d\"/>\n", f.name, i+1, len(f.data))
		if !f.disk {
			continue
		}
		fmt.Fprintf(&disks, "    <Disk ovf:capacity=\"%d\" ovf:diskId=\"disk%d\" ovf:fileRef=\"file%d\" ovf:format=%q/>\n", len(f.data), i+1, i+1, vmdkStream)
	}
	for i := len(files) - 1; i >= 0; i-- {
		if !files[i].disk {
			continue
		}
		fmt.Fprintf(&items, "      <Item>\n        <rasd:ElementName>Hard disk %d</rasd:ElementName>\n        <rasd:HostResource>ovf:/disk/disk%d</rasd:HostResource>\n        <rasd:InstanceID>%d</rasd:InstanceID>\n        <rasd:ResourceType>17</rasd:ResourceType>\n      </Item>\n", i+1, i+1, i+10)
	}
	return fmt.Appendf(nil, ovaTemplate, refs.String(), disks.String(), items.String())
}

func makeManifest(alg string, files map[string][]byte) []byte {
	var b bytes.Buffer
	for _, name := range slices.Sorted(func(yield func(string) bool) {
		for k := range files {
			if !yield(k) {
				return
			}
		}
	}) {
		var sum []byte
		switch alg {
		case "SHA1":
			s := sha1.Sum(files[name])
			sum = s[:]
		case "SHA256":
			s := sha256.Sum256(files[name])
			sum = s[:]
		case "SHA512":
			s := sha512.Sum512(files[name])
			sum = s[:]
		}
		fmt.Fprintf(&b, "%s(%s)= %x\n", alg, name, sum)
	}
	return b.Bytes()
}

type member struct {
	name     string
	data     []byte
	typeflag byte   // tar.TypeReg if zero
	linkname string // for links
}

func writeOVA(t *testing.T, members ...member) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "appliance.ova")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	for _, m := range members {
		hdr := &tar.Header{Name: m.name, Mode: 0o644, Typeflag: m.typeflag, Linkname: m.linkname, Format: tar.FormatUSTAR}
		if hdr.Typeflag == 0 {
			hdr.Typeflag = tar.TypeReg
		}
		if hdr.Typeflag == tar.TypeReg {
			hdr.Size = int64(len(m.data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(m.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// sparseDisk has random data around a 1 MiB zero region and a zero tail
// that ends in a partial block, to exercise holes in the middle and at the
// end.
func sparseDisk() []byte {
	var b []byte
	b = append(b, randomBytes(1, 100<<10)...)
	b = append(b, make([]byte, 1<<20)...)
	b = append(b, randomBytes(2, 100<<10)...)
	b = append(b, make([]byte, 200<<10)...)
	return b
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestReadOVA(t *testing.T) {
	disk1 := testFile{"app-disk1.vmdk", sparseDisk(), true}
	disk2 := testFile{"app-disk2.vmdk", randomBytes(3, 70000), true}
	empty := testFile{"empty.vmdk", nil, true}
	iso := testFile{"tools.iso", randomBytes(4, 3000), false}
	desc := makeDescriptor(disk1, disk2)
	all := map[string][]byte{"app.ovf": desc, disk1.name: disk1.data, disk2.name: disk2.data}
	descISO := makeDescriptor(disk1, iso)
	descEmpty := makeDescriptor(empty)

	tests := []struct {
		name    string
		members []member
		disks   []testFile // in the order ReadOVA must return them
	}{
		{"no manifest", []member{{name: "app.ovf", data: desc}, {name: disk1.name, data: disk1.data}, {name: disk2.name, data: disk2.data}},
			[]testFile{disk2, disk1}},
		{"SHA256 manifest second", []member{{name: "app.ovf", data: desc}, {name: "app.mf", data: makeManifest("SHA256", all)},
			{name: disk1.name, data: disk1.data}, {name: disk2.name, data: disk2.data}},
			[]testFile{disk2, disk1}},
		{"SHA1 manifest and certificate", []member{{name: "app.ovf", data: desc}, {name: "app.mf", data: makeManifest("SHA1", all)},
			{name: "app.cert", data: []byte("-----BEGIN CERTIFICATE-----\n")},
			{name: disk2.name, data: disk2.data}, {name: disk1.name, data: disk1.data}},
			[]testFile{disk2, disk1}},
		{"SHA512 manifest at the end", []member{{name: "app.ovf", data: desc}, {name: disk1.name, data: disk1.data},
			{name: disk2.name, data: disk2.data}, {name: "app.mf", data: makeManifest("SHA512", all)}},
			[]testFile{disk2, disk1}},
		{"manifest without the descriptor", []member{{name: "app.ovf", data: desc},
			{name: "app.mf", data: makeManifest("SHA256", map[string][]byte{disk1.name: disk1.data, disk2.name: disk2.data})},
			{name: disk1.name, data: disk1.data}, {name: disk2.name, data: disk2.data}},
			[]testFile{disk2, disk1}},
		{"referenced ISO is verified, not written", []member{{name: "app.ovf", data: descISO},
			{name: "app.mf", data: makeManifest("SHA256", map[string][]byte{disk1.name: disk1.data, iso.name: iso.data})},
			{name: iso.name, data: iso.data}, {name: disk1.name, data: disk1.data}},
			[]testFile{disk1}},
		{"empty disk", []member{{name: "app.ovf", data: descEmpty}, {name: empty.name}}, []testFile{empty}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ova := writeOVA(t, tt.members...)
			dir := t.TempDir()
			d, paths, err := ReadOVA(context.Background(), ova, dir, 64<<20)
			if err != nil {
				t.Fatalf("ReadOVA: %v", err)
			}
			if d.Name != "test-vm" || d.CPUs != 1 {
				t.Errorf("descriptor = %+v, want test-vm with 1 CPU", d)
			}
			var wantPaths, wantNames []string
			for _, f := range tt.disks {
				wantPaths = append(wantPaths, filepath.Join(dir, f.name))
				wantNames = append(wantNames, f.name)
			}
			if !slices.Equal(paths, wantPaths) {
				t.Errorf("paths = %q, want %q", paths, wantPaths)
			}
			var gotDisks []string
			for _, disk := range d.Disks {
				gotDisks = append(gotDisks, disk.File)
			}
			if !slices.Equal(gotDisks, wantNames) {
				t.Errorf("Disks = %q, want %q", gotDisks, wantNames)
			}
			slices.Sort(wantNames)
			if got := dirNames(t, dir); !slices.Equal(got, wantNames) {
				t.Errorf("dir holds %q, want %q", got, wantNames)
			}
			for _, f := range tt.disks {
				got, err := os.ReadFile(filepath.Join(dir, f.name))
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, f.data) {
					t.Errorf("%s: %d bytes differ from the %d written", f.name, len(got), len(f.data))
				}
			}
		})
	}
}

// countdownContext reports cancellation after a number of Err calls, so
// that a test can cancel in the middle of a copy without racing it.
type countdownContext struct {
	context.Context
	left int
}

func (c *countdownContext) Err() error {
	if c.left <= 0 {
		return context.Canceled
	}
	c.left--
	return nil
}

func TestReadOVARefuses(t *testing.T) {
	disk1 := testFile{"app-disk1.vmdk", randomBytes(5, 300<<10), true}
	disk2 := testFile{"app-disk2.vmdk", randomBytes(6, 5000), true}
	desc := makeDescriptor(disk1, disk2)
	ovf := member{name: "app.ovf", data: desc}
	m1 := member{name: disk1.name, data: disk1.data}
	m2 := member{name: disk2.name, data: disk2.data}
	all := map[string][]byte{disk1.name: disk1.data, disk2.name: disk2.data}
	badSum := map[string][]byte{disk1.name: disk1.data, disk2.name: []byte("something else")}

	truncated := func(t *testing.T) string {
		path := writeOVA(t, ovf, m1, m2)
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, data[:len(desc)+2048+100<<10], 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}

	tests := []struct {
		name     string
		members  []member
		ova      func(t *testing.T) string // instead of members
		maxBytes int64
		ctx      context.Context
		want     string
		wantErr  error // instead of ErrInvalid
	}{
		{name: "empty archive", want: "archive is empty"},
		{name: "disk first", members: []member{m1, ovf, m2}, want: `first member "app-disk1.vmdk" is not an .ovf descriptor`},
		{name: "manifest first", members: []member{{name: "app.mf", data: makeManifest("SHA256", all)}, ovf, m1, m2}, want: "is not an .ovf descriptor"},
		{name: "directory first", members: []member{{name: "app.ovf", typeflag: tar.TypeDir}, ovf, m1, m2}, want: `member "app.ovf" is a directory`},
		{name: "descriptor too large", members: []member{{name: "app.ovf", data: make([]byte, maxDescriptor+1)}}, want: "more than the 4194304 allowed"},
		{name: "invalid descriptor", members: []member{{name: "app.ovf", data: []byte("<Envelope/>")}, m1}, want: "not an OVF"},
		{name: "symlink disk", members: []member{ovf, {name: disk1.name, typeflag: tar.TypeSymlink, linkname: "/etc/shadow"}, m2},
			want: `member "app-disk1.vmdk" is a symbolic link`},
		{name: "hard link disk", members: []member{ovf, m2, {name: disk1.name, typeflag: tar.TypeLink, linkname: disk2.name}},
			want: `member "app-disk1.vmdk" is a hard link`},
		{name: "device", members: []member{ovf, m1, m2, {name: "null", typeflag: tar.TypeChar}}, want: `member "null" is a device`},
		{name: "parent path", members: []member{ovf, m1, m2, {name: "../x", data: []byte("x")}}, want: `member "../x" is not a plain file name`},
		{name: "absolute path", members: []member{ovf, m1, m2, {name: "/tmp/x", data: []byte("x")}}, want: `member "/tmp/x" is not a plain file name`},
		{name: "subdirectory path", members: []member{ovf, {name: "disks/" + disk1.name, data: disk1.data}, m2}, want: "is not a plain file name"},
		{name: "unreferenced member", members: []member{ovf, m1, m2, {name: "readme.txt", data: []byte("hi")}},
			want: `member "readme.txt" is not referenced by the descriptor`},
		{name: "second descriptor", members: []member{ovf, m1, m2, {name: "other.ovf", data: desc}},
			want: `member "other.ovf" is not referenced by the descriptor`},
		{name: "missing disk", members: []member{ovf, m1}, want: `app-disk2.vmdk: file "file2" is missing from the archive`},
		{name: "duplicate disk", members: []member{ovf, m1, m2, m1}, want: `member "app-disk1.vmdk" appears twice`},
		{name: "duplicate descriptor", members: []member{ovf, ovf, m1, m2}, want: `member "app.ovf" appears twice`},
		{name: "size differs from ovf:size", members: []member{ovf, {name: disk1.name, data: disk1.data[:1000]}, m2},
			want: "app-disk1.vmdk: member is 1000 bytes, but the descriptor says 307200"},
		{name: "oversize member", members: []member{ovf, m1, m2}, maxBytes: 100 << 10,
			want: `member "app-disk1.vmdk" is 307200 bytes, more than the limit of 102400`},
		{name: "truncated archive", ova: truncated, want: `member "app-disk1.vmdk": the data ends early`},
		{name: "digest mismatch", members: []member{ovf, {name: "app.mf", data: makeManifest("SHA256", badSum)}, m1, m2},
			want: "app-disk2.vmdk: SHA256 digest does not match the manifest"},
		{name: "digest mismatch, manifest last", members: []member{ovf, m1, m2, {name: "app.mf", data: makeManifest("SHA1", badSum)}},
			want: "app-disk2.vmdk: SHA1 digest does not match the manifest"},
		{name: "descriptor digest mismatch", members: []member{ovf,
			{name: "app.mf", data: makeManifest("SHA256", map[string][]byte{"app.ovf": []byte("x"), disk1.name: disk1.data, disk2.name: disk2.data})}, m1, m2},
			want: "app.ovf: SHA256 digest does not match the manifest"},
		{name: "disk not in manifest", members: []member{ovf, {name: "app.mf", data: makeManifest("SHA256", map[string][]byte{disk1.name: disk1.data})}, m1, m2},
			want: "app-disk2.vmdk: not listed in the manifest"},
		{name: "disk not in trailing manifest", members: []member{ovf, m1, m2, {name: "app.mf", data: makeManifest("SHA256", map[string][]byte{disk1.name: disk1.data})}},
			want: "app-disk2.vmdk: not listed in the manifest"},
		{name: "manifest lists a stranger", members: []member{ovf,
			{name: "app.mf", data: makeManifest("SHA256", map[string][]byte{"evil.bin": nil, disk1.name: disk1.data, disk2.name: disk2.data})}, m1, m2},
			want: "manifest lists evil.bin, which is not part of the package"},
		{name: "malformed manifest", members: []member{ovf, {name: "app.mf", data: []byte("MD5(app.ovf)= 00")}, m1, m2}, want: "manifest line 1"},
		{name: "two manifests", members: []member{ovf, {name: "app.mf", data: makeManifest("SHA256", all)}, {name: "b.mf", data: makeManifest("SHA256", all)}, m1, m2},
			want: `member "b.mf": the archive has more than one manifest`},
		{name: "two certificates", members: []member{ovf, {name: "a.cert"}, {name: "b.cert"}, m1, m2}, want: "more than one certificate"},
		{name: "cancelled before", members: []member{ovf, m1, m2}, ctx: cancelledContext(), wantErr: context.Canceled},
		{name: "cancelled during copy", members: []member{ovf, m2, m1}, ctx: &countdownContext{Context: context.Background(), left: 5},
			wantErr: context.Canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ova string
			if tt.ova != nil {
				ova = tt.ova(t)
			} else {
				ova = writeOVA(t, tt.members...)
			}
			dir := t.TempDir()
			ctx := tt.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			maxBytes := tt.maxBytes
			if maxBytes == 0 {
				maxBytes = 64 << 20
			}
			d, paths, err := ReadOVA(ctx, ova, dir, maxBytes)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Errorf("err = %v, want %v", err, tt.wantErr)
				}
			} else {
				checkInvalid(t, err, tt.want)
			}
			if len(d.Disks) != 0 || paths != nil {
				t.Errorf("ReadOVA returned %+v, %q with an error", d, paths)
			}
			if got := dirNames(t, dir); len(got) != 0 {
				t.Errorf("dir holds %q after the error, want nothing", got)
			}
		})
	}
}

func cancelledContext() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

func TestReadOVACallerErrors(t *testing.T) {
	ova := writeOVA(t, member{name: "app.ovf", data: makeDescriptor(testFile{"a.vmdk", []byte("a"), true})}, member{name: "a.vmdk", data: []byte("a")})
	full := t.TempDir()
	if err := os.WriteFile(filepath.Join(full, "keep"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, ova, dir string
		maxBytes       int64
	}{
		{"dir not empty", ova, full, 1 << 20},
		{"dir missing", ova, filepath.Join(t.TempDir(), "nope"), 1 << 20},
		{"ova missing", filepath.Join(t.TempDir(), "nope.ova"), t.TempDir(), 1 << 20},
		{"no size limit", ova, t.TempDir(), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := ReadOVA(context.Background(), tt.ova, tt.dir, tt.maxBytes)
			if err == nil || errors.Is(err, ErrInvalid) {
				t.Errorf("err = %v, want an error that does not blame the appliance", err)
			}
		})
	}
	if got := dirNames(t, full); !slices.Equal(got, []string{"keep"}) {
		t.Errorf("non-empty dir now holds %q, want it untouched", got)
	}
}

func writeFiles(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// realTempDir resolves links in the temporary directory (macOS puts it
// under a link), because ReadOVF reports paths next to the real descriptor.
func realTempDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestReadOVF(t *testing.T) {
	disk1 := testFile{"app-disk1.vmdk", randomBytes(7, 200<<10), true}
	disk2 := testFile{"app-disk2.vmdk", randomBytes(8, 1000), true}
	desc := makeDescriptor(disk1, disk2)
	all := map[string][]byte{"app.ovf": desc, disk1.name: disk1.data, disk2.name: disk2.data}
	withManifest := func(alg string, files map[string][]byte) map[string][]byte {
		out := map[string][]byte{"app.mf": makeManifest(alg, files)}
		for k, v := range all {
			out[k] = v
		}
		return out
	}
	without := func(name string) map[string][]byte {
		out := map[string][]byte{}
		for k, v := range all {
			if k != name {
				out[k] = v
			}
		}
		return out
	}

	good := []struct {
		name  string
		files map[string][]byte
	}{
		{"no manifest", all},
		{"SHA256 manifest", withManifest("SHA256", all)},
		{"SHA1 manifest without descriptor", withManifest("SHA1", map[string][]byte{disk1.name: disk1.data, disk2.name: disk2.data})},
	}
	for _, tt := range good {
		t.Run(tt.name, func(t *testing.T) {
			dir := realTempDir(t)
			writeFiles(t, dir, tt.files)
			d, paths, err := ReadOVF(context.Background(), filepath.Join(dir, "app.ovf"))
			if err != nil {
				t.Fatalf("ReadOVF: %v", err)
			}
			want := []string{filepath.Join(dir, disk2.name), filepath.Join(dir, disk1.name)}
			if !slices.Equal(paths, want) {
				t.Errorf("paths = %q, want %q", paths, want)
			}
			if len(d.Disks) != 2 || d.Disks[0].File != disk2.name {
				t.Errorf("Disks = %+v, want %s first", d.Disks, disk2.name)
			}
		})
	}

	bad := []struct {
		name    string
		files   map[string][]byte
		symlink bool // replace disk1 by a link to a copy outside the directory
		ctx     context.Context
		want    string
		wantErr error
	}{
		{name: "missing disk", files: without(disk2.name), want: `app-disk2.vmdk: file "file2" is missing from`},
		{name: "symlinked disk", files: withManifest("SHA256", all), symlink: true, want: "app-disk1.vmdk: not a regular file"},
		{name: "disk size differs", files: func() map[string][]byte {
			f := without(disk1.name)
			f[disk1.name] = disk1.data[:100]
			return f
		}(), want: "app-disk1.vmdk: file is 100 bytes, but the descriptor says 204800"},
		{name: "digest mismatch", files: withManifest("SHA256", map[string][]byte{disk1.name: disk2.data, disk2.name: disk2.data}),
			want: "app-disk1.vmdk: SHA256 digest does not match the manifest"},
		{name: "descriptor digest mismatch", files: withManifest("SHA512", map[string][]byte{"app.ovf": nil, disk1.name: disk1.data, disk2.name: disk2.data}),
			want: "app.ovf: SHA512 digest does not match the manifest"},
		{name: "disk not in manifest", files: withManifest("SHA256", map[string][]byte{disk1.name: disk1.data}), want: "app-disk2.vmdk: not listed in the manifest"},
		{name: "manifest lists a stranger", files: withManifest("SHA256", map[string][]byte{"other.vmdk": nil, disk1.name: disk1.data, disk2.name: disk2.data}),
			want: "manifest lists other.vmdk, which is not part of the package"},
		{name: "cancelled", files: withManifest("SHA256", all), ctx: cancelledContext(), wantErr: context.Canceled},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, tt.files)
			if tt.symlink {
				outside := filepath.Join(t.TempDir(), disk1.name)
				writeFiles(t, filepath.Dir(outside), map[string][]byte{disk1.name: disk1.data})
				if err := os.Remove(filepath.Join(dir, disk1.name)); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(outside, filepath.Join(dir, disk1.name)); err != nil {
					t.Skipf("symlinks unavailable: %v", err)
				}
			}
			ctx := tt.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			_, paths, err := ReadOVF(ctx, filepath.Join(dir, "app.ovf"))
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Errorf("err = %v, want %v", err, tt.wantErr)
				}
			} else {
				checkInvalid(t, err, tt.want)
			}
			if paths != nil {
				t.Errorf("paths = %q with an error", paths)
			}
		})
	}

	t.Run("descriptor through a link", func(t *testing.T) {
		dir := realTempDir(t)
		writeFiles(t, dir, withManifest("SHA256", all))
		link := filepath.Join(t.TempDir(), "link.ovf")
		if err := os.Symlink(filepath.Join(dir, "app.ovf"), link); err != nil {
			t.Skipf("symlinks unavailable: %v", err)
		}
		_, paths, err := ReadOVF(context.Background(), link)
		if err != nil {
			t.Fatalf("ReadOVF: %v", err)
		}
		if want := filepath.Join(dir, disk2.name); len(paths) != 2 || paths[0] != want {
			t.Errorf("paths = %q, want %s first", paths, want)
		}
	})

	t.Run("missing descriptor", func(t *testing.T) {
		_, _, err := ReadOVF(context.Background(), filepath.Join(t.TempDir(), "app.ovf"))
		if err == nil || errors.Is(err, ErrInvalid) || !errors.Is(err, os.ErrNotExist) {
			t.Errorf("err = %v, want a not-exist error", err)
		}
	})
}
