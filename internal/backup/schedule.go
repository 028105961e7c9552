package backup

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// Schedule says when backups run: every fixed interval, or at the
// minutes a cron expression matches. Two schedules are the same when
// their Strings are; the zero Schedule never fires.
type Schedule struct {
	text string

	every time.Duration

	// The cron fields as bit sets, bit n standing for value n.
	minute uint64
	hour   uint32
	dom    uint32
	month  uint16
	dow    uint8
	// Cron's rule for the two day fields: if either starts with "*", a
	// day must match both; otherwise it may match either.
	domStar, dowStar bool
}

const (
	minEvery = time.Minute
	maxEvery = 365 * 24 * time.Hour
)

var cronNames = map[string]string{
	"@hourly":  "0 * * * *",
	"@daily":   "0 0 * * *",
	"@weekly":  "0 0 * * 0",
	"@monthly": "0 0 1 * *",
}

type cronField struct {
	name   string
	lo, hi int
}

var cronFields = [5]cronField{
	{"minute", 0, 59},
	{"hour", 0, 23},
	{"day-of-month", 1, 31},
	{"month", 1, 12},
	{"day-of-week", 0, 7},
}

// ParseSchedule reads an interval ("30m", "1h", "1d", "1d12h"; at least
// 1m, whole seconds) or a cron expression of five fields, "minute hour
// day-of-month month day-of-week", each "*", a number, a range "a-b", a
// step "*/n" or "a-b/n", or a comma-separated list of those; day-of-week
// 0 and 7 are Sunday. @hourly, @daily, @weekly and @monthly stand for
// their usual expressions. Errors wrap ErrInvalid.
func ParseSchedule(s string) (Schedule, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return Schedule{}, fmt.Errorf("schedule: %w: empty; want an interval such as 1h or a cron expression such as \"0 3 * * *\"", errdefs.ErrInvalid)
	}
	if strings.HasPrefix(t, "@") {
		expr, ok := cronNames[t]
		if !ok {
			return Schedule{}, fmt.Errorf("schedule %q: %w: want @hourly, @daily, @weekly or @monthly", s, errdefs.ErrInvalid)
		}
		sc, err := parseCron(s, strings.Fields(expr))
		if err != nil {
			return Schedule{}, err
		}
		sc.text = t
		return sc, nil
	}
	fields := strings.Fields(t)
	switch len(fields) {
	case 1:
		d, err := parseEvery(t)
		if err != nil {
			return Schedule{}, fmt.Errorf("schedule %q: %w", s, err)
		}
		return Schedule{text: formatEvery(d), every: d}, nil
	case 5:
		sc, err := parseCron(s, fields)
		if err != nil {
			return Schedule{}, err
		}
		sc.text = strings.Join(fields, " ")
		return sc, nil
	}
	return Schedule{}, fmt.Errorf("schedule %q: %w: want an interval such as 1h or a cron expression of 5 fields, not %d fields", s, errdefs.ErrInvalid, len(fields))
}

// parseEvery reads a Go duration with an optional leading count of days.
func parseEvery(s string) (time.Duration, error) {
	bad := func(why string) (time.Duration, error) {
		return 0, fmt.Errorf("%w: %s", errdefs.ErrInvalid, why)
	}
	var d time.Duration
	rest := s
	if days, after, ok := strings.Cut(s, "d"); ok {
		n, ok := number(days, 3)
		if !ok {
			return bad("want a whole number of days before \"d\", as in 1d or 2d12h")
		}
		d = time.Duration(n) * 24 * time.Hour
		rest = after
		if rest != "" && (rest[0] < '0' || rest[0] > '9') {
			return bad("after the days, want a duration such as 12h")
		}
	}
	if rest != "" {
		v, err := time.ParseDuration(rest)
		if err != nil {
			return bad("want a duration such as 30m, 1h or 1d, or a cron expression such as \"0 3 * * *\"")
		}
		if v > maxEvery {
			return bad("longer than the maximum 365d")
		}
		d += v
	}
	switch {
	case d < minEvery:
		return bad("shorter than the minimum 1m")
	case d > maxEvery:
		return bad("longer than the maximum 365d")
	case d%time.Second != 0:
		return bad("not a whole number of seconds")
	}
	return d, nil
}

// formatEvery writes d so that parseEvery reads it back.
func formatEvery(d time.Duration) string {
	var b strings.Builder
	for _, u := range []struct {
		unit time.Duration
		name string
	}{{24 * time.Hour, "d"}, {time.Hour, "h"}, {time.Minute, "m"}, {time.Second, "s"}} {
		if n := d / u.unit; n > 0 {
			fmt.Fprintf(&b, "%d%s", n, u.name)
			d -= n * u.unit
		}
	}
	return b.String()
}

