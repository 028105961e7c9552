package backup

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestStageChunk writes chunks of awkward sizes from aligned and unaligned
// buffers, with O_DIRECT and through the page cache as on a filesystem
// that refuses it, and reads each back.
func TestStageChunk(t *testing.T) {
	for _, direct := range []bool{true, false} {
		t.Run(map[bool]string{true: "direct", false: "page cache"}[direct], func(t *testing.T) {
			r, err := initRepo(filepath.Join(t.TempDir(), "repo"), testChunk)
			if err != nil {
				t.Fatal(err)
			}
			r.direct.refused.Store(!direct)
			for _, n := range []int{1, 4095, 4096, 4097, 1<<20 + 13} {
				for _, buf := range map[string][]byte{
					"aligned, room for padding": alignedBuffer(n),
					"unaligned":                 make([]byte, 1, n+1)[1:],
					"aligned, no room":          alignedBuffer(n)[:0:n],
				} {
					data := append(buf, bytes.Repeat([]byte{byte(n), 7, 0, 3}, n/4+1)[:n]...)
					path, err := r.stageChunk(data)
					if err != nil {
						t.Fatalf("stage %d bytes: %v", n, err)
					}
					got, err := os.ReadFile(path)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, data) {
						t.Fatalf("staged %d bytes, read back %d that differ", n, len(got))
					}
				}
			}
			if direct && r.direct.refused.Load() {
				t.Error("the test's filesystem refused O_DIRECT: nothing was written directly")
			}
		})
	}
}
