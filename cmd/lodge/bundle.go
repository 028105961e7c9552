package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/internal/bundle"
)

func exportCmd(g *globals) *cobra.Command {
	var compression, format string
	var withSnapshots bool
	cmd := &cobra.Command{
		Use:   "export VM FILE|-",
		Short: "Write a VM to one portable bundle file (or stdout), running or stopped",
		Long: `Write a VM to one bundle: its settings, identity and disks. The bundle
stands alone (it holds the whole disk, not only what differs from the
image), and only the disks' data is stored: holes and zeros cost nothing.
A running VM keeps running; its filesystems are frozen through the guest
agent for the instant the point in time is taken.

--with-snapshots carries the snapshot tree as well (memory states
included), as the layers Lodge keeps it in, so nothing is stored twice;
it needs the VM stopped. Without it a bundle holds the VM as it is now.

A bundle is a zstd-compressed tar archive: 'tar --zstd -xSf FILE' unpacks
lodge.json and each disk as a sparse raw image. --format ova writes an OVA
(OVF descriptor and streamOptimized VMDKs) that other hypervisors import.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if format != "lodge" && format != "ova" {
				return usageError{fmt.Errorf("--format %q: want lodge or ova", format)}
			}
			if _, err := bundle.ParseCompression(compression); err != nil {
				return usageError{err}
			}
			name, file := args[0], args[1]
			var out io.Writer = os.Stdout
			var tmp *os.File
			if file != "-" {
				// Written under a temporary name and renamed at the end, so
				// a failed or cancelled export leaves no half bundle.
				f, err := os.CreateTemp(filepath.Dir(file), "."+filepath.Base(file)+".part-")
				if err != nil {
					return fmt.Errorf("export vm %q: %w", name, err)
				}
				tmp, out = f, f
				defer func() {
					if tmp != nil {
						_ = tmp.Close()
						_ = os.Remove(tmp.Name())
					}
				}()
			}
			bar := newByteProgress("export "+name, format == "lodge")
			err := g.client().ExportVM(cmd.Context(), name, api.ExportOptions{Format: format, Compression: compression, WithSnapshots: withSnapshots}, bar.writer(out))
			bar.finish()
			if err != nil {
				return err
			}
			if tmp != nil {
				if err := tmp.Sync(); err != nil {
					return fmt.Errorf("export vm %q: %w", name, err)
				}
				if err := tmp.Close(); err != nil {
					return fmt.Errorf("export vm %q: %w", name, err)
				}
				if err := os.Rename(tmp.Name(), file); err != nil {
					return fmt.Errorf("export vm %q: %w", name, err)
				}
				tmp = nil
				fmt.Fprintf(os.Stderr, "exported %s to %s (%s)\n", name, file, sizeOfFile(file))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&compression, "compression", "fast", "none, fast or best")
	cmd.Flags().StringVar(&format, "format", "lodge", "lodge (a Lodge bundle) or ova (for other hypervisors)")
	cmd.Flags().BoolVar(&withSnapshots, "with-snapshots", false, "carry the snapshot tree too (the VM must be stopped)")
	return cmd
}

func importCmd(g *globals) *cobra.Command {
	var opts api.ImportOptions
	cmd := &cobra.Command{
		Use:   "import FILE|-",
		Short: "Make a VM from a bundle; it gets a new identity unless --keep-identity",
		Long: `Make a VM from a bundle written by 'lodge export'. Every chunk is checked
as it streams in; a damaged or truncated bundle is refused, naming the
disk and offset, and leaves nothing behind. The VM gets a new UUID, MACs,
hostname and instance-id (so its guest makes a new machine-id and SSH host
keys), unless --keep-identity keeps them, as for a move.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var in io.Reader = os.Stdin
			size := int64(-1)
			if args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return fmt.Errorf("import %s: %w", args[0], err)
				}
				defer func() { _ = f.Close() }()
				if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
					size = fi.Size()
				}
				in = f
			}
			bar := newByteProgress("import", true)
			v, err := g.client().ImportVM(cmd.Context(), bar.reader(in), size, opts)
			bar.finish()
			if err != nil {
				return err
			}
			if g.output != "table" {
				return g.emit(os.Stdout, v, nil)
			}
			fmt.Printf("imported %s (uuid %s)\n", v.Name, v.UUID)
			return nil
		},
	}
	cmd.Flags().StringVar(&opts.Name, "name", "", "name the VM (default: the name in the bundle)")
	cmd.Flags().BoolVar(&opts.KeepIdentity, "keep-identity", false, "keep UUID, MACs, hostname and instance-id (a move)")
	cmd.Flags().StringVar(&opts.Project, "project", "", "the project the VM counts against")
	cmd.Flags().StringVar(&opts.Pool, "pool", "", "the pool for its disks (default: default)")
	return cmd
}

