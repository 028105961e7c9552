// Package client is the Go client of Lodge's REST API. The CLI and the
// tests use it; nothing else talks to the daemon.
//
// Long calls (create, start, stop, delete, image import) return an
// api.Operation; Wait follows it to the end.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"

	"github.com/lodge-vm/lodge/api"
)

// ErrDaemonDown means nothing answers on the socket.
var ErrDaemonDown = errors.New("the lodge daemon is not running")

// Error is an error reply from the daemon.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Message }

// IsNotFound reports whether err is a not-found reply.
func IsNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == "not_found"
}

// IsBusy reports whether err is a busy reply: the object is held by
// another operation for now, and a retry later can succeed.
func IsBusy(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == "busy"
}

// Client talks to one daemon: over its unix socket, or over HTTPS to a
// remote one (NewRemote).
type Client struct {
	socket string
	base   string
	token  string
	http   *http.Client
}

// New returns a client for the daemon listening on socket.
func New(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns: 4,
	}
	return &Client{socket: socket, base: "http://lodge", http: &http.Client{Transport: tr}}
}

// Socket is the path the client dials.
func (c *Client) Socket() string { return c.socket }

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(raw)
	}
	resp, err := c.send(ctx, method, path, rd, "application/json", body != nil)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode >= 300 {
		return decodeError(resp)
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		return nil
	}
	if w, ok := out.(io.Writer); ok {
		_, err := io.Copy(w, resp.Body)
		return err
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// send makes one request; a reply of 300 or more is returned as is.
func (c *Client) send(ctx context.Context, method, path string, body io.Reader, contentType string, hasBody bool) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if hasBody {
		req.Header.Set("Content-Type", contentType)
	}
	return c.roundTrip(req)
}

// sendSized sends a bundle stream, with its length when known.
func (c *Client) sendSized(ctx context.Context, method, path string, body io.Reader, size int64) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/vnd.lodge.bundle")
	if size >= 0 {
		req.ContentLength = size
	}
	return c.roundTrip(req)
}

func (c *Client) roundTrip(req *http.Request) (*http.Response, error) {
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var ne *net.OpError
		if errors.As(err, &ne) && ne.Op == "dial" {
			where := c.socket
			if where == "" {
				where = c.base
			}
			return nil, fmt.Errorf("%w (no answer on %s)", ErrDaemonDown, where)
		}
		return nil, err
	}
	return resp, nil
}

func decodeError(resp *http.Response) error {
	var e api.Error
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if json.Unmarshal(raw, &e) != nil || e.Error == "" {
		e.Error = fmt.Sprintf("daemon answered %s", resp.Status)
	}
	return &Error{Status: resp.StatusCode, Code: e.Code, Message: e.Error}
}

// Host returns the host's resources and accelerator.
func (c *Client) Host(ctx context.Context) (api.HostInfo, error) {
	var h api.HostInfo
	return h, c.do(ctx, http.MethodGet, "/v1/host", nil, &h)
}

// SetHost changes the host's limits and returns the host info after.
func (c *Client) SetHost(ctx context.Context, req api.SetHost) (api.HostInfo, error) {
	var out api.HostInfo
	return out, c.do(ctx, http.MethodPatch, "/v1/host", req, &out)
}

// ListVMs returns every VM.
func (c *Client) ListVMs(ctx context.Context) ([]api.VM, error) {
	var vms []api.VM
	return vms, c.do(ctx, http.MethodGet, "/v1/vms", nil, &vms)
}

// GetVM returns one VM.
func (c *Client) GetVM(ctx context.Context, name string) (api.VM, error) {
	var v api.VM
	return v, c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(name), nil, &v)
}

// CreateVM starts creating a VM.
func (c *Client) CreateVM(ctx context.Context, req api.CreateVM) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms", req, &op)
}

// DeleteVM starts deleting a VM.
func (c *Client) DeleteVM(ctx context.Context, name string, force bool) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(name)+"?force="+strconv.FormatBool(force), nil, &op)
}

// CloneVM copies VM src to req.Name, as a linked clone unless req.Full.
func (c *Client) CloneVM(ctx context.Context, src string, req api.CloneVM) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(src)+"/clone", req, &op)
}

// SetVM starts changing a VM's settings; memory changes while it runs.
func (c *Client) SetVM(ctx context.Context, name string, req api.SetVM) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPatch, "/v1/vms/"+url.PathEscape(name), req, &op)
}

// AddDisk starts giving a VM a new empty data disk of size bytes; its
// result is the VM. A running VM gets it hot-plugged.
func (c *Client) AddDisk(ctx context.Context, vm string, size int64) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/disks", api.AddDisk{Size: size}, &op)
}

