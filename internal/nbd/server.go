package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

// How long a qemu-nbd may take to start listening, and to stop after
// SIGTERM before it is killed.
const (
	startTimeout = 10 * time.Second
	stopTimeout  = 5 * time.Second
)

// maxUnixPath is the longest socket path the kernel takes (sun_path is
// 108 bytes with its terminating NUL).
const maxUnixPath = 107

// ServerOptions describe one image to serve with qemu-nbd.
type ServerOptions struct {
	// Binary is the qemu-nbd to run; "qemu-nbd" if empty.
	Binary string
	// Path is the image file.
	Path string
	// Format is the image format, such as "qcow2" or "raw". It is
	// required: letting QEMU guess would let a guest that wrote a qcow2
	// header into a raw disk make the host open files of its choosing.
	Format string
	// ReadOnly exports the image read-only.
	ReadOnly bool
	// ForceShare, only with ReadOnly, opens the image without taking
	// QEMU's image lock, to read one a running QEMU has open. What a
	// running guest writes meanwhile may be seen half-done.
	ForceShare bool
	// Writeback asks for --cache=writeback explicitly. (qemu-nbd 7.2
	// already defaults to it; writes are durable only after Flush in
	// either case.)
	Writeback bool
	// Socket is the unix socket path to listen on.
	Socket string
	// Export is the export name; "" is the default export.
	Export string
	// Bitmap is a persistent dirty bitmap of the image (or of a file
	// under it) to offer as the meta context "qemu:dirty-bitmap:NAME".
	Bitmap string
	// AllocationDepth offers ContextAllocationDepth.
	AllocationDepth bool
}

// Server is a running qemu-nbd.
type Server struct {
	opts   ServerOptions
	cmd    *exec.Cmd
	stderr *headBuffer

	exited  chan struct{}
	waitErr error // set before exited closes

	stopOnce sync.Once
	stopErr  error
}

// dieWithParent ends a qemu-nbd whose daemon was killed, so that it does
// not keep an image open (and locked) with nobody left to stop it.
var dieWithParent = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}

var formatRE = regexp.MustCompile(`^[a-z0-9_-]+$`)

// Serve starts qemu-nbd on opts.Socket and returns once the socket takes
// connections. ctx bounds the server's whole life, not just its start:
// when ctx ends qemu-nbd is sent SIGTERM (and killed if it lingers). Stop
// it with Stop in any case, which also removes the socket.
func Serve(ctx context.Context, opts ServerOptions) (*Server, error) {
	args, err := serverArgs(opts)
	if err != nil {
		return nil, fmt.Errorf("qemu-nbd %s: %w", opts.Path, err)
	}
	bin := opts.Binary
	if bin == "" {
		bin = "qemu-nbd"
	}
	// A socket left by a qemu-nbd that was killed would make the bind
	// fail. Only a socket is removed: a path that names anything else is
	// a mistake to report, not a file to delete.
	if fi, err := os.Lstat(opts.Socket); err == nil {
		if fi.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("qemu-nbd %s: %s exists and is not a socket", opts.Path, opts.Socket)
		}
		if err := os.Remove(opts.Socket); err != nil {
			return nil, fmt.Errorf("qemu-nbd %s: removing stale socket: %w", opts.Path, err)
		}
	}

	s := &Server{opts: opts, stderr: &headBuffer{max: 4096}, exited: make(chan struct{})}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.SysProcAttr = dieWithParent
	cmd.Stdout, cmd.Stderr = s.stderr, s.stderr
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = stopTimeout
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu-nbd %s: %w", opts.Path, err)
	}
	s.cmd = cmd
	go func() {
		s.waitErr = cmd.Wait()
		close(s.exited)
	}()

	if err := s.waitReady(ctx); err != nil {
		_ = s.Stop()
		return nil, fmt.Errorf("qemu-nbd %s: %w", opts.Path, err)
	}
	return s, nil
}

// serverArgs builds qemu-nbd's command line.
func serverArgs(o ServerOptions) ([]string, error) {
	switch {
	case o.Path == "":
		return nil, errors.New("no image path")
	case o.Socket == "":
		return nil, errors.New("no socket path")
	case len(o.Socket) > maxUnixPath:
		return nil, fmt.Errorf("socket path %q longer than %d bytes", o.Socket, maxUnixPath)
	case !formatRE.MatchString(o.Format):
		return nil, fmt.Errorf("image format %q: empty or not a format name", o.Format)
	case o.ForceShare && !o.ReadOnly:
		return nil, errors.New("force-share needs a read-only export")
	case len(o.Export) > maxErrString:
		return nil, errors.New("export name too long")
	case o.Bitmap != "" && !formatRE.MatchString(o.Bitmap):
		return nil, fmt.Errorf("bitmap name %q: only lower-case letters, digits, - and _", o.Bitmap)
	}
	args := []string{
		"--socket=" + o.Socket,
		// Keep serving when a client leaves: without it qemu-nbd exits
		// as soon as its last client disconnects, including the probe
		// that checks it is up.
		"--persistent",
		"--shared=8",
		"--aio=threads",
	}
	if o.Export != "" {
		args = append(args, "--export-name="+o.Export)
	}
	if o.Writeback {
		args = append(args, "--cache=writeback")
	}
	if o.Bitmap != "" {
		args = append(args, "--bitmap="+o.Bitmap)
	}
	if o.AllocationDepth {
		args = append(args, "--allocation-depth")
	}
	if o.ReadOnly {
		args = append(args, "--read-only")
	} else {
		// Let trims and written zeroes free space in the image.
		args = append(args, "--discard=unmap", "--detect-zeroes=unmap")
	}
	if o.ForceShare {
		// qemu-nbd has no -U; force-share is a block-layer option that
		// only --image-opts can pass. Commas in the path are doubled,
		// QEMU's escape in option strings.
		args = append(args, "--image-opts", "--",
			"driver="+o.Format+
				",file.driver=file,file.filename="+strings.ReplaceAll(o.Path, ",", ",,")+
				",force-share=on")
		return args, nil
	}
	return append(args, "--format="+o.Format, "--", o.Path), nil
}

