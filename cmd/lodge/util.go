package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/client"
	"github.com/lodge-vm/lodge/internal/config"
	"github.com/lodge-vm/lodge/internal/units"
	"github.com/spf13/cobra"
	"golang.org/x/term"
	"gopkg.in/yaml.v3"
)

func (g *globals) resolvedHome() string {
	if g.home != "" {
		abs, err := filepath.Abs(g.home)
		if err == nil {
			return abs
		}
		return g.home
	}
	return config.HomeFromEnv()
}

func (g *globals) resolvedSocket() string {
	if g.socket != "" {
		return g.socket
	}
	if s := os.Getenv("LODGE_SOCKET"); s != "" {
		return s
	}
	return filepath.Join(g.resolvedHome(), "lodge.sock")
}

func (g *globals) client() *client.Client { return client.New(g.resolvedSocket()) }

// emit prints v as JSON or YAML, or calls table for the table format.
func (g *globals) emit(w io.Writer, v any, table func(*tabwriter.Writer)) error {
	switch g.output {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "yaml":
		// Round-trip through JSON so YAML keys match the JSON contract.
		raw, err := json.Marshal(v)
		if err != nil {
			return err
		}
		var generic any
		if err := json.Unmarshal(raw, &generic); err != nil {
			return err
		}
		return yaml.NewEncoder(w).Encode(generic)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	table(tw)
	return tw.Flush()
}

func isTTY(f *os.File) bool { return term.IsTerminal(int(f.Fd())) }

// finish waits for the operation a call started (err is the call's) and
// decodes its result: how every command that starts an operation ends.
func finish[T any](cmd *cobra.Command, c *client.Client, op api.Operation, err error) (T, error) {
	var out T
	if err != nil {
		return out, err
	}
	if op, err = wait(cmd.Context(), c, op); err != nil {
		return out, err
	}
	return out, client.Result(op, &out)
}

// wait follows an operation. On a TTY it draws progress; Ctrl-C cancels
// the operation in the daemon rather than leaving it running unseen.
func wait(ctx context.Context, c *client.Client, op api.Operation) (api.Operation, error) {
	var progress func(api.Operation)
	tty := isTTY(os.Stderr)
	if tty {
		start := time.Now()
		progress = func(o api.Operation) { drawProgress(o, start) }
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = c.CancelOperation(cctx, op.ID)
			cancel()
		case <-done:
		}
	}()
	out, err := c.Wait(context.WithoutCancel(ctx), op, progress)
	if tty {
		fmt.Fprint(os.Stderr, "\r\033[K")
	}
	return out, err
}

func drawProgress(o api.Operation, start time.Time) {
	elapsed := time.Since(start)
	line := fmt.Sprintf("%s %s", o.Kind, o.Target)
	if o.Stage != "" {
		line += " (" + o.Stage + ")"
	}
	if o.Total > 0 && o.Unit == api.UnitSteps {
		eta := "?"
		if o.Done > 0 {
			eta = time.Duration(float64(o.Total-o.Done) * float64(elapsed) / float64(o.Done)).Round(time.Second).String()
		}
		line += fmt.Sprintf(" step %d/%d, %.0fs, ETA %s", o.Done, o.Total, elapsed.Seconds(), eta)
	} else if o.Total > 0 {
		pct := float64(o.Done) / float64(o.Total)
		rate := float64(o.Done) / max(elapsed.Seconds(), 0.001)
		eta := "?"
		if rate > 0 && o.Done > 0 {
			eta = time.Duration(float64(o.Total-o.Done) / rate * float64(time.Second)).Round(time.Second).String()
		}
		bar := strings.Repeat("#", int(pct*20)) + strings.Repeat(".", 20-int(pct*20))
		line += fmt.Sprintf(" [%s] %3.0f%% %s/%s %s/s ETA %s", bar, pct*100,
			units.FormatSize(o.Done), units.FormatSize(o.Total), units.FormatSize(int64(rate)), eta)
	} else {
		line += fmt.Sprintf(" %.0fs", elapsed.Seconds())
	}
	fmt.Fprint(os.Stderr, "\r\033[K"+line)
}

func sizeOrDash(b int64) string {
	if b == 0 {
		return "-"
	}
	return units.FormatSize(b)
}

func parseSizeFlag(flag, v string) (int64, error) {
	if v == "" {
		return 0, nil
	}
	n, err := units.ParseSize(v)
	if err != nil {
		return 0, usagef("--%s: %v", flag, err)
	}
	return n, nil
}
