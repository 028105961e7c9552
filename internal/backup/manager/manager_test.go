package manager

import (
	"slices"
	"testing"

	"github.com/lodge-vm/lodge/internal/backup"
	"github.com/lodge-vm/lodge/internal/nbd"
)

func TestChunksOf(t *testing.T) {
	const c = backup.ChunkSize
	for _, tc := range []struct {
		name   string
		ranges []nbd.Extent
		size   int64
		want   []int64
	}{
		{"nothing", nil, 10 * c, nil},
		{"inside one chunk", []nbd.Extent{{Offset: c + 10, Length: 20}}, 10 * c, []int64{1}},
		{"across a boundary", []nbd.Extent{{Offset: c - 1, Length: 2}}, 10 * c, []int64{0, 1}},
		{"ends on a boundary", []nbd.Extent{{Offset: 0, Length: 2 * c}}, 10 * c, []int64{0, 1}},
		{"two ranges in one chunk count once", []nbd.Extent{{Offset: 0, Length: 1}, {Offset: 100, Length: 1}, {Offset: 3 * c, Length: 1}}, 10 * c, []int64{0, 3}},
		{"short last chunk", []nbd.Extent{{Offset: 2*c + 5, Length: 100}}, 2*c + 50, []int64{2}},
		{"past the end is clipped", []nbd.Extent{{Offset: c, Length: 5 * c}}, 2 * c, []int64{1}},
		{"empty ranges are skipped", []nbd.Extent{{Offset: c, Length: 0}}, 2 * c, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := chunksOf(tc.ranges, tc.size, c); !slices.Equal(got, tc.want) {
				t.Fatalf("chunksOf: got %v, want %v", got, tc.want)
			}
		})
	}
}
