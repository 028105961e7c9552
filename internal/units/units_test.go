package units

import (
	"errors"
	"testing"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		bad  bool
	}{
		{in: "512M", want: 512 << 20},
		{in: "2G", want: 2 << 30},
		{in: "2GiB", want: 2 << 30},
		{in: "2gb", want: 2 << 30},
		{in: "1.5G", want: 3 << 29},
		{in: "4096", want: 4096},
		{in: " 8G ", want: 8 << 30},
		{in: "1T", want: 1 << 40},
		{in: "", bad: true},
		{in: "G", bad: true},
		{in: "-1G", bad: true},
		{in: "12X", bad: true},
		{in: "1..2G", bad: true},
		{in: "lots", bad: true},
		{in: "99999999999T", bad: true},
	}
	for _, tt := range tests {
		got, err := ParseSize(tt.in)
		if tt.bad {
			if !errors.Is(err, ErrBadSize) {
				t.Errorf("ParseSize(%q) = %d, %v; want ErrBadSize", tt.in, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
}

func TestFormatSize(t *testing.T) {
	tests := map[int64]string{512 << 20: "512M", 2 << 30: "2G", 3 << 29: "1.5G", 100: "100B", 1 << 40: "1T"}
	for in, want := range tests {
		if got := FormatSize(in); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", in, got, want)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"512M", "2GiB", "1.5g", "", "x", "9e99", "1e3G"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseSize(s)
		if err == nil && v < 0 {
			t.Fatalf("ParseSize(%q) = %d: negative", s, v)
		}
	})
}

func TestMeminfoField(t *testing.T) {
	const text = "MemTotal:        1000 kB\nMemFree:  10 kB\nMemAvailable:     512 kB\nHugePages_Total:       0\nBad: x kB\n"
	tests := []struct {
		field   string
		want    int64
		wantErr bool
	}{
		{"MemTotal", 1000 << 10, false},
		{"MemAvailable", 512 << 10, false},
		{"HugePages_Total", 0, true},
		{"Bad", 0, true},
		{"SwapTotal", 0, true},
		{"Mem", 0, true},
	}
	for _, tt := range tests {
		got, err := MeminfoField([]byte(text), tt.field)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("MeminfoField(%s) = %d, %v; want %d, error %v", tt.field, got, err, tt.want, tt.wantErr)
		}
	}
}

func FuzzMeminfoField(f *testing.F) {
	f.Add([]byte("MemTotal: 1000 kB\nMemAvailable: 512 kB\n"), "MemAvailable")
	f.Add([]byte("MemAvailable: 99999999999999999999 kB\n"), "MemAvailable")
	f.Add([]byte("MemAvailable: -1 kB\n"), "MemAvailable")
	f.Fuzz(func(t *testing.T, data []byte, field string) {
		n, err := MeminfoField(data, field)
		if err == nil && (n < 0 || n%1024 != 0) {
			t.Fatalf("MeminfoField = %d without an error", n)
		}
	})
}
