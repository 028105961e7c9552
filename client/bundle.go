package client

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/api"
)

// A remote daemon's access token is "lodge1:<certificate SHA-256>:<secret>".
// The fingerprint pins the daemon's self-signed certificate, so no CA is
// needed and no one in between can pose as the daemon; the secret proves
// the caller may use it.
const tokenPrefix = "lodge1"

// FormatToken makes an access token from a certificate and a secret.
func FormatToken(certDER []byte, secret string) string {
	sum := sha256.Sum256(certDER)
	return tokenPrefix + ":" + hex.EncodeToString(sum[:]) + ":" + secret
}

// ParseToken splits an access token into the pinned fingerprint and the
// secret.
func ParseToken(token string) (fingerprint []byte, secret string, err error) {
	parts := strings.Split(strings.TrimSpace(token), ":")
	if len(parts) != 3 || parts[0] != tokenPrefix || len(parts[2]) < 32 {
		return nil, "", errors.New("access token: want lodge1:<fingerprint>:<secret>, as `lodge host token` prints it")
	}
	fp, err := hex.DecodeString(parts[1])
	if err != nil || len(fp) != sha256.Size {
		return nil, "", errors.New("access token: the fingerprint is not a SHA-256 in hex")
	}
	return fp, parts[2], nil
}

// NewRemote returns a client for a daemon's HTTPS listener at addr
// (https://HOST:PORT), trusting only the certificate the token pins.
func NewRemote(addr, token string) (*Client, error) {
	u, err := url.Parse(addr)
	if err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") {
		return nil, fmt.Errorf("remote %q: want https://HOST:PORT", addr)
	}
	fp, secret, err := ParseToken(token)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{
			MinVersion: tls.VersionTLS13,
			// The chain is checked against the pinned fingerprint below,
			// not against CAs: the daemon's certificate is self-signed.
			InsecureSkipVerify: true, //nolint:gosec // VerifyPeerCertificate pins the certificate
			VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
				if len(raw) == 0 {
					return errors.New("the daemon sent no certificate")
				}
				sum := sha256.Sum256(raw[0])
				if subtle.ConstantTimeCompare(sum[:], fp) != 1 {
					return fmt.Errorf("the daemon at %s is not the one the token names (certificate %x)", u.Host, sum[:8])
				}
				return nil
			},
		},
		MaxIdleConns:          4,
		ResponseHeaderTimeout: 0,
		TLSHandshakeTimeout:   15 * time.Second,
	}
	return &Client{base: "https://" + u.Host, token: secret, http: &http.Client{Transport: tr}}, nil
}

// HostToken returns this daemon's access token for remote callers, and
// the address it listens on ("" when it has no TCP listener).
func (c *Client) HostToken(ctx context.Context) (api.HostToken, error) {
	var t api.HostToken
	return t, c.do(ctx, http.MethodGet, "/v1/host/token", nil, &t)
}

// ExportVM writes a bundle of the VM to w. A bundle cut short by a
// failure is reported as an error, never as a short success.
func (c *Client) ExportVM(ctx context.Context, name string, opts api.ExportOptions, w io.Writer) error {
	q := url.Values{}
	if opts.Compression != "" {
		q.Set("compression", opts.Compression)
	}
	if opts.Format != "" {
		q.Set("format", opts.Format)
	}
	if opts.WithSnapshots {
		q.Set("snapshots", "1")
	}
	resp, err := c.send(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(name)+"/export?"+q.Encode(), nil, "", false)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode >= 300 {
		return decodeError(resp)
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("export vm %q: the stream broke off: %w", name, err)
	}
	return nil
}

func importQuery(opts api.ImportOptions) string {
	q := url.Values{}
	if opts.Name != "" {
		q.Set("name", opts.Name)
	}
	if opts.KeepIdentity {
		q.Set("keep_identity", "1")
	}
	if opts.Project != "" {
		q.Set("project", opts.Project)
	}
	if opts.Pool != "" {
		q.Set("pool", opts.Pool)
	}
	return q.Encode()
}

// ImportVM makes a VM from the bundle read from r. size is the bundle's
// length if known (a file's), or -1: a known length is sent as such rather
// than in chunked encoding, which costs the daemon a copy per chunk.
func (c *Client) ImportVM(ctx context.Context, r io.Reader, size int64, opts api.ImportOptions) (api.VM, error) {
	var v api.VM
	return v, c.stream(ctx, http.MethodPost, "/v1/import?"+importQuery(opts), r, size, &v)
}

func (c *Client) stream(ctx context.Context, method, path string, body io.Reader, size int64, out any) error {
	resp, err := c.sendSized(ctx, method, path, body, size)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode >= 300 {
		return decodeError(resp)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// CreateTransfer opens a resumable transfer on a receiving daemon.
func (c *Client) CreateTransfer(ctx context.Context, opts api.ImportOptions) (api.Transfer, error) {
	var t api.Transfer
	return t, c.do(ctx, http.MethodPost, "/v1/transfers", opts, &t)
}

// PutTransfer sends (the rest of) a bundle, starting at the transfer's
// Next chunk.
func (c *Client) PutTransfer(ctx context.Context, id string, body io.Reader) (api.Transfer, error) {
	var t api.Transfer
	return t, c.stream(ctx, http.MethodPut, "/v1/transfers/"+url.PathEscape(id), body, -1, &t)
}

// GetTransfer reports where a transfer stands.
func (c *Client) GetTransfer(ctx context.Context, id string) (api.Transfer, error) {
	var t api.Transfer
	return t, c.do(ctx, http.MethodGet, "/v1/transfers/"+url.PathEscape(id), nil, &t)
}

// DeleteTransfer abandons a transfer; the receiver removes what it made.
func (c *Client) DeleteTransfer(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/transfers/"+url.PathEscape(id), nil, nil)
}

// SendVM starts sending a VM to another daemon.
func (c *Client) SendVM(ctx context.Context, name string, req api.SendVM) (api.Operation, error) {
	var op api.Operation
	return op, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/send", req, &op)
}
