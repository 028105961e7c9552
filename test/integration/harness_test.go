// Package integration boots the tiny guest under real QEMU through a real
// lodge daemon and checks, from inside the guest, that things happened.
// It needs bin/lodge and build/guest/tiny.qcow2 (make integration builds
// both); without them it skips, unless LODGE_TEST_REQUIRE is set, as in CI.
package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/client"
)

// requireQEMU skips (or, in CI, fails) when the pieces are missing.
func requireQEMU(t *testing.T) (bin, guest string) {
	t.Helper()
	bin, guest = os.Getenv("LODGE_BIN"), os.Getenv("LODGE_GUEST")
	var missing []string
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		missing = append(missing, "qemu-system-x86_64 (apt-get install qemu-system-x86)")
	}
	if bin == "" || !exists(bin) {
		missing = append(missing, "LODGE_BIN (make build)")
	}
	if guest == "" || !exists(guest) {
		missing = append(missing, "LODGE_GUEST (make guest)")
	}
	if len(missing) > 0 {
		msg := "integration test needs " + strings.Join(missing, ", ") + "; run make integration"
		if os.Getenv("LODGE_TEST_REQUIRE") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return bin, guest
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// host is one lodge daemon with its own LODGE_HOME.
type host struct {
	t   *testing.T
	bin string
	// binArgs come before lodge's own arguments (e.g. setpriv's).
	binArgs []string
	guest   string
	home    string
	env     []string
	c       *client.Client
	mu      sync.Mutex
	daemon  *exec.Cmd
	log     *bytes.Buffer
}

// newHost starts a daemon in a fresh home. Unix socket paths are short,
// so the home sits under /tmp rather than t.TempDir().
func newHost(t *testing.T) *host {
	t.Helper()
	requireQEMU(t)
	waitProbe(t)
	return newHostNoProbe(t)
}

func newHostNoProbe(t *testing.T) *host {
	t.Helper()
	h := newHostNoDaemon(t)
	h.startDaemon()
	t.Cleanup(h.cleanup)
	return h
}

// newHostWithConfig starts a daemon in a fresh home that holds config as
// its config.yaml.
func newHostWithConfig(t *testing.T, config string) *host {
	t.Helper()
	requireQEMU(t)
	waitProbe(t)
	h := newHostNoDaemon(t)
	if err := os.WriteFile(filepath.Join(h.home, "config.yaml"), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	h.startDaemon()
	t.Cleanup(h.cleanup)
	return h
}

// newHostNoDaemon prepares a home, environment and client, and starts
// nothing.
func newHostNoDaemon(t *testing.T) *host {
	t.Helper()
	bin, guest := requireQEMU(t)
	home, err := os.MkdirTemp("", "lodge-it-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(home) })
	h := &host{t: t, bin: bin, guest: guest, home: home}
	h.env = append(os.Environ(), "LODGE_HOME="+home, "LODGE_SOCKET=", "LODGE_ACCEL=")
	h.c = client.New(filepath.Join(home, "lodge.sock"))
	return h
}

func (h *host) startDaemon() {
	h.t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	cmd := exec.Command(h.bin, append(append([]string{}, h.binArgs...), "daemon")...)
	cmd.Env = h.env
	h.log = &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = h.log, h.log
	// A session of its own, as a service manager gives it: the daemon
	// then lowers its own CPU group during backups (package priority).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	h.daemon = cmd
	go func() { _ = cmd.Wait() }()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := h.c.Host(context.Background()); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	h.t.Fatalf("daemon did not answer within 15s; log:\n%s", h.log.String())
}

// killDaemon kills the daemon with SIGKILL, as a crash would.
func (h *host) killDaemon() {
	h.mu.Lock()
	defer h.mu.Unlock()
	_ = h.daemon.Process.Signal(syscall.SIGKILL)
	for i := 0; i < 100 && h.daemon.ProcessState == nil; i++ {
		time.Sleep(20 * time.Millisecond)
	}
}

func (h *host) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if vms, err := h.c.ListVMs(ctx); err == nil {
		for _, v := range vms {
			if op, err := h.c.StopVM(ctx, v.Name, api.StopVM{Force: true}); err == nil {
				_, _ = h.c.Wait(ctx, op, nil)
			}
		}
	}
	// Whatever still runs under this home (a test that killed the daemon
	// may leave QEMU behind) is killed by its pidfile.
	pids, _ := filepath.Glob(filepath.Join(h.home, "run", "*", "pid"))
	for _, p := range pids {
		raw, _ := os.ReadFile(p)
		var pid int
		if _, err := fmt.Sscanf(string(raw), "%d", &pid); err == nil && pid > 1 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	h.mu.Lock()
	if h.daemon != nil && h.daemon.Process != nil {
		_ = h.daemon.Process.Signal(syscall.SIGTERM)
	}
	h.mu.Unlock()
	time.Sleep(200 * time.Millisecond)
	teardownNetworks(h.home)
	if h.t.Failed() {
		h.t.Logf("daemon log:\n%s", h.log.String())
	}
	_ = os.RemoveAll(h.home)
}

// teardownNetworks removes what a test's networks left on the host:
// dnsmasq, bridges and iptables rules outlive the daemon by design.
func teardownNetworks(home string) {
	confs, _ := filepath.Glob(filepath.Join(home, "networks", "*", "dnsmasq.conf"))
	for _, c := range confs {
		dir := filepath.Dir(c)
		if raw, err := os.ReadFile(filepath.Join(dir, "dnsmasq.pid")); err == nil {
			var pid int
			if _, err := fmt.Sscanf(string(raw), "%d", &pid); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		raw, _ := os.ReadFile(c)
		for _, line := range strings.Split(string(raw), "\n") {
			br, ok := strings.CutPrefix(line, "interface=")
			if !ok {
				continue
			}
			_ = exec.Command("ip", "link", "del", "dev", br).Run()
			for _, table := range []string{"filter", "nat"} {
				out, _ := exec.Command("iptables", "-w", "-t", table, "-S").Output()
				for _, rule := range strings.Split(string(out), "\n") {
					if strings.HasPrefix(rule, "-A ") && strings.Contains(rule, " on "+br+"\"") {
						args := append([]string{"-w", "-t", table, "-D"}, strings.Fields(strings.TrimPrefix(rule, "-A "))...)
						// The comment is quoted in -S output; pass it whole.
						args = unquoteComment(args)
						_ = exec.Command("iptables", args...).Run()
					}
				}
			}
		}
	}
}

// unquoteComment joins the words of a quoted --comment back into one
// argument, as iptables -S prints it quoted.
func unquoteComment(args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		if args[i] == "--comment" && i+1 < len(args) && strings.HasPrefix(args[i+1], "\"") {
			words := []string{}
			for i++; i < len(args); i++ {
				words = append(words, args[i])
				if strings.HasSuffix(args[i], "\"") {
					break
				}
			}
			out = append(out, "--comment", strings.Trim(strings.Join(words, " "), "\""))
			continue
		}
		out = append(out, args[i])
	}
	return out
}

// lodge runs the CLI and returns stdout, stderr and the exit code.
func (h *host) lodge(args ...string) (string, string, int) {
	h.t.Helper()
	return h.lodgeIn("", args...)
}

// lodgeIn is lodge with stdin.
func (h *host) lodgeIn(stdin string, args ...string) (string, string, int) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, h.bin, append(append([]string{}, h.binArgs...), args...)...)
	cmd.Env = h.env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Stdin = strings.NewReader(stdin)
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		h.t.Fatalf("lodge %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), code
}

// must runs the CLI and fails the test unless it exits 0.
func (h *host) must(args ...string) string {
	h.t.Helper()
	out, errOut, code := h.lodge(args...)
	if code != 0 {
		h.t.Fatalf("lodge %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// importGuest imports the tiny guest once per host.
func (h *host) importGuest() {
	h.t.Helper()
	if _, err := h.c.GetImage(context.Background(), "tiny"); err == nil {
		return
	}
	h.must("image", "import", h.guest, "--name", "tiny")
}

// vm creates and starts a VM from the tiny guest and waits for its agent.
func (h *host) vm(name string, extra ...string) api.VM {
	h.t.Helper()
	h.importGuest()
	args := append([]string{"create", name, "--image", "tiny", "--memory", "256M", "--start"}, extra...)
	h.must(args...)
	h.waitAgent(name)
	return h.show(name)
}

// waitAgent waits for the guest agent and then for the guest's ready
// marker: the agent starts while the guest is still applying its seed
// (hostname, machine-id), as qemu-ga and cloud-init do on real images.
func (h *host) waitAgent(name string) {
	h.t.Helper()
	if _, errOut, code := h.lodge("exec", name, "--wait", "180s", "--", "true"); code != 0 {
		log, _ := h.consoleLog(name)
		h.t.Fatalf("agent of %s never answered: %s\nconsole:\n%s", name, errOut, log)
	}
	deadline := time.Now().Add(120 * time.Second)
	for {
		log, _ := h.consoleLog(name)
		if strings.Contains(log, "lodge-guest: ready") {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s never printed its ready marker; console:\n%s", name, log)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (h *host) consoleLog(name string) (string, error) {
	var buf bytes.Buffer
	err := h.c.ConsoleLog(context.Background(), name, &buf)
	return buf.String(), err
}

func (h *host) show(name string) api.VM {
	h.t.Helper()
	var v api.VM
	if err := json.Unmarshal([]byte(h.must("show", name, "-o", "json")), &v); err != nil {
		h.t.Fatal(err)
	}
	return v
}

// mustJSON decodes a command's JSON output into v.
func mustJSON(t *testing.T, out string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
}

// exec runs a command in the guest and returns its trimmed stdout.
func (h *host) exec(name string, cmd ...string) string {
	h.t.Helper()
	return strings.TrimSpace(h.must(append([]string{"exec", name, "--"}, cmd...)...))
}

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s", timeout, what)
}

func statUID(st os.FileInfo) int {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return int(s.Uid)
	}
	return -1
}
