package integration

import (
	"archive/tar"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lodge-vm/lodge/api"
)

// TestBadInput: every bad request gets a one-line error naming the object
// and the reason, the right exit code, and changes nothing.
func TestBadInput(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.importGuest()
	h.must("create", "taken", "--image", "tiny")
	notQcow := filepath.Join(h.home, "garbage.img")
	if err := os.WriteFile(notQcow, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	badOVA := filepath.Join(h.home, "bad.ova")
	writeTar(t, badOVA, [2]string{"disk.vmdk", "not a descriptor first"})
	badOVF := filepath.Join(h.home, "bad.ovf")
	if err := os.WriteFile(badOVF, []byte("<Envelope xmlns='urn:nope'/>"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"duplicate name", []string{"create", "taken", "--image", "tiny"}, 1, []string{`vm "taken"`, "already exists"}},
		{"unknown image", []string{"create", "x1", "--image", "nope"}, 1, []string{`image "nope"`, "not found"}},
		{"no image", []string{"create", "x2"}, 1, []string{`vm "x2"`, "image is required"}},
		{"memory not a size", []string{"create", "x3", "--image", "tiny", "--memory", "lots"}, 2, []string{"--memory", "not a size"}},
		{"memory over host", []string{"create", "x4", "--image", "tiny", "--memory", "100T"}, 1, []string{`vm "x4"`, "more than the host has"}},
		{"memory too small", []string{"create", "x5", "--image", "tiny", "--memory", "1M"}, 1, []string{`vm "x5"`, "at least 64M"}},
		{"negative cpus", []string{"create", "x6", "--image", "tiny", "--cpus", "-1"}, 2, []string{"--cpus -1"}},
		{"disk smaller than image", []string{"create", "x7", "--image", "tiny", "--disk", "1M"}, 1, []string{`vm "x7"`, "smaller than image"}},
		{"bad bus", []string{"create", "x8", "--image", "tiny", "--disk-bus", "floppy"}, 1, []string{`disk bus "floppy"`}},
		{"data disk not a size", []string{"create", "x10", "--image", "tiny", "--data-disk", "big"}, 2, []string{"--data-disk", "not a size"}},
		{"data disk too small", []string{"create", "x11", "--image", "tiny", "--data-disk", "1G", "--data-disk", "4K"}, 1, []string{`vm "x11"`, "data disk 2 of 4K"}},
		{"data disks over ide", []string{"create", "x12", "--image", "tiny", "--disk-bus", "ide", "--data-disk", "1G", "--data-disk", "1G", "--data-disk", "1G"}, 1, []string{`vm "x12"`, "at most 2"}},
		{"slash in name", []string{"create", "a/b", "--image", "tiny"}, 1, []string{`vm name "a/b"`}},
		{"dotdot in name", []string{"create", "..", "--image", "tiny"}, 1, []string{`vm name ".."`}},
		{"unknown pool", []string{"create", "x9", "--image", "tiny", "--pool", "nope"}, 1, []string{`pool "nope"`, "not found"}},
		{"image name with dotdot", []string{"image", "import", h.guest, "--name", "../evil"}, 1, []string{`image name "../evil"`}},
		{"image import of empty file", []string{"image", "import", notQcow, "--name", "empty"}, 1, []string{`image "empty"`}},
		{"image import of missing file", []string{"image", "import", "/no/such.qcow2", "--name", "missing"}, 1, []string{"no such file"}},
		{"delete image in use", []string{"image", "delete", "tiny"}, 1, []string{`image "tiny"`, "in use", "taken"}},
		{"start unknown vm", []string{"start", "ghost"}, 1, []string{`vm "ghost"`, "not found"}},
		{"exec in stopped vm", []string{"exec", "taken", "--", "true"}, 1, []string{`vm "taken"`, "not running"}},
		{"exec without --", []string{"exec", "taken", "true"}, 2, []string{"--"}},
		{"bad output format", []string{"list", "-o", "xml"}, 2, []string{`-o "xml"`}},
		{"unknown flag", []string{"create", "x", "--colour", "red"}, 2, []string{"unknown flag"}},
		{"negative stop timeout", []string{"stop", "taken", "--timeout", "-5s"}, 2, []string{"--timeout"}},
		{"pool on missing dir", []string{"pool", "create", "far", "/no/such/dir"}, 1, []string{`pool "far"`}},
		{"clone without a name", []string{"clone", "taken"}, 2, []string{"2 arg"}},
		{"clone of unknown vm", []string{"clone", "ghost", "g2"}, 1, []string{`vm "ghost"`, "not found"}},
		{"clone onto existing vm", []string{"clone", "taken", "taken"}, 1, []string{`vm "taken"`, "already exists"}},
		{"clone with bad name", []string{"clone", "taken", "a/b"}, 1, []string{`vm name "a/b"`}},
		{"clone into unknown pool", []string{"clone", "taken", "c1", "--pool", "nope"}, 1, []string{`pool "nope"`}},
		{"publish without name", []string{"image", "publish", "taken"}, 2, []string{"--name is required"}},
		{"publish of unknown vm", []string{"image", "publish", "ghost", "--name", "p"}, 1, []string{`vm "ghost"`}},
		{"publish over an image", []string{"image", "publish", "taken", "--name", "tiny"}, 1, []string{`image "tiny"`, "already exists"}},
		{"publish with bad name", []string{"image", "publish", "taken", "--name", "../p"}, 1, []string{`image name "../p"`}},
		{"flatten standalone image", []string{"image", "flatten", "tiny"}, 1, []string{`image "tiny"`, "no parent"}},
		{"flatten unknown image", []string{"image", "flatten", "nope"}, 1, []string{`image "nope"`, "not found"}},
		{"ova without descriptor first", []string{"image", "import", badOVA, "--name", "ova"}, 1, []string{`image "ova"`, ".ovf"}},
		{"ovf not an envelope", []string{"image", "import", badOVF, "--name", "ovf"}, 1, []string{`image "ovf"`, "invalid OVF"}},
		{"snapshot of unknown vm", []string{"snapshot", "create", "ghost", "s"}, 1, []string{`vm "ghost"`, "not found"}},
		{"snapshot with bad name", []string{"snapshot", "create", "taken", "a/b"}, 1, []string{`snapshot name "a/b"`}},
		{"snapshot without a name", []string{"snapshot", "create", "taken"}, 2, []string{"2 arg"}},
		{"revert to unknown snapshot", []string{"snapshot", "revert", "taken", "nope"}, 1, []string{`snapshot "nope" of vm "taken"`, "not found"}},
		{"delete unknown snapshot", []string{"snapshot", "delete", "taken", "nope"}, 1, []string{`snapshot "nope" of vm "taken"`, "not found"}},
		{"snapshots of unknown vm", []string{"snapshot", "list", "ghost"}, 1, []string{`vm "ghost"`, "not found"}},
		{"networks with other settings", []string{"set", "taken", "networks=nat", "cpus=2"}, 1, []string{`vm "taken"`, "networks are set alone"}},
		{"unknown network", []string{"set", "taken", "networks=nat,nosuch"}, 1, []string{`vm "taken"`, `network "nosuch"`}},
		{"empty network name", []string{"set", "taken", "networks=nat,,nat"}, 2, []string{"empty network name"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, code := h.lodge(tt.args...)
			if code != tt.code {
				t.Fatalf("lodge %v: exit %d, want %d (stdout %q, stderr %q)", tt.args, code, tt.code, out, errOut)
			}
			line := strings.TrimRight(errOut, "\n")
			if strings.Count(line, "\n") != 0 || !strings.HasPrefix(line, "lodge: ") {
				t.Errorf("stderr is not one `lodge: ...` line: %q", errOut)
			}
			for _, w := range tt.want {
				if !strings.Contains(errOut, w) {
					t.Errorf("stderr %q lacks %q", errOut, w)
				}
			}
		})
	}
	// Nothing was created by any of it.
	var vms []api.VM
	if err := json.Unmarshal([]byte(h.must("list", "-o", "json")), &vms); err != nil {
		t.Fatal(err)
	}
	if len(vms) != 1 || vms[0].Name != "taken" {
		t.Errorf("VMs after bad input = %+v, want only taken", vms)
	}
	disks, _ := filepath.Glob(filepath.Join(h.home, "pools", "default", "*"))
	if len(disks) != 1 {
		t.Errorf("pool files after bad input = %v, want one disk", disks)
	}
	imgs, _ := h.c.ListImages(context.Background())
	if len(imgs) != 1 {
		t.Errorf("images after bad input = %+v", imgs)
	}
	before := h.show("taken")
	if len(before.NICs) != 1 || before.CPUs == 2 {
		t.Errorf("refused sets changed taken: %+v, %d cpus", before.NICs, before.CPUs)
	}
	// The same setting, well formed, applies: the NIC that stays keeps
	// its MAC.
	h.must("set", "taken", "networks="+before.NICs[0].Network+","+before.NICs[0].Network)
	if after := h.show("taken"); len(after.NICs) != 2 || after.NICs[0].MAC != before.NICs[0].MAC || after.NICs[1].MAC == before.NICs[0].MAC {
		t.Errorf("taken after set networks: %+v (was %+v)", after.NICs, before.NICs)
	}
	// API bodies are checked too.
	if _, err := h.c.CreateVM(context.Background(), api.CreateVM{Name: "../x", Image: "tiny"}); err == nil || !strings.Contains(err.Error(), `vm name "../x"`) {
		t.Errorf("API create with bad name: %v", err)
	}

	if _, err := h.c.CreateSnapshot(context.Background(), "taken", api.CreateSnapshot{Name: "../x"}); err == nil || !strings.Contains(err.Error(), `snapshot name "../x"`) {
		t.Errorf("API snapshot with bad name: %v", err)
	}
	if snaps, err := h.c.ListSnapshots(context.Background(), "taken"); err != nil || len(snaps) != 0 {
		t.Errorf("snapshots after bad input = %+v, %v; want none", snaps, err)
	}
	for _, size := range []int64{100, 1<<20 + 1, -1} {
		if _, err := h.c.AddDisk(context.Background(), "taken", size); err == nil || !strings.Contains(err.Error(), `add a disk to vm "taken"`) {
			t.Errorf("API disk add of %d bytes: %v", size, err)
		}
	}
	if _, err := h.c.ResizeDisk(context.Background(), "taken", "root", 0); err == nil || !strings.Contains(err.Error(), `resize disk "root" of vm "taken"`) {
		t.Errorf("API disk resize to 0: %v", err)
	}
	if v := h.show("taken"); len(v.Disks) != 1 || v.Disks[0].Size != before.Disks[0].Size {
		t.Errorf("disks after refused disk requests: %+v", v.Disks)
	}
	if disks, _ := filepath.Glob(filepath.Join(h.home, "pools", "default", "*")); len(disks) != 1 {
		t.Errorf("pool files after refused disk requests = %v, want one disk", disks)
	}

	// A missing daemon is reported with how to start it.
	other := newHostNoDaemon(t)
	_, errOut, code := other.lodge("list")
	if code != 1 || !strings.Contains(errOut, "daemon is not running") || !strings.Contains(errOut, "lodge daemon") {
		t.Errorf("no daemon: exit %d, %q", code, errOut)
	}
}

// writeTar writes an archive of (name, content) members, in order.
func writeTar(t *testing.T, path string, files ...[2]string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	for _, m := range files {
		name, body := m[0], m[1]
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Format: tar.FormatUSTAR}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}