// ResizeDisk starts growing a VM's disk to size bytes; its result is the
// VM. A running guest sees the new size at once.
func (c *Client) ResizeDisk(ctx context.Context, vm, disk string, size int64) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPatch, "/v1/vms/"+url.PathEscape(vm)+"/disks/"+url.PathEscape(disk), api.ResizeDisk{Size: size}, &op)
}

// ListSnapshots returns a VM's snapshot tree, parents before children.
func (c *Client) ListSnapshots(ctx context.Context, vm string) ([]api.Snapshot, error) {
	var out []api.Snapshot
	return out, c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(vm)+"/snapshots", nil, &out)
}

// CreateSnapshot starts taking a snapshot; its result is the api.Snapshot.
func (c *Client) CreateSnapshot(ctx context.Context, vm string, req api.CreateSnapshot) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/snapshots", req, &op)
}

// RevertSnapshot starts returning a VM to a snapshot; its result is the VM.
func (c *Client) RevertSnapshot(ctx context.Context, vm, snap string, req api.RevertSnapshot) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/snapshots/"+url.PathEscape(snap)+"/revert", req, &op)
}

// DeleteSnapshot starts deleting a snapshot and merging its data away.
func (c *Client) DeleteSnapshot(ctx context.Context, vm, snap string) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(vm)+"/snapshots/"+url.PathEscape(snap), nil, &op)
}

// StartVM starts booting a VM.
func (c *Client) StartVM(ctx context.Context, name string) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/start", nil, &op)
}

// StopVM starts stopping a VM.
func (c *Client) StopVM(ctx context.Context, name string, req api.StopVM) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/stop", req, &op)
}

// RestartVM stops and starts a VM.
func (c *Client) RestartVM(ctx context.Context, name string, req api.StopVM) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/restart", req, &op)
}

// PauseVM freezes a VM's CPUs.
func (c *Client) PauseVM(ctx context.Context, name string) (api.VM, error) {
	var v api.VM
	return v, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/pause", nil, &v)
}

// ResumeVM continues a paused VM.
func (c *Client) ResumeVM(ctx context.Context, name string) (api.VM, error) {
	var v api.VM
	return v, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/resume", nil, &v)
}

// Exec runs a command in the guest through its agent.
func (c *Client) Exec(ctx context.Context, name string, req api.ExecRequest) (api.ExecResult, error) {
	var res api.ExecResult
	return res, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/exec", req, &res)
}

// ConsoleLog writes what the guest printed on its console since boot.
func (c *Client) ConsoleLog(ctx context.Context, name string, w io.Writer) error {
	return c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(name)+"/console/log", nil, w)
}

// Console opens an interactive byte stream to the VM's serial console.
func (c *Client) Console(ctx context.Context, name string) (io.ReadWriteCloser, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.socket)
	if err != nil {
		return nil, fmt.Errorf("%w (no answer on %s)", ErrDaemonDown, c.socket)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://lodge/v1/vms/"+url.PathEscape(name)+"/console", nil)
	req.Header.Set("Upgrade", "lodge-console")
	req.Header.Set("Connection", "Upgrade")
	if err := req.Write(conn); err != nil {
		_ = conn.Close()
		return nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req) //nolint:bodyclose // on success the upgraded connection is the body
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer func() { _ = conn.Close() }()
		return nil, decodeError(resp)
	}
	return &bufferedConn{Conn: conn, r: br}, nil
}

type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// ListImages returns the image library.
func (c *Client) ListImages(ctx context.Context) ([]api.Image, error) {
	var imgs []api.Image
	return imgs, c.do(ctx, http.MethodGet, "/v1/images", nil, &imgs)
}

// GetImage returns one image.
func (c *Client) GetImage(ctx context.Context, name string) (api.Image, error) {
	var img api.Image
	return img, c.do(ctx, http.MethodGet, "/v1/images/"+url.PathEscape(name), nil, &img)
}

// ImportImage starts importing a disk file on the daemon's host.
func (c *Client) ImportImage(ctx context.Context, name, path string) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/images", api.ImportImage{Name: name, Path: path}, &op)
}

// PublishImage starts making an image from a stopped VM.
func (c *Client) PublishImage(ctx context.Context, req api.PublishImage) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/images/publish", req, &op)
}

// FlattenImage starts copying an image's parents into it.
func (c *Client) FlattenImage(ctx context.Context, name string) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(name)+"/flatten", nil, &op)
}

// DeleteImage removes an unused image.
func (c *Client) DeleteImage(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/images/"+url.PathEscape(name), nil, nil)
}

