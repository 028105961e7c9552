package client

import (
	"context"
	"net/http"
	"net/url"

	"github.com/lodge-vm/lodge/api"
)

// Bench starts benchmarking a running VM against its host; the
// operation's result is the api.BenchReport.
func (c *Client) Bench(ctx context.Context, vm string, req api.BenchRequest) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/bench", req, &op)
}

// BenchHistory lists a VM's saved benchmark reports, oldest first.
func (c *Client) BenchHistory(ctx context.Context, vm string) ([]api.BenchReport, error) {
	var out []api.BenchReport
	return out, c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(vm)+"/bench", nil, &out)
}
