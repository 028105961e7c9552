// Package units parses and prints the sizes users type: 512M, 2G, 2GiB,
// 1.5G, 4096. Suffixes are binary (K = KiB), as qemu-img and QEMU read them.
package units

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ErrBadSize is wrapped by every parse failure.
var ErrBadSize = errors.New("not a size")

var multipliers = map[string]float64{
	"": 1, "b": 1,
	"k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
	"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
	"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
	"t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}

// ParseSize reads a size in bytes. A bare number is bytes.
func ParseSize(s string) (int64, error) {
	in := strings.TrimSpace(s)
	i := 0
	for i < len(in) && (in[i] >= '0' && in[i] <= '9' || in[i] == '.') {
		i++
	}
	num, suffix := in[:i], strings.ToLower(strings.TrimSpace(in[i:]))
	if num == "" {
		return 0, fmt.Errorf("%q: %w (use a number with an optional K, M, G or T suffix, e.g. 512M)", s, ErrBadSize)
	}
	mult, ok := multipliers[suffix]
	if !ok {
		return 0, fmt.Errorf("%q: %w: unknown unit %q", s, ErrBadSize, suffix)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("%q: %w", s, ErrBadSize)
	}
	v := f * mult
	if v > math.MaxInt64/2 {
		return 0, fmt.Errorf("%q: %w: too large", s, ErrBadSize)
	}
	return int64(v), nil
}

// FormatSize prints bytes the short way users type them: 512M, 2G, 1.5G.
func FormatSize(b int64) string {
	units := []struct {
		suffix string
		size   int64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}}
	for _, u := range units {
		if b >= u.size {
			if b%u.size == 0 {
				return fmt.Sprintf("%d%s", b/u.size, u.suffix)
			}
			return strconv.FormatFloat(float64(b)/float64(u.size), 'f', 1, 64) + u.suffix
		}
	}
	return fmt.Sprintf("%dB", b)
}

// MeminfoField reads one field of /proc/meminfo text ("MemAvailable:
// 123 kB"), in bytes. The text may come from a guest, so anything odd is
// an error rather than a guess.
func MeminfoField(data []byte, field string) (int64, error) {
	for _, line := range strings.Split(string(data), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if !ok || name != field {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("meminfo %s: %q: want a count of kB", field, strings.TrimSpace(rest))
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || kb < 0 || kb > math.MaxInt64>>10 {
			return 0, fmt.Errorf("meminfo %s: %q: not a count of kB", field, f[0])
		}
		return kb << 10, nil
	}
	return 0, fmt.Errorf("meminfo: no %s line", field)
}