// ListPools returns the storage pools.
func (c *Client) ListPools(ctx context.Context) ([]api.Pool, error) {
	var pools []api.Pool
	return pools, c.do(ctx, http.MethodGet, "/v1/pools", nil, &pools)
}

// CreatePool registers a directory as a pool.
func (c *Client) CreatePool(ctx context.Context, name, path string) (api.Pool, error) {
	var p api.Pool
	return p, c.do(ctx, http.MethodPost, "/v1/pools", api.Pool{Name: name, Path: path}, &p)
}

// DeletePool unregisters a pool.
func (c *Client) DeletePool(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/pools/"+url.PathEscape(name), nil, nil)
}

// ListProjects returns the projects with their limits and usage.
func (c *Client) ListProjects(ctx context.Context) ([]api.Project, error) {
	var ps []api.Project
	return ps, c.do(ctx, http.MethodGet, "/v1/projects", nil, &ps)
}

// CreateProject adds a project with its limits.
func (c *Client) CreateProject(ctx context.Context, p api.Project) (api.Project, error) {
	var out api.Project
	return out, c.do(ctx, http.MethodPost, "/v1/projects", p, &out)
}

// Project returns one project with its usage.
func (c *Client) Project(ctx context.Context, name string) (api.Project, error) {
	var out api.Project
	return out, c.do(ctx, http.MethodGet, "/v1/projects/"+url.PathEscape(name), nil, &out)
}

// SetProject changes a project's limits.
func (c *Client) SetProject(ctx context.Context, name string, req api.SetProject) (api.Project, error) {
	var out api.Project
	return out, c.do(ctx, http.MethodPatch, "/v1/projects/"+url.PathEscape(name), req, &out)
}

// DeleteProject removes a project that holds no VMs.
func (c *Client) DeleteProject(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/projects/"+url.PathEscape(name), nil, nil)
}

// Operations lists running and recent operations.
func (c *Client) Operations(ctx context.Context) ([]api.Operation, error) {
	var ops []api.Operation
	return ops, c.do(ctx, http.MethodGet, "/v1/operations", nil, &ops)
}

// CancelOperation asks a running operation to stop.
func (c *Client) CancelOperation(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/operations/"+url.PathEscape(id), nil, nil)
}

// OperationError is a failed or cancelled operation.
type OperationError struct{ Op api.Operation }

func (e *OperationError) Error() string { return e.Op.Error }

// Wait follows an operation until it ends, calling progress (if not nil)
// each time the daemon reports. A failed operation returns
// *OperationError carrying the daemon's message.
func (c *Client) Wait(ctx context.Context, op api.Operation, progress func(api.Operation)) (api.Operation, error) {
	for op.State == api.OpRunning {
		if progress != nil {
			progress(op)
		}
		wait := "30"
		if progress != nil {
			wait = "0.5"
		}
		var next api.Operation
		if err := c.do(ctx, http.MethodGet, "/v1/operations/"+url.PathEscape(op.ID)+"/wait?timeout="+wait, nil, &next); err != nil {
			return op, err
		}
		op = next
	}
	if progress != nil {
		progress(op)
	}
	if op.State != api.OpSucceeded {
		return op, &OperationError{Op: op}
	}
	return op, nil
}

// Result decodes a finished operation's result into v.
func Result(op api.Operation, v any) error {
	raw, err := json.Marshal(op.Result)
	if err != nil {
		return err
	}
	return json.Unmarshal(raw, v)
}

// Events streams events until ctx ends, calling fn for each.
func (c *Client) Events(ctx context.Context, fn func(api.Event)) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://lodge/v1/events", nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w (no answer on %s)", ErrDaemonDown, c.socket)
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return decodeError(resp)
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var ev api.Event
		if err := dec.Decode(&ev); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		fn(ev)
	}
}

// ListNetworks returns the built-in network and the private ones.
func (c *Client) ListNetworks(ctx context.Context) ([]api.Network, error) {
	var ns []api.Network
	return ns, c.do(ctx, http.MethodGet, "/v1/networks", nil, &ns)
}

// CreateNetwork makes a private network.
func (c *Client) CreateNetwork(ctx context.Context, req api.CreateNetwork) (api.Network, error) {
	var n api.Network
	return n, c.do(ctx, http.MethodPost, "/v1/networks", req, &n)
}

// GetNetwork returns one network with its leases.
func (c *Client) GetNetwork(ctx context.Context, name string) (api.Network, error) {
	var n api.Network
	return n, c.do(ctx, http.MethodGet, "/v1/networks/"+url.PathEscape(name), nil, &n)
}

// DeleteNetwork removes a private network no VM is on.
func (c *Client) DeleteNetwork(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/networks/"+url.PathEscape(name), nil, nil)
}
