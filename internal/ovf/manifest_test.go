package ovf

import (
	"bytes"
	"encoding/hex"
	"reflect"
	"strings"
	"testing"
)

func TestParseManifest(t *testing.T) {
	sha1Hex := strings.Repeat("0a", 20)
	sha256Hex := strings.Repeat("1b", 32)
	sha512Hex := strings.Repeat("2C", 64)
	sum := func(h string) []byte {
		b, err := hex.DecodeString(h)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tests := []struct {
		name string
		in   string
		want map[string]Digest
	}{
		{"empty", "", map[string]Digest{}},
		{"ovftool SHA1", "SHA1(web.ovf)= " + sha1Hex + "\nSHA1(web-disk1.vmdk)= " + sha1Hex + "\n", map[string]Digest{
			"web.ovf":        {"SHA1", sum(sha1Hex)},
			"web-disk1.vmdk": {"SHA1", sum(sha1Hex)},
		}},
		{"space before equals", "SHA256(web.ovf) = " + sha256Hex, map[string]Digest{
			"web.ovf": {"SHA256", sum(sha256Hex)},
		}},
		{"no space at all", "SHA512(web.ovf)=" + sha512Hex, map[string]Digest{
			"web.ovf": {"SHA512", sum(sha512Hex)},
		}},
		{"CRLF and blank lines", "\r\nSHA256(a.vmdk)= " + sha256Hex + "\r\n\r\nSHA1(b.vmdk)= " + sha1Hex + "\r\n", map[string]Digest{
			"a.vmdk": {"SHA256", sum(sha256Hex)},
			"b.vmdk": {"SHA1", sum(sha1Hex)},
		}},
		{"lower-case algorithm", "sha256(a.vmdk)= " + sha256Hex, map[string]Digest{
			"a.vmdk": {"SHA256", sum(sha256Hex)},
		}},
		{"spaces in name", "SHA256(my disk.vmdk)= " + sha256Hex, map[string]Digest{
			"my disk.vmdk": {"SHA256", sum(sha256Hex)},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseManifest(strings.NewReader(tt.in))
			if err != nil {
				t.Fatalf("ParseManifest: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ParseManifest = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestParseManifestRefuses(t *testing.T) {
	sha256Hex := strings.Repeat("1b", 32)
	tests := []struct {
		name, in, want string
	}{
		{"MD5", "MD5(a.vmdk)= " + strings.Repeat("ab", 16), `unsupported digest algorithm "MD5"`},
		{"no parentheses", "SHA256 a.vmdk = " + sha256Hex, "manifest line 1: not of the form"},
		{"no digest", "SHA256(a.vmdk)=", "manifest line 1: not of the form"},
		{"garbage second line", "SHA256(a.vmdk)= " + sha256Hex + "\nhello", "manifest line 2: not of the form"},
		{"short digest", "SHA256(a.vmdk)= " + sha256Hex[2:], "has 62 hex digits, want 64"},
		{"SHA1 length for SHA256", "SHA256(a.vmdk)= " + strings.Repeat("0a", 20), "want 64"},
		{"odd digits", "SHA1(a.vmdk)= " + strings.Repeat("0", 41), "want 40"},
		{"non-hex", "SHA256(a.vmdk)= " + strings.Repeat("zz", 32), "not of the form"},
		{"path", "SHA256(../a.vmdk)= " + sha256Hex, `"../a.vmdk" is not a plain file name`},
		{"absolute", "SHA256(/a.vmdk)= " + sha256Hex, "is not a plain file name"},
		{"empty name", "SHA256()= " + sha256Hex, "is not a plain file name"},
		{"URL", "SHA256(http://x/a.vmdk)= " + sha256Hex, "is not a plain file name"},
		{"duplicate", "SHA256(a.vmdk)= " + sha256Hex + "\nSHA1(a.vmdk)= " + strings.Repeat("0a", 20), "manifest line 2: a.vmdk is listed twice"},
		{"not UTF-8", "SHA256(\xff.vmdk)= " + sha256Hex, "not UTF-8"},
		{"too large", strings.Repeat("\n", maxManifest+1), "larger than 1 MiB"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseManifest(bytes.NewReader([]byte(tt.in)))
			checkInvalid(t, err, tt.want)
		})
	}
}
