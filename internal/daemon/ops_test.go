package daemon

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/storage"
)

func TestOperationOutcomes(t *testing.T) {
	ops := newOperations(context.Background(), newBus())
	events, cancelSub := ops.events.subscribe()
	defer cancelSub()

	ok := ops.start("create", "a", func(_ context.Context, o *operation) (any, error) {
		o.Progress("copy", 5, 10)
		return "result", nil
	})
	fail := ops.start("start", "b", func(context.Context, *operation) (any, error) {
		return nil, fmt.Errorf("vm %q: %w", "b", errdefs.ErrBusy)
	})
	block := ops.start("import", "c", func(ctx context.Context, _ *operation) (any, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	})
	<-ok.done
	<-fail.done
	if got := ok.snapshot(); got.State != api.OpSucceeded || got.Result != "result" || got.Done != 5 || got.Total != 10 || got.FinishedAt == nil {
		t.Fatalf("succeeded op = %+v", got)
	}
	if got := fail.snapshot(); got.State != api.OpFailed || got.Code != "busy" || got.Error != `vm "b": busy` {
		t.Fatalf("failed op = %+v", got)
	}
	block.cancel()
	select {
	case <-block.done:
	case <-time.After(5 * time.Second):
		t.Fatal("cancel did not end the operation")
	}
	if got := block.snapshot(); got.State != api.OpCancelled {
		t.Fatalf("cancelled op = %+v", got)
	}
	if len(ops.list()) != 3 || ops.get(ok.op.ID) != ok || ops.get("nope") != nil {
		t.Fatal("registry lookups are wrong")
	}
	// Each operation announces its start and its end.
	seen := 0
	for seen < 6 {
		select {
		case <-events:
			seen++
		case <-time.After(time.Second):
			t.Fatalf("saw %d of 6 operation events", seen)
		}
	}
}

func TestCodeOf(t *testing.T) {
	tests := []struct {
		err  error
		code string
	}{
		{errdefs.ErrNotFound, "not_found"},
		{errdefs.ErrNotFound, "not_found"},
		{errdefs.ErrBusy, "busy"},
		{errdefs.ErrExists, "conflict"},
		{errdefs.ErrState, "conflict"},
		{errdefs.ErrInUse, "conflict"},
		{errdefs.ErrLimit, "limit"},
		{errdefs.ErrQuota, "quota"},
		{errdefs.ErrInvalid, "bad_request"},
		{storage.ErrUnsafeImage, "bad_request"},
		{errdefs.ErrNoAgent, "no_agent"},
		{errors.New("disk on fire"), "internal"},
	}
	for _, tt := range tests {
		wrapped := fmt.Errorf("vm %q: %w", "x", tt.err)
		if got := codeOf(wrapped); got != tt.code {
			t.Errorf("codeOf(%v) = %s, want %s", tt.err, got, tt.code)
		}
		if statusOf[tt.code] == 0 {
			t.Errorf("code %s has no HTTP status", tt.code)
		}
	}
}
