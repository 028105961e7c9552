package vswitch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

func TestForward(t *testing.T) {
	tests := []struct {
		name string
		run  func(t *testing.T, r *rig, a, b, c *vm)
	}{
		{"broadcast reaches every port but the sender's", func(t *testing.T, r *rig, a, b, c *vm) {
			f := raw(t, a.mac, broadcast, "hello all")
			a.send(f)
			for _, v := range []*vm{b, c} {
				if got := v.recv(); !bytes.Equal(got, f) {
					t.Fatalf("%s: got %x, want %x", v.name, got, f)
				}
			}
			a.none()
		}},
		{"multicast reaches every port but the sender's", func(t *testing.T, r *rig, a, b, c *vm) {
			f := raw(t, a.mac, hw("01:00:5e:00:00:fb"), "mdns")
			a.send(f)
			for _, v := range []*vm{b, c} {
				if got := v.recv(); !bytes.Equal(got, f) {
					t.Fatalf("%s: got %x, want %x", v.name, got, f)
				}
			}
			a.none()
		}},
		{"unicast to a learnt MAC reaches its port only", func(t *testing.T, r *rig, a, b, c *vm) {
			b.send(raw(t, b.mac, broadcast, "b is here"))
			a.recv()
			c.recv()
			f := raw(t, a.mac, b.mac, "to b")
			a.send(f)
			if got := b.recv(); !bytes.Equal(got, f) {
				t.Fatalf("b: got %x, want %x", got, f)
			}
			c.none()
			a.none()
		}},
		{"unknown unicast is flooded", func(t *testing.T, r *rig, a, b, c *vm) {
			f := raw(t, a.mac, hw("52:54:00:00:00:99"), "anyone?")
			a.send(f)
			for _, v := range []*vm{b, c} {
				if got := v.recv(); !bytes.Equal(got, f) {
					t.Fatalf("%s: got %x, want %x", v.name, got, f)
				}
			}
			a.none()
		}},
		{"a frame to a MAC behind its own port goes nowhere", func(t *testing.T, r *rig, a, b, c *vm) {
			other := hw("52:54:00:00:01:0a") // a second NIC behind a's port
			a.send(raw(t, other, broadcast, "other is here"))
			b.recv()
			c.recv()
			a.send(raw(t, a.mac, other, "to other"))
			a.none()
			b.none()
			c.none()
		}},
		{"a port added before it sent gets broadcasts", func(t *testing.T, r *rig, a, b, c *vm) {
			d, e := r.vm("d", "52:54:00:00:00:0d", ""), r.vm("e", "52:54:00:00:00:0e", "")
			r.sw.AddPort(d.path)
			f := raw(t, a.mac, broadcast, "hello d")
			a.send(f)
			if got := d.recv(); !bytes.Equal(got, f) {
				t.Fatalf("d: got %x, want %x", got, f)
			}
			e.none() // never added and never sent: not a port
		}},
		{"a removed port gets nothing and its MACs are forgotten", func(t *testing.T, r *rig, a, b, c *vm) {
			b.send(raw(t, b.mac, broadcast, "b is here"))
			a.recv()
			c.recv()
			r.sw.RemovePort(b.path)
			f := raw(t, a.mac, b.mac, "to b")
			a.send(f)
			if got := c.recv(); !bytes.Equal(got, f) {
				t.Fatalf("c: got %x, want %x (b's MAC unknown again: flooded)", got, f)
			}
			f = raw(t, a.mac, broadcast, "all")
			a.send(f)
			if got := c.recv(); !bytes.Equal(got, f) {
				t.Fatalf("c: got %x, want %x", got, f)
			}
			b.none()
		}},
		{"a VM whose socket is gone is dropped and holds nobody up", func(t *testing.T, r *rig, a, b, c *vm) {
			d := r.vm("d", "52:54:00:00:00:0d", "")
			r.sw.AddPort(d.path)
			_ = d.conn.Close()
			if err := os.Remove(d.path); err != nil {
				t.Fatal(err)
			}
			for i := range 2 {
				f := raw(t, a.mac, broadcast, fmt.Sprint("frame ", i))
				a.send(f)
				if got := b.recv(); !bytes.Equal(got, f) {
					t.Fatalf("b: got %x, want %x", got, f)
				}
			}
			if got, want := r.hasPort(d.path), false; got != want {
				t.Fatalf("port of the vanished VM: got %v, want %v", got, want)
			}
		}},
		{"a VM whose socket is left unbound is dropped", func(t *testing.T, r *rig, a, b, c *vm) {
			d := r.vm("d", "52:54:00:00:00:0d", "")
			r.sw.AddPort(d.path)
			_ = d.conn.Close() // the file stays: sends to it are refused
			for i := range 2 {
				f := raw(t, a.mac, broadcast, fmt.Sprint("frame ", i))
				a.send(f)
				if got := b.recv(); !bytes.Equal(got, f) {
					t.Fatalf("b: got %x, want %x", got, f)
				}
			}
			if got, want := r.hasPort(d.path), false; got != want {
				t.Fatalf("port of the stopped VM: got %v, want %v", got, want)
			}
		}},
		{"a VM that does not read holds nobody up", func(t *testing.T, r *rig, a, b, c *vm) {
			d := r.vm("d", "52:54:00:00:00:0d", "")
			r.sw.AddPort(d.path)
			// Large frames, so that those stuck in d's queue would fill a
			// send buffer shared with the other ports many times over.
			for i := range 40 {
				f := raw(t, a.mac, broadcast, fmt.Sprintf("%05d", i)+strings.Repeat("x", 60000))
				a.send(f)
				for _, v := range []*vm{b, c} {
					if got := v.recv(); !bytes.Equal(got, f) {
						t.Fatalf("frame %d: %s: got %d bytes, want %d", i, v.name, len(got), len(f))
					}
				}
			}
			if got, want := r.hasPort(d.path), true; got != want {
				t.Fatalf("port of the slow VM: got %v, want %v", got, want)
			}
		}},
		{"runt and oversized frames are dropped, the largest is not", func(t *testing.T, r *rig, a, b, c *vm) {
			a.send(raw(t, a.mac, broadcast, "")[:13])
			a.send(raw(t, a.mac, broadcast, strings.Repeat("x", maxFrame+1-minFrame)))
			f := raw(t, a.mac, broadcast, strings.Repeat("y", maxFrame-minFrame))
			a.send(f)
			if got := b.recv(); !bytes.Equal(got, f) {
				t.Fatalf("b: got %d bytes, want the %d-byte frame", len(got), len(f))
			}
		}},
		{"a multicast source is dropped and not learnt", func(t *testing.T, r *rig, a, b, c *vm) {
			a.send(raw(t, hw("01:00:5e:00:00:01"), broadcast, "bogus"))
			f := raw(t, a.mac, broadcast, "fine")
			a.send(f)
			if got := b.recv(); !bytes.Equal(got, f) {
				t.Fatalf("b: got %x, want %x", got, f)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := newRig(t)
			a := r.vm("a", "52:54:00:00:00:0a", "")
			b := r.vm("b", "52:54:00:00:00:0b", "")
			c := r.vm("c", "52:54:00:00:00:0c", "")
			for _, v := range []*vm{a, b, c} {
				r.sw.AddPort(v.path)
			}
			tt.run(t, r, a, b, c)
		})
	}
}

// TestLearnUnknownSender checks that a VM the switch was not told of
// becomes a port by sending.
func TestLearnUnknownSender(t *testing.T) {
	r := newRig(t)
	a := r.vm("a", "52:54:00:00:00:0a", "")
	b := r.vm("b", "52:54:00:00:00:0b", "")
	a.send(raw(t, a.mac, broadcast, "a is here"))
	b.none() // not a port yet
	b.send(raw(t, b.mac, broadcast, "b is here"))
	a.recv()
	f := raw(t, a.mac, broadcast, "hello b")
	a.send(f)
	if got := b.recv(); !bytes.Equal(got, f) {
		t.Fatalf("b: got %x, want %x", got, f)
	}
}

func TestNewRefuses(t *testing.T) {
	dir, err := os.MkdirTemp("", "vsw")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	leases := func() []Lease { return nil }
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	live := filepath.Join(dir, "live")
	sw, err := New(Config{Socket: live, Subnet: testSubnet, Gateway: testGateway, Leases: leases, Log: discard})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sw.Serve(ctx) }()
	defer func() { cancel(); <-done }()

	sock := filepath.Join(dir, "sw")
	tests := []struct {
		name string
		cfg  Config
		kind error
		want string
	}{
		{"no socket", Config{Subnet: testSubnet, Gateway: testGateway, Leases: leases}, errdefs.ErrInvalid, "no socket path"},
		{"no subnet", Config{Socket: sock, Gateway: testGateway, Leases: leases}, errdefs.ErrInvalid, "no subnet"},
		{"IPv6 subnet", Config{Socket: sock, Subnet: netip.MustParsePrefix("fd00::/64"), Gateway: netip.MustParseAddr("fd00::1"), Leases: leases}, errdefs.ErrInvalid, "is not IPv4"},
		{"subnet too small", Config{Socket: sock, Subnet: netip.MustParsePrefix("10.77.0.0/31"), Gateway: netip.MustParseAddr("10.77.0.1"), Leases: leases}, errdefs.ErrInvalid, "no room"},
		{"no gateway", Config{Socket: sock, Subnet: testSubnet, Leases: leases}, errdefs.ErrInvalid, "gateway invalid IP is not IPv4"},
		{"gateway outside the subnet", Config{Socket: sock, Subnet: testSubnet, Gateway: netip.MustParseAddr("10.78.0.1"), Leases: leases}, errdefs.ErrInvalid, "outside subnet"},
		{"gateway is the network address", Config{Socket: sock, Subnet: testSubnet, Gateway: netip.MustParseAddr("10.77.0.0"), Leases: leases}, errdefs.ErrInvalid, "network or broadcast"},
		{"gateway is the broadcast address", Config{Socket: sock, Subnet: testSubnet, Gateway: netip.MustParseAddr("10.77.0.255"), Leases: leases}, errdefs.ErrInvalid, "network or broadcast"},
		{"no Leases", Config{Socket: sock, Subnet: testSubnet, Gateway: testGateway}, errdefs.ErrInvalid, "no Leases"},
		{"a file that is not a socket", Config{Socket: file, Subnet: testSubnet, Gateway: testGateway, Leases: leases}, errdefs.ErrExists, "not a socket"},
		{"a socket another switch serves", Config{Socket: live, Subnet: testSubnet, Gateway: testGateway, Leases: leases}, errdefs.ErrInUse, "another switch"},
		{"a path too long", Config{Socket: filepath.Join(dir, strings.Repeat("x", 120)), Subnet: testSubnet, Gateway: testGateway, Leases: leases}, nil, "bind"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.cfg)
			if err == nil {
				t.Fatalf("New: got no error, want one saying %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New: got %q, want it to say %q", err, tt.want)
			}
			if tt.cfg.Socket != "" && !strings.Contains(err.Error(), tt.cfg.Socket) {
				t.Fatalf("New: got %q, want it to name the socket %s", err, tt.cfg.Socket)
			}
			if tt.kind != nil && !errors.Is(err, tt.kind) {
				t.Fatalf("New: got %v, want it to wrap %v", err, tt.kind)
			}
		})
	}
	if data, err := os.ReadFile(file); err != nil || string(data) != "keep me" {
		t.Fatalf("the file that is not a socket: got %q, %v, want it untouched", data, err)
	}
	if got, want := sw.conn.LocalAddr().String(), live; got != want {
		t.Fatalf("the live switch's socket: got %v, want %v", got, want)
	}
}

func TestNewReplacesStaleSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "vsw")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	sock := filepath.Join(dir, "sw")
	old, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	_ = old.Close() // as a daemon that stopped leaves it
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	r := &rig{t: t, dir: dir}
	sw, err := New(Config{Socket: sock, Subnet: testSubnet, Gateway: testGateway, Leases: r.getLeases, Log: discard})
	if err != nil {
		t.Fatalf("New over a stale socket: %v", err)
	}
	r.sw = sw
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sw.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	a, b := r.vm("a", "52:54:00:00:00:0a", ""), r.vm("b", "52:54:00:00:00:0b", "")
	sw.AddPort(b.path)
	f := raw(t, a.mac, broadcast, "hello")
	a.send(f)
	if got := b.recv(); !bytes.Equal(got, f) {
		t.Fatalf("b: got %x, want %x", got, f)
	}
}

func TestServeStops(t *testing.T) {
	tests := []struct {
		name          string
		cancelEarlier bool
	}{
		{"cancelled while serving", false},
		{"cancelled before serving", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir, err := os.MkdirTemp("", "vsw")
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = os.RemoveAll(dir) }()
			sock := filepath.Join(dir, "sw")
			sw, err := New(Config{Socket: sock, Subnet: testSubnet, Gateway: testGateway, Leases: func() []Lease { return nil }})
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			sw.AddPort(filepath.Join(dir, "vm"))
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.cancelEarlier {
				cancel()
			}
			done := make(chan error, 1)
			go func() { done <- sw.Serve(ctx) }()
			if !tt.cancelEarlier {
				time.Sleep(50 * time.Millisecond)
				cancel()
			}
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Serve: got %v, want nil", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Serve: still running 5s after the context ended")
			}
			if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("socket after Serve: got %v, want %v", err, fs.ErrNotExist)
			}
		})
	}
}

func TestGatewayMAC(t *testing.T) {
	m1, m2, other := gatewayMAC("/run/lodge/networks/back/switch.sock"), gatewayMAC("/run/lodge/networks/back/switch.sock"), gatewayMAC("/run/lodge/networks/front/switch.sock")
	tests := []struct {
		what      string
		got, want any
	}{
		{"same path, same MAC", m1, m2},
		{"other path, other MAC", m1 == other, false},
		{"unicast", m1[0] & 1, byte(0)},
		{"locally administered", m1[0] & 2, byte(2)},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Fatalf("%s: got %v, want %v", tt.what, tt.got, tt.want)
		}
	}
	sw := newSwitch(Config{Socket: "/x/sw"})
	if got, want := sw.GatewayMAC().String(), gatewayMAC("/x/sw").String(); got != want {
		t.Fatalf("GatewayMAC: got %v, want %v", got, want)
	}
	sw.GatewayMAC()[0] = 0xff
	if got, want := sw.GatewayMAC().String(), gatewayMAC("/x/sw").String(); got != want {
		t.Fatalf("GatewayMAC after the caller changed its copy: got %v, want %v", got, want)
	}
}
