package bundle

import (
	"encoding/binary"
	"io"
)

// Watch passes a bundle's bytes through and reports, from its chunk
// headers, how much of the archive has gone by and how long it is: a
// progress bar for a stream the caller only copies. It never fails; a
// stream that is not a bundle just reports nothing.
func Watch(r io.Reader, progress func(done, total int64)) io.Reader {
	return &watcher{r: r, fn: progress}
}

type watcher struct {
	r     io.Reader
	fn    func(done, total int64)
	head  []byte // a record header being gathered
	skip  int64  // bytes of a frame still to pass over
	total int64
	lost  bool
}

// WatchWriter is Watch for a stream being written.
func WatchWriter(w io.Writer, progress func(done, total int64)) io.Writer {
	return &watchWriter{w: w, watcher: watcher{fn: progress}}
}

type watchWriter struct {
	w io.Writer
	watcher
}

func (w *watchWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.scan(p[:n])
	return n, err
}

func (w *watcher) Read(p []byte) (int, error) {
	n, err := w.r.Read(p)
	w.scan(p[:n])
	return n, err
}

// scan walks records: 8 bytes of magic and length, then the payload,
// then for a chunk its stored frame.
func (w *watcher) scan(b []byte) {
	for len(b) > 0 && !w.lost {
		if w.skip > 0 {
			k := min(int64(len(b)), w.skip)
			w.skip -= k
			b = b[k:]
			continue
		}
		need := 8
		if len(w.head) >= 8 {
			need = 8 + int(binary.LittleEndian.Uint32(w.head[4:]))
			if need > 8+chunkLen {
				w.lost = true
				return
			}
		}
		k := min(len(b), need-len(w.head))
		w.head = append(w.head, b[:k]...)
		b = b[k:]
		if len(w.head) < need || need == 8 {
			continue
		}
		h := w.head
		w.head = w.head[:0]
		if binary.LittleEndian.Uint32(h) != skippableMagic || len(h) < 12 {
			w.lost = true
			return
		}
		switch [4]byte(h[8:12]) {
		case tagStart:
			w.total = int64(binary.LittleEndian.Uint64(h[16:]))
			w.fn(0, w.total)
		case tagChunk:
			off := binary.LittleEndian.Uint64(h[20:])
			raw := binary.LittleEndian.Uint32(h[28:])
			w.skip = int64(binary.LittleEndian.Uint32(h[32:]))
			w.fn(int64(off)+int64(raw), w.total)
		}
	}
}
