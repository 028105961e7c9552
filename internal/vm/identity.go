package vm

import (
	"context"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/internal/identity"
	"github.com/lodge-vm/lodge/internal/qga"
)

// settleIdentity makes sure a clone's guest has taken its new identity.
// Guests with cloud-init (or the test guest's equivalent) take it from the
// seed at boot; once the agent is up, the guest's hostname shows whether
// that happened. If it has not within IdentityGrace, the guest ignores
// seeds, and Lodge applies the identity through the agent instead.
func (s *Service) settleIdentity(in *instance) {
	if !in.settling.CompareAndSwap(false, true) {
		return
	}
	defer in.settling.Store(false)
	ctx := context.Background()
	r, err := s.load(ctx, in.name)
	if err != nil || !r.IdentityPending {
		return
	}
	deadline := time.Now().Add(s.cfg.IdentityGrace)
	for {
		var hn string
		err := s.withAgent(ctx, in.name, 10*time.Second, func(a qga.Agent) error {
			actx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			var err error
			hn, err = a.HostName(actx)
			return err
		})
		short, _, _ := strings.Cut(hn, ".")
		if err == nil && strings.EqualFold(short, r.Hostname) {
			s.identitySettled(ctx, in.name, "the guest took its new identity from the seed")
			return
		}
		if time.Now().After(deadline) {
			break
		}
		select {
		case <-in.done:
			return
		case <-time.After(time.Second):
		}
	}
	err = s.withAgent(ctx, in.name, 10*time.Second, func(a qga.Agent) error {
		actx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		return identity.Apply(actx, a, r.Hostname)
	})
	if err != nil {
		s.log.Warn("identity not applied", "vm", in.name, "err", err)
		s.publish(in.name, "identity", "", "new identity not applied: "+err.Error())
		return
	}
	s.identitySettled(ctx, in.name, "the guest ignored the seed; new hostname, machine-id and SSH host keys applied through the agent")
}

func (s *Service) identitySettled(ctx context.Context, name, how string) {
	if _, err := s.update(ctx, name, func(x *record) error { x.IdentityPending = false; return nil }); err != nil {
		s.log.Error("record identity", "vm", name, "err", err)
		return
	}
	s.log.Info("identity settled", "vm", name, "how", how)
	s.publish(name, "identity", "", how)
}
