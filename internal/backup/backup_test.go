package backup

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

func TestInitOpen(t *testing.T) {
	dir := t.TempDir()
	r, err := Init(filepath.Join(dir, "a"))
	if err != nil {
		t.Fatalf("init: %v", err)
	}
	if got, want := r.ChunkSize(), ChunkSize; got != want {
		t.Fatalf("chunk size: got %d, want %d", got, want)
	}
	o, err := Open(r.Path())
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	if got, want := o.ID(), r.ID(); got != want {
		t.Fatalf("id: got %q, want %q", got, want)
	}

	notEmpty := filepath.Join(dir, "b")
	if err := os.MkdirAll(filepath.Join(notEmpty, "photos"), 0o700); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "c")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "d")
	if err := os.Mkdir(empty, 0o700); err != nil {
		t.Fatal(err)
	}
	// An Init cut short leaves the layout without the marker.
	half := filepath.Join(dir, "e")
	for _, d := range []string{"chunks", "tmp"} {
		if err := os.MkdirAll(filepath.Join(half, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		path string
		want error
	}{
		{r.Path(), errdefs.ErrExists},
		{notEmpty, errdefs.ErrInvalid},
		{file, errdefs.ErrInvalid},
		{empty, nil},
		{half, nil},
	} {
		_, err := Init(tc.path)
		if tc.want == nil && err != nil || !errors.Is(err, tc.want) {
			t.Fatalf("init %s: got %v, want %v", tc.path, err, tc.want)
		}
	}
	if _, err := Init(notEmpty); err == nil || !strings.Contains(err.Error(), "not empty and not a lodge backup repository") {
		t.Fatalf("init non-empty: got %v", err)
	}

	writeMarker := func(name, body string) string {
		p := filepath.Join(dir, name)
		for _, d := range []string{"", "chunks", "backups"} {
			if err := os.MkdirAll(filepath.Join(p, d), 0o700); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(p, markerName), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		path string
		want error
	}{
		{filepath.Join(dir, "missing"), errdefs.ErrNotFound},
		{notEmpty, errdefs.ErrInvalid},
		{file, errdefs.ErrInvalid},
		{writeMarker("f2", `{"format":2,"id":"0123456789abcdef","chunk_size":4194304}`), errdefs.ErrInvalid},
		{writeMarker("garbage", `{"format":`), errdefs.ErrInvalid},
		{writeMarker("chunk", `{"format":1,"id":"0123456789abcdef","chunk_size":1000}`), errdefs.ErrInvalid},
		{writeMarker("ok", `{"format":1,"id":"0123456789abcdef","chunk_size":4194304}`), nil},
	} {
		_, err := Open(tc.path)
		if tc.want == nil && err != nil || !errors.Is(err, tc.want) {
			t.Fatalf("open %s: got %v, want %v", tc.path, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "\n") {
			t.Fatalf("open %s: error of several lines: %q", tc.path, err)
		}
	}
}

func TestBackupRoundTrip(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	disk := makeDisk(1, 20, 1000, 3, 7) // 21 chunks, two of zeros, a short last one
	size := int64(len(disk))
	w := begin(t, r)

	var progressed atomic.Int64
	dm, st, err := w.BackupDisk(ctx, DiskInput{Name: "root", Size: size, Reader: bytes.NewReader(disk), Read: allChunks(size)}, func(n int64) { progressed.Add(n) })
	if err != nil {
		t.Fatalf("back up: %v", err)
	}
	for _, c := range []struct {
		what      string
		got, want int64
	}{
		{"chunks", int64(len(dm.Chunks)), 21},
		{"read", st.Read, size},
		{"progress", progressed.Load(), size},
		{"new chunks", int64(st.NewChunks), 19},
		{"referenced chunks", int64(st.Chunks), 19},
		{"data", st.Data, size - 2*testChunk},
	} {
		if c.got != c.want {
			t.Fatalf("first backup %s: got %d, want %d", c.what, c.got, c.want)
		}
	}
	if !dm.Chunks[3].IsZero() || !dm.Chunks[7].IsZero() || dm.Chunks[0].IsZero() {
		t.Fatalf("zero chunks: got %v %v %v, want zero, zero, non-zero", dm.Chunks[3].IsZero(), dm.Chunks[7].IsZero(), dm.Chunks[0].IsZero())
	}
	// New chunks wait in tmp/ until the commit makes them durable.
	if _, used, err := r.Usage(); err != nil || used != 0 {
		t.Fatalf("usage before the commit: got %d, %v; want 0", used, err)
	}
	m1 := commit(t, w, manifest("web", clock, "", dm))
	_, used, err := r.Usage()
	if err != nil {
		t.Fatal(err)
	}
	if used != st.Stored {
		t.Fatalf("usage after first backup: got %d, want the stored %d", used, st.Stored)
	}
	if got := readBack(t, r, dm); !bytes.Equal(got, disk) {
		t.Fatalf("read back first backup: bytes differ")
	}

	// The same data again costs nothing.
	_, st2 := backupDisk(t, w, "root", disk, allChunks(size), nil)
	if st2.Stored != 0 || st2.NewChunks != 0 || st2.Read != size {
		t.Fatalf("second full backup: got stored %d new %d read %d, want 0 0 %d", st2.Stored, st2.NewChunks, st2.Read, size)
	}

	// An incremental: chunk 1 changes, 3 gets data, 5 becomes zeros, the
	// short last one changes.
	disk2 := append([]byte(nil), disk...)
	copy(disk2[1*testChunk:], makeDisk(2, 1, 0))
	copy(disk2[3*testChunk:], makeDisk(3, 1, 0))
	clear(disk2[5*testChunk : 6*testChunk])
	copy(disk2[20*testChunk:], makeDisk(4, 0, 1000))
	read := []int64{1, 3, 5, 20}
	dm2, st3 := backupDisk(t, w, "root", disk2, read, dm.Chunks)
	if got, want := st3.Read, int64(3*testChunk+1000); got != want {
		t.Fatalf("incremental read: got %d, want %d", got, want)
	}
	if got, want := st3.NewChunks, 3; got != want {
		t.Fatalf("incremental new chunks: got %d, want %d", got, want)
	}
	if got, want := st3.Chunks, 19; got != want {
		t.Fatalf("incremental chunks: got %d, want %d", got, want)
	}
	if dm2.Chunks[0] != dm.Chunks[0] || dm2.Chunks[1] == dm.Chunks[1] || !dm2.Chunks[5].IsZero() {
		t.Fatalf("incremental chunk list does not reuse and replace as asked")
	}
	m2 := commit(t, w, manifest("web", clock.Add(time.Hour), m1.ID, dm2))
	if got := readBack(t, r, dm2); !bytes.Equal(got, disk2) {
		t.Fatalf("read back incremental: bytes differ")
	}

	// The disk grew by two chunks and a bit: the old short last chunk is
	// now full, and the new ones are past the parent's end.
	disk3 := append(append([]byte(nil), disk2[:20*testChunk]...), makeDisk(5, 2, 77)...)
	copy(disk3[20*testChunk:], makeDisk(6, 1, 0))
	dm3, _ := backupDisk(t, w, "root", disk3, []int64{20, 22}, dm2.Chunks) // 21 stays as the parent's (none: zero)
	flush(t, w)
	want3 := append([]byte(nil), disk3...)
	clear(want3[21*testChunk : 22*testChunk])
	if got := readBack(t, r, dm3); !bytes.Equal(got, want3) {
		t.Fatalf("read back grown disk: bytes differ")
	}
	// and shrank to 2.5 chunks.
	disk4 := disk3[:2*testChunk+100]
	dm4, _ := backupDisk(t, w, "root", disk4, []int64{2}, dm3.Chunks)
	flush(t, w)
	if got := readBack(t, r, dm4); !bytes.Equal(got, disk4) {
		t.Fatalf("read back shrunk disk: bytes differ")
	}

	bs, err := r.Backups()
	if err != nil {
		t.Fatalf("backups: %v", err)
	}
	if len(bs) != 2 || bs[0].ID != m1.ID || bs[1].ID != m2.ID {
		t.Fatalf("backups: got %d, want [%s %s] in order", len(bs), m1.ID, m2.ID)
	}
	got, err := r.Backup(m2.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Parent != m1.ID || got.Kind != KindIncremental || len(got.Disks) != 1 || got.Disks[0].Size != size {
		t.Fatalf("backup %s read back: got %+v", m2.ID, got)
	}
	if _, err := r.Backup(NewID(clock)); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("unknown backup: got %v, want ErrNotFound", err)
	}
	if _, err := r.Backup("../../etc/passwd"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("bad id: got %v, want ErrInvalid", err)
	}
	rep, err := r.Verify(ctx, nil, nil)
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	if rep.Backups != 2 || rep.Chunks != 19+3 || len(rep.Bad) != 0 {
		t.Fatalf("verify: got %+v, want 2 backups, 22 chunks, none bad", rep)
	}
}

func TestPutChunk(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	d, stored, err := w.PutChunk(ctx, make([]byte, testChunk))
	if err != nil || !d.IsZero() || stored != 0 {
		t.Fatalf("zeros: got %v %d %v, want the zero digest, 0, nil", d, stored, err)
	}
	if n, _, _ := r.Usage(); n != 0 {
		t.Fatalf("zeros were stored: %d chunks", n)
	}
	if _, _, err := w.PutChunk(ctx, make([]byte, testChunk+1)); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("oversized chunk: got %v, want ErrInvalid", err)
	}
	data := makeDisk(9, 0, 5000)
	// Many goroutines storing one chunk store it once.
	var wg sync.WaitGroup
	var total atomic.Int64
	for range 8 {
		wg.Go(func() {
			_, n, err := w.PutChunk(ctx, data)
			if err != nil {
				t.Errorf("put: %v", err)
			}
			total.Add(n)
		})
	}
	wg.Wait()
	n, used, _ := r.Usage()
	if n != 1 || total.Load() != used {
		t.Fatalf("concurrent puts of one chunk: got %d chunks, %d bytes reported, %d used; want 1 and equal", n, total.Load(), used)
	}
	d, _, _ = w.PutChunk(ctx, data)
	got, err := r.Chunk(ctx, d)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read chunk back: got %d bytes, %v", len(got), err)
	}
	if _, err := r.Chunk(ctx, Digest{}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("zero digest: got %v, want ErrInvalid", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, _, err := w.PutChunk(ctx, data); err == nil {
		t.Fatalf("put after close: got nil error")
	}
}

func TestBackupDiskErrors(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	disk := makeDisk(1, 4, 0)
	size := int64(len(disk))
	var missing Digest
	missing[0] = 1
	for _, tc := range []struct {
		name string
		in   DiskInput
		want error
		says string
	}{
		{"descending", DiskInput{Name: "d", Size: size, Reader: bytes.NewReader(disk), Read: []int64{2, 1}}, errdefs.ErrInvalid, "ascending"},
		{"out of range", DiskInput{Name: "d", Size: size, Reader: bytes.NewReader(disk), Read: []int64{4}}, errdefs.ErrInvalid, "outside"},
		{"no reader", DiskInput{Name: "d", Size: size, Read: []int64{0}}, errdefs.ErrInvalid, "no reader"},
		{"negative size", DiskInput{Name: "d", Size: -1}, errdefs.ErrInvalid, "negative"},
		{"no name", DiskInput{Size: size}, errdefs.ErrInvalid, "name"},
		{"missing parent chunk", DiskInput{Name: "d", Size: size, Reader: bytes.NewReader(disk), Read: []int64{0}, Parent: []Digest{{}, missing}}, errdefs.ErrNotFound, missing.String()},
		{"short reader", DiskInput{Name: "d", Size: size + 10, Reader: bytes.NewReader(disk), Read: []int64{4}}, io.ErrUnexpectedEOF, "chunk 4 at offset 262144"},
	} {
		_, _, err := w.BackupDisk(ctx, tc.in, nil)
		if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.says) {
			t.Fatalf("%s: got %v, want %v saying %q", tc.name, err, tc.want, tc.says)
		}
	}
}

// slowReader reads slowly and cancels after a few reads, so a test can
// count how many more it took to stop.
type slowReader struct {
	data   []byte
	reads  atomic.Int64
	after  int64
	cancel func()
	late   atomic.Int64
}

func (s *slowReader) ReadAt(p []byte, off int64) (int, error) {
	n := s.reads.Add(1)
	if n == s.after {
		s.cancel()
	}
	if n > s.after {
		s.late.Add(1)
	}
	time.Sleep(2 * time.Millisecond)
	return bytes.NewReader(s.data).ReadAt(p, off)
}

func TestBackupDiskCancel(t *testing.T) {
	r := testRepo(t)
	w := begin(t, r)
	disk := makeDisk(1, 200, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sr := &slowReader{data: disk, after: 5, cancel: cancel}
	_, _, err := w.BackupDisk(ctx, DiskInput{Name: "d", Size: int64(len(disk)), Reader: sr, Read: allChunks(int64(len(disk)))}, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled backup: got %v, want context.Canceled", err)
	}
	// The other reader may have been mid-read; nothing more may start.
	if late := sr.late.Load(); late > 1 {
		t.Fatalf("reads after cancel: got %d, want at most 1", late)
	}
	// Nothing half-visible: the repository still verifies.
	if _, err := r.Verify(context.Background(), nil, nil); err != nil {
		t.Fatalf("verify after cancel: %v", err)
	}
}

func TestCommit(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	disk := makeDisk(1, 2, 0)
	dm, _ := backupDisk(t, w, "root", disk, allChunks(int64(len(disk))), nil)
	m := commit(t, w, manifest("web", clock, "", dm))

	again := m
	if err := w.Commit(ctx, &again); !errors.Is(err, errdefs.ErrExists) {
		t.Fatalf("commit an id twice: got %v, want ErrExists", err)
	}
	var missing Digest
	missing[5] = 9
	bad := manifest("web", clock.Add(time.Second), "", DiskManifest{Name: "root", Size: testChunk, Chunks: []Digest{missing}})
	err := w.Commit(ctx, &bad)
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), missing.String()) {
		t.Fatalf("commit naming a missing chunk: got %v, want ErrNotFound naming it", err)
	}
	if exists(r.manifestPath(bad.ID)) {
		t.Fatalf("a failed commit left its manifest")
	}
	invalid := manifest("web", clock.Add(2*time.Second), "", DiskManifest{Name: "root", Size: testChunk + 1, Chunks: dm.Chunks[:1]})
	if err := w.Commit(ctx, &invalid); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("commit with a chunk count off: got %v, want ErrInvalid", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	late := manifest("web", clock.Add(3*time.Second), "", dm)
	if err := w.Commit(ctx, &late); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("commit after close: got %v, want ErrInvalid", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(r.Path(), dirWriters)); len(ents) != 0 {
		t.Fatalf("closed writer still registered: %d files", len(ents))
	}
}

func TestCorruption(t *testing.T) {
	flip := func(t *testing.T, path string) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)/2] ^= 0x40
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, r *Repo, victim, other Digest)
	}{
		{"flipped byte", func(t *testing.T, r *Repo, victim, _ Digest) { flip(t, r.chunkPath(victim)) }},
		{"deleted", func(t *testing.T, r *Repo, victim, _ Digest) {
			if err := os.Remove(r.chunkPath(victim)); err != nil {
				t.Fatal(err)
			}
		}},
		{"empty", func(t *testing.T, r *Repo, victim, _ Digest) {
			if err := os.Truncate(r.chunkPath(victim), 0); err != nil {
				t.Fatal(err)
			}
		}},
		{"truncated", func(t *testing.T, r *Repo, victim, _ Digest) {
			if err := os.Truncate(r.chunkPath(victim), 100); err != nil {
				t.Fatal(err)
			}
		}},
		{"another chunk's file", func(t *testing.T, r *Repo, victim, other Digest) {
			b, err := os.ReadFile(r.chunkPath(other))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(r.chunkPath(victim), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			r := testRepo(t)
			w := begin(t, r)
			disk := makeDisk(1, 8, 300, 2)
			dm, _ := backupDisk(t, w, "root", disk, allChunks(int64(len(disk))), nil)
			m1 := commit(t, w, manifest("web", clock, "", dm))
			other := makeDisk(7, 1, 0)
			dmData, _ := backupDisk(t, w, "data", other, []int64{0}, nil)
			dm2, _ := backupDisk(t, w, "root", disk, []int64{1}, dm.Chunks)
			m2 := commit(t, w, manifest("web", clock.Add(time.Hour), m1.ID, dm2, dmData))
			victim := dm.Chunks[5]
			tc.damage(t, r, victim, dmData.Chunks[0])

			_, err := r.Chunk(ctx, victim)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), victim.String()) {
				t.Fatalf("chunk: got %v, want ErrCorrupt naming %s", err, victim)
			}
			err = r.ReadDisk(ctx, dm, func(int64, []byte) error { return nil })
			for _, s := range []string{victim.String(), `"root"`, "chunk 5", fmt.Sprintf("offset %d", 5*testChunk)} {
				if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), s) {
					t.Fatalf("read disk: got %v, want ErrCorrupt saying %s", err, s)
				}
			}
			rep, err := r.Verify(ctx, nil, nil)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), victim.String()) {
				t.Fatalf("verify: got %v, want ErrCorrupt naming %s", err, victim)
			}
			want := []BadChunk{
				{Backup: m1.ID, Disk: "root", Offset: 5 * testChunk, Digest: victim},
				{Backup: m2.ID, Disk: "root", Offset: 5 * testChunk, Digest: victim},
			}
			if len(rep.Bad) != len(want) {
				t.Fatalf("verify bad: got %+v, want %d entries", rep.Bad, len(want))
			}
			for i := range want {
				got := rep.Bad[i]
				got.Err = ""
				if got != want[i] {
					t.Fatalf("verify bad %d: got %+v, want %+v", i, got, want[i])
				}
				if !strings.Contains(rep.Bad[i].Err, "corrupt") {
					t.Fatalf("verify bad %d: reason %q does not say corrupt", i, rep.Bad[i].Err)
				}
			}
			// Verifying only the backup without the chunk passes.
			if _, err := r.Verify(ctx, []string{}, nil); err != nil {
				t.Fatalf("verify nothing: %v", err)
			}
		})
	}
}

