package main

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/units"
)

func snapshotCmd(g *globals) *cobra.Command {
	root := &cobra.Command{Use: "snapshot", Short: "Snapshots of a VM: disks, and memory while it runs"}
	var req api.CreateSnapshot
	create := &cobra.Command{
		Use:   "create VM SNAP",
		Short: "Take a snapshot; of a running VM it keeps memory too, with the guest paused for milliseconds",
		Long: `Take a snapshot of a VM. Of a running VM it captures the disks and the
memory and device state: the memory is written while the guest keeps
running, after a pause of a few milliseconds. --no-memory captures the
disks only, with the guest's filesystems frozen through its agent so that
they are consistent. Of a stopped VM it captures the disks.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Name = args[1]
			c := g.client()
			op, err := c.CreateSnapshot(cmd.Context(), args[0], req)
			s, err := finish[api.Snapshot](cmd, c, op, err)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), s, func(tw *tabwriter.Writer) {
				what := "disks"
				if s.Memory {
					what = fmt.Sprintf("disks and memory, guest paused %d ms", s.PauseMS)
				}
				fmt.Fprintf(tw, "Snapshot %s of %s taken (%s, %s)\n", s.Name, s.VM, what, units.FormatSize(s.Size))
			})
		},
	}
	create.Flags().BoolVar(&req.NoMemory, "no-memory", false, "capture the disks only (filesystems frozen through the agent)")
	create.Flags().StringVar(&req.Description, "description", "", "a note kept with the snapshot")

	list := &cobra.Command{
		Use:   "list VM",
		Short: "Show a VM's snapshot tree",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			snaps, err := g.client().ListSnapshots(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), snaps, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "NAME\tPARENT\tCREATED\tSIZE\tMEMORY\tCURRENT")
				for _, s := range snaps {
					cur, mem := "", "no"
					if s.Current {
						cur = "*"
					}
					if s.Memory {
						mem = "yes"
					}
					parent := s.Parent
					if parent == "" {
						parent = "-"
					}
					fmt.Fprintf(tw, "%s%s\t%s\t%s\t%s\t%s\t%s\n", strings.Repeat("  ", s.Depth), s.Name, parent,
						s.CreatedAt.Local().Format(time.DateTime), units.FormatSize(s.Size), mem, cur)
				}
			})
		},
	}

	var start bool
	revert := &cobra.Command{
		Use:   "revert VM SNAP",
		Short: "Return a VM to a snapshot: with memory it comes back running",
		Long: `Return a VM to a snapshot, dropping what changed since (other snapshots
are kept). A snapshot with memory comes back running, with the same
processes; one without comes back stopped, or booted with --start.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			op, err := c.RevertSnapshot(cmd.Context(), args[0], args[1], api.RevertSnapshot{Start: start})
			return g.waitVM(cmd, c, op, err)
		},
	}
	revert.Flags().BoolVar(&start, "start", false, "boot the VM after reverting to a snapshot without memory")

	del := &cobra.Command{
		Use:   "delete VM SNAP",
		Short: "Delete a snapshot and free its space; the VM may keep running",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			op, err := c.DeleteSnapshot(cmd.Context(), args[0], args[1])
			if err != nil {
				return err
			}
			if _, err := wait(cmd.Context(), c, op); err != nil {
				return err
			}
			if g.output == "table" {
				fmt.Fprintf(cmd.OutOrStdout(), "Deleted snapshot %s of %s\n", args[1], args[0])
			}
			return nil
		},
	}
	root.AddCommand(create, list, revert, del)
	return root
}
