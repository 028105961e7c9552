package main

import (
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/units"
)

func setCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "set VM KEY=VALUE...",
		Short: "Change a VM's memory (also while it runs), max_memory, min_memory, cpus or networks",
		Long: `Change a VM's settings:

  memory=SIZE      while it runs too: the balloon takes memory back and
                   gives it again, up to what the VM booted with, and
                   virtio-mem plugs more, up to max_memory; the command
                   returns once the guest has got there
  max_memory=SIZE  while it is stopped
  min_memory=SIZE  the floor the host's auto-balloon may take the VM down
                   to while the host is short of memory; 0 or off keeps
                   the VM out of it
  cpus=N           while it is stopped, or while it runs if it booted with
                   max_cpus above cpus: CPUs are plugged in (and brought
                   online through the guest agent) or taken out again
  max_cpus=N       while it is stopped
  project=NAME     moves the VM to another project, if it fits there
  networks=A,B     while it is stopped, and alone: one NIC per network, in
                   order; a NIC that stays on its network keeps its MAC
                   (and so its address), one on a new network gets a
                   fresh MAC

Sizes take 512M, 2G or 2GiB.`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := parseSettings(args[1:])
			if err != nil {
				return err
			}
			c := g.client()
			op, err := c.SetVM(cmd.Context(), args[0], req)
			return g.waitVM(cmd, c, op, err)
		},
	}
}

// parseSettings reads KEY=VALUE words into a SetVM.
func parseSettings(words []string) (api.SetVM, error) {
	var req api.SetVM
	for _, w := range words {
		key, val, ok := strings.Cut(w, "=")
		if !ok || val == "" {
			return req, usagef("set: %q: want KEY=VALUE", w)
		}
		var err error
		switch key {
		case "memory":
			req.Memory, err = units.ParseSize(val)
		case "max_memory", "max-memory":
			req.MaxMemory, err = units.ParseSize(val)
		case "min_memory", "min-memory":
			var n int64
			if val != "0" && val != "off" {
				n, err = units.ParseSize(val)
			}
			req.MinMemory = &n
		case "project":
			req.Project = val
		case "networks":
			for n := range strings.SplitSeq(val, ",") {
				if n == "" {
					return req, usagef("set: networks=%s: an empty network name", val)
				}
				req.Networks = append(req.Networks, n)
			}
		case "cpus":
			req.CPUs, err = strconv.Atoi(val)
			if err == nil && req.CPUs < 1 {
				return req, usagef("set: cpus=%s: must be at least 1", val)
			}
		case "max_cpus", "max-cpus":
			req.MaxCPUs, err = strconv.Atoi(val)
			if err == nil && req.MaxCPUs < 1 {
				return req, usagef("set: max_cpus=%s: must be at least 1", val)
			}
		default:
			return req, usagef("set: unknown setting %q (memory, max_memory, min_memory, cpus, max_cpus, project, networks)", key)
		}
		if err != nil {
			return req, usagef("set: %s: %v", w, err)
		}
	}
	return req, nil
}
