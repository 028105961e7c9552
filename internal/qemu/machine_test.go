package qemu

import (
	"strings"
	"testing"
)

func baseMachine() Machine {
	return Machine{
		Name: "web", UUID: "3f1c0e4a-0000-4000-8000-000000000001", CPUs: 2, Memory: 512 << 20,
		RunDir: "/run/lodge/web", SeedISO: "/v/web/seed.iso",
		Disks: []Disk{{Name: "root", Path: "/p/web-root.qcow2", Format: "qcow2", Bus: BusVirtio}},
		NICs:  []NIC{{MAC: "52:54:00:aa:bb:cc"}},
	}
}

func TestArgsBuses(t *testing.T) {
	tests := []struct {
		bus  string
		want []string
	}{
		{BusVirtio, []string{"virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=0"}},
		{BusSCSI, []string{"virtio-scsi-pci,id=scsi0", "scsi-hd,bus=scsi0.0,drive=disk0,id=disk0-dev,bootindex=0"}},
		{BusIDE, []string{"ide-hd,bus=ide.0,unit=0,drive=disk0,id=disk0-dev,bootindex=0"}},
		{BusNVMe, []string{"nvme,serial=lodge0,drive=disk0,id=disk0-dev,bootindex=0"}},
	}
	for _, tt := range tests {
		t.Run(tt.bus, func(t *testing.T) {
			m := baseMachine()
			m.Disks[0].Bus = tt.bus
			args, err := m.Args()
			if err != nil {
				t.Fatal(err)
			}
			joined := strings.Join(args, " ")
			for _, w := range tt.want {
				if !strings.Contains(joined, "-device "+w) {
					t.Errorf("args lack -device %s:\n%s", w, joined)
				}
			}
			for _, w := range []string{
				"-uuid 3f1c0e4a-0000-4000-8000-000000000001", "-m 512M", "-smp 2", "-daemonize",
				"-pidfile /run/lodge/web/pid", "unix:/run/lodge/web/qmp.sock,server=on,wait=off",
				"mac=52:54:00:aa:bb:cc", "ide-cd,bus=ide.1,unit=0,drive=seed",
				"name=org.qemu.guest_agent.0", "logfile=/run/lodge/web/serial.log",
			} {
				if !strings.Contains(joined, w) {
					t.Errorf("args lack %q", w)
				}
			}
		})
	}
}

func TestArgsVsock(t *testing.T) {
	m := baseMachine()
	args, err := m.Args()
	if err != nil {
		t.Fatal(err)
	}
	if joined := strings.Join(args, " "); strings.Contains(joined, "vsock") {
		t.Errorf("a machine without a CID has a vsock device:\n%s", joined)
	}
	m.VsockCID = 42
	if args, err = m.Args(); err != nil {
		t.Fatal(err)
	}
	if joined := strings.Join(args, " "); !strings.Contains(joined, "-device vhost-vsock-pci,id=vsock0,guest-cid=42") {
		t.Errorf("args lack the vsock device with CID 42:\n%s", joined)
	}
}

func TestArgsRejects(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Machine)
		want string
	}{
		{"bus", func(m *Machine) { m.Disks[0].Bus = "floppy" }, "unknown bus"},
		{"cpus", func(m *Machine) { m.CPUs = 0 }, "cpus"},
		{"memory", func(m *Machine) { m.Memory = 1 << 20 }, "memory"},
		{"format", func(m *Machine) { m.Disks[0].Format = "" }, "format"},
		{"backing format", func(m *Machine) { m.Disks[0].Backing = []BackingFile{{Path: "/i/base", Format: "vmdk"}} }, "backing file /i/base"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := baseMachine()
			tt.edit(&m)
			if _, err := m.Args(); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Args() err = %v, want %q", err, tt.want)
			}
		})
	}
}

// A disk's backing chain is named from the bottom up, every file with
// drop-cache=off, every layer read-only.
func TestArgsBackingChain(t *testing.T) {
	m := baseMachine()
	m.Disks[0].Backing = []BackingFile{{Path: "/p/layer.qcow2", Format: "qcow2"}, {Path: "/i/base.qcow2", Format: "qcow2"}}
	args, err := m.Args()
	if err != nil {
		t.Fatal(err)
	}
	var blockdevs []string
	for i, a := range args {
		if a == "-blockdev" && strings.Contains(args[i+1], "disk0") {
			blockdevs = append(blockdevs, args[i+1])
		}
	}
	want := []string{
		"driver=file,filename=/i/base.qcow2,node-name=disk0-b2-file,cache.direct=off,drop-cache=off,auto-read-only=on",
		"driver=qcow2,file=disk0-b2-file,node-name=disk0-b2,read-only=on",
		"driver=file,filename=/p/layer.qcow2,node-name=disk0-b1-file,cache.direct=off,drop-cache=off,auto-read-only=on",
		"driver=qcow2,file=disk0-b1-file,node-name=disk0-b1,read-only=on,backing=disk0-b2",
		"driver=file,filename=/p/web-root.qcow2,node-name=disk0-file,cache.direct=off,discard=unmap,drop-cache=off",
		"driver=qcow2,file=disk0-file,node-name=disk0,discard=unmap,backing=disk0-b1",
	}
	if strings.Join(blockdevs, "\n") != strings.Join(want, "\n") {
		t.Fatalf("disk blockdevs:\n%s\nwant:\n%s", strings.Join(blockdevs, "\n"), strings.Join(want, "\n"))
	}
}

