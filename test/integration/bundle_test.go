package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/bundle"
)

// rawRegion is where the tests write data straight to the disk, past the
// guest's partitions: 200 MiB at 1 GiB into a 4 GiB disk.
const rawRegion = "bs=1M seek=1024 count=200"

func (h *host) rawSum(name string) string {
	h.t.Helper()
	return strings.Fields(h.exec(name, "sh", "-c", "dd if=/dev/vda bs=1M skip=1024 count=200 2>/dev/null | sha256sum"))[0]
}

// poolFiles lists what a host's default pool holds.
func (h *host) poolFiles() []string {
	files, _ := filepath.Glob(filepath.Join(h.home, "pools", "default", "*"))
	return files
}

// TestBundleExportImport exports a running VM with a 4 GiB disk holding
// 200 MiB of data and imports it on a second daemon that does not even
// have its image: the data comes along, the identity does not (unless
// kept), and damaged bundles are refused without a trace.
func TestBundleExportImport(t *testing.T) {
	t.Parallel()
	src := newHost(t)
	src.vm("web", "--disk", "4G")
	src.exec("web", "sh", "-c", "echo carried-in-a-bundle >/root/note && echo b >/root/before && dd if=/dev/urandom of=/dev/vda "+rawRegion+" conv=fsync 2>/dev/null && sync")
	want := src.rawSum("web")
	before := src.identity("web")

	dir := t.TempDir()
	file := filepath.Join(dir, "web.lodge")
	src.must("export", "web", file)
	if v := src.show("web"); v.State != api.StateRunning {
		t.Fatalf("web after a live export: %s", v.State)
	}
	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	// Sparse and compressed: the 200 MiB of random data, not 4 GiB.
	if st.Size() > 260<<20 || st.Size() < 200<<20 {
		t.Errorf("bundle is %d MiB for 200 MiB of random data on a 4 GiB disk", st.Size()>>20)
	}
	leftovers, _ := filepath.Glob(filepath.Join(src.home, "pools", "default", "*.fleece.qcow2"))
	if len(leftovers) > 0 {
		t.Errorf("the export left %v behind", leftovers)
	}

	dst := newHost(t)
	dst.must("import", file, "--name", "copy")
	dst.must("start", "copy")
	dst.waitAgent("copy")
	if got := dst.exec("copy", "cat", "/root/note"); got != "carried-in-a-bundle" {
		t.Errorf("file in the imported VM: %q", got)
	}
	if got := dst.rawSum("copy"); got != want {
		t.Errorf("raw data in the imported VM: sha256 %s, want %s", got, want)
	}
	eventually(t, 90*time.Second, "the copy takes a new identity", func() bool {
		id := dst.identity("copy")
		return id.hostname == "copy" && id.machineID != before.machineID && id.sshKey != before.sshKey
	})
	after := dst.identity("copy")
	if after.uuid == before.uuid || after.mac == before.mac {
		t.Errorf("imported copy kept uuid %s / mac %s", after.uuid, after.mac)
	}

	// --keep-identity, for a move: same UUID and MAC.
	dst.must("import", file, "--name", "moved", "--keep-identity")
	moved := dst.show("moved")
	orig := src.show("web")
	if moved.UUID != orig.UUID || moved.NICs[0].MAC != orig.NICs[0].MAC {
		t.Errorf("--keep-identity: uuid %s mac %s, want %s %s", moved.UUID, moved.NICs[0].MAC, orig.UUID, orig.NICs[0].MAC)
	}
	// A second copy with the same identity on one host is refused.
	filesBefore := dst.poolFiles()
	_, errOut, code := dst.lodge("import", file, "--name", "twin", "--keep-identity")
	if code == 0 || !strings.Contains(errOut, "uuid") {
		t.Errorf("a duplicate identity was imported: exit %d: %s", code, errOut)
	}
	if got := dst.poolFiles(); len(got) != len(filesBefore) {
		t.Errorf("refused import left files: %v", got)
	}

	// Damage: a flipped byte and a cut file are refused, naming the disk
	// and offset, and leave nothing behind.
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "bad.lodge")
	flipped := append([]byte(nil), raw...)
	flipped[len(flipped)/2] ^= 0x10
	cases := map[string][]byte{"corrupted": flipped, "truncated": raw[:len(raw)*2/3]}
	for name, b := range cases {
		if err := os.WriteFile(bad, b, 0o600); err != nil {
			t.Fatal(err)
		}
		_, errOut, code := dst.lodge("import", bad, "--name", "bad-"+name)
		if code != 1 || !strings.Contains(errOut, `disk "root"`) || !strings.Contains(errOut, "offset") {
			t.Errorf("%s bundle: exit %d: %s", name, code, errOut)
		}
		if strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("%s bundle: error is not one line: %q", name, errOut)
		}
		if _, _, code := dst.lodge("show", "bad-"+name); code == 0 {
			t.Errorf("%s bundle left a VM behind", name)
		}
		if got := dst.poolFiles(); len(got) != len(filesBefore) {
			t.Errorf("%s bundle left files: %v", name, got)
		}
	}
}

