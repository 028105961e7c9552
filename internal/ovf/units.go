package ovf

import (
	"errors"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Limits beyond which a number in a descriptor is taken as hostile or broken
// rather than as a real machine: they keep the arithmetic far from int64
// overflow and stop a descriptor from asking the host for a petabyte disk.
const (
	maxCapacity = 1 << 50 // bytes per disk or file
	maxMemory   = 1 << 44 // bytes of guest memory
	maxCPUs     = 1024
)

var (
	errNotNumber = errors.New("is not a whole number")
	errNegative  = errors.New("is negative")
	errTooLarge  = errors.New("is too large")
)

// parseCount parses a non-negative decimal integer.
func parseCount(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, errNotNumber
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		if errors.Is(err, strconv.ErrRange) {
			if strings.HasPrefix(s, "-") {
				return 0, errNegative
			}
			return 0, errTooLarge
		}
		return 0, errNotNumber
	}
	if n < 0 {
		return 0, errNegative
	}
	return n, nil
}

// scale multiplies a count by a unit, refusing results above limit. Both
// arguments are non-negative and limit is far below MaxInt64, so the division
// test is exact.
func scale(n, unit, limit int64) (int64, error) {
	if n == 0 || unit == 0 {
		return 0, nil
	}
	if n > limit/unit {
		return 0, errTooLarge
	}
	return n * unit, nil
}

// namedUnits are the spellings exporters use instead of DSP0004 programmatic
// units. The prefixes are binary because that is what VMware and VirtualBox
// mean by them, whatever SI says.
var namedUnits = map[string]int64{
	"byte": 1, "bytes": 1, "b": 1,
	"kilobyte": 1 << 10, "kilobytes": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
	"megabyte": 1 << 20, "megabytes": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
	"gigabyte": 1 << 30, "gigabytes": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
	"terabyte": 1 << 40, "terabytes": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}

// maxUnit keeps a unit small enough that a quantity of one is still a
// plausible size; a larger unit can only come from a broken descriptor.
const maxUnit = 1 << 50

// parseUnits returns the number of bytes in one unit, accepting the DSP0004
// programmatic form ("byte * 2^20", "byte*10^3", "byte * 1024") and the
// common names ("MegaBytes", "MB").
func parseUnits(s string) (int64, bool) {
	norm := strings.ToLower(strings.Join(strings.Fields(s), ""))
	if u, ok := namedUnits[norm]; ok {
		return u, true
	}
	rest, ok := strings.CutPrefix(norm, "byte")
	if !ok {
		return 0, false
	}
	rest = strings.TrimPrefix(rest, "s")
	if rest == "" {
		return 0, false // plain "byte(s)" is in namedUnits; anything else is junk
	}
	if !strings.HasPrefix(rest, "*") {
		return 0, false
	}
	unit := int64(1)
	for _, term := range strings.Split(rest, "*")[1:] {
		f, ok := unitFactor(term)
		if !ok {
			return 0, false
		}
		if unit > maxUnit/f {
			return 0, false
		}
		unit *= f
	}
	return unit, true
}

// unitFactor evaluates one multiplier of a programmatic unit: "2^20", "10^3"
// or a plain integer.
func unitFactor(term string) (int64, bool) {
	base, exp, power := strings.Cut(term, "^")
	b, err := strconv.ParseInt(base, 10, 64)
	if err != nil || b < 1 || b > maxUnit {
		return 0, false
	}
	if !power {
		return b, true
	}
	e, err := strconv.ParseInt(exp, 10, 64)
	if err != nil || e < 0 || e > 64 {
		return 0, false
	}
	f := int64(1)
	for range e {
		if f > maxUnit/b {
			return 0, false
		}
		f *= b
	}
	return f, true
}

// isPlainName reports whether s can only mean a file in the package's own
// directory: no separators of either platform, no parent references, no URL
// scheme or drive letter (both need ':'), nothing that a terminal or a path
// API would treat specially.
func isPlainName(s string) bool {
	if s == "" || s == "." || len(s) > 255 || !utf8.ValidString(s) {
		return false
	}
	if strings.Contains(s, "..") || strings.ContainsAny(s, `/\:`) {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return false
		}
	}
	return true
}