// number reads a non-negative decimal of at most maxDigits digits.
func number(s string, maxDigits int) (int, bool) {
	if s == "" || len(s) > maxDigits {
		return 0, false
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.Atoi(s)
	return n, err == nil
}

func parseCron(s string, fields []string) (Schedule, error) {
	var bits [5]uint64
	for i, f := range fields {
		b, err := parseCronField(f, cronFields[i])
		if err != nil {
			return Schedule{}, fmt.Errorf("schedule %q: %s field %q: %w", s, cronFields[i].name, f, err)
		}
		bits[i] = b
	}
	// Day-of-week 7 is Sunday, like 0.
	if bits[4]&(1<<7) != 0 {
		bits[4] = bits[4]&^(1<<7) | 1
	}
	sc := Schedule{
		minute:  bits[0],
		hour:    uint32(bits[1]),
		dom:     uint32(bits[2]),
		month:   uint16(bits[3]),
		dow:     uint8(bits[4]),
		domStar: strings.HasPrefix(fields[2], "*"),
		dowStar: strings.HasPrefix(fields[4], "*"),
	}
	if (sc.domStar || sc.dowStar) && !sc.someDayExists() {
		return Schedule{}, fmt.Errorf("schedule %q: day-of-month field %q: %w: no month in %q has such a day", s, fields[2], errdefs.ErrInvalid, fields[3])
	}
	return sc, nil
}

// someDayExists reports whether some month of the schedule has one of its
// days of the month: "0 0 30 2 *" would never fire.
func (s Schedule) someDayExists() bool {
	longest := [13]int{0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}
	for m := 1; m <= 12; m++ {
		if s.month&(1<<m) == 0 {
			continue
		}
		for d := 1; d <= longest[m]; d++ {
			if s.dom&(1<<d) != 0 {
				return true
			}
		}
	}
	return false
}

func parseCronField(f string, spec cronField) (uint64, error) {
	bad := func(format string, args ...any) (uint64, error) {
		return 0, fmt.Errorf("%w: %s", errdefs.ErrInvalid, fmt.Sprintf(format, args...))
	}
	var bits uint64
	for item := range strings.SplitSeq(f, ",") {
		if item == "" {
			return bad("empty item in a list")
		}
		span, stepText, hasStep := strings.Cut(item, "/")
		step := 1
		if hasStep {
			n, ok := number(stepText, 2)
			if !ok || n < 1 || n > spec.hi {
				return bad("step %q: want a number from 1 to %d", stepText, spec.hi)
			}
			step = n
		}
		var lo, hi int
		if span == "*" {
			lo, hi = spec.lo, spec.hi
		} else {
			a, b, isRange := strings.Cut(span, "-")
			if !isRange {
				if hasStep {
					return bad("a step needs * or a range before it, as in */%d", step)
				}
				b = a
			}
			var okA, okB bool
			lo, okA = number(a, 2)
			hi, okB = number(b, 2)
			switch {
			case !okA || !okB:
				return bad("%q is not a number, range or *", span)
			case lo < spec.lo || hi > spec.hi || hi < spec.lo || lo > spec.hi:
				return bad("%s is out of range %d-%d", span, spec.lo, spec.hi)
			case lo > hi:
				return bad("range %s runs backwards", span)
			}
		}
		for v := lo; v <= hi; v += step {
			bits |= 1 << v
		}
	}
	return bits, nil
}

// String is the schedule as ParseSchedule reads it back.
func (s Schedule) String() string { return s.text }

// Next is when the schedule fires next. For an interval that is last plus
// the interval, or now if it never ran (a time long past means it is
// due). For cron it is the first matching minute after last, or after now
// if it never ran, in the location of that time: pass local time for a
// schedule in local time. Around a change of summer time, a minute that
// does not exist is skipped and one that repeats may fire twice. The zero
// Schedule gives the zero Time.
func (s Schedule) Next(last, now time.Time) time.Time {
	if s.every > 0 {
		if last.IsZero() {
			return now
		}
		return last.Add(s.every)
	}
	if s.minute == 0 {
		return time.Time{}
	}
	after := last
	if after.IsZero() {
		after = now
	}
	return s.nextCron(after)
}

func (s Schedule) nextCron(after time.Time) time.Time {
	loc := after.Location()
	t := after.Truncate(time.Minute).Add(time.Minute).In(loc)
	// Feb 29 on a given weekday can be decades away; nothing else is.
	limit := after.AddDate(100, 0, 0)
	for t.Before(limit) {
		y, mo, d := t.Date()
		var nt time.Time
		switch {
		case s.month&(1<<mo) == 0:
			nt = time.Date(y, mo+1, 1, 0, 0, 0, 0, loc)
		case !s.dayMatches(t):
			nt = time.Date(y, mo, d+1, 0, 0, 0, 0, loc)
		case s.hour&(1<<t.Hour()) == 0:
			nt = time.Date(y, mo, d, t.Hour()+1, 0, 0, 0, loc)
		case s.minute&(1<<t.Minute()) == 0:
			nt = t.Add(time.Minute)
		default:
			return t
		}
		// time.Date may land on or before t in an hour that summer time
		// repeats; always move on.
		if !nt.After(t) {
			nt = t.Add(time.Minute)
		}
		t = nt
	}
	return time.Time{}
}

func (s Schedule) dayMatches(t time.Time) bool {
	dom := s.dom&(1<<t.Day()) != 0
	dow := s.dow&(1<<t.Weekday()) != 0
	if s.domStar || s.dowStar {
		return dom && dow
	}
	return dom || dow
}