// waitReady waits until the socket completes an NBD greeting, qemu-nbd
// exits, or startTimeout passes.
func (s *Server) waitReady(ctx context.Context) error {
	deadline := time.NewTimer(startTimeout)
	defer deadline.Stop()
	delay := 5 * time.Millisecond
	for {
		if err := probe(ctx, s.opts.Socket); err == nil {
			return nil
		}
		select {
		case <-s.exited:
			return s.exitError()
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return fmt.Errorf("socket %s not ready after %v", s.opts.Socket, startTimeout)
		case <-time.After(delay):
			delay = min(2*delay, 100*time.Millisecond)
		}
	}
}

// probe checks that an NBD server answers on the socket, and leaves with
// NBD_OPT_ABORT so that qemu-nbd logs no broken connection.
func probe(ctx context.Context, socket string) error {
	d := net.Dialer{Timeout: time.Second}
	nc, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return err
	}
	defer func() { _ = nc.Close() }()
	_ = nc.SetDeadline(time.Now().Add(2 * time.Second))
	br := bufio.NewReader(nc)
	if _, err := readGreeting(br); err != nil {
		return err
	}
	msg := be.AppendUint32(nil, uint32(flagFixedNewstyle))
	msg = appendOption(msg, optAbort, nil)
	if _, err := nc.Write(msg); err != nil {
		return err
	}
	// The ACK is a courtesy; a server that just hangs up is fine too.
	_, _ = readOptReply(br, optAbort)
	return nil
}

// exitError explains an exit of qemu-nbd, using what it said on stderr.
func (s *Server) exitError() error {
	msg := s.stderr.firstLines(3)
	if msg == "" {
		if s.waitErr != nil {
			return fmt.Errorf("exited: %w", s.waitErr)
		}
		return errors.New("exited")
	}
	if s.waitErr != nil {
		return fmt.Errorf("%s (%w)", msg, s.waitErr)
	}
	return errors.New(msg)
}

// Dial connects to the server's export with the given meta contexts.
func (s *Server) Dial(ctx context.Context, metaContexts ...string) (*Conn, error) {
	c, err := Dial(ctx, "unix", s.opts.Socket, Options{Export: s.opts.Export, MetaContexts: metaContexts})
	if err != nil {
		select {
		case <-s.exited:
			return nil, fmt.Errorf("%w; qemu-nbd %s: %w", err, s.opts.Path, s.exitError())
		default:
		}
		return nil, err
	}
	return c, nil
}

// Stop ends qemu-nbd: SIGTERM, then SIGKILL if it has not exited within
// five seconds. It waits for the process and removes the socket. It
// reports an error if qemu-nbd had failed on its own or had to be
// killed.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() {
		select {
		case <-s.exited:
			// It stopped by itself (or its context ended): a failure is
			// worth reporting.
			if s.waitErr != nil && !terminated(s.waitErr) {
				s.stopErr = fmt.Errorf("qemu-nbd %s: %w", s.opts.Path, s.exitError())
			}
		default:
			_ = s.cmd.Process.Signal(syscall.SIGTERM)
			t := time.NewTimer(stopTimeout)
			select {
			case <-s.exited:
				if s.waitErr != nil && !terminated(s.waitErr) {
					s.stopErr = fmt.Errorf("qemu-nbd %s: %w", s.opts.Path, s.exitError())
				}
			case <-t.C:
				_ = s.cmd.Process.Kill()
				<-s.exited
				s.stopErr = fmt.Errorf("qemu-nbd %s: killed after not stopping within %v", s.opts.Path, stopTimeout)
			}
			t.Stop()
		}
		if fi, err := os.Lstat(s.opts.Socket); err == nil && fi.Mode()&fs.ModeSocket != 0 {
			_ = os.Remove(s.opts.Socket)
		}
	})
	return s.stopErr
}

// terminated reports an exit caused by SIGTERM, which is how Stop and an
// ended context ask qemu-nbd to go. (exec reports the latter as the
// context's error.)
func terminated(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM
}

// headBuffer keeps the first max bytes written to it: qemu-nbd's first
// words explain a failure, and a chatty one must not grow memory.
type headBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (h *headBuffer) Write(p []byte) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if room := h.max - len(h.b); room > 0 {
		h.b = append(h.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

// firstLines returns up to n non-empty lines, without the "qemu-nbd: "
// prefix qemu-nbd puts on each.
func (h *headBuffer) firstLines(n int) string {
	h.mu.Lock()
	text := string(h.b)
	h.mu.Unlock()
	var lines []string
	for _, l := range strings.Split(text, "\n") {
		l = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "qemu-nbd:"))
		if l == "" {
			continue
		}
		lines = append(lines, cleanString([]byte(l)))
		if len(lines) == n {
			break
		}
	}
	return strings.Join(lines, "; ")
}
