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
