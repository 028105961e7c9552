package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/client"
	"github.com/lodge-vm/lodge/internal/units"
)

func hostCmd(g *globals) *cobra.Command {
	host := &cobra.Command{Use: "host", Short: "This host's resources and accelerator"}
	host.AddCommand(&cobra.Command{
		Use:   "token",
		Short: "Print the access token other daemons use to send VMs here (needs --listen)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			t, err := g.client().HostToken(cmd.Context())
			if err != nil {
				return err
			}
			if g.output != "table" {
				return g.emit(os.Stdout, t, nil)
			}
			fmt.Printf("address: https://%s\ntoken:   %s\n", t.Listen, t.Token)
			return nil
		},
	}, &cobra.Command{
		Use:   "info",
		Short: "Accelerator (kvm or tcg) and why, CPUs, memory and pools",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			h, err := g.client().Host(cmd.Context())
			if err != nil {
				return err
			}
			return g.emitHost(cmd, h)
		},
	}, &cobra.Command{
		Use:   "set KEY=VALUE...",
		Short: "Set the host's limits: memory_limit, overcommit, auto_balloon",
		Long: `Set the host's limits; they are kept across restarts and win over the
config file.

  memory_limit=SIZE             the total memory VMs may be given
                                (default: host RAM less memory_reserve)
  overcommit=RATIO              how far past memory_limit VMs may be
                                given memory (default 1.0: never)
  auto_balloon=on|off           take memory back from idle VMs, down to
                                their min_memory, while the host is short
                                of it (default off)
  auto_balloon_threshold=SIZE   the available host memory below which it
                                does (default: a tenth of the host's RAM)`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var req api.SetHost
			for _, w := range args {
				key, val, ok := strings.Cut(w, "=")
				if !ok || val == "" {
					return usagef("host set: %q: want KEY=VALUE", w)
				}
				var err error
				switch key {
				case "memory_limit", "memory-limit":
					req.MemoryLimit, err = units.ParseSize(val)
				case "overcommit":
					req.Overcommit, err = strconv.ParseFloat(val, 64)
				case "auto_balloon", "auto-balloon":
					on, ok := onOff[val]
					if !ok {
						return usagef("host set: %s: want on or off", w)
					}
					req.AutoBalloon = &on
				case "auto_balloon_threshold", "auto-balloon-threshold":
					req.AutoBalloonThreshold, err = units.ParseSize(val)
				default:
					return usagef("host set: unknown setting %q (memory_limit, overcommit, auto_balloon, auto_balloon_threshold)", key)
				}
				if err != nil {
					return usagef("host set: %s: %v", w, err)
				}
			}
			h, err := g.client().SetHost(cmd.Context(), req)
			if err != nil {
				return err
			}
			return g.emitHost(cmd, h)
		},
	})
	return host
}

var onOff = map[string]bool{"on": true, "true": true, "yes": true, "off": false, "false": false, "no": false}

func (g *globals) emitHost(cmd *cobra.Command, h api.HostInfo) error {
	return g.emit(cmd.OutOrStdout(), h, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "Accelerator:\t%s (%s)\n", h.Accel, h.AccelReason)
		fmt.Fprintf(tw, "QEMU:\t%s\nCPUs:\t%d\n", h.QEMUVersion, h.CPUs)
		fmt.Fprintf(tw, "Memory:\t%s total, %s limit (overcommit %.1f), %s allocated (%s per VM for QEMU itself), %s free\n",
			units.FormatSize(h.MemoryTotal), units.FormatSize(h.MemoryLimit), h.Overcommit,
			units.FormatSize(h.MemoryAllocated), units.FormatSize(h.VMOverhead), units.FormatSize(h.MemoryFree))
		auto := "off"
		if h.AutoBalloon {
			auto = "on, below " + units.FormatSize(h.AutoBalloonThreshold) + " available"
		}
		fmt.Fprintf(tw, "Available:\t%s (auto-balloon %s)\n", units.FormatSize(h.MemoryAvailable), auto)
		fmt.Fprintf(tw, "VMs:\t%d (%d running)\nHome:\t%s\n", h.VMs, h.Running, h.Home)
		for _, p := range h.Pools {
			fmt.Fprintf(tw, "Pool %s:\t%s (%s free of %s)\n", p.Name, p.Path, sizeOrDash(p.Free), sizeOrDash(p.Total))
		}
	})
}

