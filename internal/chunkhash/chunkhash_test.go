package chunkhash

import (
	"math/rand/v2"
	"testing"

	"lukechampine.com/blake3"
)

// TestSum256MatchesBlake3 covers both paths: sizes the subtree walk takes
// (two subtrees, odd counts, powers of two, the largest chunk a repository
// allows) and sizes it leaves to the library.
func TestSum256MatchesBlake3(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{
		0, 1, 64, 1024, 1025, subtree - 1, subtree, subtree + 1, 2*subtree - 1,
		2 * subtree, 3 * subtree, 5 * subtree, 7 * subtree, 48 * subtree,
		1 << 20, 1<<20 - subtree, 1<<20 + subtree, 1<<20 + 1, 4 << 20, 16 << 20,
	} {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		if got, want := Sum256(b), blake3.Sum256(b); got != want {
			t.Errorf("Sum256 of %d bytes = %x, want %x", n, got, want)
		}
	}
}

func FuzzSum256(f *testing.F) {
	f.Add(uint16(2), uint64(1))
	f.Add(uint16(64), uint64(7))
	f.Fuzz(func(t *testing.T, subtrees uint16, seed uint64) {
		n := int(subtrees%1100) * subtree / 4 // whole subtrees and not
		b := make([]byte, n)
		rng := rand.New(rand.NewPCG(seed, 0))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		if got, want := Sum256(b), blake3.Sum256(b); got != want {
			t.Fatalf("Sum256 of %d bytes = %x, want %x", n, got, want)
		}
	})
}

func BenchmarkSum256(b *testing.B) {
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	for _, impl := range []struct {
		name string
		sum  func([]byte) [32]byte
	}{{"chunkhash", Sum256}, {"blake3", blake3.Sum256}} {
		b.Run(impl.name, func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					impl.sum(data)
				}
			})
		})
	}
}
