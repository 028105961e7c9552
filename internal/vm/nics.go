package vm

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/identity"
	"github.com/lodge-vm/lodge/internal/store"
)

// SetNetworks puts a stopped VM's NICs on networks, one NIC each, in
// order. A NIC that stays on its network keeps its MAC, and with it the
// address the network's DHCP hands it; a NIC on a network the VM was not
// on gets a fresh MAC. The guest takes its addresses by DHCP on whatever
// NICs it finds, so nothing in it needs to change.
func (s *Service) SetNetworks(ctx context.Context, name string, networks []string) (api.VM, error) {
	fail := func(err error) (api.VM, error) {
		return api.VM{}, fmt.Errorf("set networks of vm %q: %w", name, err)
	}
	if len(networks) == 0 {
		return fail(fmt.Errorf("%w: a VM needs at least one network", errdefs.ErrInvalid))
	}
	for _, n := range networks {
		if err := s.checkNetwork(ctx, n); err != nil {
			return fail(err)
		}
	}
	unlock, err := s.lock(name, "set")
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	if s.alive(name) {
		return fail(fmt.Errorf("%w: its NICs change while it is stopped", errdefs.ErrState))
	}
	for {
		r, err := s.load(ctx, name)
		if err != nil {
			return api.VM{}, err
		}
		nics := renic(r.NICs, networks)
		_, err = s.updateTx(ctx, name, func(tx store.Tx, x *record) error {
			if !slices.Equal(x.NICs, r.NICs) {
				return fmt.Errorf("%w: its NICs changed meanwhile", errdefs.ErrConflict)
			}
			if err := macsFree(tx, nics, r.NICs); err != nil {
				return err
			}
			x.NICs = nics
			return nil
		})
		if errors.Is(err, errIdentityTaken) {
			continue
		}
		if err != nil {
			return fail(err)
		}
		nets := make([]string, len(nics))
		for i, n := range nics {
			nets[i] = n.Network
		}
		s.publish(name, "vm-set", "", "networks "+strings.Join(nets, " "))
		return s.Get(ctx, name)
	}
}

// renic lays out NICs for networks, reusing have's MACs network by
// network and drawing new ones for the rest.
func renic(have []api.NIC, networks []string) []api.NIC {
	used := make([]bool, len(have))
	out := make([]api.NIC, 0, len(networks))
	for _, n := range networks {
		nic := api.NIC{Network: n}
		for i, h := range have {
			if !used[i] && h.Network == n {
				used[i], nic.MAC = true, h.MAC
				break
			}
		}
		if nic.MAC == "" {
			nic.MAC = identity.NewMAC()
		}
		out = append(out, nic)
	}
	return out
}

// macsFree fails with errIdentityTaken if a MAC in nics that the VM did
// not already have (in old) belongs to a VM, which cannot be this one.
func macsFree(tx store.Tx, nics, old []api.NIC) error {
	others, err := store.ListJSON[identityOf](tx, bucket)
	if err != nil {
		return err
	}
	for _, n := range nics {
		if slices.ContainsFunc(old, func(o api.NIC) bool { return o.MAC == n.MAC }) {
			continue
		}
		if slices.ContainsFunc(others, func(o identityOf) bool { return o.hasMAC(n.MAC) }) {
			return errIdentityTaken
		}
	}
	return nil
}