// TestBundleStdoutAndOVA pipes an export of a stopped VM through stdout
// into an import, and writes an OVA that qemu-img reads back.
func TestBundleStdoutAndOVA(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("app")
	h.exec("app", "sh", "-c", "echo piped >/root/note && sync")
	h.must("stop", "app")
	dir := t.TempDir()
	out, errOut, code := h.lodge("export", "app", "-")
	if code != 0 {
		t.Fatalf("export to stdout: %s", errOut)
	}
	if _, errOut, code := h.lodgeIn(out, "import", "-", "--name", "piped"); code != 0 {
		t.Fatalf("import from stdin: %s", errOut)
	}
	h.must("start", "piped")
	h.waitAgent("piped")
	if got := h.exec("piped", "cat", "/root/note"); got != "piped" {
		t.Errorf("piped copy holds %q", got)
	}

	ova := filepath.Join(dir, "app.ova")
	h.must("export", "app", ova, "--format", "ova")
	listing, err := tarList(ova)
	if err != nil {
		t.Fatal(err)
	}
	if len(listing) != 3 || !strings.HasSuffix(listing[0], ".ovf") || !strings.HasSuffix(listing[1], ".mf") || !strings.HasSuffix(listing[2], ".vmdk") {
		t.Errorf("OVA holds %v; want .ovf, .mf, .vmdk", listing)
	}
	// Lodge's own OVA import reads it back into an image.
	h.must("image", "import", ova, "--name", "from-ova")

	_, errOut, code = h.lodge("export", "app", filepath.Join(dir, "x"), "--compression", "gzip")
	if code != 2 || !strings.Contains(errOut, "gzip") {
		t.Errorf("bad --compression: exit %d: %s", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); err == nil {
		t.Error("a refused export left a file")
	}
}

func tarList(path string) ([]string, error) {
	out, err := exec.Command("tar", "-tf", path).Output()
	if err != nil {
		return nil, fmt.Errorf("tar -tf %s: %w", path, err)
	}
	return strings.Fields(string(out)), nil
}

// cutProxy forwards TCP to target and cuts the first connection once it
// has carried cutAfter bytes upstream, as a flaky link would.
type cutProxy struct {
	ln   net.Listener
	cuts atomic.Int32
}

func newCutProxy(t *testing.T, target string, cutAfter int64) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c, target, cutAfter)
		}
	}()
	return p
}

func (p *cutProxy) serve(c net.Conn, target string, cutAfter int64) {
	defer func() { _ = c.Close() }()
	up, err := net.Dial("tcp", target)
	if err != nil {
		return
	}
	defer func() { _ = up.Close() }()
	go func() { _, _ = io.Copy(c, up) }()
	if p.cuts.Load() == 0 {
		if n, _ := io.CopyN(up, c, cutAfter); n == cutAfter && p.cuts.CompareAndSwap(0, 1) {
			// Cut mid-stream. The sender learns of it at once; the
			// receiver only later, as over a real network, so the
			// sender's retry meets a receiver still busy with the
			// broken attempt.
			_ = c.Close()
			time.Sleep(3 * time.Second)
			return
		}
	}
	_, _ = io.Copy(up, c)
}

