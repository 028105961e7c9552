package main

import (
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/units"
)

const projectKeys = `  memory=SIZE   the sum of the memory settings of its VMs
  cpus=N        the sum of their CPUs
  disk=SIZE     the sum of the sizes of their disks
  vms=N         how many VMs it holds
  description=TEXT

A limit of 0 or none lifts it.`

func projectCmd(g *globals) *cobra.Command {
	p := &cobra.Command{Use: "project", Short: "Projects: groups of VMs with quotas on memory, CPUs, disk and count"}
	p.AddCommand(
		&cobra.Command{
			Use: "create NAME [KEY=VALUE...]", Short: "Add a project, with its limits", Args: cobra.MinimumNArgs(1),
			Long: "Add a project. Limits:\n\n" + projectKeys,
			RunE: func(cmd *cobra.Command, args []string) error {
				set, err := parseProjectSettings(args[1:])
				if err != nil {
					return err
				}
				req := api.Project{Name: args[0]}
				set.ApplyTo(&req)
				out, err := g.client().CreateProject(cmd.Context(), req)
				if err != nil {
					return err
				}
				return g.emitProject(cmd, out)
			},
		},
		&cobra.Command{
			Use: "set NAME KEY=VALUE...", Short: "Change a project's limits", Args: cobra.MinimumNArgs(2),
			Long: "Change a project's limits. A limit below what the project uses now stops\ngrowth and takes nothing away.\n\n" + projectKeys,
			RunE: func(cmd *cobra.Command, args []string) error {
				set, err := parseProjectSettings(args[1:])
				if err != nil {
					return err
				}
				out, err := g.client().SetProject(cmd.Context(), args[0], set)
				if err != nil {
					return err
				}
				return g.emitProject(cmd, out)
			},
		},
		&cobra.Command{
			Use: "list", Aliases: []string{"ls"}, Short: "List projects with their usage and limits", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				ps, err := g.client().ListProjects(cmd.Context())
				if err != nil {
					return err
				}
				return g.emit(cmd.OutOrStdout(), ps, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tVMS\tMEMORY\tCPUS\tDISK")
					for _, p := range ps {
						u, l := p.Usage, p.Limits
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", p.Name, ofCount(u.VMs, l.VMs), ofSize(u.Memory, l.Memory), ofCount(u.CPUs, l.CPUs), ofSize(u.Disk, l.Disk))
					}
				})
			},
		},
		&cobra.Command{
			Use: "show NAME", Short: "Show a project's usage and limits", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				out, err := g.client().Project(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				return g.emitProject(cmd, out)
			},
		},
		&cobra.Command{
			Use: "delete NAME", Short: "Remove a project that holds no VMs", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return g.client().DeleteProject(cmd.Context(), args[0])
			},
		},
	)
	return p
}

func (g *globals) emitProject(cmd *cobra.Command, p api.Project) error {
	return g.emit(cmd.OutOrStdout(), p, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "Name:\t%s\n", p.Name)
		if p.Description != "" {
			fmt.Fprintf(tw, "Description:\t%s\n", p.Description)
		}
		u, l := p.Usage, p.Limits
		fmt.Fprintf(tw, "VMs:\t%s\nMemory:\t%s\nCPUs:\t%s\nDisk:\t%s\n", ofCount(u.VMs, l.VMs), ofSize(u.Memory, l.Memory), ofCount(u.CPUs, l.CPUs), ofSize(u.Disk, l.Disk))
	})
}

func ofSize(used, limit int64) string {
	if limit == 0 {
		return units.FormatSize(used) + " (no limit)"
	}
	return units.FormatSize(used) + " of " + units.FormatSize(limit)
}

func ofCount(used, limit int64) string {
	if limit == 0 {
		return strconv.FormatInt(used, 10) + " (no limit)"
	}
	return strconv.FormatInt(used, 10) + " of " + strconv.FormatInt(limit, 10)
}

// parseProjectSettings reads KEY=VALUE words into a SetProject.
func parseProjectSettings(words []string) (api.SetProject, error) {
	var req api.SetProject
	for _, w := range words {
		key, val, ok := strings.Cut(w, "=")
		if !ok || val == "" {
			return req, usagef("project: %q: want KEY=VALUE", w)
		}
		if key == "description" {
			req.Description = &val
			continue
		}
		var n int64
		var err error
		if val != "0" && val != "none" {
			switch key {
			case "memory", "disk":
				n, err = units.ParseSize(val)
			case "cpus", "vms":
				n, err = strconv.ParseInt(val, 10, 64)
				if err == nil && n < 0 {
					return req, usagef("project: %s: must not be negative", w)
				}
			}
		}
		if err != nil {
			return req, usagef("project: %s: %v", w, err)
		}
		switch key {
		case "memory":
			req.Memory = &n
		case "disk":
			req.Disk = &n
		case "cpus":
			req.CPUs = &n
		case "vms":
			req.VMs = &n
		default:
			return req, usagef("project: unknown setting %q (memory, cpus, disk, vms, description)", key)
		}
	}
	return req, nil
}
