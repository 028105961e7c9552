package qga

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// fileChunk is how much file data moves per exchange: big enough to keep
// round trips few, small enough that one exchange stays quick.
const fileChunk = 48 << 10

// Exec polls guest-exec-status with this backoff: short programs finish
// in milliseconds, long ones should not cost a round trip every 20 ms.
const (
	execPollMin = 20 * time.Millisecond
	execPollMax = 200 * time.Millisecond
)

// Ping implements Agent.
func (c *Client) Ping(ctx context.Context) error {
	return c.do(ctx, "guest-ping", nil, nil)
}

// HostName implements Agent.
func (c *Client) HostName(ctx context.Context) (string, error) {
	var r struct {
		HostName string `json:"host-name"`
	}
	if err := c.do(ctx, "guest-get-host-name", nil, &r); err != nil {
		return "", err
	}
	return r.HostName, nil
}

// VCPUs implements Agent.
func (c *Client) VCPUs(ctx context.Context) ([]VCPU, error) {
	var cpus []VCPU
	err := c.do(ctx, "guest-get-vcpus", nil, &cpus)
	return cpus, err
}

// SetVCPUs implements Agent.
func (c *Client) SetVCPUs(ctx context.Context, cpus []VCPU) (int, error) {
	req := make([]map[string]any, len(cpus))
	for i, v := range cpus {
		req[i] = map[string]any{"logical-id": v.ID, "online": v.Online}
	}
	var n int
	err := c.do(ctx, "guest-set-vcpus", map[string]any{"vcpus": req}, &n)
	return n, err
}

// OSInfo implements Agent.
func (c *Client) OSInfo(ctx context.Context) (OSInfo, error) {
	var info OSInfo
	if err := c.do(ctx, "guest-get-osinfo", nil, &info); err != nil {
		return OSInfo{}, err
	}
	return info, nil
}

// Info implements Agent.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var info Info
	if err := c.do(ctx, "guest-info", nil, &info); err != nil {
		return Info{}, err
	}
	return info, nil
}

// NetworkInterfaces implements Agent.
func (c *Client) NetworkInterfaces(ctx context.Context) ([]Interface, error) {
	var ifaces []Interface
	if err := c.do(ctx, "guest-network-get-interfaces", nil, &ifaces); err != nil {
		return nil, err
	}
	return ifaces, nil
}

// FSFreeze implements Agent.
func (c *Client) FSFreeze(ctx context.Context) (int, error) {
	var n int
	if err := c.do(ctx, "guest-fsfreeze-freeze", nil, &n); err != nil {
		return 0, err
	}
	return n, nil
}

// FSThaw implements Agent.
func (c *Client) FSThaw(ctx context.Context) (int, error) {
	var n int
	if err := c.do(ctx, "guest-fsfreeze-thaw", nil, &n); err != nil {
		return 0, err
	}
	return n, nil
}

// FSFreezeStatus implements Agent.
func (c *Client) FSFreezeStatus(ctx context.Context) (string, error) {
	var s string
	if err := c.do(ctx, "guest-fsfreeze-status", nil, &s); err != nil {
		return "", err
	}
	return s, nil
}

type execArgs struct {
	Path          string   `json:"path"`
	Arg           []string `json:"arg,omitempty"`
	Env           []string `json:"env,omitempty"`
	InputData     string   `json:"input-data,omitempty"`
	CaptureOutput bool     `json:"capture-output"`
}

type execStatus struct {
	Exited       bool   `json:"exited"`
	ExitCode     *int   `json:"exitcode"`
	Signal       *int   `json:"signal"`
	OutData      string `json:"out-data"`
	ErrData      string `json:"err-data"`
	OutTruncated bool   `json:"out-truncated"`
	ErrTruncated bool   `json:"err-truncated"`
}

