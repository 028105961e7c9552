package partition

import (
	"encoding/binary"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
)

// mbr makes a disk head with the given primary entries: type, first
// sector, sector count.
func mbr(entries ...[3]uint32) []byte {
	b := make([]byte, 4096)
	for i, e := range entries {
		p := b[446+i*16:]
		p[4] = byte(e[0])
		binary.LittleEndian.PutUint32(p[8:], e[1])
		binary.LittleEndian.PutUint32(p[12:], e[2])
	}
	b[510], b[511] = 0x55, 0xaa
	return b
}

func TestParse(t *testing.T) {
	gpt, err := os.ReadFile("testdata/gpt.bin") // sfdisk: a 10 MiB Linux and a 20 MiB EFI partition on 64 MiB
	if err != nil {
		t.Fatal(err)
	}
	broken := slices.Clone(gpt)
	broken[1024+40]++ // inside the first entry: the entries' checksum fails
	for _, tc := range []struct {
		name    string
		head    []byte
		size    int64
		want    []Partition
		wantErr string
	}{
		{name: "the tiny guest's layout", head: mbr([3]uint32{0x0c, 2048, 98304}, [3]uint32{0x83, 100352, 524288}), size: 1 << 30,
			want: []Partition{{1, 2048 * 512, 98304 * 512, "mbr:0c"}, {2, 100352 * 512, 524288 * 512, "mbr:83"}}},
		{name: "empty and extended entries are skipped", head: mbr([3]uint32{0, 0, 0}, [3]uint32{0x05, 4096, 2048}, [3]uint32{0x83, 8192, 2048}), size: 1 << 30,
			want: []Partition{{3, 8192 * 512, 2048 * 512, "mbr:83"}}},
		{name: "an entry past the disk", head: mbr([3]uint32{0x83, 2048, 1 << 30}), size: 1 << 30, wantErr: "do not fit"},
		{name: "no signature", head: make([]byte, 4096), size: 1 << 30, wantErr: ErrNoTable.Error()},
		{name: "too short", head: []byte{1, 2, 3}, size: 1 << 30, wantErr: ErrNoTable.Error()},
		{name: "gpt", head: gpt, size: 64 << 20, want: []Partition{
			{1, 2048 * 512, 20480 * 512, "gpt:0fc63daf-8483-4772-8e79-3d69d8477de4"},
			{2, 22528 * 512, 40960 * 512, "gpt:c12a7328-f81f-11d2-ba4b-00a0c93ec93b"}}},
		{name: "gpt on a smaller disk than it says", head: gpt, size: 16 << 20, wantErr: "do not fit"},
		{name: "gpt with a damaged entry", head: broken, size: 64 << 20, wantErr: "checksum"},
		{name: "gpt cut short", head: gpt[:2048], size: 64 << 20, wantErr: "past what was read"},
		{name: "protective mbr, no gpt", head: mbr([3]uint32{0xee, 1, 1000}), size: 1 << 30, wantErr: "no GPT header"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.head, tc.size)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
	if _, err := Parse(make([]byte, 512), 1<<20); !errors.Is(err, ErrNoTable) {
		t.Fatalf("no table: %v", err)
	}
}

func TestIsExt(t *testing.T) {
	sb := make([]byte, 2048)
	if IsExt(sb) || IsExt(sb[:100]) {
		t.Fatal("zeros taken for ext")
	}
	binary.LittleEndian.PutUint16(sb[1024+56:], 0xef53)
	if !IsExt(sb) {
		t.Fatal("ext superblock not seen")
	}
}

// FuzzParse: no input panics, and every partition returned lies inside
// the disk.
func FuzzParse(f *testing.F) {
	if gpt, err := os.ReadFile("testdata/gpt.bin"); err == nil {
		f.Add(gpt[:20000], int64(64<<20))
	}
	f.Add(mbr([3]uint32{0x83, 2048, 4096}), int64(1<<30))
	f.Add(mbr([3]uint32{0xee, 1, 4096}), int64(1<<30))
	f.Fuzz(func(t *testing.T, head []byte, size int64) {
		ps, err := Parse(head, size)
		if err != nil {
			return
		}
		for _, p := range ps {
			if p.Start <= 0 || p.Size <= 0 || p.Start+p.Size > size || p.Start+p.Size < p.Start {
				t.Fatalf("partition %+v outside a disk of %d bytes", p, size)
			}
		}
	})
}
