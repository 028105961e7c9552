package backup

import (
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
	_ "time/tzdata" // the summer-time test needs America/New_York anywhere

	"github.com/lodge-vm/lodge/internal/errdefs"
)

func TestParseSchedule(t *testing.T) {
	for _, tc := range []struct {
		in, want string
	}{
		{"30m", "30m"},
		{"1h", "1h"},
		{" 1h\t", "1h"},
		{"90m", "1h30m"},
		{"1m", "1m"},
		{"61s", "1m1s"},
		{"1d", "1d"},
		{"36h", "1d12h"},
		{"1d12h", "1d12h"},
		{"2d0h30m", "2d30m"},
		{"365d", "365d"},
		{"0 3 * * *", "0 3 * * *"},
		{"0  3 *\t* *", "0 3 * * *"},
		{"*/15 * * * *", "*/15 * * * *"},
		{"0 0 * * 7", "0 0 * * 7"},
		{"0 9-17/2 * * 1-5", "0 9-17/2 * * 1-5"},
		{"0,30 8,20 1,15 1-12 *", "0,30 8,20 1,15 1-12 *"},
		{"0 0 29 2 *", "0 0 29 2 *"},
		{"0 0 31 2 1", "0 0 31 2 1"}, // Feb 31 never, but Mondays do
		{"@hourly", "@hourly"},
		{"@daily", "@daily"},
		{"@weekly", "@weekly"},
		{"@monthly", "@monthly"},
	} {
		s, err := ParseSchedule(tc.in)
		if err != nil {
			t.Fatalf("parse %q: %v", tc.in, err)
		}
		if got := s.String(); got != tc.want {
			t.Fatalf("parse %q: got %q, want %q", tc.in, got, tc.want)
		}
		again, err := ParseSchedule(s.String())
		if err != nil || again != s {
			t.Fatalf("parse %q again: got %+v %v, want %+v", s.String(), again, err, s)
		}
	}
}

func TestParseScheduleErrors(t *testing.T) {
	for _, tc := range []struct {
		in, says string
	}{
		{"", "empty"},
		{"   ", "empty"},
		{"30s", "minimum 1m"},
		{"0s", "minimum 1m"},
		{"-1h", "minimum 1m"},
		{"1m0.5s", "whole number of seconds"},
		{"366d", "maximum 365d"},
		{"9000h", "maximum 365d"},
		{"1x", "want a duration"},
		{"d", "days"},
		{"1d-5m", "after the days"},
		{"1.5d", "days"},
		{"1h 2h", "5 fields, not 2"},
		{"* * * *", "5 fields, not 4"},
		{"* * * * * *", "5 fields, not 6"},
		{"60 * * * *", "minute field"},
		{"* 24 * * *", "hour field"},
		{"* * 0 * *", "day-of-month field"},
		{"* * 32 * *", "day-of-month field"},
		{"* * * 13 *", "month field"},
		{"* * * 0 *", "month field"},
		{"* * * * 8", "day-of-week field"},
		{"5-3 * * * *", "backwards"},
		{"*/0 * * * *", "step"},
		{"*/60 * * * *", "step"},
		{"5/2 * * * *", "needs * or a range"},
		{"a * * * *", "not a number"},
		{"-5 * * * *", "not a number"},
		{",1 * * * *", "empty item"},
		{"1, * * * *", "empty item"},
		{"0 0 30 2 *", "no month"},
		{"0 0 31 4,6,9,11 *", "no month"},
		{"0 0 31 2 */2", "no month"},
		{"@yearly", "@hourly"},
		{"@ hourly", "@hourly"},
		{"0 3 * * *\n", ""}, // fine: surrounding space
	} {
		_, err := ParseSchedule(tc.in)
		if tc.says == "" {
			if err != nil {
				t.Fatalf("parse %q: %v", tc.in, err)
			}
			continue
		}
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), tc.says) {
			t.Fatalf("parse %q: got %v, want ErrInvalid saying %q", tc.in, err, tc.says)
		}
		if strings.Contains(err.Error(), "\n") {
			t.Fatalf("parse %q: error of several lines: %q", tc.in, err)
		}
	}
}

