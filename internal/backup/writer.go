package backup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lodge-vm/lodge/internal/chunkhash"
	"github.com/lodge-vm/lodge/internal/errdefs"
	"github.com/lodge-vm/lodge/internal/priority"
)

// Writer adds chunks and backups to a repository. While it is open, GC
// keeps every chunk it wrote or reused, even before a manifest names them.
type Writer struct {
	r     *Repo
	reg   *os.File // our file in writers/, flock'ed until Close
	path  string
	start time.Time

	mu     sync.Mutex
	closed bool
	// inflight holds a channel per chunk being stored, so that one disk
	// full of the same block stores it once and counts it once.
	inflight map[Digest]chan struct{}
	// pending are chunks written to tmp/ and not yet synced: they are
	// moved into chunks/ only after one syncfs has made them all
	// durable (see flush), so that chunks/ never holds a file a crash
	// could leave short.
	pending map[Digest]string
}

// writerRecord is what a writer's registration file holds; GC needs the
// start time, the rest helps whoever finds a writer that seems stuck.
type writerRecord struct {
	StartedAt time.Time `json:"started_at"`
	PID       int       `json:"pid"`
	Host      string    `json:"host,omitempty"`
}

// BeginWrite registers a writer. Close it when done, committed or not.
func (r *Repo) BeginWrite(ctx context.Context) (*Writer, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("backup repository %q: begin write: %w", r.path, err)
	}
	start := time.Now()
	if err := r.scratchDirs(); err != nil {
		return nil, fmt.Errorf("backup repository %q: begin write: %w", r.path, err)
	}
	// The file is locked before it appears in writers/: a GC that saw it
	// unlocked would take it for a dead writer's.
	f, err := os.CreateTemp(r.tmpDir(), "writer-*")
	if err != nil {
		return nil, fmt.Errorf("backup repository %q: begin write: %w", r.path, err)
	}
	fail := func(err error) (*Writer, error) {
		_ = os.Remove(f.Name())
		_ = f.Close()
		return nil, fmt.Errorf("backup repository %q: begin write: %w", r.path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fail(fmt.Errorf("lock %s: %w", f.Name(), err))
	}
	host, _ := os.Hostname()
	b, err := json.Marshal(writerRecord{StartedAt: start.UTC(), PID: os.Getpid(), Host: host})
	if err != nil {
		return fail(err)
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		return fail(err)
	}
	path := filepath.Join(r.path, dirWriters, randomHex(16))
	if err := os.Rename(f.Name(), path); err != nil {
		return fail(err)
	}
	return &Writer{r: r, reg: f, path: path, start: start, inflight: map[Digest]chan struct{}{}, pending: map[Digest]string{}}, nil
}

// Close unregisters the writer. Chunks it stored that no manifest names
// become garbage for a later GC.
func (w *Writer) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	pending := w.pending
	w.pending = nil
	w.mu.Unlock()
	// Never committed: garbage now.
	for _, tmp := range pending {
		if tmp != "" {
			_ = os.Remove(tmp)
		}
	}
	err := os.Remove(w.path)
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	// Closing drops the lock.
	if cerr := w.reg.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("backup repository %q: end write: %w", w.r.path, err)
	}
	return nil
}

// PutChunk stores one chunk of at most the repository's chunk size and
// returns its digest and the compressed bytes it added. Zeros are not
// stored and give the zero Digest; a chunk already there costs nothing but
// a touch. Any number of goroutines may call it at once.
func (w *Writer) PutChunk(ctx context.Context, data []byte) (d Digest, stored int64, err error) {
	d, stored, _, err = w.put(ctx, data, nil, nil)
	if err != nil {
		return Digest{}, 0, fmt.Errorf("backup repository %q: store chunk: %w", w.r.path, err)
	}
	return d, stored, nil
}