// TestSend streams a VM between two daemons through a link that drops
// in the middle: the sender resumes, and the receiver gets it whole.
// --move then hands over a second VM with its identity.
func TestSend(t *testing.T) {
	t.Parallel()
	src := newHost(t)
	dst := newHostNoDaemon(t)
	port := freePort(t)
	dst.env = append(dst.env, "LODGE_LISTEN=127.0.0.1:"+port)
	dst.startDaemon()
	t.Cleanup(dst.cleanup)
	var tok api.HostToken
	mustJSON(t, dst.must("host", "token", "-o", "json"), &tok)

	src.vm("db", "--disk", "4G")
	src.exec("db", "sh", "-c", "echo sent-over >/root/note && dd if=/dev/urandom of=/dev/vda bs=1M seek=1024 count=64 conv=fsync 2>/dev/null && sync")
	want := strings.Fields(src.exec("db", "sh", "-c", "dd if=/dev/vda bs=1M skip=1024 count=64 2>/dev/null | sha256sum"))[0]

	proxy := newCutProxy(t, "127.0.0.1:"+port, 24<<20)
	to := "https://" + proxy.ln.Addr().String()

	// A wrong token is refused up front.
	_, errOut, code := src.lodge("send", "db", "--to", to, "--token", strings.Replace(tok.Token, tok.Token[len(tok.Token)-4:], "0000", 1))
	if code == 0 || !strings.Contains(errOut, "token") {
		t.Errorf("send with a wrong token: exit %d: %s", code, errOut)
	}

	src.must("send", "db", "--to", to, "--token", tok.Token, "--name", "db2")
	if proxy.cuts.Load() != 1 {
		t.Errorf("the link was cut %d times; the test meant to cut it once", proxy.cuts.Load())
	}
	if !strings.Contains(src.log.String(), "resuming send") {
		t.Errorf("the sender did not resume; log:\n%s", src.log.String())
	}
	dst.must("start", "db2")
	dst.waitAgent("db2")
	if got := dst.exec("db2", "cat", "/root/note"); got != "sent-over" {
		t.Errorf("sent VM holds %q", got)
	}
	if got := strings.Fields(dst.exec("db2", "sh", "-c", "dd if=/dev/vda bs=1M skip=1024 count=64 2>/dev/null | sha256sum"))[0]; got != want {
		t.Errorf("sent disk data: %s, want %s", got, want)
	}

	// --move: the source goes only after the receiver has the VM.
	orig := src.show("db")
	src.must("send", "db", "--to", to, "--token", tok.Token, "--move")
	if _, _, code := src.lodge("show", "db"); code == 0 {
		t.Error("--move left the VM on the sender")
	}
	moved := dst.show("db")
	if moved.UUID != orig.UUID || moved.NICs[0].MAC != orig.NICs[0].MAC {
		t.Errorf("moved VM: uuid %s mac %s, want %s %s", moved.UUID, moved.NICs[0].MAC, orig.UUID, orig.NICs[0].MAC)
	}
}

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	return fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
}

// TestBundleKill kills the daemon in the middle of an export of a running
// VM and in the middle of an import: the VM keeps running, the next
// export works, and the half import leaves no VM and no disk behind.
func TestBundleKill(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	h.vm("k", "--disk", "4G")
	h.exec("k", "sh", "-c", "dd if=/dev/urandom of=/dev/vda bs=1M seek=1024 count=64 conv=fsync 2>/dev/null && sync")

	// An export held mid-stream by a reader that stops reading.
	exp := exec.Command(h.bin, "export", "k", "-")
	exp.Env = h.env
	out, err := exp.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := exp.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(out, make([]byte, 1<<20)); err != nil {
		t.Fatalf("export started no stream: %v", err)
	}
	h.killDaemon()
	_ = exp.Process.Kill()
	_ = exp.Wait()
	h.startDaemon()
	if v := h.show("k"); v.State != api.StateRunning {
		t.Fatalf("k after the daemon was killed mid-export: %s", v.State)
	}
	file := filepath.Join(t.TempDir(), "k.lodge")
	h.must("export", "k", file)
	if left, _ := filepath.Glob(filepath.Join(h.home, "pools", "default", "*.fleece.qcow2")); len(left) > 0 {
		t.Errorf("fleecing files left after the next export: %v", left)
	}
	h.exec("k", "true")

	// An import fed half its bundle, then the daemon killed.
	filesBefore := h.poolFiles()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	imp := exec.Command(h.bin, "import", "-", "--name", "half")
	imp.Env = h.env
	in, err := imp.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := imp.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Write(raw[:len(raw)/2]); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the half import to create its VM", func() bool {
		_, _, code := h.lodge("show", "half")
		return code == 0
	})
	h.killDaemon()
	_ = in.Close()
	_ = imp.Wait()
	h.startDaemon()
	if _, _, code := h.lodge("show", "half"); code == 0 {
		t.Error("a half import survived the daemon's restart")
	}
	eventually(t, 10*time.Second, "the half import's disk to go", func() bool {
		return len(h.poolFiles()) == len(filesBefore)
	})
}

