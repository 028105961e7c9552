package main

import (
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/internal/config"
	"github.com/lodge-vm/lodge/internal/daemon"
	"github.com/lodge-vm/lodge/internal/priority"
)

func daemonCmd(g *globals) *cobra.Command {
	var listen string
	cmd := &cobra.Command{
		Use:   "daemon",
		Short: "Run the host daemon in the foreground",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			home := g.resolvedHome()
			cfg, err := config.Load(home)
			if err != nil {
				return err
			}
			if g.socket != "" {
				cfg.Socket = g.socket
			}
			if listen != "" {
				cfg.Listen = listen
			}
			cfg.Default()
			if err := cfg.Validate(); err != nil {
				return usageError{err}
			}
			var level slog.Level
			_ = level.UnmarshalText([]byte(cfg.LogLevel))
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			if err := priority.OwnGroup(); err != nil {
				log.Info("backups and exports lower only their own threads, and weigh as much as a VM", "component", "daemon", "reason", err)
			}
			d, err := daemon.New(cmd.Context(), cfg, log)
			if err != nil {
				return err
			}
			return d.Run(cmd.Context())
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "", "also serve the API over HTTPS on HOST:PORT, for other daemons (env LODGE_LISTEN)")
	return cmd
}
