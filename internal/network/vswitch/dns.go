package vswitch

import (
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

const dnsTTL = 60

// dns answers a DNS query for the leases' names. The switch knows only
// those: a single-label name it does not know cannot exist on the
// network, but a dotted one may exist elsewhere, so it refuses that and
// the guest's resolver asks its next server.
func (s *Switch) dns(query []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil || h.Response || h.OpCode != 0 {
		return nil
	}
	qs, err := p.AllQuestions()
	if err != nil || len(qs) != 1 {
		return nil
	}
	q := qs[0]
	name := strings.TrimSuffix(q.Name.String(), ".")

	known := false
	var as [][4]byte
	for _, l := range s.cfg.Leases() {
		for _, n := range l.Names {
			if strings.EqualFold(strings.TrimSuffix(n, "."), name) {
				known = true
				if ip := l.IP.Unmap(); ip.Is4() {
					as = append(as, ip.As4())
				}
				break
			}
		}
	}

	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
	switch {
	case known:
		rh.RCode = dnsmessage.RCodeSuccess
	case name != "" && !strings.Contains(name, "."):
		rh.RCode = dnsmessage.RCodeNameError
	default:
		rh.RCode, rh.Authoritative = dnsmessage.RCodeRefused, false
	}
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), rh)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil
	}
	if err := b.Question(q); err != nil {
		return nil
	}
	if known && q.Type == dnsmessage.TypeA && q.Class == dnsmessage.ClassINET {
		if err := b.StartAnswers(); err != nil {
			return nil
		}
		for _, a := range as {
			// The name as asked: resolvers that randomise its case
			// check that it comes back unchanged.
			rr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: dnsTTL}
			if err := b.AResource(rr, dnsmessage.AResource{A: a}); err != nil {
				return nil
			}
		}
	}
	out, err := b.Finish()
	if err != nil {
		s.log.Debug("DNS reply", "name", q.Name, "err", err)
		return nil
	}
	return out
}
