// Command gapwatch measures how long a guest stops, from the guest's own
// output: the guest prints to its serial port in a tight loop, and
// gapwatch timestamps what arrives on the host (a unix socket or a pty).
// A guest's own clock cannot see a pause, because QEMU stops the guest's
// clock with its CPUs. It prints the longest gap between arrivals, in
// milliseconds, among those after the file named by -start appears and
// before the one named by -stop appears.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

func main() {
	src := flag.String("src", "", "unix socket (unix:PATH) or file/pty to read")
	start := flag.String("start", "", "measure once this file exists")
	stop := flag.String("stop", "", "stop once this file exists")
	flag.Parse()
	var r io.Reader
	if len(*src) > 5 && (*src)[:5] == "unix:" {
		var d net.Dialer
		c, err := d.DialContext(context.Background(), "unix", (*src)[5:])
		if err != nil {
			fmt.Fprintln(os.Stderr, "gapwatch:", err)
			os.Exit(1)
		}
		r = c
	} else {
		f, err := os.Open(*src)
		if err != nil {
			fmt.Fprintln(os.Stderr, "gapwatch:", err)
			os.Exit(1)
		}
		r = f
	}
	arrivals := make(chan time.Time, 1<<16)
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := r.Read(buf); err != nil {
				close(arrivals)
				return
			}
			arrivals <- time.Now()
		}
	}()
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	var last time.Time
	var longest time.Duration
	measuring := false
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case t, ok := <-arrivals:
			if !ok {
				fmt.Printf("%.1f\n", float64(longest.Microseconds())/1000)
				return
			}
			if measuring && !last.IsZero() && t.Sub(last) > longest {
				longest = t.Sub(last)
			}
			last = t
		case <-tick.C:
			if !measuring && exists(*start) {
				measuring = true
			}
			if measuring && exists(*stop) {
				fmt.Printf("%.1f\n", float64(longest.Microseconds())/1000)
				return
			}
		}
	}
}