func TestScheduleNext(t *testing.T) {
	utc := func(s string) time.Time { return at(t, s) }
	plus2 := time.FixedZone("+02", 2*3600)
	for _, tc := range []struct {
		sched     string
		last, now time.Time
		want      time.Time
	}{
		{"1h", time.Time{}, utc("2026-03-01 10:00"), utc("2026-03-01 10:00")},
		{"1h", utc("2026-03-01 10:00"), utc("2026-03-01 10:20"), utc("2026-03-01 11:00")},
		{"1d", utc("2026-03-01 10:00"), utc("2026-03-05 10:20"), utc("2026-03-02 10:00")},
		{"0 3 * * *", time.Time{}, utc("2026-03-01 02:59"), utc("2026-03-01 03:00")},
		{"0 3 * * *", utc("2026-03-01 03:00"), utc("2026-03-01 03:00"), utc("2026-03-02 03:00")},
		{"0 3 * * *", at(t, "2026-03-01T02:59:30Z"), time.Time{}, utc("2026-03-01 03:00")},
		{"*/15 * * * *", at(t, "2026-03-01T10:07:12Z"), time.Time{}, utc("2026-03-01 10:15")},
		{"*/15 * * * *", utc("2026-03-01 23:45"), time.Time{}, utc("2026-03-02 00:00")},
		{"0 0 * * 0", utc("2026-03-02 00:00"), time.Time{}, utc("2026-03-08 00:00")},
		{"0 0 * * 7", utc("2026-03-02 00:00"), time.Time{}, utc("2026-03-08 00:00")},
		{"@weekly", utc("2026-03-02 00:00"), time.Time{}, utc("2026-03-08 00:00")},
		{"@monthly", utc("2026-01-15 00:00"), time.Time{}, utc("2026-02-01 00:00")},
		{"@daily", utc("2026-12-31 23:59"), time.Time{}, utc("2027-01-01 00:00")},
		{"@hourly", utc("2026-03-01 10:00"), time.Time{}, utc("2026-03-01 11:00")},
		{"0 0 29 2 *", utc("2026-03-01 00:00"), time.Time{}, utc("2028-02-29 00:00")},
		{"0 0 31 * *", utc("2026-04-01 00:00"), time.Time{}, utc("2026-05-31 00:00")},
		// Both day fields restricted: the 13th or a Friday.
		{"0 0 13 * 5", utc("2026-03-01 00:00"), time.Time{}, utc("2026-03-06 00:00")},
		{"0 0 13 * 5", utc("2026-03-07 00:00"), time.Time{}, utc("2026-03-13 00:00")},
		// A "*" day field: both must match, so odd days that are Fridays.
		{"0 0 */2 * 5", utc("2026-03-01 00:00"), time.Time{}, utc("2026-03-13 00:00")},
		{"0 9-17/2 * * 1-5", utc("2026-03-06 17:30"), time.Time{}, utc("2026-03-09 09:00")},
		{"0 9-17/2 * * 1-5", utc("2026-03-09 09:00"), time.Time{}, utc("2026-03-09 11:00")},
		{"30 4 1,15 * *", utc("2026-03-01 04:30"), time.Time{}, utc("2026-03-15 04:30")},
		// In the location of the time given.
		{"0 3 * * *", at(t, "2026-03-01T04:00:00+02:00"), time.Time{}, time.Date(2026, 3, 2, 3, 0, 0, 0, plus2)},
	} {
		s, err := ParseSchedule(tc.sched)
		if err != nil {
			t.Fatalf("parse %q: %v", tc.sched, err)
		}
		if got := s.Next(tc.last, tc.now); !got.Equal(tc.want) {
			t.Fatalf("%q next after %v (now %v): got %v, want %v", tc.sched, tc.last, tc.now, got, tc.want)
		}
	}
	if got := (Schedule{}).Next(time.Time{}, time.Now()); !got.IsZero() {
		t.Fatalf("zero schedule: got %v, want the zero time", got)
	}
}

// Next against a minute-by-minute search, on random times.
func TestScheduleNextBruteForce(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base := at(t, "2026-01-01 00:00")
	for _, expr := range []string{
		"* * * * *", "*/7 * * * *", "5,35 */3 * * *", "0 0 * * 1-5", "15 12 1-7 * 1",
		"0 0 13 * 5", "59 23 31 * *", "0 12 * 2 *", "1-10/3 2 * * 0,6", "0 0 */10 * *",
	} {
		s, err := ParseSchedule(expr)
		if err != nil {
			t.Fatalf("parse %q: %v", expr, err)
		}
		for range 4 {
			after := base.Add(time.Duration(rng.Int64N(int64(365 * 24 * time.Hour)))).Add(time.Duration(rng.IntN(60)) * time.Second)
			got := s.Next(after, time.Time{})
			want := after.Truncate(time.Minute).Add(time.Minute)
			for !s.matches(want) {
				want = want.Add(time.Minute)
			}
			if !got.Equal(want) {
				t.Fatalf("%q after %v: got %v, want %v", expr, after, got, want)
			}
		}
	}
}

// matches is the plain reading of a cron schedule, for the brute force.
func (s Schedule) matches(t time.Time) bool {
	return s.minute&(1<<t.Minute()) != 0 && s.hour&(1<<t.Hour()) != 0 &&
		s.month&(1<<t.Month()) != 0 && s.dayMatches(t)
}

func TestScheduleSummerTime(t *testing.T) {
	ny, err := time.LoadLocation("America/New_York")
	if err != nil {
		t.Fatalf("load zone: %v", err)
	}
	s, err := ParseSchedule("30 2 * * *")
	if err != nil {
		t.Fatal(err)
	}
	// 8 March 2026 has no 02:30 in New York: that day is skipped.
	got := s.Next(time.Date(2026, 3, 7, 2, 30, 0, 0, ny), time.Time{})
	if want := time.Date(2026, 3, 9, 2, 30, 0, 0, ny); !got.Equal(want) {
		t.Fatalf("over the spring change: got %v, want %v", got, want)
	}
	// 1 November 2026 has 01:30 twice; Next always moves forward.
	s, err = ParseSchedule("30 1 * * *")
	if err != nil {
		t.Fatal(err)
	}
	first := s.Next(time.Date(2026, 11, 1, 0, 0, 0, 0, ny), time.Time{})
	second := s.Next(first, time.Time{})
	if !second.After(first) || second.Sub(first) > 25*time.Hour {
		t.Fatalf("over the autumn change: got %v then %v", first, second)
	}
}
