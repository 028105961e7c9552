package integration

import (
	"os"
	"os/exec"
	"path/filepath"
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
