package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
)

func netCmd(g *globals) *cobra.Command {
	n := &cobra.Command{Use: "net", Aliases: []string{"network"}, Short: "Private networks: VMs on one reach each other by name"}
	var req api.CreateNetwork
	create := &cobra.Command{
		Use: "create NAME", Short: "Make a network with DHCP and DNS for its VMs", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Name = args[0]
			nw, err := g.client().CreateNetwork(cmd.Context(), req)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), nw, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "%s\t%s\tgateway %s\tbridge %s\n", nw.Name, nw.Subnet, nw.Gateway, nw.Bridge)
			})
		},
	}
	f := create.Flags()
	f.StringVar(&req.Subnet, "subnet", "", "IPv4 subnet, e.g. 10.77.0.0/24 (default: a free /24 in 10.0.0.0/8)")
	f.BoolVar(&req.NAT, "nat", false, "route the network to the outside through the host")
	f.BoolVar(&req.Isolated, "isolated", false, "keep the guests from the host: they reach only each other")
	f.StringVar(&req.Mode, "mode", "", "bridge (root: a Linux bridge, dnsmasq, NAT possible) or user (any user: a switch in the daemon); default: bridge where possible")
	n.AddCommand(create,
		&cobra.Command{
			Use: "list", Aliases: []string{"ls"}, Short: "List networks", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				ns, err := g.client().ListNetworks(cmd.Context())
				if err != nil {
					return err
				}
				return g.emit(cmd.OutOrStdout(), ns, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tSUBNET\tMODE\tBRIDGE\tVMS")
					for _, nw := range ns {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\n", nw.Name, dash(nw.Subnet), networkMode(nw), dash(nw.Bridge), len(nw.Leases))
					}
				})
			},
		},
		&cobra.Command{
			Use: "show NAME", Short: "Show a network and its VMs' addresses and names", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				nw, err := g.client().GetNetwork(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				return g.emit(cmd.OutOrStdout(), nw, func(tw *tabwriter.Writer) {
					fmt.Fprintf(tw, "Name:\t%s\nSubnet:\t%s\nGateway:\t%s\nMode:\t%s\nBridge:\t%s\n", nw.Name, dash(nw.Subnet), dash(nw.Gateway), networkMode(nw), dash(nw.Bridge))
					for _, l := range nw.Leases {
						fmt.Fprintf(tw, "Lease:\t%s %s %s %v\n", l.VM, l.MAC, l.IP, l.Names)
					}
				})
			},
		},
		&cobra.Command{
			Use: "delete NAME", Short: "Remove a network no VM has a NIC on", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return g.client().DeleteNetwork(cmd.Context(), args[0])
			},
		},
	)
	return n
}

func networkMode(n api.Network) string {
	switch {
	case n.Builtin:
		return "QEMU NAT (per VM)"
	case n.NAT:
		return n.Mode + ", NAT"
	case n.Isolated:
		return n.Mode + ", isolated"
	}
	return n.Mode
}
