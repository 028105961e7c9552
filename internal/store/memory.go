package store

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
)

// Memory is an in-memory Store for unit tests. Transactions are
// serialised and a failed Update leaves the data as it was.
type Memory struct {
	mu   sync.Mutex
	data map[string]map[string][]byte
}

var _ Store = (*Memory)(nil)

// NewMemory returns an empty in-memory store.
func NewMemory() *Memory { return &Memory{data: map[string]map[string][]byte{}} }

// Update runs fn on a copy and keeps the copy only if fn succeeds.
func (m *Memory) Update(ctx context.Context, fn func(Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	work := memTx{data: cloneData(m.data)}
	if err := fn(work); err != nil {
		return err
	}
	m.data = work.data
	return nil
}

// View runs fn on a snapshot; writes inside it are discarded.
func (m *Memory) View(ctx context.Context, fn func(Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	snap := cloneData(m.data)
	m.mu.Unlock()
	return fn(memTx{data: snap})
}

// Close does nothing.
func (m *Memory) Close() error { return nil }

func cloneData(src map[string]map[string][]byte) map[string]map[string][]byte {
	dst := make(map[string]map[string][]byte, len(src))
	for b, kv := range src {
		nb := make(map[string][]byte, len(kv))
		for k, v := range kv {
			nb[k] = bytes.Clone(v)
		}
		dst[b] = nb
	}
	return dst
}

type memTx struct{ data map[string]map[string][]byte }

func (t memTx) Get(bucket, key string) ([]byte, error) {
	v, ok := t.data[bucket][key]
	if !ok {
		return nil, fmt.Errorf("%s/%s: %w", bucket, key, ErrNotFound)
	}
	return bytes.Clone(v), nil
}

func (t memTx) Put(bucket, key string, value []byte) error {
	if t.data[bucket] == nil {
		t.data[bucket] = map[string][]byte{}
	}
	t.data[bucket][key] = bytes.Clone(value)
	return nil
}

func (t memTx) Delete(bucket, key string) error {
	delete(t.data[bucket], key)
	return nil
}

func (t memTx) List(bucket, prefix string) ([]KV, error) {
	var out []KV
	for k, v := range t.data[bucket] {
		if strings.HasPrefix(k, prefix) {
			out = append(out, KV{Key: k, Value: bytes.Clone(v)})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, nil
}
