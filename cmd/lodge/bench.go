package main

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/units"
	"github.com/spf13/cobra"
)

func benchCmd(g *globals) *cobra.Command {
	var (
		req             api.BenchRequest
		buses, diskSize string
	)
	cmd := &cobra.Command{
		Use:   "bench VM",
		Short: "Measure what a running VM gets: CPU, memory and disk, as a percentage of the bare host",
		Long: `Run the same micro-benchmarks on the host and inside the VM, alternating,
and print the host's value, the guest's, and the guest as a percentage of
the host, with each side's spread over the repeats (± half the range).

The benchmark program, lodge-probe, is copied into the guest through its
agent and run there: the guest needs nothing installed. The disk tests run
with direct I/O on a scratch disk Lodge plugs in beside the VM's own disks
and removes afterwards; --disk-bus repeats them on each bus given. --with N
starts N more VMs like this one, keeps them busy, and deletes them after,
to show how neighbours interfere. --save keeps the report for
'lodge bench history VM'.`,
		Example: `  lodge bench web
  lodge bench web --disk-bus virtio,scsi,nvme --save
  lodge bench web --with 2 --repeats 5 -o json
  lodge bench history web`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if buses != "" {
				req.DiskBuses = strings.Split(buses, ",")
			}
			var err error
			if req.DiskSize, err = parseSizeFlag("disk-size", diskSize); err != nil {
				return err
			}
			c := g.client()
			op, err := c.Bench(cmd.Context(), args[0], req)
			rep, err := finish[api.BenchReport](cmd, c, op, err)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), rep, func(tw *tabwriter.Writer) { benchTable(tw, rep) })
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Duration, "duration", "", "how long each test runs in each repeat (default 1s)")
	f.IntVar(&req.Repeats, "repeats", 0, "repeats on each side, alternated (default 3)")
	f.IntVar(&req.With, "with", 0, "extra busy VMs to run alongside")
	f.StringVar(&buses, "disk-bus", "", "comma-separated buses to run the disk tests on: virtio, scsi, nvme (default virtio)")
	f.StringVar(&diskSize, "disk-size", "", "area the disk tests use (default 256M)")
	f.BoolVar(&req.Save, "save", false, "keep the report for bench history")
	cmd.AddCommand(benchHistoryCmd(g))
	return cmd
}

func benchTable(tw *tabwriter.Writer, rep api.BenchReport) {
	fmt.Fprintf(tw, "Benchmark of %s: %d vCPUs, %s, accelerator %s; %d repeats of %gs per test, %.0f s in all\n",
		rep.VM, rep.CPUs, units.FormatSize(rep.Memory), rep.Accel, rep.Repeats, rep.Duration, rep.Seconds)
	fmt.Fprintln(tw, "TEST\tBUS\tUNIT\tHOST\t±\tGUEST\t±\tGUEST/HOST")
	for _, r := range rep.Rows {
		bus := r.Bus
		if bus == "" {
			bus = "-"
		}
		pct := "-"
		if r.Percent > 0 {
			pct = fmt.Sprintf("%.1f%%", r.Percent)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Test, bus, r.Unit,
			figure(r.Host), spread(r.HostSpread, r.Repeats), figure(r.Guest), spread(r.GuestSpread, r.Repeats), pct)
	}
	if s := rep.Summary; s != nil {
		fmt.Fprintf(tw, "Guest/host (geometric mean): CPU %.1f%%, memory %.1f%%, disk %.1f%%\n", s.CPU, s.Memory, s.Disk)
	}
	for _, n := range rep.Notes {
		fmt.Fprintf(tw, "Note: %s\n", n)
	}
	if rep.Saved {
		fmt.Fprintf(tw, "Saved as %s\n", rep.ID)
	}
}

// spread prints a ± column; one repeat has none.
func spread(pct float64, repeats int) string {
	if repeats < 2 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", pct)
}

// figure prints a measurement with three significant digits or more.
func figure(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func benchHistoryCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "history VM",
		Short: "List a VM's saved benchmark reports, oldest first",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			reps, err := g.client().BenchHistory(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), reps, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "ID\tDATE\tACCEL\tVCPUS\tWITH\tBUSES\tCPU\tMEMORY\tDISK")
				for _, r := range reps {
					var s api.BenchSummary
					if r.Summary != nil {
						s = *r.Summary
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%.1f%%\t%.1f%%\t%.1f%%\n", r.ID, r.CreatedAt.Local().Format("2006-01-02 15:04"),
						r.Accel, r.CPUs, r.With, strings.Join(r.DiskBuses, ","), s.CPU, s.Memory, s.Disk)
				}
			})
		},
	}
}