// put is PutChunk with a buffer for the compressed bytes, which it
// returns (maybe grown) for reuse, or nil when st took it.
// With a stager, a new chunk goes to st to be written to tmp/, where it
// waits until Commit makes it durable with every other (flush); without
// one it is durable when put returns.
func (w *Writer) put(ctx context.Context, data, scratch []byte, st *stager) (Digest, int64, []byte, error) {
	if len(data) > w.r.chunkSize {
		return Digest{}, 0, scratch, fmt.Errorf("%w: a chunk of %d bytes, the repository's chunks hold at most %d", errdefs.ErrInvalid, len(data), w.r.chunkSize)
	}
	if allZero(data) {
		return Digest{}, 0, scratch, nil
	}
	d := Digest(chunkhash.Sum256(data))
	for {
		if err := ctx.Err(); err != nil {
			return Digest{}, 0, scratch, err
		}
		w.mu.Lock()
		if w.closed {
			w.mu.Unlock()
			return Digest{}, 0, scratch, fmt.Errorf("%w: the writer is closed", errdefs.ErrInvalid)
		}
		if ch, ok := w.inflight[d]; ok {
			w.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				return Digest{}, 0, scratch, ctx.Err()
			}
			continue // it is stored now, unless that failed: then try ourselves
		}
		ch := make(chan struct{})
		w.inflight[d] = ch
		w.mu.Unlock()

		stored, out, err := w.store(d, data, scratch, st)

		w.mu.Lock()
		delete(w.inflight, d)
		w.mu.Unlock()
		close(ch)
		if err != nil {
			return Digest{}, 0, out, fmt.Errorf("chunk %s: %w", d, err)
		}
		return d, stored, out, nil
	}
}

// store writes chunk d unless it exists, in which case its modification
// time becomes now: that is what keeps it from a GC running meanwhile.
func (w *Writer) store(d Digest, data, scratch []byte, st *stager) (int64, []byte, error) {
	w.mu.Lock()
	_, mine := w.pending[d]
	w.mu.Unlock()
	if mine {
		return 0, scratch, nil
	}
	path := w.r.chunkPath(d)
	ok, err := touch(path)
	if err != nil || ok {
		return 0, scratch, err
	}
	c, err := codec()
	if err != nil {
		return 0, scratch, err
	}
	if incompressible(data) {
		scratch = rawFrame(scratch[:0], data)
	} else {
		scratch = c.enc.EncodeAll(data, scratch[:0])
	}
	if st == nil {
		if err := w.r.installChunk(path, scratch); err != nil {
			return 0, scratch, err
		}
		return int64(len(scratch)), scratch, nil
	}
	if err := st.submit(d, scratch); err != nil {
		return 0, scratch, err
	}
	return int64(len(scratch)), nil, nil
}

// stage writes chunk d's stored bytes to tmp/, unsynced, for the next
// flush to put in place.
func (w *Writer) stage(d Digest, stored []byte) error {
	tmp, err := w.r.stageChunk(stored)
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.pending == nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("%w: the writer is closed", errdefs.ErrInvalid)
	}
	w.pending[d] = tmp
	return nil
}

// Flush makes the chunks stored so far durable and puts them in place;
// Commit does it too. It lets a caller time a backup up to its commit.
func (w *Writer) Flush(ctx context.Context) error {
	if err := w.flush(ctx); err != nil {
		return fmt.Errorf("backup repository %q: flush: %w", w.r.path, err)
	}
	return nil
}

// flush makes the pending chunks durable and moves them into place: one
// syncfs writes them all (a per-file fsync costs a journal commit each,
// which for a gigabyte in 1 MiB chunks is most of a backup's time), the
// renames follow, and a second syncfs makes those durable. A crash before
// the renames leaves temporaries that GC removes.
func (w *Writer) flush(ctx context.Context) error {
	w.mu.Lock()
	pending := w.pending
	w.pending = map[Digest]string{}
	w.mu.Unlock()
	if len(pending) == 0 {
		return nil
	}
	if err := syncFS(w.r.path); err != nil {
		return err
	}
	for d, tmp := range pending {
		if err := ctx.Err(); err != nil {
			return err
		}
		path := w.r.chunkPath(d)
		err := os.Rename(tmp, path)
		if errors.Is(err, fs.ErrNotExist) {
			// Someone removed a fan-out directory by hand; put it back.
			if err = mkdir(filepath.Dir(path)); err == nil {
				err = os.Rename(tmp, path)
			}
		}
		if err != nil {
			return fmt.Errorf("chunk %s: %w", d, err)
		}
	}
	return syncFS(w.r.path)
}