func sendCmd(g *globals) *cobra.Command {
	var req api.SendVM
	cmd := &cobra.Command{
		Use:   "send VM --to https://HOST:PORT --token TOKEN",
		Short: "Stream a VM to another lodge daemon, resuming if the connection drops",
		Long: `Stream a VM to another lodge daemon over its HTTPS API, with no temporary
file on either side. The other daemon must run with --listen; 'lodge host
token' there prints the token. A dropped connection is resumed from the
last chunk the receiver checked. --move stops the VM first and deletes it
here only once the receiver has verified and registered it.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if req.To == "" {
				return usageError{errors.New("--to is required")}
			}
			if req.Token == "" {
				req.Token = os.Getenv("LODGE_REMOTE_TOKEN")
			}
			if req.Token == "" {
				return usageError{errors.New("--token (or LODGE_REMOTE_TOKEN) is required")}
			}
			c := g.client()
			op, err := c.SendVM(cmd.Context(), args[0], req)
			if err != nil {
				return err
			}
			if _, err := wait(cmd.Context(), c, op); err != nil {
				return err
			}
			fmt.Printf("sent %s to %s\n", args[0], req.To)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.To, "to", "", "the receiving daemon, https://HOST:PORT")
	f.StringVar(&req.Token, "token", "", "the receiver's access token (env LODGE_REMOTE_TOKEN)")
	f.BoolVar(&req.Move, "move", false, "delete the VM here once the receiver has it (keeps its identity)")
	f.StringVar(&req.Compression, "compression", "fast", "none, fast or best")
	f.StringVar(&req.Name, "name", "", "its name on the receiver")
	f.BoolVar(&req.KeepIdentity, "keep-identity", false, "keep UUID, MACs, hostname and instance-id")
	f.BoolVar(&req.WithSnapshots, "with-snapshots", false, "send the snapshot tree too (the VM must be stopped)")
	return cmd
}

// byteProgress draws a bundle's progress on a TTY: archive bytes, rate
// and time left, read from the bundle's own chunk headers.
type byteProgress struct {
	label   string
	tty     bool
	watch   bool
	start   time.Time
	drawn   time.Time
	counted int64
}

func newByteProgress(label string, watch bool) *byteProgress {
	return &byteProgress{label: label, tty: isTTY(os.Stderr), watch: watch, start: time.Now()}
}

func (b *byteProgress) draw(done, total int64) {
	if !b.tty || time.Since(b.drawn) < 200*time.Millisecond {
		return
	}
	b.drawn = time.Now()
	drawProgress(api.Operation{Kind: b.label, Done: done, Total: total}, b.start)
}

// countingWriter counts bytes for streams that carry no headers (OVA).
type countingWriter struct {
	w io.Writer
	b *byteProgress
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.b.counted += int64(n)
	c.b.draw(c.b.counted, 0)
	return n, err
}

func (b *byteProgress) writer(w io.Writer) io.Writer {
	if !b.tty {
		return w
	}
	if !b.watch {
		return countingWriter{w, b}
	}
	return bundle.WatchWriter(w, b.draw)
}

func (b *byteProgress) reader(r io.Reader) io.Reader {
	if !b.tty {
		return r
	}
	return bundle.Watch(r, b.draw)
}

func (b *byteProgress) finish() {
	if b.tty {
		fmt.Fprint(os.Stderr, "\r\033[K")
	}
}

func sizeOfFile(path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(sizeOrDash(fi.Size()))
}
