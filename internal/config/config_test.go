package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadDefaultValidate(t *testing.T) {
	home := t.TempDir()
	t.Setenv("LODGE_ACCEL", "")
	t.Setenv("LODGE_SOCKET", "")
	t.Setenv("LODGE_OVERCOMMIT", "")
	if err := os.WriteFile(filepath.Join(home, "config.yaml"), []byte("memory_limit: 4G\naccel: tcg\nstop_timeout: 5s\nauto_balloon:\n  enabled: true\n  threshold: 2G\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(home)
	if err != nil {
		t.Fatal(err)
	}
	c.Default()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.MemoryLimit != 4<<30 || c.Accel != "tcg" || c.Socket != filepath.Join(home, "lodge.sock") || c.Overcommit != 1 {
		t.Fatalf("config = %+v", c)
	}
	if ab := c.AutoBalloon; !ab.Enabled || ab.Threshold != 2<<30 || ab.Interval != 5*time.Second || ab.MemInfo != "/proc/meminfo" {
		t.Fatalf("auto_balloon = %+v", ab)
	}
}

func TestValidateRejects(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"accel", func(c *Config) { c.Accel = "xen" }, "accel"},
		{"overcommit", func(c *Config) { c.Overcommit = 0.5 }, "overcommit"},
		{"relative home", func(c *Config) { c.Home = "rel" }, "absolute"},
		{"log level", func(c *Config) { c.LogLevel = "loud" }, "log_level"},
		{"tcg cache", func(c *Config) { c.TCGCache = 100 }, "tcg_cache"},
		{"fleece limit", func(c *Config) { c.FleeceLimit = 1 << 20 }, "fleece_limit"},
		{"auto-balloon interval", func(c *Config) { c.AutoBalloon.Interval = time.Millisecond }, "auto_balloon.interval"},
		{"auto-balloon threshold", func(c *Config) { c.AutoBalloon.Threshold = -1 }, "auto_balloon.threshold"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Config{Home: "/x"}
			c.Default()
			tt.edit(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want error mentioning %q", err, tt.want)
			}
		})
	}
}

func TestLoadBadFile(t *testing.T) {
	home := t.TempDir()
	if err := os.WriteFile(filepath.Join(home, "config.yaml"), []byte("memory_limit: lots\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(home); err == nil || !strings.Contains(err.Error(), "config.yaml") {
		t.Fatalf("Load = %v, want error naming config.yaml", err)
	}
}
