package ovf

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func FuzzParse(f *testing.F) {
	names, err := filepath.Glob(filepath.Join("testdata", "*.ovf"))
	if err != nil || len(names) == 0 {
		f.Fatalf("no seed descriptors in testdata: %v", err)
	}
	for _, name := range names {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add(makeDescriptor(testFile{"a.vmdk", []byte("a"), true}, testFile{"b.iso", nil, false}))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := Parse(bytes.NewReader(data))
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("Parse error %v does not wrap ErrInvalid", err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("Parse error %q spans lines", err)
			}
			return
		}
		if len(d.Disks) == 0 {
			t.Fatalf("Parse succeeded without disks: %+v", d)
		}
		seen := map[string]bool{}
		for _, disk := range d.Disks {
			if !isPlainName(disk.File) || strings.ContainsAny(disk.File, `/\`) || strings.Contains(disk.File, "..") {
				t.Fatalf("disk %q has file name %q", disk.ID, disk.File)
			}
			if seen[disk.File] {
				t.Fatalf("file %q is used by two disks", disk.File)
			}
			seen[disk.File] = true
			if disk.Capacity < 0 || disk.Capacity > maxCapacity || disk.FileSize < 0 {
				t.Fatalf("disk %q has capacity %d and file size %d", disk.ID, disk.Capacity, disk.FileSize)
			}
		}
		if d.CPUs < 0 || d.CPUs > maxCPUs || d.Memory < 0 || d.Memory > maxMemory {
			t.Fatalf("descriptor has %d CPUs and %d bytes of memory", d.CPUs, d.Memory)
		}
	})
}

func FuzzParseManifest(f *testing.F) {
	f.Add([]byte("SHA1(a.ovf)= " + strings.Repeat("0a", 20) + "\nSHA256(a.vmdk) = " + strings.Repeat("1b", 32) + "\r\n"))
	f.Add([]byte("SHA512(disk.vmdk)=" + strings.Repeat("ff", 64)))
	f.Add([]byte("MD5(x)= 00\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := ParseManifest(bytes.NewReader(data))
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseManifest error %v does not wrap ErrInvalid", err)
			}
			return
		}
		for name, dg := range m {
			if !isPlainName(name) {
				t.Fatalf("manifest accepted name %q", name)
			}
			newHash, ok := algorithms[dg.Algorithm]
			if !ok || len(dg.Sum) != newHash().Size() {
				t.Fatalf("%s: %s digest of %d bytes", name, dg.Algorithm, len(dg.Sum))
			}
		}
	})
}