// Two bad chunks are both reported, not just the first.
func TestVerifyReportsAll(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	disk := makeDisk(1, 6, 0)
	dm, _ := backupDisk(t, w, "root", disk, allChunks(int64(len(disk))), nil)
	m := commit(t, w, manifest("web", clock, "", dm))
	for _, i := range []int{1, 4} {
		if err := os.Remove(r.chunkPath(dm.Chunks[i])); err != nil {
			t.Fatal(err)
		}
	}
	var last, total int64
	rep, err := r.Verify(ctx, []string{m.ID}, func(done, tot int64) { last, total = done, tot })
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("verify: got %v, want ErrCorrupt", err)
	}
	if len(rep.Bad) != 2 || rep.Bad[0].Offset != 1*testChunk || rep.Bad[1].Offset != 4*testChunk {
		t.Fatalf("verify bad: got %+v, want offsets %d and %d", rep.Bad, testChunk, 4*testChunk)
	}
	if last != total || total != int64(len(disk)) {
		t.Fatalf("verify progress: got %d of %d, want %d of %d", last, total, len(disk), len(disk))
	}
	if _, err := r.Verify(ctx, []string{NewID(clock)}, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("verify unknown backup: got %v, want ErrNotFound", err)
	}
}

// A manifest that names a chunk at a place needing another length is
// caught by Verify even though the chunk itself is fine.
func TestVerifyLength(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	short := makeDisk(1, 0, 1000)
	dm, _ := backupDisk(t, w, "root", short, []int64{0}, nil)
	commit(t, w, manifest("web", clock, "", dm))
	wrong := manifest("web", clock.Add(time.Hour), "", DiskManifest{Name: "root", Size: testChunk, Chunks: dm.Chunks})
	commit(t, w, wrong)
	rep, err := r.Verify(ctx, nil, nil)
	if !errors.Is(err, ErrCorrupt) || len(rep.Bad) != 1 || rep.Bad[0].Backup != wrong.ID {
		t.Fatalf("verify wrong length: got %v %+v, want one bad place in %s", err, rep.Bad, wrong.ID)
	}
	err = r.ReadDisk(ctx, wrong.Disks[0], func(int64, []byte) error { return nil })
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("read disk of wrong length: got %v, want ErrCorrupt", err)
	}
}