// syncFS makes everything written to the filesystem holding dir durable.
func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// touch sets path's modification time to now and reports whether the
// file exists. One syscall both checks for a chunk and protects it.
func touch(path string) (bool, error) {
	now := []unix.Timespec{{Nsec: unix.UTIME_NOW}, {Nsec: unix.UTIME_NOW}}
	err := unix.UtimesNanoAt(unix.AT_FDCWD, path, now, 0)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENOENT):
		return false, nil
	}
	return false, &os.PathError{Op: "touch", Path: path, Err: err}
}

// installChunk puts a chunk file in place, durably. Overwriting a chunk
// someone else stored meanwhile is harmless: the bytes are the same.
func (r *Repo) installChunk(path string, stored []byte) error {
	tmp, err := writeTemp(r.tmpDir(), "chunk-", stored)
	if err != nil {
		return err
	}
	err = os.Rename(tmp, path)
	if errors.Is(err, fs.ErrNotExist) {
		// Someone removed a fan-out directory by hand; put it back.
		if err = mkdir(filepath.Dir(path)); err == nil {
			err = os.Rename(tmp, path)
		}
	}
	if err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(path))
}

// DiskInput is one disk to back up.
type DiskInput struct {
	Name string
	Size int64
	// Reader is the disk as it is at the backup point. ReadAt must be
	// safe to call from several goroutines.
	Reader io.ReaderAt
	// Read lists, ascending, the chunks to read. Every other chunk is
	// the parent's, or zeros without a parent.
	Read []int64
	// Parent is the parent backup's chunk list for this disk, or nil. A
	// parent shorter or longer than the disk (which has grown or shrunk)
	// counts as zeros past its end; any chunk whose content or length
	// changed, such as the parent's last one, must be in Read.
	Parent []Digest
}

