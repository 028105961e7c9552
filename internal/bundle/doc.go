// Package bundle reads and writes Lodge's portable VM bundles: one file
// holding a machine's settings, identity and disks, which export, import
// and host-to-host send all use.
//
// A bundle is a zstd stream whose content is a tar archive, so standard
// tools read it: `tar --zstd -xSf vm.lodge` gives lodge.json and each
// disk as a sparse raw image. Lodge cuts the archive into chunks of at
// most 4 MiB, compresses each as an independent zstd frame, and puts
// before each one a zstd skippable frame (which zstd itself passes over)
// with the chunk's number, position and BLAKE3 digest. Independent frames
// let both ends use every core; the digests let an import check a chunk
// before it decompresses it, name where damage is, and let a transfer
// resume after the last chunk that arrived whole.
//
// Import treats a bundle as hostile: it accepts only the entries the
// manifest announces, as regular files, with sizes that add up, and never
// decompresses more than a chunk header allows.
package bundle