// TestBundleSnapshots moves a VM with its snapshot tree, one snapshot with
// memory and one without, and reverts to each on the other host.
func TestBundleSnapshots(t *testing.T) {
	t.Parallel()
	src := newHost(t)
	src.vm("tree")
	src.exec("tree", "sh", "-c", "echo one >/root/f && sync")
	src.must("snapshot", "create", "tree", "s1")
	src.exec("tree", "sh", "-c", "echo two >/root/f && sync")
	src.must("snapshot", "create", "tree", "s2", "--no-memory")
	src.exec("tree", "sh", "-c", "echo three >/root/f && sync")

	file := filepath.Join(t.TempDir(), "tree.lodge")
	_, errOut, code := src.lodge("export", "tree", file, "--with-snapshots")
	if code != 1 || !strings.Contains(errOut, "stop it first") {
		t.Errorf("--with-snapshots of a running VM: exit %d: %s", code, errOut)
	}
	src.must("stop", "tree")
	src.must("export", "tree", file, "--with-snapshots")

	dst := newHost(t)
	dst.must("import", file, "--keep-identity")
	var snaps []api.Snapshot
	mustJSON(t, dst.must("snapshot", "list", "tree", "-o", "json"), &snaps)
	if len(snaps) != 2 || snaps[0].Name != "s1" || !snaps[0].Memory || snaps[1].Name != "s2" || snaps[1].Memory || snaps[1].Parent != "s1" || !snaps[1].Current {
		t.Fatalf("imported snapshot tree: %+v", snaps)
	}
	dst.must("start", "tree")
	dst.waitAgent("tree")
	if got := dst.exec("tree", "cat", "/root/f"); got != "three" {
		t.Errorf("current state after import: %q", got)
	}
	dst.must("snapshot", "revert", "tree", "s1")
	if v := dst.show("tree"); v.State != api.StateRunning {
		t.Errorf("after reverting to a memory snapshot: %s", v.State)
	}
	if got := dst.exec("tree", "cat", "/root/f"); got != "one" {
		t.Errorf("after revert to s1: %q", got)
	}
	dst.must("snapshot", "revert", "tree", "s2")
	dst.must("start", "tree")
	dst.waitAgent("tree")
	if got := dst.exec("tree", "cat", "/root/f"); got != "two" {
		t.Errorf("after revert to s2: %q", got)
	}

	// A new identity drops the memory states: they hold the old one.
	dst.must("import", file, "--name", "fresh")
	mustJSON(t, dst.must("snapshot", "list", "fresh", "-o", "json"), &snaps)
	if len(snaps) != 2 || snaps[0].Memory {
		t.Errorf("snapshots of an import with a new identity: %+v", snaps)
	}
}

// fileSource serves a whole file as a bundle entry.
type fileSource struct{ b []byte }

func (f fileSource) ReadAt(p []byte, off int64) (int, error) {
	n := copy(p, f.b[min(off, int64(len(f.b))):])
	clear(p[n:])
	return len(p), nil
}

// layerBundle writes a bundle whose one disk is a single qcow2 layer.
func layerBundle(t *testing.T, path string, layer []byte) {
	t.Helper()
	m := bundle.Manifest{
		CreatedAt: time.Now().UTC(), Consistency: "stopped",
		VM:     bundle.VMSpec{Name: "evil", UUID: "0a1b2c3d-4e5f-4071-8899-aabbccddeeff", CPUs: 1, Memory: 256 << 20},
		Disks:  []bundle.Disk{{Name: "root", Bus: "virtio", Size: 64 << 20, Top: "l0"}},
		Layers: []bundle.Layer{{ID: "l0", Disk: "root", Entry: bundle.LayerEntry("l0"), Size: int64(len(layer))}},
	}
	size := bundle.RoundBlock(int64(len(layer)))
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	src := []bundle.Source{{Entry: bundle.LayerEntry("l0"), Size: size, Extents: []bundle.Extent{{Offset: 0, Length: size}}, Data: fileSource{layer}}}
	if _, err := bundle.Write(context.Background(), f, m, src, bundle.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// TestBundleHostileLayer imports bundles whose qcow2 layers point at host
// files: one through an external data file is refused and leaves nothing;
// one with a backing file gets Lodge's own instead.
func TestBundleHostileLayer(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	dir := t.TempDir()
	img := func(name string, opts ...string) []byte {
		p := filepath.Join(dir, name)
		args := append([]string{"create", "-q", "-f", "qcow2"}, opts...)
		if out, err := exec.Command("qemu-img", append(args, p, "64M")...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v: %s", err, out)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	before := h.poolFiles()
	layerBundle(t, filepath.Join(dir, "datafile.lodge"), img("d.qcow2", "-o", "data_file=/etc/hostname,data_file_raw=on"))
	_, errOut, code := h.lodge("import", filepath.Join(dir, "datafile.lodge"))
	if code != 1 || !strings.Contains(errOut, "names other files") {
		t.Errorf("a layer with an external data file: exit %d: %s", code, errOut)
	}
	if _, _, code := h.lodge("show", "evil"); code == 0 {
		t.Error("the refused import left a VM")
	}
	if got := h.poolFiles(); len(got) != len(before) {
		t.Errorf("the refused import left files: %v", got)
	}

	layerBundle(t, filepath.Join(dir, "backing.lodge"), img("b.qcow2", "-b", "/etc/shadow", "-F", "raw", "-u"))
	h.must("import", filepath.Join(dir, "backing.lodge"))
	v := h.show("evil")
	out, err := exec.Command("qemu-img", "info", "-U", "--output=json", v.Disks[0].Path).Output()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "shadow") || strings.Contains(string(out), "backing-filename") {
		t.Errorf("the imported layer still names a backing file: %s", out)
	}
}