func TestReadDiskStops(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	disk := makeDisk(1, 30, 0)
	dm, _ := backupDisk(t, w, "root", disk, allChunks(int64(len(disk))), nil)
	if err := w.flush(ctx); err != nil {
		t.Fatal(err)
	}
	stop := errors.New("enough")
	calls := 0
	err := r.ReadDisk(ctx, dm, func(int64, []byte) error {
		calls++
		if calls == 3 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) || calls != 3 {
		t.Fatalf("read disk with fn failing: got %v after %d calls, want %v after 3", err, calls, stop)
	}
	cctx, cancel := context.WithCancel(ctx)
	calls = 0
	err = r.ReadDisk(cctx, dm, func(int64, []byte) error {
		if calls++; calls == 2 {
			cancel()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) || calls >= 30 {
		t.Fatalf("cancelled read disk: got %v after %d calls, want context.Canceled early", err, calls)
	}
	bad := DiskManifest{Name: "x", Size: 10, Chunks: nil}
	if err := r.ReadDisk(ctx, bad, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("read disk with chunk count off: got %v, want ErrInvalid", err)
	}
}

func TestCrashLeftovers(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	disk := makeDisk(1, 4, 0)
	dm, _ := backupDisk(t, w, "root", disk, allChunks(int64(len(disk))), nil)
	m := commit(t, w, manifest("web", clock, "", dm))

	// A writer that died: chunks no manifest names, a manifest half
	// written in tmp, a stray temporary, and its registration file.
	orphan := makeDisk(2, 1, 0)
	od, _, err := w.PutChunk(ctx, orphan)
	if err != nil {
		t.Fatal(err)
	}
	half := filepath.Join(r.tmpDir(), "w-123")
	stray := filepath.Join(r.tmpDir(), "chunk-456")
	dead := filepath.Join(r.Path(), dirWriters, "0123abcd")
	for _, p := range []string{half, stray, dead} {
		if err := os.WriteFile(p, []byte(`{"format":1,"id":`), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if bs, err := r.Backups(); err != nil || len(bs) != 1 {
		t.Fatalf("backups with leftovers: got %d, %v; want 1, nil", len(bs), err)
	}
	if _, err := r.Verify(ctx, nil, nil); err != nil {
		t.Fatalf("verify with leftovers: %v", err)
	}

	// Young leftovers stay: they may be a live writer's.
	st, err := r.GC(ctx)
	if err != nil {
		t.Fatalf("gc: %v", err)
	}
	if st.Removed != 0 || !exists(r.chunkPath(od)) || !exists(half) || !exists(stray) {
		t.Fatalf("gc removed young leftovers: %+v", st)
	}
	if exists(dead) {
		t.Fatalf("gc kept a dead writer's registration")
	}

	ageAllChunks(t, r)
	age(t, half, stray)
	st, err = r.GC(ctx)
	if err != nil {
		t.Fatalf("gc: %v", err)
	}
	if st.Removed != 1 || exists(r.chunkPath(od)) || exists(half) || exists(stray) {
		t.Fatalf("gc of old leftovers: got %+v, orphan there %v, tmp there %v %v", st, exists(r.chunkPath(od)), exists(half), exists(stray))
	}
	n, used, _ := r.Usage()
	if st.Chunks != n || st.Kept != used || n != 4 {
		t.Fatalf("gc stats: got %+v, usage %d chunks %d bytes, want 4 chunks matching", st, n, used)
	}
	if _, err := r.Verify(ctx, []string{m.ID}, nil); err != nil {
		t.Fatalf("verify after gc: %v", err)
	}
}

func TestGCDeletedBackups(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	disk := makeDisk(1, 6, 0)
	dmA, _ := backupDisk(t, w, "root", disk, allChunks(int64(len(disk))), nil)
	a := commit(t, w, manifest("web", clock, "", dmA))
	disk2 := append([]byte(nil), disk...)
	copy(disk2[2*testChunk:], makeDisk(2, 2, 0)) // chunks 2 and 3 change
	dmB, _ := backupDisk(t, w, "root", disk2, []int64{2, 3}, dmA.Chunks)
	b := commit(t, w, manifest("web", clock.Add(time.Hour), a.ID, dmB))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	if err := r.Delete(ctx, a.ID); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if err := r.Delete(ctx, a.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("delete twice: got %v, want ErrNotFound", err)
	}
	if err := r.Delete(ctx, "x/../y"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("delete bad id: got %v, want ErrInvalid", err)
	}
	ageAllChunks(t, r)
	st, err := r.GC(ctx)
	if err != nil {
		t.Fatalf("gc: %v", err)
	}
	if st.Removed != 2 || st.Chunks != 6 || st.Freed <= 0 {
		t.Fatalf("gc after delete: got %+v, want 2 removed, 6 left", st)
	}
	for i, d := range dmA.Chunks {
		if got, want := exists(r.chunkPath(d)), i != 2 && i != 3; got != want {
			t.Fatalf("chunk %d of the deleted backup: there %v, want %v", i, got, want)
		}
	}
	if _, err := r.Verify(ctx, nil, nil); err != nil {
		t.Fatalf("verify after gc: %v", err)
	}
	if got := readBack(t, r, dmB); !bytes.Equal(got, disk2) {
		t.Fatalf("read back %s after gc: bytes differ", b.ID)
	}
}

func TestGCKeepsLiveWriters(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	data := makeDisk(1, 1, 0)
	d, _, err := w.PutChunk(ctx, data)
	if err != nil {
		t.Fatal(err)
	}
	// Make the writer look as if it began two hours ago and its chunk
	// an hour ago: older than GC's own start, younger than the writer.
	rec, _ := json.Marshal(writerRecord{StartedAt: time.Now().Add(-2 * time.Hour)})
	if err := os.WriteFile(w.path, rec, 0o600); err != nil {
		t.Fatal(err)
	}
	hourAgo := time.Now().Add(-time.Hour)
	if err := os.Chtimes(r.chunkPath(d), hourAgo, hourAgo); err != nil {
		t.Fatal(err)
	}
	if _, err := r.GC(ctx); err != nil {
		t.Fatalf("gc: %v", err)
	}
	if !exists(r.chunkPath(d)) {
		t.Fatalf("gc removed a live writer's chunk")
	}

	// Once committed, the chunk is referenced and stays for good.
	m := commit(t, w, manifest("web", clock, "", DiskManifest{Name: "root", Size: testChunk, Chunks: []Digest{d}}))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	ageAllChunks(t, r)
	if _, err := r.GC(ctx); err != nil {
		t.Fatalf("gc: %v", err)
	}
	if !exists(r.chunkPath(d)) {
		t.Fatalf("gc removed a committed chunk")
	}

	// A writer that never commits: its chunk goes once old.
	w2 := begin(t, r)
	d2, _, err := w2.PutChunk(ctx, makeDisk(2, 1, 0))
	if err != nil {
		t.Fatal(err)
	}
	if err := w2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.GC(ctx); err != nil {
		t.Fatalf("gc: %v", err)
	}
	if !exists(r.chunkPath(d2)) {
		t.Fatalf("gc removed a young chunk")
	}
	age(t, r.chunkPath(d2))
	if _, err := r.GC(ctx); err != nil {
		t.Fatalf("gc: %v", err)
	}
	if exists(r.chunkPath(d2)) {
		t.Fatalf("gc kept an old chunk of a writer that left without committing")
	}

	// A live writer that reuses an old unreferenced chunk protects it.
	w3 := begin(t, r)
	d3, _, err := w3.PutChunk(ctx, makeDisk(3, 1, 0))
	if err != nil {
		t.Fatal(err)
	}
	if err := w3.Close(); err != nil {
		t.Fatal(err)
	}
	age(t, r.chunkPath(d3))
	w4 := begin(t, r)
	again, stored, err := w4.PutChunk(ctx, makeDisk(3, 1, 0))
	if err != nil || again != d3 || stored != 0 {
		t.Fatalf("dedup hit: got %v %d %v, want %v 0 nil", again, stored, err, d3)
	}
	if _, err := r.GC(ctx); err != nil {
		t.Fatalf("gc: %v", err)
	}
	if !exists(r.chunkPath(d3)) {
		t.Fatalf("gc removed a chunk a live writer just reused")
	}
	m4 := commit(t, w4, manifest("web", clock.Add(time.Hour), "", DiskManifest{Name: "root", Size: testChunk, Chunks: []Digest{d3}}))
	if rep, err := r.Verify(ctx, []string{m.ID, m4.ID}, nil); err != nil || rep.Chunks != 2 {
		t.Fatalf("verify: got %+v %v, want 2 chunks, nil", rep, err)
	}
}

// The race GC guards against: a writer touching a chunk between GC's
// look at it and its removal. removeChunk sees the touch and puts the
// chunk back.
func TestGCPutsBackTouchedChunk(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	w := begin(t, r)
	d, _, err := w.PutChunk(ctx, makeDisk(1, 1, 0))
	if err != nil {
		t.Fatal(err)
	}
	path := r.chunkPath(d)
	freed, removed, err := r.removeChunk(path, time.Now().Add(-time.Minute))
	if err != nil || removed || freed != 0 || !exists(path) {
		t.Fatalf("remove a touched chunk: got %d %v %v, there %v; want it put back", freed, removed, err, exists(path))
	}
	// A GC that crashed with a chunk moved aside gets it back next time.
	m := commit(t, w, manifest("web", clock, "", DiskManifest{Name: "root", Size: testChunk, Chunks: []Digest{d}}))
	aside := filepath.Join(r.tmpDir(), asidePrefix+d.String())
	if err := os.Rename(path, aside); err != nil {
		t.Fatal(err)
	}
	age(t, aside)
	if _, err := r.GC(ctx); err != nil {
		t.Fatalf("gc: %v", err)
	}
	if !exists(path) || exists(aside) {
		t.Fatalf("gc did not put back a chunk left aside")
	}
	if _, err := r.Verify(ctx, []string{m.ID}, nil); err != nil {
		t.Fatalf("verify: %v", err)
	}
}

func TestGCBusyAndBadManifest(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	other, err := Open(r.Path())
	if err != nil {
		t.Fatal(err)
	}
	lock, err := os.OpenFile(filepath.Join(r.Path(), gcLockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = lock.Close() }()
	if err := flockNB(lock); err != nil {
		t.Fatal(err)
	}
	if _, err := other.GC(ctx); !errors.Is(err, errdefs.ErrBusy) {
		t.Fatalf("second gc: got %v, want ErrBusy", err)
	}
	_ = lock.Close()

	// A manifest GC cannot read stops it: it cannot know what it needs.
	w := begin(t, r)
	d, _, err := w.PutChunk(ctx, makeDisk(1, 1, 0))
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	age(t, r.chunkPath(d))
	badPath := r.manifestPath(NewID(clock))
	if err := os.WriteFile(badPath, []byte(`{"format":1`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r.GC(ctx); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), badPath) {
		t.Fatalf("gc with a bad manifest: got %v, want ErrCorrupt naming %s", err, badPath)
	}
	if !exists(r.chunkPath(d)) {
		t.Fatalf("gc removed chunks despite an unreadable manifest")
	}
	bs, err := r.Backups()
	if !errors.Is(err, ErrCorrupt) || len(bs) != 0 || strings.Contains(err.Error(), "\n") {
		t.Fatalf("backups with a bad manifest: got %d, %v; want 0 and one line wrapping ErrCorrupt", len(bs), err)
	}
}

func TestSync(t *testing.T) {
	ctx := context.Background()
	src := testRepo(t)
	dst := testRepo(t)
	w := begin(t, src)
	disk := makeDisk(1, 6, 500, 2)
	dm1, _ := backupDisk(t, w, "root", disk, allChunks(int64(len(disk))), nil)
	m1 := commit(t, w, manifest("web", clock, "", dm1))
	disk2 := append([]byte(nil), disk...)
	copy(disk2[4*testChunk:], makeDisk(2, 1, 0))
	dm2, _ := backupDisk(t, w, "root", disk2, []int64{4}, dm1.Chunks)
	m2 := commit(t, w, manifest("web", clock.Add(time.Hour), m1.ID, dm2))

	var done, total int64
	st, err := Sync(ctx, src, dst, func(d, t int64) { done, total = d, t })
	if err != nil {
		t.Fatalf("sync: %v", err)
	}
	srcChunks, srcBytes, _ := src.Usage()
	if st.Backups != 2 || st.Chunks != srcChunks || st.Bytes != srcBytes || done != total || total != srcBytes {
		t.Fatalf("first sync: got %+v, progress %d/%d; want 2 backups, %d chunks, %d bytes", st, done, total, srcChunks, srcBytes)
	}
	if _, err := dst.Verify(ctx, nil, nil); err != nil {
		t.Fatalf("verify dst: %v", err)
	}
	got, err := dst.Backup(m2.ID)
	if err != nil {
		t.Fatal(err)
	}
	if b := readBack(t, dst, got.Disks[0]); !bytes.Equal(b, disk2) {
		t.Fatalf("read back from dst: bytes differ")
	}

	st, err = Sync(ctx, src, dst, nil)
	if err != nil || st != (SyncStats{}) {
		t.Fatalf("second sync: got %+v %v, want nothing copied", st, err)
	}

	// One more backup with one new chunk: only that travels.
	disk3 := append([]byte(nil), disk2...)
	copy(disk3[0:], makeDisk(3, 1, 0))
	dm3, _ := backupDisk(t, w, "root", disk3, []int64{0}, dm2.Chunks)
	m3 := commit(t, w, manifest("web", clock.Add(2*time.Hour), m2.ID, dm3))
	st, err = Sync(ctx, src, dst, nil)
	if err != nil || st.Backups != 1 || st.Chunks != 1 {
		t.Fatalf("third sync: got %+v %v, want 1 backup, 1 chunk", st, err)
	}

	// A backup with a bad chunk in src stays out of dst; the next one,
	// which does not need it, still goes.
	disk4 := append([]byte(nil), disk3...)
	copy(disk4[testChunk:], makeDisk(4, 1, 0))
	dm4, _ := backupDisk(t, w, "root", disk4, []int64{1}, dm3.Chunks)
	m4 := commit(t, w, manifest("web", clock.Add(3*time.Hour), m3.ID, dm4))
	other := makeDisk(5, 1, 0)
	dm5, _ := backupDisk(t, w, "root", other, []int64{0}, nil)
	m5 := commit(t, w, manifest("db", clock.Add(4*time.Hour), "", dm5))
	bad := dm4.Chunks[1]
	b, err := os.ReadFile(src.chunkPath(bad))
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-20] ^= 1
	if err := os.WriteFile(src.chunkPath(bad), b, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err = Sync(ctx, src, dst, nil)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), bad.String()) || !strings.Contains(err.Error(), m4.ID) {
		t.Fatalf("sync with a bad chunk: got %v, want ErrCorrupt naming %s and %s", err, bad, m4.ID)
	}
	if st.Backups != 1 {
		t.Fatalf("sync with a bad chunk: got %d backups copied, want the other 1", st.Backups)
	}
	if _, err := dst.Backup(m4.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("backup with a bad chunk in dst: got %v, want ErrNotFound", err)
	}
	if _, err := dst.Backup(m5.ID); err != nil {
		t.Fatalf("good backup after a bad one: %v", err)
	}
	if exists(dst.chunkPath(bad)) {
		t.Fatalf("the bad chunk reached dst")
	}
	if _, err := dst.Verify(ctx, nil, nil); err != nil {
		t.Fatalf("verify dst after a failed sync: %v", err)
	}

	if _, err := Sync(ctx, src, src, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("sync to itself: got %v, want ErrInvalid", err)
	}
	again, err := Open(src.Path())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Sync(ctx, src, again, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("sync to itself opened twice: got %v, want ErrInvalid", err)
	}
}

// flush moves a writer's chunks into place without a commit.
func flush(t *testing.T, w *Writer) {
	t.Helper()
	if err := w.flush(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestUncommittedChunksStayOut: a writer closed without a commit (a
// failed or cancelled backup) leaves nothing in chunks/ or tmp/.
func TestUncommittedChunksStayOut(t *testing.T) {
	r := testRepo(t)
	w := begin(t, r)
	disk := makeDisk(1, 5, 0)
	backupDisk(t, w, "root", disk, allChunks(int64(len(disk))), nil)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if n, used, err := r.Usage(); err != nil || n != 0 || used != 0 {
		t.Fatalf("usage after an uncommitted backup: got %d chunks, %d bytes, %v; want none", n, used, err)
	}
	tmp, err := os.ReadDir(r.tmpDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(tmp) != 0 {
		t.Fatalf("tmp/ after an uncommitted backup: got %d files, want 0", len(tmp))
	}
}

// TestBackupDiskWriteFails makes every chunk write fail part way through
// a disk, with the same chunk twice in it: the error names a chunk, no
// chunk stays counted as written, and the same writer then backs the disk
// up whole once writes work again.
func TestBackupDiskWriteFails(t *testing.T) {
	r := testRepo(t)
	w := begin(t, r)
	disk := makeDisk(7, 40, 100)
	copy(disk[30*testChunk:31*testChunk], disk[3*testChunk:4*testChunk])
	in := DiskInput{Name: "d", Size: int64(len(disk)), Reader: bytes.NewReader(disk), Read: allChunks(int64(len(disk)))}
	tmp := r.tmpDir()
	if err := os.Rename(tmp, tmp+".away"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tmp, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err := w.BackupDisk(context.Background(), in, nil)
	if err == nil || !strings.Contains(err.Error(), "chunk ") || !errors.Is(err, unix.ENOTDIR) {
		t.Fatalf("backup with tmp/ a file: got %v, want a chunk's ENOTDIR", err)
	}
	w.mu.Lock()
	for d, path := range w.pending {
		if path == "" {
			t.Errorf("chunk %s still counted as being written", d)
		}
	}
	w.mu.Unlock()

	if err := os.Remove(tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp+".away", tmp); err != nil {
		t.Fatal(err)
	}
	dm, st := backupDisk(t, w, "d", disk, in.Read, nil)
	if st.NewChunks != 40 {
		t.Fatalf("new chunks after the failure: got %d, want 40 (41 chunks, one twice)", st.NewChunks)
	}
	commit(t, w, manifest("vm", clock, "", dm))
	if got := readBack(t, r, dm); !bytes.Equal(got, disk) {
		t.Fatal("restored disk differs")
	}
}
