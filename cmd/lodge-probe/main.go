// Command lodge-probe is the micro-benchmark program behind `lodge bench`.
// It is one static binary with no dependencies, so the daemon can copy it
// into any Linux guest through the guest agent and run the very same code
// there and on the host.
//
//	lodge-probe run -duration 1s -threads 2 -mem 64M -disk PATH|size:BYTES -disk-bytes 256M
//	lodge-probe burn -for 1h -mem 32M
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lodge-vm/lodge/internal/bench"
	"github.com/lodge-vm/lodge/internal/units"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lodge-probe:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("usage: lodge-probe run|burn [flags]")
	}
	switch args[0] {
	case "run":
		return probe(ctx, args[1:])
	case "burn":
		return burn(ctx, args[1:])
	}
	return fmt.Errorf("unknown command %q (want run or burn)", args[0])
}

// sizeFlag accepts 512M, 2G, 2GiB or plain bytes.
type sizeFlag struct{ n *int64 }

func (s sizeFlag) String() string {
	if s.n == nil {
		return "0"
	}
	return strconv.FormatInt(*s.n, 10)
}

func (s sizeFlag) Set(v string) error {
	n, err := units.ParseSize(v)
	if err != nil {
		return err
	}
	*s.n = n
	return nil
}

func probe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	c := bench.ProbeConfig{MemBytes: 64 << 20, DiskBytes: 256 << 20}
	fs.DurationVar(&c.Duration, "duration", time.Second, "how long each test runs")
	fs.IntVar(&c.Threads, "threads", runtime.NumCPU(), "threads for the all-CPU tests")
	fs.Var(sizeFlag{&c.MemBytes}, "mem", "memory buffer size")
	fit := fs.Bool("mem-fit", false, "shrink the memory buffer to a third of the available memory")
	disk := fs.String("disk", "", "file or block device for the disk tests (overwritten), or size:BYTES for the disk of that size")
	fs.Var(sizeFlag{&c.DiskBytes}, "disk-bytes", "area of the disk the tests use")
	groups := fs.String("groups", "", "comma-separated groups to run: cpu, mem, disk (default all)")
	evict := fs.Bool("evict", false, "first kill any other lodge-probe on this machine (in a guest, one left by an earlier run)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *groups != "" {
		c.Groups = strings.Split(*groups, ",")
	}
	if *evict {
		if n, err := bench.EvictOthers("/proc", filepath.Base(os.Args[0]), 10*time.Second); err != nil {
			return err
		} else if n > 0 {
			fmt.Fprintf(os.Stderr, "lodge-probe: stopped %d probe(s) left running\n", n)
		}
	}
	if *fit {
		if avail, err := memAvailable(); err == nil && avail/3 < c.MemBytes {
			c.MemBytes = avail / 3 &^ (1<<20 - 1)
		}
	}
	if size, ok := strings.CutPrefix(*disk, "size:"); ok {
		n, err := strconv.ParseInt(size, 10, 64)
		if err != nil {
			return fmt.Errorf("-disk %s: %w", *disk, err)
		}
		if *disk, err = bench.FindDisk(ctx, "/sys/block", n, 30*time.Second); err != nil {
			return err
		}
	}
	c.DiskPath = *disk
	res, err := bench.Probe(ctx, c)
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

func burn(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("burn", flag.ContinueOnError)
	limit := fs.Duration("for", time.Hour, "stop after this long")
	mem := int64(32 << 20)
	fs.Var(sizeFlag{&mem}, "mem", "memory to keep rewriting")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *limit)
	defer cancel()
	bench.Burn(ctx, mem)
	return nil
}

// memAvailable reads MemAvailable from /proc/meminfo, in bytes.
func memAvailable() (int64, error) {
	raw, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no MemAvailable in /proc/meminfo")
}