// Exec implements Agent. Each exchange with the agent gets the default
// timeout if ctx has no deadline, but the program itself may run for as
// long as ctx allows.
func (c *Client) Exec(ctx context.Context, req ExecRequest) (ExecResult, error) {
	if req.Path == "" {
		return ExecResult{}, errors.New("qga exec: no program given")
	}
	args := execArgs{Path: req.Path, Arg: req.Args, Env: req.Env, CaptureOutput: true}
	if req.Stdin != nil {
		args.InputData = base64.StdEncoding.EncodeToString(req.Stdin)
	}
	var started struct {
		PID int64 `json:"pid"`
	}
	if err := c.exchange(ctx, "guest-exec", args, &started); err != nil {
		return ExecResult{}, fmt.Errorf("qga exec %s: guest-exec: %w", req.Path, err)
	}
	poll := execPollMin
	for {
		var st execStatus
		if err := c.exchange(ctx, "guest-exec-status", map[string]int64{"pid": started.PID}, &st); err != nil {
			return ExecResult{}, fmt.Errorf("qga exec %s (pid %d): guest-exec-status: %w", req.Path, started.PID, err)
		}
		if st.Exited {
			res, err := st.result()
			if err != nil {
				return ExecResult{}, fmt.Errorf("qga exec %s (pid %d): %w", req.Path, started.PID, err)
			}
			return res, nil
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return ExecResult{}, fmt.Errorf("qga exec %s (pid %d, left running): %w", req.Path, started.PID, ctx.Err())
		case <-t.C:
		}
		poll = min(2*poll, execPollMax)
	}
}

func (st execStatus) result() (ExecResult, error) {
	res := ExecResult{ExitCode: -1, Truncated: st.OutTruncated || st.ErrTruncated}
	if st.ExitCode != nil {
		res.ExitCode = *st.ExitCode
	}
	if st.Signal != nil {
		res.Signal = *st.Signal
	}
	var err error
	if res.Stdout, err = decodeBase64(st.OutData); err != nil {
		return ExecResult{}, fmt.Errorf("decode stdout: %w", err)
	}
	if res.Stderr, err = decodeBase64(st.ErrData); err != nil {
		return ExecResult{}, fmt.Errorf("decode stderr: %w", err)
	}
	return res, nil
}

func decodeBase64(s string) ([]byte, error) {
	if s == "" {
		return nil, nil
	}
	return base64.StdEncoding.DecodeString(s)
}

// FileWrite implements Agent. The file keeps the mode the agent creates
// it with.
func (c *Client) FileWrite(ctx context.Context, path string, data []byte) (err error) {
	h, err := c.openFile(ctx, path, "w")
	if err != nil {
		return fmt.Errorf("qga write %s: %w", path, err)
	}
	defer func() {
		// Close even after a failure: it flushes, and an open handle
		// stays open in the agent until the agent restarts.
		if cerr := c.closeFile(ctx, h); cerr != nil && err == nil {
			err = fmt.Errorf("qga write %s: %w", path, cerr)
		}
	}()
	for off := 0; off < len(data); {
		end := min(off+fileChunk, len(data))
		var r struct {
			Count int `json:"count"`
		}
		args := map[string]any{"handle": h, "buf-b64": base64.StdEncoding.EncodeToString(data[off:end])}
		if err := c.exchange(ctx, "guest-file-write", args, &r); err != nil {
			return fmt.Errorf("qga write %s at %d: guest-file-write: %w", path, off, err)
		}
		// A short write is legal; no progress at all would loop forever.
		if r.Count <= 0 || r.Count > end-off {
			return fmt.Errorf("qga write %s at %d: agent reports %d of %d bytes written", path, off, r.Count, end-off)
		}
		off += r.Count
	}
	return nil
}

