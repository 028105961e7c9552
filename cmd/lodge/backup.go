package main

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/units"
)

func backupCmd(g *globals) *cobra.Command {
	root := &cobra.Command{Use: "backup", Short: "Live backups: full and incremental, deduplicated, verified, restorable"}
	root.AddCommand(backupRepoCmd(g), backupCreateCmd(g), backupListCmd(g), backupShowCmd(g), backupVerifyCmd(g),
		backupRestoreCmd(g), backupFilesCmd(g), backupCatCmd(g), backupDeleteCmd(g), backupPruneCmd(g), backupGCCmd(g), backupSyncCmd(g), backupScheduleCmd(g))
	return root
}

func backupRepoCmd(g *globals) *cobra.Command {
	root := &cobra.Command{Use: "repo", Short: "Backup repositories: directories of deduplicated chunks"}
	var mirror string
	add := &cobra.Command{
		Use:   "add NAME PATH",
		Short: "Register a directory (on another drive or a mounted remote disk) as a repository",
		Long: `Register a directory as a backup repository. An empty or missing
directory becomes a new repository; one that already holds a repository
(written by another host, say) is used as it is, and its backups can be
restored here. --mirror-of R copies every new backup made to R here too.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			path, err := filepath.Abs(args[1])
			if err != nil {
				return err
			}
			r, err := g.client().AddBackupRepo(cmd.Context(), api.CreateBackupRepo{Name: args[0], Path: path, MirrorOf: mirror})
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), r, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "Repository %s at %s: %d backups\n", r.Name, r.Path, r.Backups)
			})
		},
	}
	add.Flags().StringVar(&mirror, "mirror-of", "", "copy each new backup of this repository here")
	list := &cobra.Command{
		Use:   "list",
		Short: "List repositories",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rs, err := g.client().BackupRepos(cmd.Context())
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), rs, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "NAME\tPATH\tBACKUPS\tSIZE\tMIRROR OF")
				for _, r := range rs {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", r.Name, r.Path, r.Backups, units.FormatSize(r.Size), dash(r.MirrorOf))
				}
			})
		},
	}
	remove := &cobra.Command{
		Use:   "remove NAME",
		Short: "Forget a repository (its files stay)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client().RemoveBackupRepo(cmd.Context(), args[0])
		},
	}
	root.AddCommand(add, list, remove)
	return root
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func backupCreateCmd(g *globals) *cobra.Command {
	var req api.CreateBackup
	cmd := &cobra.Command{
		Use:   "create VM",
		Short: "Back a VM up, running or stopped: incremental after the first",
		Long: `Back a VM up into a repository (--repo, "default" if not given). A
running VM keeps running: its filesystems are frozen through the agent
for the instant the point is taken, then QEMU keeps a copy of each block
the guest overwrites until the backup has read it. The first backup of a
VM in a repository is full; later ones read only the blocks written since
the last one. Every backup can be restored alone.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			op, err := c.CreateBackup(cmd.Context(), args[0], req)
			b, err := finish[api.Backup](cmd, c, op, err)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), b, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "Backup %s of %s in %s: %s, read %s, stored %s new, %.1f s%s\n", b.ID, b.VM, b.Repo, b.Kind,
					units.FormatSize(b.Read), units.FormatSize(b.NewData), b.Duration, yielded(b))
				if b.Reason != "" {
					fmt.Fprintf(tw, "%s %s\n", wholeBecause(b), b.Reason)
				}
			})
		},
	}
	cmd.Flags().StringVar(&req.Repo, "repo", "", "repository (default: default)")
	return cmd
}

