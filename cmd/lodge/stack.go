package main

import (
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/client"
)

func stackCmd(g *globals) *cobra.Command {
	root := &cobra.Command{Use: "stack", Short: "Multi-VM stacks started in dependency order"}
	var recreate bool
	up := &cobra.Command{
		Use:   "up FILE [--recreate]",
		Short: "Create what is missing and start the members, each once what it depends on is ready",
		Long: `Bring a stack up from its YAML file. The file is checked first (cycles,
unknown images and names, memory over the host limit, each with its line).
Missing members are created; then they start in dependency order, members
that do not depend on each other in parallel, each once the members it
depends on have reached the condition asked for (started, agent, healthy
or completed). The first failure stops the rollout; members already up are
left running. Running up again changes nothing that already matches.

An edited file applies only what changed: cpus and memory as lodge set
does; networks on a member that is stopped first and started again; an
image, with --recreate, by rebuilding the member on the new image (its
disks are replaced, its identity kept). Members not in the file any more
are deleted.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			raw, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			c := g.client()
			op, err := c.StackUp(cmd.Context(), api.StackUp{Path: args[0], File: string(raw), Recreate: recreate})
			return g.stackResult(cmd, c, op, err)
		},
	}
	up.Flags().BoolVar(&recreate, "recreate", false, "rebuild members whose image changed in the file on the new image (their disks' data is lost)")
	status := &cobra.Command{
		Use:   "status NAME",
		Short: "Show each member's state, health, addresses and when it became ready",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := g.client().StackStatus(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), st, func(tw *tabwriter.Writer) { stackTable(tw, st) })
		},
	}
	var down api.StackDown
	downCmd := &cobra.Command{
		Use:   "down NAME [--delete]",
		Short: "Stop a stack's members, dependents first; --delete removes them",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			op, err := c.StackDown(cmd.Context(), args[0], down)
			if err != nil {
				return err
			}
			_, err = wait(cmd.Context(), c, op)
			return err
		},
	}
	downCmd.Flags().BoolVar(&down.Delete, "delete", false, "delete the members and forget the stack")
	var rebuild api.StackRebuild
	rebuildCmd := &cobra.Command{
		Use:   "rebuild NAME MEMBER [--from-backup [--repo R]]",
		Short: "Recreate a member from its image or latest backup, keeping its identity",
		Long: `Rebuild a member whose disk is lost or broken: it is stopped, gets a fresh
disk on its image (or, with --from-backup, its latest backup's content), and
is started and waited on again. Its UUID, MACs, hostname and network
addresses stay, since other members know it by them; no other member is
stopped. MEMBER is a member's name (all its instances) or an instance's
(app-2). A VM with snapshots is refused.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			rebuild.Member = args[1]
			c := g.client()
			op, err := c.StackRebuild(cmd.Context(), args[0], rebuild)
			return g.stackResult(cmd, c, op, err)
		},
	}
	rebuildCmd.Flags().BoolVar(&rebuild.FromBackup, "from-backup", false, "restore each VM's latest backup instead of a fresh disk on its image")
	rebuildCmd.Flags().StringVar(&rebuild.Repo, "repo", "", "backup repository to take the backup from (default: any)")
	root.AddCommand(up, status, downCmd, rebuildCmd, stackBackupCmd(g), stackBackupsCmd(g), stackRestoreCmd(g))
	return root
}

func stackBackupCmd(g *globals) *cobra.Command {
	var req api.StackBackupRequest
	cmd := &cobra.Command{
		Use:   "backup NAME [--repo R]",
		Short: "Back up every member at one point, with the stack's file",
		Long: `Back up all of a stack's members into one repository. Every member's point
is taken (each guest's filesystems frozen for its instant) before any data
is read, so the backups are as close in time as the guests allow. The set
is recorded with the stack's file in the repository: lodge stack restore
brings the stack back from it, on this host or on one that has the
repository.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			op, err := c.StackBackup(cmd.Context(), args[0], req)
			sb, err := finish[api.StackBackup](cmd, c, op, err)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), sb, func(tw *tabwriter.Writer) { stackBackupTable(tw, []api.StackBackup{sb}) })
		},
	}
	cmd.Flags().StringVar(&req.Repo, "repo", "", "backup repository (default: default)")
	return cmd
}

func stackBackupsCmd(g *globals) *cobra.Command {
	var repo string
	cmd := &cobra.Command{
		Use:   "backups NAME [--repo R]",
		Short: "List a stack's backups in a repository",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sbs, err := g.client().StackBackups(cmd.Context(), args[0], repo)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), sbs, func(tw *tabwriter.Writer) { stackBackupTable(tw, sbs) })
		},
	}
	cmd.Flags().StringVar(&repo, "repo", "", "backup repository (default: default)")
	return cmd
}

func stackBackupTable(tw *tabwriter.Writer, sbs []api.StackBackup) {
	fmt.Fprintln(tw, "ID\tSTACK\tREPO\tCREATED\tMEMBERS")
	for _, sb := range sbs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\n", sb.ID, sb.Stack, sb.Repo, sb.CreatedAt.Local().Format(time.DateTime), len(sb.Members))
	}
}

func stackRestoreCmd(g *globals) *cobra.Command {
	var req api.StackRestore
	cmd := &cobra.Command{
		Use:   "restore NAME [--from ID] [--repo R]",
		Short: "Bring a stack back from a stack backup: networks, members with their identities, then up",
		Long: `Restore a stack from one of its stack backups (the latest by default) in a
repository: on another host, add the repository first (lodge backup repo
add NAME PATH). The stack's networks are made, each member is restored with
its identity (UUID, MACs, hostname), and the stack is brought up in
dependency order. Neither the stack nor any of its members may exist here.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Stack = args[0]
			c := g.client()
			op, err := c.StackRestore(cmd.Context(), req)
			return g.stackResult(cmd, c, op, err)
		},
	}
	cmd.Flags().StringVar(&req.From, "from", "", "stack backup id (default: the latest)")
	cmd.Flags().StringVar(&req.Repo, "repo", "", "backup repository (default: default)")
	return cmd
}

// stackResult waits for a stack operation and prints the stack it
// leaves.
func (g *globals) stackResult(cmd *cobra.Command, c *client.Client, op api.Operation, err error) error {
	st, err := finish[api.StackStatus](cmd, c, op, err)
	if err != nil {
		return err
	}
	return g.emit(cmd.OutOrStdout(), st, func(tw *tabwriter.Writer) { stackTable(tw, st) })
}

func stackTable(tw *tabwriter.Writer, st api.StackStatus) {
	fmt.Fprintln(tw, "MEMBER\tVM\tSTATE\tHEALTH\tIPS\tSTARTED\tREADY")
	at := func(t *time.Time) string {
		if t == nil {
			return "-"
		}
		return t.Local().Format(time.TimeOnly)
	}
	for _, m := range st.Members {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, m.VM, m.State, m.Health, dash(strings.Join(m.IPs, ",")), at(m.StartedAt), at(m.ReadyAt))
	}
}
