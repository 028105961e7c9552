package qemu

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
	"syscall"
	"time"

	"github.com/lodge-vm/lodge/internal/qga"
)

// Accel is the accelerator verdict and the reason for it.
type Accel struct {
	Accel    string    `json:"accel"`
	Reason   string    `json:"reason"`
	CPUModel string    `json:"cpu_model,omitempty"`
	Key      string    `json:"key"`
	ProbedAt time.Time `json:"probed_at"`
	// Verified is true when a guest was actually booted to decide.
	Verified bool `json:"verified"`
}

// ProbeInput says how to decide.
type ProbeInput struct {
	// Mode is auto, kvm or tcg.
	Mode string
	// Image is a bootable qcow2 with a guest agent, booted read-only.
	Image   string
	Timeout time.Duration
	// WorkDir holds the probe VM's sockets.
	WorkDir string
}

// cpuModels are tried in order under KVM. Nested hosts may reject "host"
// outright (QEMU 7.2 fails to set MSR 0x10a), while hiding that MSR lets
// QEMU start but can still stall the guest: only a boot tells.
var cpuModels = []string{"host", "host,-arch-capabilities"}

// CacheKey names the facts a verdict depends on: QEMU's version, the host
// kernel and whether /dev/kvm opens.
func (q *QEMU) CacheKey(ctx context.Context) string {
	version, _ := q.Version(ctx)
	var uts syscall.Utsname
	_ = syscall.Uname(&uts)
	rel := make([]byte, 0, len(uts.Release))
	for _, c := range uts.Release {
		if c == 0 {
			break
		}
		rel = append(rel, byte(c))
	}
	return fmt.Sprintf("%s|%s|kvm=%v", version, rel, kvmUsable() == nil)
}

func kvmUsable() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// ProbeAccel decides between KVM and TCG. /dev/kvm existing is not
// enough: some nested hosts expose it yet stall every guest, so in auto
// mode a real guest must reach its agent under KVM in time.
func (q *QEMU) ProbeAccel(ctx context.Context, in ProbeInput) Accel {
	key := q.CacheKey(ctx)
	res := Accel{Key: key, ProbedAt: time.Now().UTC()}
	switch in.Mode {
	case "tcg":
		res.Accel, res.Reason = "tcg", "set to tcg in the configuration"
		return res
	case "kvm":
		res.Accel, res.Reason, res.CPUModel = "kvm", "set to kvm in the configuration (not probed)", "host"
		return res
	}
	if err := kvmUsable(); err != nil {
		res.Accel, res.Reason = "tcg", "KVM unavailable: "+err.Error()
		return res
	}
	if in.Image == "" {
		res.Accel, res.Reason = "tcg", "/dev/kvm opens but KVM is not verified yet: no image to boot as a probe (it runs after the first image import)"
		return res
	}
	var fails []string
	for _, model := range cpuModels {
		took, err := q.bootProbe(ctx, in, model)
		if err == nil {
			res.Accel, res.CPUModel, res.Verified = "kvm", model, true
			res.Reason = fmt.Sprintf("a probe guest reached its agent in %.1fs under KVM (-cpu %s)", took.Seconds(), model)
			return res
		}
		fails = append(fails, "-cpu "+model+": "+err.Error())
	}
	res.Accel, res.Verified = "tcg", true
	res.Reason = "KVM does not run guests here (nested KVM?): " + strings.Join(fails, "; ")
	return res
}

func (q *QEMU) bootProbe(ctx context.Context, in ProbeInput, model string) (time.Duration, error) {
	if err := os.MkdirAll(in.WorkDir, 0o700); err != nil {
		return 0, err
	}
	sock := filepath.Join(in.WorkDir, "probe-qga.sock")
	_ = os.Remove(sock)
	ctx, cancel := context.WithTimeout(ctx, in.Timeout)
	defer cancel()
	args := []string{
		"-machine", "pc,accel=kvm", "-cpu", model, "-m", "256M", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-serial", "null",
		"-drive", "file=" + escape(in.Image) + ",format=qcow2,if=virtio,snapshot=on",
		"-chardev", "socket,id=qga0,path=" + sock + ",server=on,wait=off",
		"-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
	}
	cmd := exec.CommandContext(ctx, q.Binary, args...)
	cmd.WaitDelay = 2 * time.Second
	// A probe guest that stalls must not outlive a daemon killed mid-probe.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Kill()
		<-exited
	}()
	for {
		select {
		case err := <-exited:
			exited <- err
			msg := firstLine(strings.TrimSpace(strings.TrimPrefix(stderr.String(), q.Binary+": ")))
			if msg == "" && err != nil {
				msg = err.Error()
			}
			return 0, errors.New("qemu exited: " + msg)
		case <-ctx.Done():
			return 0, fmt.Errorf("no agent after %s", in.Timeout)
		case <-time.After(500 * time.Millisecond):
		}
		actx, acancel := context.WithTimeout(ctx, time.Second)
		agent, err := qga.Dial(actx, sock)
		if err == nil {
			err = agent.Ping(actx)
			_ = agent.Close()
		}
		acancel()
		if err == nil {
			return time.Since(start), nil
		}
	}
}

// LoadAccelCache returns a cached verdict if its key still matches.
func LoadAccelCache(path, key string) (Accel, bool) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return Accel{}, false
	}
	var a Accel
	if json.Unmarshal(raw, &a) != nil || a.Key != key || !a.Verified {
		return Accel{}, false
	}
	return a, true
}

// SaveAccelCache stores a verified verdict (atomically).
func SaveAccelCache(path string, a Accel) error {
	if !a.Verified {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	raw, _ := json.MarshalIndent(a, "", "  ")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, raw, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// DefaultAccelCache is a host-wide location: the verdict is a fact about
// the host, not about one LODGE_HOME.
func DefaultAccelCache() string {
	if p := os.Getenv("LODGE_ACCEL_CACHE"); p != "" {
		return p
	}
	if os.Geteuid() == 0 {
		return "/var/cache/lodge/accel.json"
	}
	if dir, err := os.UserCacheDir(); err == nil {
		return filepath.Join(dir, "lodge", "accel.json")
	}
	return filepath.Join(os.TempDir(), "lodge-accel.json")
}