func backupListCmd(g *globals) *cobra.Command {
	var repo string
	cmd := &cobra.Command{
		Use:   "list [VM]",
		Short: "List backups, of one VM or all",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var name string
			if len(args) == 1 {
				name = args[0]
			}
			bs, err := g.client().Backups(cmd.Context(), name, repo)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), bs, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "ID\tVM\tREPO\tCREATED\tKIND\tSIZE\tNEW DATA")
				for _, b := range bs {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", b.ID, b.VM, b.Repo, b.CreatedAt.Local().Format(time.DateTime),
						b.Kind, units.FormatSize(b.Size), units.FormatSize(b.NewData))
				}
			})
		},
	}
	cmd.Flags().StringVar(&repo, "repo", "", "only this repository")
	return cmd
}

func backupShowCmd(g *globals) *cobra.Command {
	var repo string
	cmd := &cobra.Command{
		Use:   "show ID",
		Short: "Show one backup: size, new data, duration, chain",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := g.client().Backup(cmd.Context(), args[0], repo)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), b, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "ID:\t%s\nVM:\t%s (%s)\nRepository:\t%s\nCreated:\t%s\nKind:\t%s\n", b.ID, b.VM, b.VMUUID, b.Repo,
					b.CreatedAt.Local().Format(time.DateTime), b.Kind)
				if b.Reason != "" {
					fmt.Fprintf(tw, "%s:\t%s\n", wholeBecause(b), b.Reason)
				}
				fmt.Fprintf(tw, "Consistency:\t%s\nSize:\t%s\nNew data:\t%s\nRead:\t%s\nDuration:\t%.1f s%s\n", b.Consistency,
					units.FormatSize(b.Size), units.FormatSize(b.NewData), units.FormatSize(b.Read), b.Duration, yielded(b))
				for _, d := range b.Disks {
					fmt.Fprintf(tw, "Disk:\t%s (%s)\n", d.Name, units.FormatSize(d.Size))
				}
				if len(b.Chain) > 0 {
					fmt.Fprintf(tw, "Chain:\t%s\n", strings.Join(b.Chain, " <- "))
				}
			})
		},
	}
	cmd.Flags().StringVar(&repo, "repo", "", "repository to look in (default: all)")
	return cmd
}

func backupVerifyCmd(g *globals) *cobra.Command {
	var repo string
	cmd := &cobra.Command{
		Use:   "verify [ID...]",
		Short: "Read every chunk of backups (or of a whole repository) and check its hash",
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			op, err := c.VerifyBackups(cmd.Context(), repo, args)
			v, err := finish[api.VerifyResult](cmd, c, op, err)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), v, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "Verified %d backups: %d chunks, %s, all good\n", v.Backups, v.Chunks, units.FormatSize(v.Bytes))
			})
		},
	}
	cmd.Flags().StringVar(&repo, "repo", "", "repository (default: default; with IDs, all are searched)")
	return cmd
}

