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
		case <-time.After(settleEvery):
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

// How often a clone's guest is asked for its hostname while its new
// identity is pending; commands run through the agent wait on it.
var settleEvery = 250 * time.Millisecond

// waitIdentity waits while a running clone's new identity is pending, so
// that a command run in the guest sees its new hostname rather than its
// source's, for the moment between the agent's start and the seed's
// taking effect. It first waits up to agentWait for the agent (settling
// needs it), and gives up after IdentityGrace and a little more, when
// settleIdentity applies the identity itself, or when the VM stops.
func (s *Service) waitIdentity(ctx context.Context, name string, agentWait time.Duration) {
	in := s.instance(name)
	if in == nil {
		return
	}
	tick := settleEvery / 2
	if waitFor(ctx, in, tick, agentWait, func() (bool, error) { return in.agentUp(), nil }) != nil {
		return
	}
	_ = waitFor(ctx, in, tick, s.cfg.IdentityGrace+30*time.Second, func() (bool, error) {
		r, err := s.load(ctx, name)
		return !r.IdentityPending, err
	})
}

func (s *Service) identitySettled(ctx context.Context, name, how string) {
	if _, err := s.update(ctx, name, func(x *record) error { x.IdentityPending = false; return nil }); err != nil {
		s.log.Error("record identity", "vm", name, "err", err)
		return
	}
	s.log.Info("identity settled", "vm", name, "how", how)
	s.publish(name, "identity", "", how)
}