// BackupDisk reads the chunks in.Read, stores those the repository
// lacks, and returns the disk's chunk list. Reading runs ahead of the
// workers that hash, compress and store, with a bounded number of chunks
// in memory. progress gets the bytes of each chunk read, maybe from
// several goroutines at once.
func (w *Writer) BackupDisk(ctx context.Context, in DiskInput, progress func(n int64)) (DiskManifest, Stats, error) {
	began := time.Now()
	r := w.r
	fail := func(err error) (DiskManifest, Stats, error) {
		return DiskManifest{}, Stats{}, fmt.Errorf("back up disk %q: %w", in.Name, err)
	}
	switch {
	case in.Name == "" || !validText(in.Name, 255):
		return fail(fmt.Errorf("%w: a disk name needs 1-255 printable characters", errdefs.ErrInvalid))
	case in.Size < 0:
		return fail(fmt.Errorf("%w: negative size %d", errdefs.ErrInvalid, in.Size))
	case len(in.Read) > 0 && in.Reader == nil:
		return fail(fmt.Errorf("%w: chunks to read but no reader", errdefs.ErrInvalid))
	}
	n := r.chunkCount(in.Size)
	for k, i := range in.Read {
		if i < 0 || i >= n {
			return fail(fmt.Errorf("%w: chunk %d to read is outside the disk's %d chunks", errdefs.ErrInvalid, i, n))
		}
		if k > 0 && i <= in.Read[k-1] {
			return fail(fmt.Errorf("%w: chunks to read are not in ascending order at %d", errdefs.ErrInvalid, i))
		}
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	w.mu.Lock()
	closed := w.closed
	w.mu.Unlock()
	if closed {
		return fail(fmt.Errorf("%w: the writer is closed", errdefs.ErrInvalid))
	}

	chunks := make([]Digest, n)
	copy(chunks, in.Parent)
	// The chunks taken from the parent are touched now, so that deleting
	// the parent and a GC during this backup cannot take them away; a
	// chunk already gone fails the backup before any reading.
	touched := make(map[Digest]bool)
	k := 0
	for i := range n {
		if k < len(in.Read) && in.Read[k] == i {
			k++
			continue
		}
		d := chunks[i]
		if d.IsZero() || touched[d] {
			continue
		}
		if i%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return fail(err)
			}
		}
		ok, err := touch(r.chunkPath(d))
		if err != nil {
			return fail(fmt.Errorf("parent's chunk %d at offset %d: %w", i, i*int64(r.chunkSize), err))
		}
		if !ok {
			return fail(fmt.Errorf("parent's chunk %d at offset %d (%s) is missing from the repository: %w", i, i*int64(r.chunkSize), d, errdefs.ErrNotFound))
		}
		touched[d] = true
	}

	var st Stats
	if len(in.Read) > 0 {
		var err error
		if st, err = w.readChunks(ctx, in, chunks, progress); err != nil {
			return fail(err)
		}
	}
	for i, d := range chunks {
		if !d.IsZero() {
			st.Chunks++
			st.Data += int64(chunkLen(in.Size, r.chunkSize, int64(i)))
		}
	}
	st.Duration = time.Since(began)
	return DiskManifest{Name: in.Name, Size: in.Size, Chunks: chunks}, st, nil
}

// readChunks is BackupDisk's pipeline: two readers take chunk indices in
// order and hand full buffers to the workers, which store them and return
// the buffers. The buffers are the only chunk memory, two per worker.
func (w *Writer) readChunks(parent context.Context, in DiskInput, chunks []Digest, progress func(int64)) (Stats, error) {
	r := w.r
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	defer priority.Background()()
	nw := workers()

	var (
		errMu    sync.Mutex
		firstErr error
	)
	setErr := func(err error) {
		errMu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		errMu.Unlock()
		cancel()
	}

	type job struct {
		idx int64
		buf []byte
		n   int
	}
	jobs := make(chan job, nw)
	// free starts with placeholders, allocated on first use, so a small
	// disk does not cost the whole window's memory.
	free := make(chan []byte, 2*nw)
	for range 2 * nw {
		free <- nil
	}
	var readBytes, storedBytes atomic.Int64
	var newChunks atomic.Int64

	var next atomic.Int64
	var readers sync.WaitGroup
	for range min(2, len(in.Read)) {
		readers.Go(func() {
			for {
				k := next.Add(1) - 1
				if k >= int64(len(in.Read)) {
					return
				}
				var buf []byte
				select {
				case buf = <-free:
				case <-ctx.Done():
					return
				}
				// select picks at random when both are ready: a reader
				// must not start one more read after a cancel.
				if ctx.Err() != nil {
					free <- buf
					return
				}
				if buf == nil {
					buf = r.getRaw()
				}
				idx := in.Read[k]
				off := idx * int64(r.chunkSize)
				l := chunkLen(in.Size, r.chunkSize, idx)
				got, err := in.Reader.ReadAt(buf[:l], off)
				if got == l {
					err = nil // a ReaderAt may report EOF with the last full read
				} else if err == nil || errors.Is(err, io.EOF) {
					err = fmt.Errorf("%w: got %d of %d bytes", io.ErrUnexpectedEOF, got, l)
				}
				if err != nil {
					free <- buf
					setErr(fmt.Errorf("read chunk %d at offset %d: %w", idx, off, err))
					return
				}
				readBytes.Add(int64(l))
				if progress != nil {
					progress(int64(l))
				}
				select {
				case jobs <- job{idx: idx, buf: buf, n: l}:
				case <-ctx.Done():
					free <- buf
					return
				}
			}
		})
	}
	go func() {
		readers.Wait()
		close(jobs)
	}()

	st := w.newStager(nw, setErr)
	var workersWG sync.WaitGroup
	for range nw {
		workersWG.Go(func() {
			priority.LowerThread()
			var scratch []byte
			for j := range jobs {
				if ctx.Err() != nil {
					free <- j.buf
					continue
				}
				if scratch == nil {
					scratch = st.buffer()
				}
				d, stored, out, err := w.put(ctx, j.buf[:j.n], scratch, st)
				scratch = out
				free <- j.buf
				if err != nil {
					setErr(fmt.Errorf("chunk %d at offset %d: %w", j.idx, j.idx*int64(r.chunkSize), err))
					continue
				}
				chunks[j.idx] = d
				if stored > 0 {
					storedBytes.Add(stored)
					newChunks.Add(1)
				}
			}
		})
	}
	workersWG.Wait()
	st.wait()
	// Every buffer is back in free now: readers and workers have ended.
	for range 2 * nw {
		if b := <-free; b != nil {
			r.putRaw(b)
		}
	}
	if firstErr != nil {
		return Stats{}, firstErr
	}
	if err := parent.Err(); err != nil {
		return Stats{}, err
	}
	return Stats{Read: readBytes.Load(), Stored: storedBytes.Load(), NewChunks: int(newChunks.Load())}, nil
}

