package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// escapeByte (Ctrl-]) ends an interactive console session, as in telnet
// and virsh console.
const escapeByte = 0x1d

func consoleCmd(g *globals) *cobra.Command {
	var logOnly bool
	cmd := &cobra.Command{
		Use:   "console NAME",
		Short: "Attach to a VM's serial console (Ctrl-] to leave); --log prints what it has said",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			if logOnly {
				return c.ConsoleLog(cmd.Context(), args[0], os.Stdout)
			}
			conn, err := c.Console(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer func() { _ = conn.Close() }()
			if isTTY(os.Stdin) {
				old, err := term.MakeRaw(int(os.Stdin.Fd()))
				if err != nil {
					return err
				}
				defer func() {
					_ = term.Restore(int(os.Stdin.Fd()), old)
					fmt.Fprintln(os.Stderr)
				}()
				fmt.Fprintf(os.Stderr, "Connected to %s's console. Press Ctrl-] to leave.\r\n", args[0])
			}
			done := make(chan struct{}, 2)
			go func() { _, _ = io.Copy(os.Stdout, conn); done <- struct{}{} }()
			go func() { copyUntilEscape(conn, os.Stdin); done <- struct{}{} }()
			<-done
			return nil
		},
	}
	cmd.Flags().BoolVar(&logOnly, "log", false, "print what the console has said since boot, and exit")
	return cmd
}

func copyUntilEscape(dst io.Writer, src io.Reader) {
	buf := make([]byte, 1024)
	for {
		n, err := src.Read(buf)
		for i := 0; i < n; i++ {
			if buf[i] == escapeByte {
				_, _ = dst.Write(buf[:i])
				return
			}
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
