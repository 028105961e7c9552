package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/units"
)

func diskCmd(g *globals) *cobra.Command {
	root := &cobra.Command{Use: "disk", Short: "Add a data disk to a VM, or grow one of its disks"}
	add := &cobra.Command{
		Use:   "add VM SIZE",
		Short: "Give a VM a new empty data disk; a running VM gets it hot-plugged",
		Long: `Give a VM a new empty thin disk of SIZE (512M, 20G, 2GiB) after its other
disks: data1, data2, and so on, on its root disk's bus and in its pool. A
running VM gets it at once on virtio, SCSI and NVMe; on IDE, stop it first.
A VM with snapshots is refused: delete them first.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			size, err := units.ParseSize(args[1])
			if err != nil {
				return usagef("size: %v", err)
			}
			c := g.client()
			op, err := c.AddDisk(cmd.Context(), args[0], size)
			v, err := finish[api.VM](cmd, c, op, err)
			if err != nil {
				return err
			}
			d := v.Disks[len(v.Disks)-1]
			return g.emit(cmd.OutOrStdout(), v, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "Disk %s of %s added (%s %s, %s)\n", d.Name, v.Name, d.Bus, units.FormatSize(d.Size), d.Path)
			})
		},
	}
	resize := &cobra.Command{
		Use:   "resize VM DISK SIZE",
		Short: "Grow a VM's disk (root, data1, ...); a running guest sees it at once",
		Long: `Grow disk DISK of a VM to SIZE. A running guest sees the new size at once;
its partitions and filesystems are its own to grow. A disk never shrinks:
that would cut off the guest's data. A VM with snapshots is refused.`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			size, err := units.ParseSize(args[2])
			if err != nil {
				return usagef("size: %v", err)
			}
			c := g.client()
			op, err := c.ResizeDisk(cmd.Context(), args[0], args[1], size)
			v, err := finish[api.VM](cmd, c, op, err)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), v, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "Disk %s of %s is %s\n", args[1], v.Name, units.FormatSize(size))
			})
		},
	}
	root.AddCommand(add, resize)
	return root
}