func TestEscapeCommas(t *testing.T) {
	m := baseMachine()
	m.Disks[0].Path = "/p/a,b.qcow2"
	args, err := m.Args()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(args, " "), "filename=/p/a,,b.qcow2") {
		t.Fatal("comma in path not doubled")
	}
}

func TestArgsHotplug(t *testing.T) {
	tests := []struct {
		name      string
		max       int64
		wantM     string
		wantVmem  string
		wantNoDev bool
	}{
		{name: "none", max: 0, wantM: "-m 512M ", wantNoDev: true},
		{name: "equal", max: 512 << 20, wantM: "-m 512M ", wantNoDev: true},
		{name: "two gib", max: 2 << 30, wantM: "-m 512M,slots=8,maxmem=3584M ", wantVmem: "memory-backend-ram,id=hotmem0-mem,size=1536M,reserve=off"},
		// virtio-mem may plug whole 2 MiB blocks; its region, and the
		// dimms' after it, are whole 128 MiB blocks.
		{name: "odd", max: 515 << 20, wantM: "-m 512M,slots=8,maxmem=768M ", wantVmem: "size=128M,"},
		{name: "under a block", max: 513 << 20, wantM: "-m 512M ", wantNoDev: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := baseMachine()
			m.MaxMemory = tt.max
			args, err := m.Args()
			if err != nil {
				t.Fatal(err)
			}
			joined := strings.Join(args, " ")
			if !strings.Contains(joined, tt.wantM) {
				t.Errorf("args lack %q:\n%s", tt.wantM, joined)
			}
			if got := strings.Contains(joined, "virtio-mem-pci"); got == tt.wantNoDev {
				t.Errorf("virtio-mem device present = %v, want %v:\n%s", got, !tt.wantNoDev, joined)
			}
			if tt.wantVmem != "" && !strings.Contains(joined, tt.wantVmem) {
				t.Errorf("args lack %q:\n%s", tt.wantVmem, joined)
			}
		})
	}
}

func TestArgsAccel(t *testing.T) {
	tests := []struct {
		accel string
		cache int64
		want  string
	}{
		{"kvm", 64 << 20, "-machine pc -accel kvm "},
		{"tcg", 0, "-machine pc -accel tcg "},
		{"tcg", 64 << 20, "-machine pc -accel tcg,tb-size=64 "},
		{"", 32 << 20, "-machine pc -accel tcg,tb-size=32 "},
	}
	for _, tt := range tests {
		m := baseMachine()
		m.Accel, m.TCGCache = tt.accel, tt.cache
		args, err := m.Args()
		if err != nil {
			t.Fatal(err)
		}
		if joined := strings.Join(args, " "); !strings.Contains(joined, tt.want) {
			t.Errorf("accel %q, cache %d: args lack %q:\n%s", tt.accel, tt.cache, tt.want, joined)
		}
	}
}

func TestArgsDimms(t *testing.T) {
	m := baseMachine()
	m.MaxMemory, m.Dimms = 1<<30, []int64{128 << 20, 256 << 20}
	args, err := m.Args()
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(args, " ")
	for _, w := range []string{
		"-object memory-backend-ram,id=dimm0-mem,size=128M -device pc-dimm,id=dimm0,memdev=dimm0-mem",
		"-object memory-backend-ram,id=dimm1-mem,size=256M -device pc-dimm,id=dimm1,memdev=dimm1-mem",
	} {
		if !strings.Contains(joined, w) {
			t.Errorf("args lack %q:\n%s", w, joined)
		}
	}
}

func TestArgsCPUHotplug(t *testing.T) {
	m := baseMachine()
	m.CPUModel, m.CPUs, m.MaxCPUs, m.HotCPUs = "max", 1, 4, 2
	args, err := m.Args()
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(args, " ")
	for _, w := range []string{
		"-smp cpus=1,maxcpus=4,sockets=4,cores=1,threads=1 ",
		"-device max-x86_64-cpu,id=cpu1,socket-id=1,core-id=0,thread-id=0",
		"-device max-x86_64-cpu,id=cpu2,socket-id=2,core-id=0,thread-id=0",
	} {
		if !strings.Contains(joined, w) {
			t.Errorf("args lack %q:\n%s", w, joined)
		}
	}
	if strings.Contains(joined, "id=cpu3") {
		t.Errorf("args plug more CPUs than HotCPUs:\n%s", joined)
	}
}
