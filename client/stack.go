package client

import (
	"context"
	"net/http"
	"net/url"

	"github.com/lodge-vm/lodge/api"
)

// StackUp starts bringing a stack up from its file; its result is the
// api.StackStatus.
func (c *Client) StackUp(ctx context.Context, req api.StackUp) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/stacks", req, &op)
}

// StackStatus returns a stack's members, running their health checks.
func (c *Client) StackStatus(ctx context.Context, name string) (api.StackStatus, error) {
	var out api.StackStatus
	return out, c.do(ctx, http.MethodGet, "/v1/stacks/"+url.PathEscape(name), nil, &out)
}

// StackDown starts stopping a stack's members, dependents first, and
// deleting them with req.Delete.
func (c *Client) StackDown(ctx context.Context, name string, req api.StackDown) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/stacks/"+url.PathEscape(name)+"/down", req, &op)
}

// StackRebuild recreates a stack member from its image or latest backup,
// keeping its identity; it returns the operation.
func (c *Client) StackRebuild(ctx context.Context, name string, req api.StackRebuild) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/stacks/"+url.PathEscape(name)+"/rebuild", req, &op)
}

// StackBackup backs every member of a stack up at one point; it returns
// the operation, whose result is an api.StackBackup.
func (c *Client) StackBackup(ctx context.Context, name string, req api.StackBackupRequest) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/stacks/"+url.PathEscape(name)+"/backup", req, &op)
}

// StackBackups lists a stack's backups in a repository (default: the
// default one).
func (c *Client) StackBackups(ctx context.Context, name, repo string) ([]api.StackBackup, error) {
	var out []api.StackBackup
	return out, c.do(ctx, http.MethodGet, "/v1/stacks/"+url.PathEscape(name)+"/backups?repo="+url.QueryEscape(repo), nil, &out)
}

// StackRestore brings a stack back from a stack backup; it returns the
// operation, whose result is the stack's status.
func (c *Client) StackRestore(ctx context.Context, req api.StackRestore) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/stacks/restore", req, &op)
}
