package vm

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/network"
)

// knownNetworks knows some networks by name; attaching is not needed by
// the tests that use it.
type knownNetworks map[string]bool

func (k knownNetworks) Check(_ context.Context, name string) error {
	if !k[name] {
		return fmt.Errorf("network %q: %w", name, errdefs.ErrNotFound)
	}
	return nil
}

func (knownNetworks) Attach(context.Context, string, []string, network.NIC) (network.Attachment, error) {
	return network.Attachment{}, errors.New("not attached in this test")
}

func (knownNetworks) Release(context.Context, string) error { return nil }

func TestSetNetworks(t *testing.T) {
	f := newFixture(t)
	f.svc.cfg.Networks = knownNetworks{"back": true, "front": true}
	ctx := context.Background()
	first := f.create(t, "db").NICs[0]

	v, err := f.svc.SetNetworks(ctx, "db", []string{first.Network, "back"})
	if err != nil {
		t.Fatal(err)
	}
	if len(v.NICs) != 2 || v.NICs[0] != (api.NIC{Network: first.Network, MAC: first.MAC}) || v.NICs[1].Network != "back" || v.NICs[1].MAC == "" || v.NICs[1].MAC == first.MAC {
		t.Fatalf("onto back as well: %+v (was %+v)", v.NICs, first)
	}
	onBack := v.NICs[1]
	v, err = f.svc.SetNetworks(ctx, "db", []string{"back"})
	if err != nil || len(v.NICs) != 1 || v.NICs[0] != onBack {
		t.Fatalf("back alone: %+v, %v; want the NIC that was on back, %+v", v.NICs, err, onBack)
	}

	for _, tt := range []struct {
		name string
		nets []string
		want error
	}{
		{"none", nil, errdefs.ErrInvalid},
		{"unknown", []string{"back", "nosuch"}, errdefs.ErrNotFound},
	} {
		if _, err := f.svc.SetNetworks(ctx, "db", tt.nets); !errors.Is(err, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.want)
		}
		if v, _ := f.svc.Get(ctx, "db"); len(v.NICs) != 1 || v.NICs[0] != onBack {
			t.Errorf("%s: a refused change left %+v", tt.name, v.NICs)
		}
	}

	f.create(t, "web")
	if _, err := f.svc.Start(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.SetNetworks(ctx, "web", []string{"front"}); !errors.Is(err, errdefs.ErrState) {
		t.Errorf("a running VM's networks: %v, want %v", err, errdefs.ErrState)
	}
}

func TestRenic(t *testing.T) {
	have := []api.NIC{{Network: "a", MAC: "m1"}, {Network: "b", MAC: "m2"}, {Network: "a", MAC: "m3"}}
	got := renic(have, []string{"a", "a", "c", "b", "b"})
	want := []string{"m1", "m3", "", "m2", ""}
	if len(got) != len(want) {
		t.Fatalf("renic: %+v", got)
	}
	for i, w := range want {
		switch {
		case w != "" && got[i].MAC != w:
			t.Errorf("NIC %d on %s: MAC %s, want %s kept", i, got[i].Network, got[i].MAC, w)
		case w == "" && (got[i].MAC == "" || got[i].MAC == "m1" || got[i].MAC == "m2" || got[i].MAC == "m3"):
			t.Errorf("NIC %d on %s: MAC %q, want a fresh one", i, got[i].Network, got[i].MAC)
		}
	}
}
