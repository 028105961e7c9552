package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/client"
	"github.com/lodge-vm/lodge/internal/units"
)

func createCmd(g *globals) *cobra.Command {
	var (
		image, memory, maxMemory, minMemory, disk, bus, pool, cloudInit, proj string
		networks                                                              []string
		cpus, maxCPUs                                                         int
		start                                                                 bool
		dataDisks                                                             []string
	)
	cmd := &cobra.Command{
		Use:   "create NAME --image IMG",
		Short: "Create a VM from an image (a thin overlay: nothing is copied)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := api.CreateVM{Name: args[0], Image: image, CPUs: cpus, MaxCPUs: maxCPUs, DiskBus: bus, Pool: pool, Networks: networks, Start: start, Project: proj}
			if cmd.Flags().Changed("cpus") && cpus < 1 {
				return usagef("--cpus %d: must be at least 1", cpus)
			}
			var err error
			if req.Memory, err = parseSizeFlag("memory", memory); err != nil {
				return err
			}
			if req.MaxMemory, err = parseSizeFlag("max-memory", maxMemory); err != nil {
				return err
			}
			if req.MinMemory, err = parseSizeFlag("min-memory", minMemory); err != nil {
				return err
			}
			if req.DiskSize, err = parseSizeFlag("disk", disk); err != nil {
				return err
			}
			for _, d := range dataDisks {
				size, err := parseSizeFlag("data-disk", d)
				if err != nil {
					return err
				}
				req.DataDisks = append(req.DataDisks, size)
			}
			if cloudInit != "" {
				raw, err := os.ReadFile(cloudInit)
				if err != nil {
					return usagef("--cloud-init: %v", err)
				}
				req.CloudInit = string(raw)
			}
			c := g.client()
			op, err := c.CreateVM(cmd.Context(), req)
			return g.waitVM(cmd, c, op, err)
		},
	}
	f := cmd.Flags()
	f.StringVar(&image, "image", "", "image to create the VM from")
	f.StringVar(&proj, "project", "", "project the VM counts against (default \"default\")")
	f.IntVar(&cpus, "cpus", 0, "virtual CPUs (default 1)")
	f.IntVar(&maxCPUs, "max-cpus", 0, "CPU ceiling for plugging CPUs in while running (default: --cpus, none)")
	f.StringVar(&memory, "memory", "", "memory, e.g. 512M or 2G (default 512M)")
	f.StringVar(&maxMemory, "max-memory", "", "memory ceiling for growth while running, by hot-plug (default: --memory)")
	f.StringVar(&minMemory, "min-memory", "", "floor the host's auto-balloon may take the VM down to (default: none, the VM keeps its memory)")
	f.StringVar(&disk, "disk", "", "root disk size (default 8G or the image's size)")
	f.StringArrayVar(&dataDisks, "data-disk", nil, "add an empty disk of this size after the root disk (data1, data2, ...); repeat for more")
	f.StringVar(&bus, "disk-bus", "virtio", "disk bus: virtio, scsi, ide or nvme")
	f.StringVar(&pool, "pool", "default", "storage pool for the disk")
	f.StringSliceVar(&networks, "net", nil, "network to put a NIC on; repeat for more NICs, in order (default nat)")
	f.StringVar(&cloudInit, "cloud-init", "", "cloud-init user-data file")
	f.BoolVar(&start, "start", false, "start the VM once created")
	return cmd
}

// waitVM follows an operation that ends with a VM and prints the VM.
func (g *globals) waitVM(cmd *cobra.Command, c *client.Client, op api.Operation, err error) error {
	v, err := finish[api.VM](cmd, c, op, err)
	if err != nil {
		return err
	}
	return g.emitVM(cmd, v)
}

