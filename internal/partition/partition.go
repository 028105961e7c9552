// Package partition reads a disk's partition table, MBR or GPT, from the
// first bytes of the disk. It reads what a guest wrote, so it trusts
// nothing: every entry is checked against the disk's size.
package partition

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Sector is the logical sector size the tables are read with.
const Sector = 512

// Partition is one entry: its number as the guest's kernel counts it
// (from 1), and its place in bytes.
type Partition struct {
	Number int    `json:"number"`
	Start  int64  `json:"start"`
	Size   int64  `json:"size"`
	Type   string `json:"type"`
}

// ErrNoTable says the disk has neither an MBR nor a GPT.
var ErrNoTable = errors.New("no partition table")

const maxGPTEntries = 1024

// Parse reads the table from head, the disk's first bytes (the first
// 64 KiB is enough for any table Linux tools write), of a disk of size
// bytes. Entries that are empty are skipped; a GPT's protective MBR is
// not returned. MBR logical partitions (inside an extended one) are not
// read.
func Parse(head []byte, size int64) ([]Partition, error) {
	if len(head) < Sector || !bytes.Equal(head[510:512], []byte{0x55, 0xaa}) {
		return nil, ErrNoTable
	}
	for i := 0; i < 4; i++ {
		if head[446+i*16+4] == 0xee {
			return parseGPT(head, size)
		}
	}
	var out []Partition
	for i := 0; i < 4; i++ {
		e := head[446+i*16 : 446+(i+1)*16]
		kind := e[4]
		start := int64(binary.LittleEndian.Uint32(e[8:])) * Sector
		n := int64(binary.LittleEndian.Uint32(e[12:])) * Sector
		if kind == 0 || n == 0 {
			continue
		}
		if kind == 0x05 || kind == 0x0f || kind == 0x85 {
			continue // extended: a container, not a filesystem
		}
		if err := fits(i+1, start, n, size); err != nil {
			return nil, err
		}
		out = append(out, Partition{Number: i + 1, Start: start, Size: n, Type: fmt.Sprintf("mbr:%02x", kind)})
	}
	return out, nil
}

func fits(num int, start, n, size int64) error {
	if start <= 0 || n <= 0 || start > size || n > size-start {
		return fmt.Errorf("partition %d: %d bytes at %d do not fit a disk of %d bytes", num, n, start, size)
	}
	return nil
}

func parseGPT(head []byte, size int64) ([]Partition, error) {
	if len(head) < 2*Sector {
		return nil, errors.New("gpt: header past what was read")
	}
	h := head[Sector : 2*Sector]
	if string(h[:8]) != "EFI PART" {
		return nil, errors.New("gpt: protective MBR but no GPT header")
	}
	hdrSize := binary.LittleEndian.Uint32(h[12:])
	if hdrSize < 92 || hdrSize > Sector {
		return nil, fmt.Errorf("gpt: header size %d", hdrSize)
	}
	hdr := append([]byte(nil), h[:hdrSize]...)
	want := binary.LittleEndian.Uint32(hdr[16:])
	binary.LittleEndian.PutUint32(hdr[16:], 0)
	if crc32.ChecksumIEEE(hdr) != want {
		return nil, errors.New("gpt: header checksum does not match")
	}
	entriesLBA := binary.LittleEndian.Uint64(h[72:])
	count := binary.LittleEndian.Uint32(h[80:])
	entrySize := binary.LittleEndian.Uint32(h[84:])
	if count > maxGPTEntries || entrySize < 128 || entrySize > 4096 || entrySize%8 != 0 {
		return nil, fmt.Errorf("gpt: %d entries of %d bytes", count, entrySize)
	}
	if entriesLBA < 2 || entriesLBA > uint64(len(head))/Sector {
		return nil, fmt.Errorf("gpt: entries at sector %d, past what was read", entriesLBA)
	}
	off := int64(entriesLBA) * Sector
	end := off + int64(count)*int64(entrySize)
	if end > int64(len(head)) {
		return nil, fmt.Errorf("gpt: entries end at byte %d, past what was read", end)
	}
	if crc32.ChecksumIEEE(head[off:end]) != binary.LittleEndian.Uint32(h[88:]) {
		return nil, errors.New("gpt: entries checksum does not match")
	}
	var out []Partition
	for i := 0; i < int(count); i++ {
		e := head[off+int64(i)*int64(entrySize):]
		typ := e[:16]
		if bytes.Equal(typ, make([]byte, 16)) {
			continue
		}
		first := binary.LittleEndian.Uint64(e[32:])
		last := binary.LittleEndian.Uint64(e[40:])
		if last < first || first > uint64(size)/Sector || last >= uint64(size)/Sector {
			return nil, fmt.Errorf("partition %d: sectors %d to %d do not fit a disk of %d bytes", i+1, first, last, size)
		}
		start, n := int64(first)*Sector, int64(last-first+1)*Sector
		if err := fits(i+1, start, n, size); err != nil {
			return nil, err
		}
		out = append(out, Partition{Number: i + 1, Start: start, Size: n, Type: "gpt:" + guid(typ)})
	}
	return out, nil
}

// guid spells a GPT type GUID the usual way (its first three fields are
// little-endian).
func guid(b []byte) string {
	return fmt.Sprintf("%08x-%04x-%04x-%x-%x", binary.LittleEndian.Uint32(b[0:]), binary.LittleEndian.Uint16(b[4:]),
		binary.LittleEndian.Uint16(b[6:]), b[8:10], b[10:16])
}

// IsExt says whether the bytes at a partition's start hold an ext2, 3 or
// 4 superblock; first must be at least its first 2 KiB.
func IsExt(first []byte) bool {
	return len(first) >= 2048 && binary.LittleEndian.Uint16(first[1024+56:]) == 0xef53
}
