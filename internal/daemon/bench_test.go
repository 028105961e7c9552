package daemon

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
)

func TestParseBench(t *testing.T) {
	tests := []struct {
		req  api.BenchRequest
		want string // part of the error; empty for none
	}{
		{api.BenchRequest{}, ""},
		{api.BenchRequest{Duration: "250ms", Repeats: 5, With: 2, DiskBuses: []string{"virtio", "scsi", "nvme"}, DiskSize: 64 << 20, Save: true}, ""},
		{api.BenchRequest{Duration: "soon"}, `duration "soon"`},
		{api.BenchRequest{Duration: "1ms"}, "duration 1ms"},
		{api.BenchRequest{Duration: "2m"}, "duration 2m0s"},
		{api.BenchRequest{Repeats: -1}, "repeats -1"},
		{api.BenchRequest{Repeats: 21}, "repeats 21"},
		{api.BenchRequest{With: 17}, "with 17"},
		{api.BenchRequest{With: -1}, "with -1"},
		{api.BenchRequest{DiskBuses: []string{"usb"}}, `disk bus "usb"`},
		{api.BenchRequest{DiskBuses: []string{"scsi", "scsi"}}, "given twice"},
		{api.BenchRequest{DiskSize: 1 << 20}, "disk size 1M"},
		{api.BenchRequest{DiskSize: 64<<20 + 512}, "whole number of MiB"},
		{api.BenchRequest{DiskSize: 32 << 30}, "disk size 32G"},
	}
	for _, tt := range tests {
		p, err := parseBench("web", tt.req)
		if tt.want == "" {
			if err != nil {
				t.Errorf("parseBench(%+v) = %v", tt.req, err)
			}
			continue
		}
		if err == nil || !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), `bench vm "web": `) {
			t.Errorf("parseBench(%+v) = %v (plan %+v), want an invalid-input error naming the VM and %q", tt.req, err, p, tt.want)
		}
	}
}

func TestParseBenchDefaults(t *testing.T) {
	p, err := parseBench("web", api.BenchRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if p.duration != time.Second || p.repeats != 3 || p.disk != 256<<20 || !slices.Equal(p.buses, []string{"virtio"}) || p.with != 0 || p.save {
		t.Fatalf("defaults = %+v", p)
	}
}

func TestBenchNotesSayWhatTheFiguresMean(t *testing.T) {
	tcg := benchNotes(api.BenchReport{Accel: "tcg", With: 2, Rows: []api.BenchRow{{HostBuffered: true}}})
	joined := strings.Join(tcg, "\n")
	for _, want := range []string{"software emulation", "page cache", "2 extra VMs"} {
		if !strings.Contains(joined, want) {
			t.Errorf("notes lack %q:\n%s", want, joined)
		}
	}
	kvm := strings.Join(benchNotes(api.BenchReport{Accel: "kvm"}), "\n")
	if strings.Contains(kvm, "emulation") || strings.Contains(kvm, "extra VMs") {
		t.Errorf("a plain KVM run got notes it should not:\n%s", kvm)
	}
}