func cloneCmd(g *globals) *cobra.Command {
	var req api.CloneVM
	cmd := &cobra.Command{
		Use:   "clone SRC DST",
		Short: "Copy a VM, stopped or running: a linked clone by default, with a new identity",
		Long: `Copy a VM. A linked clone is a thin overlay on a frozen layer of SRC's
disk: it takes the same few milliseconds whatever the disk's size. --full
makes an independent, sparse copy. SRC may be running: its filesystems are
frozen through the guest agent for the moment its disk is switched.

The clone gets a new identity: SMBIOS UUID, MACs, vsock CID, and a new
cloud-init instance-id, so the guest makes a new machine-id and SSH host
keys and takes DST as its hostname. --keep-identity copies all of these
instead, as when moving a VM; such copies are refused to run at the same
time as SRC.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Name = args[1]
			c := g.client()
			op, err := c.CloneVM(cmd.Context(), args[0], req)
			return g.waitVM(cmd, c, op, err)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&req.Full, "full", false, "make an independent copy instead of a linked clone")
	f.BoolVar(&req.KeepIdentity, "keep-identity", false, "keep SRC's UUID, MACs, CID, hostname and instance-id")
	f.StringVar(&req.Project, "project", "", "the clone's project (default: SRC's)")
	f.StringVar(&req.Pool, "pool", "", "storage pool for the clone's disks (default: SRC's)")
	f.BoolVar(&req.Start, "start", false, "start the clone once made")
	return cmd
}

func lifecycleCmd(g *globals, verb string) *cobra.Command {
	var (
		force   bool
		timeout time.Duration
	)
	short := map[string]string{
		"start":   "Boot a VM",
		"stop":    "Power a VM off: ACPI first, forced after --timeout",
		"restart": "Stop and start a VM",
		"pause":   "Freeze a VM's CPUs",
		"resume":  "Continue a paused VM",
	}[verb]
	cmd := &cobra.Command{
		Use:   verb + " NAME...",
		Short: short,
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if timeout < 0 {
				return usagef("--timeout %s: must not be negative", timeout)
			}
			c := g.client()
			ctx := cmd.Context()
			stopReq := api.StopVM{Force: force, TimeoutSeconds: int(timeout.Round(time.Second) / time.Second)}
			var vms []api.VM
			for _, name := range args {
				var v api.VM
				var op api.Operation
				var err error
				switch verb {
				case "pause":
					v, err = c.PauseVM(ctx, name)
				case "resume":
					v, err = c.ResumeVM(ctx, name)
				case "start":
					op, err = c.StartVM(ctx, name)
				case "stop":
					op, err = c.StopVM(ctx, name, stopReq)
				case "restart":
					op, err = c.RestartVM(ctx, name, stopReq)
				}
				if err == nil && op.ID != "" {
					if op, err = wait(ctx, c, op); err == nil {
						err = client.Result(op, &v)
					}
				}
				if err != nil {
					return err
				}
				vms = append(vms, v)
			}
			return g.emit(cmd.OutOrStdout(), vms, func(tw *tabwriter.Writer) {
				for _, v := range vms {
					fmt.Fprintf(tw, "%s\t%s\n", v.Name, v.State)
				}
			})
		},
	}
	if verb == "stop" || verb == "restart" {
		cmd.Flags().DurationVar(&timeout, "timeout", 0, "how long to wait for the guest to power off before forcing (default 60s)")
	}
	if verb == "stop" {
		cmd.Flags().BoolVar(&force, "force", false, "pull the plug at once")
	}
	return cmd
}

func deleteCmd(g *globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "delete NAME...",
		Short: "Delete VMs with their disks",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			for _, name := range args {
				op, err := c.DeleteVM(cmd.Context(), name, force)
				if err != nil {
					return err
				}
				if _, err := wait(cmd.Context(), c, op); err != nil {
					return err
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "stop a running VM first")
	return cmd
}

func listCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List VMs",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			vms, err := g.client().ListVMs(cmd.Context())
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), vms, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "NAME\tSTATE\tIMAGE\tCPUS\tMEMORY\tIP\tAGENT")
				for _, v := range vms {
					ip := "-"
					if len(v.NICs) > 0 && v.NICs[0].IP != "" {
						ip = v.NICs[0].IP
					}
					agent := "-"
					if v.Agent {
						agent = "up"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", v.Name, v.State, v.Image, v.CPUs, units.FormatSize(v.Memory), ip, agent)
				}
			})
		},
	}
}

func showCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show one VM",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := g.client().GetVM(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return g.emitVM(cmd, v)
		},
	}
}

func (g *globals) emitVM(cmd *cobra.Command, v api.VM) error {
	return g.emit(cmd.OutOrStdout(), v, func(tw *tabwriter.Writer) {
		state := v.State
		if v.StateReason != "" {
			state += " (" + v.StateReason + ")"
		}
		mem := units.FormatSize(v.Memory) + " (max " + units.FormatSize(v.MaxMemory)
		if v.MemoryActual > 0 {
			mem += ", guest has " + units.FormatSize(v.MemoryActual)
		}
		if v.MemoryPlugged > 0 {
			mem += ", " + units.FormatSize(v.MemoryPlugged) + " of it hot-plugged"
		}
		if v.MinMemory > 0 {
			mem += ", min " + units.FormatSize(v.MinMemory)
		}
		if v.Ballooned > 0 {
			mem += ", held at " + units.FormatSize(v.Ballooned) + " by the auto-balloon"
		}
		if v.MemoryUsed > 0 {
			mem += ", uses " + units.FormatSize(v.MemoryUsed)
		}
		cpus := strconv.Itoa(v.CPUs)
		if v.MaxCPUs > v.CPUs {
			cpus += " (max " + strconv.Itoa(v.MaxCPUs) + ")"
		}
		fmt.Fprintf(tw, "Name:\t%s\nProject:\t%s\nState:\t%s\nUUID:\t%s\nImage:\t%s\nCPUs:\t%s\nMemory:\t%s)\nHostname:\t%s\n",
			v.Name, v.Project, state, v.UUID, v.Image, cpus, mem, v.Hostname)
		agent := "not connected"
		if v.Agent {
			agent = "connected"
		}
		fmt.Fprintf(tw, "Agent:\t%s\nvsock CID:\t%d\n", agent, v.CID)
		if v.StartedAt != nil {
			fmt.Fprintf(tw, "Started:\t%s (pid %d)\n", v.StartedAt.Local().Format(time.DateTime), v.PID)
		}
		fmt.Fprintf(tw, "Created:\t%s\n", v.CreatedAt.Local().Format(time.DateTime))
		for _, n := range v.NICs {
			fmt.Fprintf(tw, "NIC:\t%s %s %s\n", n.Network, n.MAC, n.IP)
		}
		for _, d := range v.Disks {
			on := "standalone"
			if d.Backing != "" {
				on = "on " + d.Backing
			}
			fmt.Fprintf(tw, "Disk %s:\t%s %s %s (%s)\n", d.Name, d.Bus, units.FormatSize(d.Size), d.Path, on)
		}
		if v.ClonedFrom != "" {
			fmt.Fprintf(tw, "Cloned from:\t%s\n", v.ClonedFrom)
		}
		if len(v.Snapshots) > 0 {
			fmt.Fprintf(tw, "Snapshots:\t%s (current: %s)\n", strings.Join(v.Snapshots, ", "), v.CurrentSnapshot)
		}
	})
}

func execCmd(g *globals) *cobra.Command {
	var (
		waitFor time.Duration
		timeout time.Duration
		env     []string
	)
	cmd := &cobra.Command{
		Use:   "exec NAME -- CMD [ARG...]",
		Short: "Run a command in the guest through its agent",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 1 {
				return usagef("exec: put -- between the VM name and the command")
			}
			req := api.ExecRequest{Command: args[1:], Env: env, WaitSeconds: int(waitFor / time.Second), TimeoutSeconds: int(timeout / time.Second)}
			if !isTTY(os.Stdin) {
				// Piped input goes to the guest command.
				raw, err := readAllLimited(os.Stdin, 16<<20)
				if err != nil {
					return err
				}
				req.Stdin = raw
			}
			res, err := g.client().Exec(cmd.Context(), args[0], req)
			if err != nil {
				return err
			}
			if g.output != "table" {
				return g.emit(cmd.OutOrStdout(), res, nil)
			}
			_, _ = os.Stdout.Write(res.Stdout)
			_, _ = os.Stderr.Write(res.Stderr)
			// A command killed by a signal exits 128+N, as in a shell.
			if res.Signal != 0 {
				return exitError{code: 128 + res.Signal}
			}
			if res.ExitCode != 0 {
				return exitError{code: res.ExitCode}
			}
			return nil
		},
	}
	cmd.Flags().DurationVar(&waitFor, "wait", 30*time.Second, "how long to wait for the guest agent to come up")
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "give up on the command after this long")
	cmd.Flags().StringArrayVarP(&env, "env", "e", nil, "environment variable KEY=VALUE for the command")
	return cmd
}

func readAllLimited(f *os.File, limit int64) ([]byte, error) {
	var sb strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := f.Read(buf)
		sb.Write(buf[:n])
		if int64(sb.Len()) > limit {
			return nil, usagef("exec: standard input is over %s", units.FormatSize(limit))
		}
		if errors.Is(err, io.EOF) {
			return []byte(sb.String()), nil
		}
		if err != nil {
			return nil, fmt.Errorf("exec: read standard input: %w", err)
		}
	}
}
