// Package config holds the daemon's settings. They are read in three
// separate steps: Load reads $LODGE_HOME/config.yaml (if any) and the
// environment, Default fills what is unset, and Validate refuses what makes
// no sense, so each step can be tested on its own.
package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/lodge-vm/lodge/internal/units"
)

// Accelerator choices.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Size is a byte count that YAML may spell as "2G".
type Size int64

// UnmarshalYAML accepts numbers and size strings.
func (s *Size) UnmarshalYAML(n *yaml.Node) error {
	v, err := units.ParseSize(n.Value)
	if err != nil {
		return err
	}
	*s = Size(v)
	return nil
}

// Config is the daemon's configuration.
type Config struct {
	Home   string `yaml:"-"`
	Socket string `yaml:"socket"`
	// Listen is a TCP address (HOST:PORT) to serve the API on over HTTPS,
	// for other daemons and remote clients; empty serves only the socket.
	Listen string `yaml:"listen"`
	// Accel is auto (probe KVM, fall back to TCG), kvm or tcg.
	Accel   string `yaml:"accel"`
	QEMU    string `yaml:"qemu"`
	QEMUImg string `yaml:"qemu_img"`
	// Probe is the lodge-probe binary that lodge bench copies into
	// guests; by default the one beside the lodge binary.
	Probe string `yaml:"probe"`
	// MemoryReserve is host RAM kept back from VMs when MemoryLimit is unset.
	MemoryReserve Size    `yaml:"memory_reserve"`
	MemoryLimit   Size    `yaml:"memory_limit"`
	Overcommit    float64 `yaml:"overcommit"`
	// StopTimeout is how long a graceful stop waits before forcing.
	StopTimeout time.Duration `yaml:"stop_timeout"`
	// ProbeTimeout bounds the KVM probe boot.
	ProbeTimeout time.Duration `yaml:"probe_timeout"`
	LogLevel     string        `yaml:"log_level"`
	// IdentityGrace is how long a clone's guest may take to adopt its new
	// identity from the seed before Lodge applies it through the agent.
	IdentityGrace time.Duration `yaml:"identity_grace"`
	// BackupTick is how often the daemon looks for scheduled backups
	// that are due.
	BackupTick  time.Duration `yaml:"backup_tick"`
	AutoBalloon AutoBalloon   `yaml:"auto_balloon"`
	// TCGCache caps each TCG guest's translated-code cache, which stays
	// resident while the VM runs (QEMU's own default is 1 GiB).
	TCGCache Size `yaml:"tcg_cache"`
	// VMOverhead is the host memory each running VM is counted for beyond
	// its guest's memory; 0 means QEMUOverhead, plus TCGCache under TCG.
	VMOverhead Size `yaml:"vm_overhead"`
	// FleeceLimit bounds what an export or backup of a running VM keeps
	// beside its disks: copies of the blocks the guest overwrote before
	// they were read. Past it the export or backup stops, not the guest.
	FleeceLimit Size `yaml:"fleece_limit"`
}

// DefaultFleeceLimit is FleeceLimit's default.
const DefaultFleeceLimit = 4 << 30

// AutoBalloon takes memory back from idle VMs while the host is short of
// it, down to each VM's min_memory, and gives it back afterwards.
type AutoBalloon struct {
	Enabled bool `yaml:"enabled"`
	// Threshold is the host's available memory below which VMs give
	// memory back; 0 means a tenth of the host's RAM.
	Threshold Size `yaml:"threshold"`
	// Interval is how often the host's memory is looked at.
	Interval time.Duration `yaml:"interval"`
	// MemInfo is the file the host's MemAvailable is read from.
	MemInfo string `yaml:"meminfo"`
}

// DefaultTCGCache is the translated-code cache a TCG guest gets; see
// docs/guide.md for what it costs and saves.
const DefaultTCGCache = 64 << 20

// QEMUOverhead is what a QEMU takes beyond its guest's memory, measured
// with the tiny guest (binary, heap, device state).
const QEMUOverhead = 40 << 20

// DefaultHome is /var/lib/lodge for root and ~/.local/share/lodge otherwise.
func DefaultHome() string {
	if os.Geteuid() == 0 {
		return "/var/lib/lodge"
	}
	if dir, err := os.UserHomeDir(); err == nil {
		return filepath.Join(dir, ".local", "share", "lodge")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("lodge-%d", os.Geteuid()))
}

// HomeFromEnv returns $LODGE_HOME or the default.
func HomeFromEnv() string {
	if h := os.Getenv("LODGE_HOME"); h != "" {
		return h
	}
	return DefaultHome()
}

