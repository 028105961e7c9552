// Package store holds Lodge's durable state as buckets of keys and values
// changed in transactions. It knows nothing of VMs or images: the services
// above it choose the buckets and encode the values. The same interface is
// meant to sit on bbolt for one host and on etcd for a cluster, so code that
// runs inside a transaction must stay deterministic (no clock, no random).
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
)

// ErrNotFound is returned when a key does not exist.
var ErrNotFound = errors.New("not found")

// KV is one key and its value.
type KV struct {
	Key   string
	Value []byte
}

// Tx is a view of the store inside one transaction.
type Tx interface {
	Get(bucket, key string) ([]byte, error)
	Put(bucket, key string, value []byte) error
	Delete(bucket, key string) error
	// List returns the entries of a bucket whose keys start with prefix,
	// in key order.
	List(bucket, prefix string) ([]KV, error)
}

// Store runs transactions. Update commits when fn returns nil and rolls
// back otherwise; View never writes.
type Store interface {
	Update(ctx context.Context, fn func(Tx) error) error
	View(ctx context.Context, fn func(Tx) error) error
	Close() error
}

// GetJSON reads a key and decodes its JSON value into v.
func GetJSON(tx Tx, bucket, key string, v any) error {
	raw, err := tx.Get(bucket, key)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("decode %s/%s: %w", bucket, key, err)
	}
	return nil
}

// PutJSON encodes v as JSON and stores it under key.
func PutJSON(tx Tx, bucket, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s/%s: %w", bucket, key, err)
	}
	return tx.Put(bucket, key, raw)
}

// ListJSON decodes every value of a bucket into a new T.
func ListJSON[T any](tx Tx, bucket string) ([]T, error) {
	kvs, err := tx.List(bucket, "")
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(kvs))
	for _, kv := range kvs {
		var v T
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, fmt.Errorf("decode %s/%s: %w", bucket, kv.Key, err)
		}
		out = append(out, v)
	}
	return out, nil
}