// waitImage follows an operation that ends with an image and prints it.
func (g *globals) waitImage(cmd *cobra.Command, c *client.Client, op api.Operation, err error, verb string) error {
	out, err := finish[api.Image](cmd, c, op, err)
	if err != nil {
		return err
	}
	return g.emit(cmd.OutOrStdout(), out, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "%s %s (%s virtual, %s on disk; chain %s)\n", verb, out.Name, units.FormatSize(out.VirtualSize), units.FormatSize(out.ActualSize), strings.Join(out.Chain, " → "))
	})
}

func publishCmd(g *globals) *cobra.Command {
	var req api.PublishImage
	cmd := &cobra.Command{
		Use:   "publish VM --name N [--generalize]",
		Short: "Make a stopped VM's disk a new image, layered on the VM's own image",
		Long: `Make a stopped VM's disk a new read-only image. Only what differs from
the VM's image is stored, so images build chains: base OS, then a database
on top, then tools on top of that. --generalize boots the new image once on
its own and clears the guest's identity inside it (machine-id, SSH host
keys, hostname, DHCP leases, cloud-init state; sysprep /generalize on
Windows), so every VM made from it starts as a new machine.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if req.Name == "" {
				return usagef("image publish: --name is required")
			}
			req.VM = args[0]
			c := g.client()
			op, err := c.PublishImage(cmd.Context(), req)
			return g.waitImage(cmd, c, op, err, "Published")
		},
	}
	cmd.Flags().StringVar(&req.Name, "name", "", "name of the new image")
	cmd.Flags().BoolVar(&req.Generalize, "generalize", false, "clear the guest's identity inside the image")
	return cmd
}

func imageCmd(g *globals) *cobra.Command {
	img := &cobra.Command{Use: "image", Short: "The image library"}
	var name string
	imp := &cobra.Command{
		Use:   "import FILE --name N",
		Short: "Import a disk file (qcow2, raw, vhd, vhdx, vmdk, ova/ovf; detected) as a read-only image",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if name == "" {
				return usagef("image import: --name is required")
			}
			path, err := filepath.Abs(args[0])
			if err != nil {
				return err
			}
			if _, err := os.Stat(path); err != nil {
				return fmt.Errorf("image import %q: %w", name, err)
			}
			c := g.client()
			op, err := c.ImportImage(cmd.Context(), name, path)
			return g.waitImage(cmd, c, op, err, "Imported")
		},
	}
	imp.Flags().StringVar(&name, "name", "", "name of the new image")
	img.AddCommand(imp,
		&cobra.Command{
			Use: "list", Aliases: []string{"ls"}, Short: "List images", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				imgs, err := g.client().ListImages(cmd.Context())
				if err != nil {
					return err
				}
				return g.emit(cmd.OutOrStdout(), imgs, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tSIZE\tON DISK\tPARENT\tUSED BY\tCREATED")
					for _, i := range imgs {
						parent := i.Parent
						if parent == "" {
							parent = "-"
						}
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", i.Name, units.FormatSize(i.VirtualSize), units.FormatSize(i.ActualSize), parent, len(i.UsedBy), i.CreatedAt.Local().Format(time.DateTime))
					}
				})
			},
		},
		&cobra.Command{
			Use: "show NAME", Short: "Show one image", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				i, err := g.client().GetImage(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				return g.emit(cmd.OutOrStdout(), i, func(tw *tabwriter.Writer) {
					origin := "imported from " + i.SourceFormat
					if i.PublishedFrom != "" {
						origin = "published from vm " + i.PublishedFrom
					}
					if i.Generalized {
						origin += ", generalized"
					}
					fmt.Fprintf(tw, "Name:\t%s\nPath:\t%s\nSize:\t%s virtual, %s on disk\nOrigin:\t%s\nChain:\t%s\nChildren:\t%s\nUsed by:\t%s\n",
						i.Name, i.Path, units.FormatSize(i.VirtualSize), units.FormatSize(i.ActualSize), origin,
						strings.Join(i.Chain, " → "), orDash(i.Children), orDash(i.UsedBy))
				})
			},
		},
		&cobra.Command{
			Use: "delete NAME", Short: "Delete an image no VM and no other image depends on", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return g.client().DeleteImage(cmd.Context(), args[0])
			},
		},
		&cobra.Command{
			Use: "flatten NAME", Short: "Copy an image's parents into it, so it stands alone", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c := g.client()
				op, err := c.FlattenImage(cmd.Context(), args[0])
				return g.waitImage(cmd, c, op, err, "Flattened")
			},
		},
		publishCmd(g),
	)
	return img
}

func orDash(s []string) string {
	if len(s) == 0 {
		return "-"
	}
	return strings.Join(s, ", ")
}

func poolCmd(g *globals) *cobra.Command {
	p := &cobra.Command{Use: "pool", Short: "Storage pools: directories that hold VM disks"}
	p.AddCommand(
		&cobra.Command{
			Use: "create NAME PATH", Short: "Register a directory (on any drive) as a pool", Args: cobra.ExactArgs(2),
			RunE: func(cmd *cobra.Command, args []string) error {
				path, err := filepath.Abs(args[1])
				if err != nil {
					return err
				}
				_, err = g.client().CreatePool(cmd.Context(), args[0], path)
				return err
			},
		},
		&cobra.Command{
			Use: "list", Aliases: []string{"ls"}, Short: "List pools", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				pools, err := g.client().ListPools(cmd.Context())
				if err != nil {
					return err
				}
				return g.emit(cmd.OutOrStdout(), pools, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tPATH\tFREE\tTOTAL")
					for _, p := range pools {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Name, p.Path, sizeOrDash(p.Free), sizeOrDash(p.Total))
					}
				})
			},
		},
		&cobra.Command{
			Use: "delete NAME", Short: "Unregister a pool no VM uses (its files stay)", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return g.client().DeletePool(cmd.Context(), args[0])
			},
		},
	)
	return p
}

func eventsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "events", Short: "Stream lifecycle and operation events", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			enc := json.NewEncoder(os.Stdout)
			err := g.client().Events(cmd.Context(), func(ev api.Event) {
				if g.output == "json" {
					_ = enc.Encode(ev)
					return
				}
				fmt.Printf("%s %-10s %-12s %s %s\n", ev.Time.Local().Format("15:04:05.000"), ev.Kind, ev.Target, ev.State, ev.Message)
			})
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		},
	}
}

func operationCmd(g *globals) *cobra.Command {
	o := &cobra.Command{Use: "operation", Aliases: []string{"op"}, Short: "Long jobs: list and cancel"}
	o.AddCommand(
		&cobra.Command{
			Use: "list", Short: "List running and recent operations", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				ops, err := g.client().Operations(cmd.Context())
				if err != nil {
					return err
				}
				return g.emit(cmd.OutOrStdout(), ops, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "ID\tKIND\tTARGET\tSTATE\tERROR")
					for _, op := range ops {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", op.ID, op.Kind, op.Target, op.State, op.Error)
					}
				})
			},
		},
		&cobra.Command{
			Use: "cancel ID", Short: "Cancel a running operation", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return g.client().CancelOperation(cmd.Context(), args[0])
			},
		},
	)
	return o
}