// Commit checks m and writes it as a backup. Every chunk m names must be
// in the repository (ErrNotFound otherwise); an id already taken fails
// with ErrExists. A zero m.Format means the current format.
func (w *Writer) Commit(ctx context.Context, m *Manifest) error {
	if m == nil {
		return fmt.Errorf("commit backup: %w: no manifest", errdefs.ErrInvalid)
	}
	if m.Format == 0 {
		m.Format = manifestFormat
	}
	fail := func(err error) error { return fmt.Errorf("commit backup %q: %w", m.ID, err) }
	b, err := encodeManifest(m)
	if err != nil {
		return fail(err)
	}
	// Checked as a reader will check it, so nothing written is unreadable.
	canon, err := parseManifest(b, w.r.chunkSize)
	if err != nil {
		return fail(err)
	}
	w.mu.Lock()
	closed := w.closed
	w.mu.Unlock()
	if closed {
		return fail(fmt.Errorf("%w: the writer is closed", errdefs.ErrInvalid))
	}
	path := w.r.manifestPath(canon.ID)
	if _, err := os.Lstat(path); err == nil {
		return fail(errdefs.ErrExists)
	}
	if err := w.flush(ctx); err != nil {
		return fail(err)
	}
	// Touching every chunk both checks it is there and moves it past the
	// cutoff of any GC that has not yet read this manifest.
	seen := make(map[Digest]bool)
	count := 0
	for _, disk := range canon.Disks {
		for i, d := range disk.Chunks {
			if d.IsZero() || seen[d] {
				continue
			}
			if count++; count%1024 == 0 {
				if err := ctx.Err(); err != nil {
					return fail(err)
				}
			}
			ok, err := touch(w.r.chunkPath(d))
			if err != nil {
				return fail(fmt.Errorf("disk %q chunk %d at offset %d: %w", disk.Name, i, int64(i)*int64(w.r.chunkSize), err))
			}
			if !ok {
				return fail(fmt.Errorf("disk %q chunk %d at offset %d: chunk %s is missing from the repository: %w", disk.Name, i, int64(i)*int64(w.r.chunkSize), d, errdefs.ErrNotFound))
			}
			seen[d] = true
		}
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	b, err = encodeManifest(&canon)
	if err != nil {
		return fail(err)
	}
	err = writeFileAtomic(w.r.tmpDir(), path, b, true)
	if errors.Is(err, fs.ErrExist) {
		return fail(errdefs.ErrExists)
	}
	if err != nil {
		return fail(err)
	}
	return nil
}