// Load reads home/config.yaml when it exists, then applies environment
// overrides (LODGE_SOCKET, LODGE_ACCEL).
func Load(home string) (Config, error) {
	c := Config{Home: home}
	path := filepath.Join(home, "config.yaml")
	raw, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return c, fmt.Errorf("read config %s: %w", path, err)
	default:
		if err := yaml.Unmarshal(raw, &c); err != nil {
			return c, fmt.Errorf("parse config %s: %w", path, err)
		}
		c.Home = home
	}
	if v := os.Getenv("LODGE_SOCKET"); v != "" {
		c.Socket = v
	}
	if v := os.Getenv("LODGE_LISTEN"); v != "" {
		c.Listen = v
	}
	if v := os.Getenv("LODGE_ACCEL"); v != "" {
		c.Accel = v
	}
	if v := os.Getenv("LODGE_PROBE"); v != "" {
		c.Probe = v
	}
	if v := os.Getenv("LODGE_OVERCOMMIT"); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return c, fmt.Errorf("LODGE_OVERCOMMIT %q: not a number", v)
		}
		c.Overcommit = f
	}
	return c, nil
}

// Default fills unset fields.
func (c *Config) Default() {
	if c.Home == "" {
		c.Home = DefaultHome()
	}
	if c.Socket == "" {
		c.Socket = filepath.Join(c.Home, "lodge.sock")
	}
	if c.Accel == "" {
		c.Accel = AccelAuto
	}
	if c.QEMU == "" {
		c.QEMU = "qemu-system-x86_64"
	}
	if c.QEMUImg == "" {
		c.QEMUImg = "qemu-img"
	}
	if c.Probe == "" {
		c.Probe = "lodge-probe"
		if exe, err := os.Executable(); err == nil {
			c.Probe = filepath.Join(filepath.Dir(exe), "lodge-probe")
		}
	}
	if c.MemoryReserve == 0 {
		c.MemoryReserve = 1 << 30
	}
	if c.Overcommit == 0 {
		c.Overcommit = 1.0
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = 60 * time.Second
	}
	if c.ProbeTimeout == 0 {
		c.ProbeTimeout = 20 * time.Second
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.BackupTick == 0 {
		c.BackupTick = 30 * time.Second
	}
	if c.IdentityGrace == 0 {
		c.IdentityGrace = 60 * time.Second
	}
	if c.TCGCache == 0 {
		c.TCGCache = DefaultTCGCache
	}
	if c.FleeceLimit == 0 {
		c.FleeceLimit = DefaultFleeceLimit
	}
	if c.AutoBalloon.Interval == 0 {
		c.AutoBalloon.Interval = 5 * time.Second
	}
	if c.AutoBalloon.MemInfo == "" {
		c.AutoBalloon.MemInfo = "/proc/meminfo"
	}
}

// Validate refuses settings that cannot work.
func (c *Config) Validate() error {
	if c.Listen != "" {
		if _, port, err := net.SplitHostPort(c.Listen); err != nil || port == "" {
			return fmt.Errorf("config listen %q: want HOST:PORT", c.Listen)
		}
	}
	switch c.Accel {
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		return fmt.Errorf("config accel %q: must be auto, kvm or tcg", c.Accel)
	}
	if c.Overcommit < 1.0 || c.Overcommit > 100 {
		return fmt.Errorf("config overcommit %v: must be between 1.0 and 100", c.Overcommit)
	}
	if c.MemoryLimit < 0 || c.MemoryReserve < 0 {
		return errors.New("config memory_limit and memory_reserve must not be negative")
	}
	if c.StopTimeout < time.Second {
		return fmt.Errorf("config stop_timeout %v: must be at least 1s", c.StopTimeout)
	}
	if c.BackupTick < 100*time.Millisecond || c.BackupTick > time.Minute {
		return fmt.Errorf("config backup_tick %v: must be between 100ms and 1m", c.BackupTick)
	}
	if c.IdentityGrace < time.Second {
		return fmt.Errorf("config identity_grace %v: must be at least 1s", c.IdentityGrace)
	}
	if c.VMOverhead < 0 {
		return fmt.Errorf("config vm_overhead %d: must not be negative", c.VMOverhead)
	}
	if c.TCGCache < 1<<20 || c.TCGCache > 2<<30 {
		return fmt.Errorf("config tcg_cache %d: must be between 1M and 2G", c.TCGCache)
	}
	if c.FleeceLimit < 64<<20 {
		return fmt.Errorf("config fleece_limit %d: must be at least 64M", c.FleeceLimit)
	}
	if c.AutoBalloon.Interval < 100*time.Millisecond {
		return fmt.Errorf("config auto_balloon.interval %v: must be at least 100ms", c.AutoBalloon.Interval)
	}
	if c.AutoBalloon.Threshold < 0 {
		return fmt.Errorf("config auto_balloon.threshold %d: must not be negative", c.AutoBalloon.Threshold)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("config log_level %q: must be debug, info, warn or error", c.LogLevel)
	}
	if !filepath.IsAbs(c.Home) {
		return fmt.Errorf("LODGE_HOME %q: must be an absolute path", c.Home)
	}
	return nil
}
