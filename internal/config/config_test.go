package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadDefaultValidate(t *testing.T) {
	home := t.TempDir()
	t.Setenv("LODGE_ACCEL", "")
	t.Setenv("LODGE_SOCKET", "")
	t.Setenv("LODGE_OVERCOMMIT", "")
	if err := os.WriteFile(filepath.Join(home, "config.yaml"), []byte("memory_limit: 4G\naccel: tcg\nstop_timeout: 5s\n"), 0o600); err != nil {
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