// FileRead implements Agent. Files larger than the client's limit (see
// WithMaxFileSize) fail with ErrTooLarge.
func (c *Client) FileRead(ctx context.Context, path string) (_ []byte, err error) {
	h, err := c.openFile(ctx, path, "r")
	if err != nil {
		return nil, fmt.Errorf("qga read %s: %w", path, err)
	}
	defer func() {
		if cerr := c.closeFile(ctx, h); cerr != nil && err == nil {
			err = fmt.Errorf("qga read %s: %w", path, cerr)
		}
	}()
	var out []byte
	for {
		var r struct {
			Count  int    `json:"count"`
			BufB64 string `json:"buf-b64"`
			EOF    bool   `json:"eof"`
		}
		if err := c.exchange(ctx, "guest-file-read", map[string]any{"handle": h, "count": fileChunk}, &r); err != nil {
			return nil, fmt.Errorf("qga read %s at %d: guest-file-read: %w", path, len(out), err)
		}
		chunk, err := decodeBase64(r.BufB64)
		if err != nil {
			return nil, fmt.Errorf("qga read %s at %d: decode: %w", path, len(out), err)
		}
		if len(chunk) > fileChunk {
			return nil, fmt.Errorf("qga read %s at %d: agent sent %d bytes, asked for %d", path, len(out), len(chunk), fileChunk)
		}
		if len(out)+len(chunk) > c.cfg.maxFileSize {
			return nil, fmt.Errorf("qga read %s: %w: over %d bytes", path, ErrTooLarge, c.cfg.maxFileSize)
		}
		out = append(out, chunk...)
		// The agent reports eof only once a read comes up short, so a
		// file whose size is a multiple of the chunk ends with an empty
		// read; treating any empty read as the end also guarantees
		// progress.
		if r.EOF || len(chunk) == 0 {
			return out, nil
		}
	}
}

func (c *Client) openFile(ctx context.Context, path, mode string) (int64, error) {
	var h int64
	if err := c.exchange(ctx, "guest-file-open", map[string]string{"path": path, "mode": mode}, &h); err != nil {
		return 0, fmt.Errorf("guest-file-open: %w", err)
	}
	return h, nil
}

func (c *Client) closeFile(ctx context.Context, h int64) error {
	// Runs even if ctx is done, but briefly, so as not to leak the
	// handle in the agent.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.syncTimeout)
	defer cancel()
	if err := c.exchange(ctx, "guest-file-close", map[string]int64{"handle": h}, nil); err != nil {
		return fmt.Errorf("guest-file-close: %w", err)
	}
	return nil
}

// Shutdown implements Agent. The agent answers guest-shutdown only when
// it refuses, so after sending it the client waits a short while (see
// WithShutdownWait) for a refusal and takes silence, or QEMU closing the
// socket, for success.
func (c *Client) Shutdown(ctx context.Context, mode string) error {
	if err := c.shutdown(ctx, mode); err != nil {
		return fmt.Errorf("qga guest-shutdown: %w", err)
	}
	return nil
}

func (c *Client) shutdown(ctx context.Context, mode string) error {
	var args any
	if mode != "" {
		args = map[string]string{"mode": mode}
	}
	msg, err := encodeRequest("guest-shutdown", args)
	if err != nil {
		return err
	}
	ctx, cancel := withDefaultTimeout(ctx, c.cfg.timeout)
	defer cancel()
	if err := c.acquire(ctx); err != nil {
		return err
	}
	defer c.release()
	if err := c.prepare(ctx); err != nil {
		return err
	}
	wctx, wcancel := context.WithTimeout(ctx, c.cfg.shutdownWait)
	defer wcancel()
	disarm := c.arm(wctx)
	defer disarm()
	if _, err := c.conn.Write(msg); err != nil {
		return c.transportError(ctx, err)
	}
	// Whatever happens next, a reply may yet arrive and must not be
	// taken for the answer to the next command.
	c.needSync = true
	frame, err := readFrame(c.r, maxFrame)
	switch {
	case err == nil:
		_, err := decodeReply(frame)
		return err
	case errors.Is(err, os.ErrDeadlineExceeded):
		// Our own wait is over; but if the caller gave up first we did
		// not wait long enough to know.
		return ctx.Err()
	case errors.Is(err, io.EOF):
		c.broken = fmt.Errorf("%w: %w", ErrClosed, err)
		return nil
	default:
		return c.transportError(ctx, err)
	}
}
