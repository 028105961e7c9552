package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/client"
	"github.com/lodge-vm/lodge/internal/errdefs"
)

// The TCP listener serves the same API over HTTPS for other daemons (send)
// and remote clients. Its certificate is self-signed and made on first
// use; callers pin it through the access token, which also carries a
// secret they must present. The unix socket needs neither: its file
// mode is the access control.

type remoteKey struct{}

// isRemote tells whether a request came in over TCP.
func isRemote(r *http.Request) bool { return r.Context().Value(remoteKey{}) != nil }

// remoteIdentity loads or makes the listener's certificate and secret.
func (d *Daemon) remoteIdentity() (tls.Certificate, string, error) {
	dir := filepath.Join(d.cfg.Home, "tls")
	certPath, keyPath, secretPath := filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"), filepath.Join(dir, "token.secret")
	if _, err := os.Stat(certPath); errors.Is(err, os.ErrNotExist) {
		if err := makeIdentity(dir, certPath, keyPath, secretPath); err != nil {
			return tls.Certificate{}, "", fmt.Errorf("make the listener's certificate in %s: %w", dir, err)
		}
	}
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, "", fmt.Errorf("load the listener's certificate: %w", err)
	}
	secret, err := os.ReadFile(secretPath)
	if err != nil {
		return tls.Certificate{}, "", fmt.Errorf("load the access secret: %w", err)
	}
	return cert, strings.TrimSpace(string(secret)), nil
}

func makeIdentity(dir, certPath, keyPath, secretPath string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "lodge " + host},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(10, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	secret := make([]byte, 24)
	if _, err := rand.Read(secret); err != nil {
		return err
	}
	// The certificate goes last: its presence means the set is whole.
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(secretPath, []byte(hex.EncodeToString(secret)+"\n"), 0o600); err != nil {
		return err
	}
	return os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// serveRemote serves the API over HTTPS on cfg.Listen until ctx ends.
func (d *Daemon) serveRemote(ctx context.Context, handler http.Handler) (*http.Server, error) {
	cert, secret, err := d.remoteIdentity()
	if err != nil {
		return nil, err
	}
	d.token = client.FormatToken(cert.Certificate[0], secret)
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", d.cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", d.cfg.Listen, err)
	}
	d.listenAddr = ln.Addr().String()
	authed := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if subtle.ConstantTimeCompare([]byte(got), []byte(secret)) != 1 {
			writeJSON(w, http.StatusUnauthorized, api.Error{Error: "remote access: a valid access token is required (`lodge host token` on this host)", Code: "unauthorized"})
			return
		}
		handler.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), remoteKey{}, true)))
	})
	srv := &http.Server{
		Handler:           authed,
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}},
	}
	go func() {
		if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("remote listener", "addr", d.cfg.Listen, "err", err)
		}
	}()
	d.log.Info("serving remote API", "addr", d.listenAddr)
	return srv, nil
}

// hostToken tells a local caller how remote daemons reach this one. It
// is never served over TCP: the token is the key to that door.
func (d *Daemon) hostToken(w http.ResponseWriter, r *http.Request) {
	if isRemote(r) {
		writeErr(w, fmt.Errorf("host token: %w: ask on the host itself", errdefs.ErrInvalid))
		return
	}
	if d.token == "" {
		writeErr(w, fmt.Errorf("host token: %w: the daemon has no TCP listener; start it with --listen HOST:PORT", errdefs.ErrState))
		return
	}
	writeJSON(w, http.StatusOK, api.HostToken{Listen: d.listenAddr, Token: d.token})
}