func backupRestoreCmd(g *globals) *cobra.Command {
	var req api.RestoreBackup
	cmd := &cobra.Command{
		Use:   "restore VM ID",
		Short: "Make a VM from a backup: as VM (lost) with its identity, or --as NAME with a new one",
		Long: `Make a VM from any backup point. Without --as the VM comes back under
its own name with its identity (UUID, MACs, hostname), for a VM that was
lost or deleted. With --as NAME it becomes a new VM with a new identity,
beside the original, as a clone does. The repository may come from
another host: register it with lodge backup repo add.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.VM = args[0]
			c := g.client()
			op, err := c.RestoreBackup(cmd.Context(), args[1], req)
			return g.waitVM(cmd, c, op, err)
		},
	}
	cmd.Flags().StringVar(&req.As, "as", "", "restore as a new VM with this name and a new identity")
	cmd.Flags().StringVar(&req.Repo, "repo", "", "repository to look in (default: all)")
	cmd.Flags().StringVar(&req.Pool, "pool", "", "storage pool for the disks")
	cmd.Flags().BoolVar(&req.Start, "start", false, "boot the VM once restored")
	return cmd
}

func backupDeleteCmd(g *globals) *cobra.Command {
	var repo string
	cmd := &cobra.Command{
		Use:   "delete ID",
		Short: "Forget one backup (lodge backup gc frees its data)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client().DeleteBackup(cmd.Context(), args[0], repo)
		},
	}
	cmd.Flags().StringVar(&repo, "repo", "", "repository to look in (default: all)")
	return cmd
}

func keepFlags(cmd *cobra.Command, k *api.BackupKeep) {
	cmd.Flags().IntVar(&k.Last, "keep-last", 0, "keep the newest N backups")
	cmd.Flags().IntVar(&k.Hourly, "keep-hourly", 0, "keep the newest backup of each of the last N hours that have one")
	cmd.Flags().IntVar(&k.Daily, "keep-daily", 0, "keep the newest backup of each of the last N days that have one")
	cmd.Flags().IntVar(&k.Weekly, "keep-weekly", 0, "keep the newest backup of each of the last N weeks that have one")
	cmd.Flags().IntVar(&k.Monthly, "keep-monthly", 0, "keep the newest backup of each of the last N months that have one")
}

func backupPruneCmd(g *globals) *cobra.Command {
	var req api.PruneBackups
	cmd := &cobra.Command{
		Use:   "prune VM --keep-last N [--keep-daily N ...]",
		Short: "Remove a VM's backups that a retention policy does not keep, and free their data",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.VM = args[0]
			res, err := g.client().PruneBackups(cmd.Context(), req)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), res, func(tw *tabwriter.Writer) {
				verb := "removed"
				if req.DryRun {
					verb = "would remove"
				}
				fmt.Fprintf(tw, "Kept %d, %s %d, freed %s\n", len(res.Kept), verb, len(res.Removed), units.FormatSize(res.Freed))
			})
		},
	}
	keepFlags(cmd, &req.Keep)
	cmd.Flags().StringVar(&req.Repo, "repo", "", "repository (default: default)")
	cmd.Flags().BoolVar(&req.DryRun, "dry-run", false, "only say what would be removed")
	return cmd
}

func backupGCCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "gc [REPO]",
		Short: "Remove the chunks no backup uses; safe while backups run",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			repo := "default"
			if len(args) == 1 {
				repo = args[0]
			}
			c := g.client()
			op, err := c.GCBackups(cmd.Context(), repo)
			r, err := finish[api.GCResult](cmd, c, op, err)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), r, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "Removed %d of %d chunks, freed %s\n", r.Removed, r.Chunks, units.FormatSize(r.Freed))
			})
		},
	}
}

func backupSyncCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "sync FROM TO",
		Short: "Copy the backups repository TO lacks from FROM, moving only missing chunks",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			op, err := c.SyncBackups(cmd.Context(), api.SyncBackups{From: args[0], To: args[1]})
			r, err := finish[api.SyncResult](cmd, c, op, err)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), r, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "Copied %d backups: %d chunks, %s\n", r.Backups, r.Chunks, units.FormatSize(r.Bytes))
			})
		},
	}
}

func backupScheduleCmd(g *globals) *cobra.Command {
	var req api.BackupSchedule
	var every, cron string
	var off bool
	cmd := &cobra.Command{
		Use:   "schedule [VM --every 1h|--cron EXPR --keep-last N ...] | schedule VM --off | schedule",
		Short: "Back a VM up on a schedule and prune by retention; with no VM, list schedules",
		Long: `Make the daemon back a VM up on a schedule: --every takes an interval
(30m, 1h, 1d), --cron a cron expression ("0 3 * * *", @daily). After each
backup the VM's backups in the repository are pruned by the --keep-*
rules. --off stops the schedule. With no arguments, list the schedules.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			if len(args) == 0 {
				ss, err := c.BackupSchedules(cmd.Context())
				if err != nil {
					return err
				}
				return g.emit(cmd.OutOrStdout(), ss, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "VM\tSCHEDULE\tREPO\tLAST RUN\tNEXT RUN\tLAST ERROR")
					for _, s := range ss {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.VM, s.Schedule, s.Repo, when(s.LastRun), when(s.NextRun), dash(s.LastError))
					}
				})
			}
			if off {
				return c.DeleteBackupSchedule(cmd.Context(), args[0])
			}
			switch {
			case every != "" && cron != "":
				return usageError{errors.New("give --every or --cron, not both")}
			case every != "":
				req.Schedule = every
			case cron != "":
				req.Schedule = cron
			default:
				return usageError{errors.New("give --every INTERVAL or --cron EXPR (or --off)")}
			}
			req.VM = args[0]
			s, err := c.SetBackupSchedule(cmd.Context(), req)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), s, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "Backups of %s to %s: %s, next at %s\n", s.VM, s.Repo, s.Schedule, when(s.NextRun))
			})
		},
	}
	cmd.Flags().StringVar(&every, "every", "", "interval between backups: 30m, 1h, 1d")
	cmd.Flags().StringVar(&cron, "cron", "", "cron expression: \"m h dom mon dow\" or @hourly, @daily, @weekly")
	cmd.Flags().StringVar(&req.Repo, "repo", "", "repository (default: default)")
	cmd.Flags().BoolVar(&off, "off", false, "stop the VM's scheduled backups")
	keepFlags(cmd, &req.Keep)
	return cmd
}

