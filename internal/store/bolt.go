package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// ErrLocked means another process holds the database open, which in
// practice is another lodge daemon on the same LODGE_HOME.
var ErrLocked = errors.New("state database is in use by another process")

// Bolt is the single-host store on a bbolt file.
type Bolt struct {
	db *bolt.DB
}

var _ Store = (*Bolt)(nil)

// OpenBolt opens (creating if needed) the database at path. It fails fast
// with ErrLocked instead of waiting forever when another daemon has it.
func OpenBolt(path string) (*Bolt, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open %s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return &Bolt{db: db}, nil
}

// Update runs fn in a read-write transaction.
func (b *Bolt) Update(ctx context.Context, fn func(Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.db.Update(func(btx *bolt.Tx) error { return fn(boltTx{btx}) })
}

// View runs fn in a read-only transaction.
func (b *Bolt) View(ctx context.Context, fn func(Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.db.View(func(btx *bolt.Tx) error { return fn(boltTx{btx}) })
}

// Close releases the database file.
func (b *Bolt) Close() error { return b.db.Close() }

type boltTx struct{ tx *bolt.Tx }

func (t boltTx) Get(bucket, key string) ([]byte, error) {
	bk := t.tx.Bucket([]byte(bucket))
	if bk == nil {
		return nil, fmt.Errorf("%s/%s: %w", bucket, key, ErrNotFound)
	}
	v := bk.Get([]byte(key))
	if v == nil {
		return nil, fmt.Errorf("%s/%s: %w", bucket, key, ErrNotFound)
	}
	// bbolt's slices die with the transaction.
	return bytes.Clone(v), nil
}

func (t boltTx) Put(bucket, key string, value []byte) error {
	bk, err := t.tx.CreateBucketIfNotExists([]byte(bucket))
	if err != nil {
		return fmt.Errorf("bucket %s: %w", bucket, err)
	}
	return bk.Put([]byte(key), value)
}

func (t boltTx) Delete(bucket, key string) error {
	bk := t.tx.Bucket([]byte(bucket))
	if bk == nil {
		return nil
	}
	return bk.Delete([]byte(key))
}

func (t boltTx) List(bucket, prefix string) ([]KV, error) {
	bk := t.tx.Bucket([]byte(bucket))
	if bk == nil {
		return nil, nil
	}
	var out []KV
	c := bk.Cursor()
	p := []byte(prefix)
	for k, v := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, v = c.Next() {
		out = append(out, KV{Key: string(k), Value: bytes.Clone(v)})
	}
	return out, nil
}
