// Command lodge is Lodge's one binary: the CLI verbs, and `lodge daemon`.
// The CLI reaches the daemon only through the client package.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/client"
)

// usageError marks bad usage, which exits 2.
type usageError struct{ error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// exitError carries an exit code through cobra without printing anything.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

type globals struct {
	home   string
	socket string
	output string
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string) int {
	g := &globals{}
	root := newRoot(g)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	fmt.Fprintln(os.Stderr, "lodge: "+oneLine(err, g))
	var ue usageError
	if errors.As(err, &ue) || isCobraUsage(err) {
		return 2
	}
	return 1
}

func oneLine(err error, g *globals) string {
	msg := err.Error()
	if errors.Is(err, client.ErrDaemonDown) {
		msg += "; start it with `lodge daemon` (or `lodge daemon &`)"
		if g.home != "" {
			msg += " with the same --home"
		}
	}
	return strings.ReplaceAll(msg, "\n", " ")
}

// isCobraUsage recognises cobra's own argument and flag errors.
func isCobraUsage(err error) bool {
	m := err.Error()
	for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand flag", "accepts ", "requires at least", "requires at most", "invalid argument", "flag needs an argument", "required flag"} {
		if strings.Contains(m, p) {
			return true
		}
	}
	return false
}

func newRoot(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:           "lodge",
		Short:         "Lodge runs virtual servers on this host",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			switch g.output {
			case "table", "json", "yaml":
			default:
				return usagef("-o %q: want table, json or yaml", g.output)
			}
			return nil
		},
	}
	root.PersistentFlags().StringVar(&g.home, "home", "", "Lodge's state directory (env LODGE_HOME)")
	root.PersistentFlags().StringVar(&g.socket, "socket", "", "the daemon's API socket (env LODGE_SOCKET)")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format: table, json or yaml")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(
		daemonCmd(g), hostCmd(g), imageCmd(g), poolCmd(g), netCmd(g), projectCmd(g),
		createCmd(g), cloneCmd(g), setCmd(g), diskCmd(g), snapshotCmd(g), lifecycleCmd(g, "start"), lifecycleCmd(g, "stop"), lifecycleCmd(g, "restart"),
		lifecycleCmd(g, "pause"), lifecycleCmd(g, "resume"), deleteCmd(g),
		listCmd(g), showCmd(g), consoleCmd(g), execCmd(g), eventsCmd(g), operationCmd(g),
		exportCmd(g), importCmd(g), sendCmd(g), backupCmd(g), stackCmd(g), benchCmd(g),
	)
	return root
}