func when(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.Local().Format(time.DateTime)
}

func fileFlags(cmd *cobra.Command, q *api.BackupFileQuery) {
	cmd.Flags().StringVar(&q.Disk, "disk", "", "the disk (default: the first)")
	cmd.Flags().IntVar(&q.Partition, "partition", 0, "the partition number (default: every ext filesystem, in order)")
	cmd.Flags().StringVar(&q.Repo, "repo", "", "repository to look in (default: all)")
}

func backupFilesCmd(g *globals) *cobra.Command {
	var q api.BackupFileQuery
	cmd := &cobra.Command{
		Use:   "files ID [PATH]",
		Short: "List a directory inside a backup, without restoring it (ext2/3/4)",
		Args:  cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			q.Path = "/"
			if len(args) == 2 {
				q.Path = args[1]
			}
			fs, err := g.client().BackupFiles(cmd.Context(), args[0], q)
			if err != nil {
				return err
			}
			return g.emit(cmd.OutOrStdout(), fs, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "TYPE\tMODE\tOWNER\tSIZE\tNAME")
				for _, f := range fs {
					fmt.Fprintf(tw, "%s\t%04o\t%d:%d\t%d\t%s\n", f.Type, f.Mode, f.UID, f.GID, f.Size, f.Name)
				}
			})
		},
	}
	fileFlags(cmd, &q)
	return cmd
}

func backupCatCmd(g *globals) *cobra.Command {
	var q api.BackupFileQuery
	cmd := &cobra.Command{
		Use:   "cat ID PATH",
		Short: "Write one file from inside a backup to stdout, without restoring it (ext2/3/4)",
		Long: `Write one file from a backup's disk to stdout. The partition holding the
filesystem is read from the backup's chunks (each checked against its
hash) into a temporary file on the host and read with debugfs, without
mounting it. Only ext2, ext3 and ext4 filesystems can be read.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			q.Path = args[1]
			return g.client().BackupFile(cmd.Context(), args[0], q, cmd.OutOrStdout())
		},
	}
	fileFlags(cmd, &q)
	return cmd
}

// wholeBecause heads a backup's reason: why it is full, or, for an
// incremental one, why some of its disks were read whole.
func wholeBecause(b api.Backup) string {
	if b.Kind == "full" {
		return "Full because"
	}
	return "Disks read whole because"
}

// yielded says how much of a backup's time went to pauses for the guest.
func yielded(b api.Backup) string {
	if b.Yielded < 0.05 {
		return ""
	}
	return fmt.Sprintf(" (%.1f s of it paused while the guest wrote)", b.Yielded)
}
