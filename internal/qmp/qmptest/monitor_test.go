package qmptest_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/lodge-vm/lodge/internal/qmp"
	"github.com/lodge-vm/lodge/internal/qmp/qmptest"
)

func next(t *testing.T, ch <-chan qmp.Event) qmp.Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("event channel closed")
		}
		return ev
	case <-time.After(time.Second):
		t.Fatal("no event")
	}
	return qmp.Event{}
}

func TestMonitorModelsAVM(t *testing.T) {
	ctx := context.Background()
	m := qmptest.NewMonitor()
	events, cancel := m.Subscribe()
	defer cancel()
	all := m.Events()

	steps := []struct {
		name       string
		do         func() error
		wantStatus string
		wantEvent  string
	}{
		{name: "stop", do: func() error { return qmp.Stop(ctx, m) }, wantStatus: "paused", wantEvent: "STOP"},
		{name: "cont", do: func() error { return qmp.Cont(ctx, m) }, wantStatus: "running", wantEvent: "RESUME"},
		{name: "reset", do: func() error { return qmp.SystemReset(ctx, m) }, wantStatus: "running", wantEvent: "RESET"},
		{name: "powerdown", do: func() error { return qmp.SystemPowerdown(ctx, m) }, wantStatus: "running", wantEvent: "POWERDOWN"},
	}
	for _, st := range steps {
		if err := st.do(); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		got, err := qmp.QueryStatus(ctx, m)
		if err != nil {
			t.Fatalf("%s: QueryStatus: %v", st.name, err)
		}
		if got.Status != st.wantStatus || got.Running != (st.wantStatus == "running") {
			t.Errorf("after %s: status %+v, want %s", st.name, got, st.wantStatus)
		}
		for _, ch := range []<-chan qmp.Event{events, all} {
			if ev := next(t, ch); ev.Name != st.wantEvent {
				t.Errorf("after %s: event %s, want %s", st.name, ev.Name, st.wantEvent)
			}
		}
	}

	if err := qmp.Quit(ctx, m); err != nil {
		t.Fatalf("Quit: %v", err)
	}
	ev := next(t, events)
	var data struct {
		Guest  bool   `json:"guest"`
		Reason string `json:"reason"`
	}
	if err := json.Unmarshal(ev.Data, &data); ev.Name != "SHUTDOWN" || err != nil || data.Guest || data.Reason != "host-qmp-quit" {
		t.Errorf("after quit: event %s %s", ev.Name, ev.Data)
	}
	select {
	case <-m.Done():
	default:
		t.Fatal("Done not closed after quit")
	}
	if _, ok := <-events; ok {
		t.Error("subscription open after quit")
	}
	if err := qmp.Stop(ctx, m); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("Stop after quit: err = %v, want ErrClosed", err)
	}
	want := []string{"stop", "query-status", "cont", "query-status", "system_reset", "query-status", "system_powerdown", "query-status", "quit", "stop"}
	if got := m.Commands(); !slices.Equal(got, want) {
		t.Errorf("Commands() = %v, want %v", got, want)
	}
}

func TestMonitorHandlers(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name      string
		handler   qmptest.MonitorHandler
		args      any
		wantArgs  string
		wantClass string
		wantValue int
	}{
		{
			name: "scripted reply",
			handler: func(args json.RawMessage) (any, error) {
				var a struct{ Value int }
				_ = json.Unmarshal(args, &a)
				return map[string]int{"actual": a.Value * 2}, nil
			},
			args: map[string]int{"value": 21}, wantArgs: `{"value":21}`, wantValue: 42,
		},
		{
			name: "refusal",
			handler: func(json.RawMessage) (any, error) {
				return nil, &qmp.Error{Class: qmp.ClassDeviceNotActive, Desc: "No balloon device has been activated"}
			},
			wantClass: qmp.ClassDeviceNotActive,
		},
		{name: "unknown command", wantClass: qmp.ClassCommandNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := qmptest.NewMonitor()
			if tt.handler != nil {
				m.Handle("balloon", tt.handler)
			}
			var res struct{ Actual int }
			err := m.Execute(ctx, "balloon", tt.args, &res)
			if tt.wantClass != "" {
				var qerr *qmp.Error
				if !errors.As(err, &qerr) || qerr.Class != tt.wantClass {
					t.Fatalf("err = %v, want *qmp.Error of class %s", err, tt.wantClass)
				}
			} else if err != nil || res.Actual != tt.wantValue {
				t.Fatalf("Execute = %+v, %v; want %d", res, err, tt.wantValue)
			}
			calls := m.Calls()
			if len(calls) != 1 || calls[0].Command != "balloon" || string(calls[0].Args) != tt.wantArgs {
				t.Errorf("Calls() = %+v", calls)
			}
		})
	}

	t.Run("cancelled context", func(t *testing.T) {
		m := qmptest.NewMonitor()
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := qmp.Stop(cctx, m); !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		if m.Status() != "running" {
			t.Error("a cancelled call still ran")
		}
	})
}
