package backup

import (
	"fmt"
	"sync"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// stager writes new chunks to tmp/ on goroutines of its own, so that a
// backup's workers go on hashing and compressing the next chunk while the
// disk takes the last one. When each worker wrote its own chunks, a full
// backup's workers spent half their time waiting on those writes, with a
// CPU idle.
type stager struct {
	w     *Writer
	in    chan staged
	bufs  chan []byte
	wg    sync.WaitGroup
	onErr func(error)

	mu  sync.Mutex
	err error
}

type staged struct {
	d      Digest
	stored []byte
}

// newStager starts n goroutines writing chunks. It keeps 2n+2 buffers
// for compressed chunks: one per worker, one per write in progress and
// a short queue, which is all the memory a faster reader can take. The
// first write that fails goes to onErr at once, so the backup can stop
// reading; later chunks are then dropped.
func (w *Writer) newStager(n int, onErr func(error)) *stager {
	s := &stager{w: w, in: make(chan staged, n), bufs: make(chan []byte, 2*n+2), onErr: onErr}
	for range cap(s.bufs) {
		s.bufs <- nil // allocated on first use, as readChunks' buffers are
	}
	for range n {
		s.wg.Go(s.run)
	}
	return s
}

// buffer waits for a free buffer for a compressed chunk. It is aligned,
// so that the chunk goes to the disk without a copy.
func (s *stager) buffer() []byte {
	b := <-s.bufs
	if b == nil {
		b = alignedBuffer(storedBound(s.w.r.chunkSize))
	}
	return b[:0]
}

// submit hands chunk d's compressed bytes, in a buffer from buffer(), to
// be written. Until the write ends, d counts as this writer's pending
// chunk, so a second copy of it in the same backup is not stored again.
func (s *stager) submit(d Digest, stored []byte) error {
	s.w.mu.Lock()
	if s.w.pending == nil {
		s.w.mu.Unlock()
		return fmt.Errorf("%w: the writer is closed", errdefs.ErrInvalid)
	}
	s.w.pending[d] = ""
	s.w.mu.Unlock()
	s.in <- staged{d: d, stored: stored}
	return nil
}

func (s *stager) run() {
	for c := range s.in {
		s.mu.Lock()
		failed := s.err != nil
		s.mu.Unlock()
		var err error
		if !failed {
			err = s.w.stage(c.d, c.stored)
		}
		s.bufs <- c.stored
		if err != nil || failed {
			s.w.mu.Lock()
			delete(s.w.pending, c.d) // a no-op once the writer is closed
			s.w.mu.Unlock()
		}
		if err != nil {
			err = fmt.Errorf("chunk %s: %w", c.d, err)
			s.mu.Lock()
			first := s.err == nil
			if first {
				s.err = err
			}
			s.mu.Unlock()
			if first {
				s.onErr(err)
			}
		}
	}
}

// wait ends the stager once every worker has stopped submitting. Every
// chunk it took is then in tmp/ or no longer counted as pending.
func (s *stager) wait() {
	close(s.in)
	s.wg.Wait()
}
