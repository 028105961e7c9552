package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"sort"
	"sync"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// operation is a long job running in the daemon.
type operation struct {
	mu     sync.Mutex
	op     api.Operation
	cancel context.CancelFunc
	done   chan struct{}
}

// Progress records how far the job got.
func (o *operation) Progress(stage string, done, total int64) {
	o.mu.Lock()
	o.op.Stage, o.op.Done, o.op.Total = stage, done, total
	o.mu.Unlock()
}

// Steps records progress counted in steps rather than bytes.
func (o *operation) Steps(stage string, done, total int64) {
	o.mu.Lock()
	o.op.Stage, o.op.Done, o.op.Total, o.op.Unit = stage, done, total, api.UnitSteps
	o.mu.Unlock()
}

func (o *operation) snapshot() api.Operation {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.op
}

// operations keeps running and recently finished jobs.
type operations struct {
	mu     sync.Mutex
	ops    map[string]*operation
	events *bus
	base   context.Context
	wg     sync.WaitGroup
}

const keepFinished = 500

func newOperations(base context.Context, events *bus) *operations {
	return &operations{ops: map[string]*operation{}, events: events, base: base}
}

func newID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// start runs fn in the background as an operation.
func (s *operations) start(kind, target string, fn func(ctx context.Context, o *operation) (any, error)) *operation {
	ctx, cancel := context.WithCancel(s.base)
	o := &operation{
		op:     api.Operation{ID: newID(), Kind: kind, Target: target, State: api.OpRunning, CreatedAt: time.Now().UTC()},
		cancel: cancel,
		done:   make(chan struct{}),
	}
	s.mu.Lock()
	s.ops[o.op.ID] = o
	s.pruneLocked()
	s.mu.Unlock()
	s.events.Publish(api.Event{Time: o.op.CreatedAt, Kind: "operation", Target: target, State: api.OpRunning, Message: kind + " " + o.op.ID})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer cancel()
		result, err := fn(ctx, o)
		now := time.Now().UTC()
		o.mu.Lock()
		o.op.FinishedAt = &now
		switch {
		case err == nil:
			o.op.State, o.op.Result = api.OpSucceeded, result
		case errors.Is(err, context.Canceled) && ctx.Err() != nil:
			o.op.State, o.op.Error = api.OpCancelled, kind+" "+target+": cancelled"
		default:
			o.op.State, o.op.Error = api.OpFailed, err.Error()
			o.op.Code = codeOf(err)
		}
		state, msg := o.op.State, kind+" "+o.op.ID
		if o.op.Error != "" {
			msg += ": " + o.op.Error
		}
		o.mu.Unlock()
		close(o.done)
		s.events.Publish(api.Event{Time: now, Kind: "operation", Target: target, State: state, Message: msg})
	}()
	return o
}

func (s *operations) pruneLocked() {
	if len(s.ops) <= keepFinished {
		return
	}
	var finished []*operation
	for _, o := range s.ops {
		select {
		case <-o.done:
			finished = append(finished, o)
		default:
		}
	}
	sort.Slice(finished, func(i, j int) bool { return finished[i].op.CreatedAt.Before(finished[j].op.CreatedAt) })
	for i := 0; i < len(finished) && len(s.ops) > keepFinished; i++ {
		delete(s.ops, finished[i].op.ID)
	}
}

func (s *operations) get(id string) *operation {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ops[id]
}

func (s *operations) list() []api.Operation {
	s.mu.Lock()
	out := make([]api.Operation, 0, len(s.ops))
	for _, o := range s.ops {
		out = append(out, o.snapshot())
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out
}

// wait lets running jobs finish (they are cancelled by the base context).
func (s *operations) wait() { s.wg.Wait() }
