package client

import (
	"strings"
	"testing"
)

func TestTokens(t *testing.T) {
	cert := []byte("a certificate's DER bytes")
	secret := strings.Repeat("ab", 24)
	tok := FormatToken(cert, secret)
	fp, got, err := ParseToken(tok)
	if err != nil || got != secret || len(fp) != 32 {
		t.Fatalf("ParseToken(FormatToken) = %x, %q, %v", fp, got, err)
	}
	bad := []string{
		"",
		secret,
		"lodge2:" + strings.Repeat("00", 32) + ":" + secret,
		"lodge1:nothex:" + secret,
		"lodge1:" + strings.Repeat("00", 31) + ":" + secret,
		"lodge1:" + strings.Repeat("00", 32) + ":short",
	}
	for _, b := range bad {
		if _, _, err := ParseToken(b); err == nil {
			t.Errorf("ParseToken(%q) was accepted", b)
		}
	}
}

func TestNewRemoteRefuses(t *testing.T) {
	tok := FormatToken([]byte("x"), strings.Repeat("ab", 24))
	for _, addr := range []string{"http://host:1", "host:1", "https://", "https://host:1/path", "ftp://host"} {
		if _, err := NewRemote(addr, tok); err == nil || !strings.Contains(err.Error(), "https://HOST:PORT") {
			t.Errorf("NewRemote(%q): %v", addr, err)
		}
	}
	if _, err := NewRemote("https://127.0.0.1:1", "garbage"); err == nil || !strings.Contains(err.Error(), "token") {
		t.Errorf("a bad token: %v", err)
	}
}
