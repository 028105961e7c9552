// Package backup keeps VM backups in a repository directory: a store of
// compressed chunks named by their content, and one manifest per backup
// that lists, for each disk, the chunk at every offset.
//
// Naming chunks by the BLAKE3 of their uncompressed bytes gives
// deduplication for free: an incremental backup reads only the chunks
// that changed and names the rest by the parent's digests, and a chunk
// that two backups (or two VMs) share is stored once. Chunks of zeros are
// never stored; the zero Digest stands for them.
//
// The manifest is a backup's commit point. Everything is written to tmp/,
// synced and renamed into place, so a crash leaves at worst stray
// temporaries and chunks no manifest names, which GC removes later.
//
// GC runs alongside writers without a repository-wide lock. A writer
// registers itself in writers/ with a file it holds flock'ed, and every
// chunk it writes or reuses gets a modification time after the writer
// started. GC removes an unreferenced chunk only if it is older than the
// oldest live writer (less a margin), so nothing a backup in progress
// relies on can go.
//
// The package also decides what retention keeps (Prune) and when a
// schedule fires (Schedule).
package backup
