package backup

import (
	"bytes"
	"crypto/rand"
	"strings"
	"testing"
)

func TestRawFrame(t *testing.T) {
	c, err := codec()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{1, 255, 256, rawBlockSize - 1, rawBlockSize, rawBlockSize + 1, 1 << 20, 4<<20 + 7} {
		data := make([]byte, n)
		_, _ = rand.Read(data)
		frame := rawFrame(nil, data)
		got, err := c.dec.DecodeAll(frame, make([]byte, 0, n))
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("raw frame of %d bytes: decoded %d bytes, %v; want the data back", n, len(got), err)
		}
		if over := len(frame) - n; over > 9+3*(n/rawBlockSize+1) {
			t.Fatalf("raw frame of %d bytes: %d bytes of framing", n, over)
		}
	}
}

func TestIncompressible(t *testing.T) {
	random := make([]byte, 1<<20)
	_, _ = rand.Read(random)
	text := []byte(strings.Repeat("the quick brown fox jumps over the lazy dog 0123456789\n", 20000))
	half := append(append([]byte(nil), random[:1<<19]...), make([]byte, 1<<19)...)
	for _, tc := range []struct {
		name string
		data []byte
		want bool
	}{
		{"random", random, true},
		{"text", text, false},
		{"zeros", make([]byte, 1<<20), false},
		{"half random, half zeros", half, false},
		{"too small to tell", random[:100], false},
	} {
		if got := incompressible(tc.data); got != tc.want {
			t.Errorf("incompressible(%s): got %v, want %v", tc.name, got, tc.want)
		}
	}
}
