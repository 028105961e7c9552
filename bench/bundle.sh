#!/usr/bin/env bash
# Bundles: `lodge export` of a stopped VM against `qemu-img convert -O
# qcow2 -c` and `tar -S | zstd -1` of the same disk; the bundle's size
# against the incompressible data plus the text compressed by zstd -1;
# `lodge import` against a plain `cp` of the bundle (and cp + sync, since
# an import is durable when it returns). The disk is 4 GiB virtual with
# 1 GiB of random data and 1 GiB of text (Go source); DATA_MIB sets the
# size of each half. Lodge and the comparisons alternate within each run.
# Writes results/bundle-*.tsv.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
DATA_MIB=${DATA_MIB:-1024}
start_lodged

D=$WORK/bundle
rm -rf "$D"
mkdir -p "$D"
for vm in bundle-src $(seq -f 'bundle-imp-%g' 1 "$RUNS"); do "$LODGE" delete --force "$vm" >/dev/null 2>&1 || true; done
"$LODGE" image delete bundledata >/dev/null 2>&1 || true

# The disk: random at 512 MiB, text at 2 GiB, holes elsewhere.
head -c "${DATA_MIB}M" /dev/urandom >"$D/random.bin"
find /usr/local/go/src /usr/share/doc -type f \( -name '*.go' -o -name '*.txt' -o -name 'copyright' \) -exec cat {} + 2>/dev/null >"$D/corpus.txt" || true
# Repeat the corpus to DATA_MIB; a copy is far apart from the next (more
# than zstd's window), so repetition does not flatter the ratio.
for _ in $(seq $(( (DATA_MIB << 20) / $(stat -c %s "$D/corpus.txt") + 1 ))); do cat "$D/corpus.txt"; done | head -c "${DATA_MIB}M" >"$D/text.bin" || true
rm -f "$D/corpus.txt"
truncate -s 4G "$D/data.raw"
dd if="$D/random.bin" of="$D/data.raw" bs=4M seek=128 conv=notrunc status=none
dd if="$D/text.bin" of="$D/data.raw" bs=4M seek=512 conv=notrunc status=none
qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$D/data.raw" "$D/data.qcow2"
rm -f "$D/data.raw"
text_zst=$(zstd -1 -q -c "$D/text.bin" | wc -c)
rm -f "$D/random.bin" "$D/text.bin"
"$LODGE" image import "$D/data.qcow2" --name bundledata >/dev/null
"$LODGE" create bundle-src --image bundledata --disk 4G --memory 256M >/dev/null
# Warm the page cache for both readers alike: one untimed pass each.
"$LODGE" export bundle-src "$D/warm.lodge" 2>/dev/null
cat "$D/data.qcow2" >/dev/null
rm -f "$D/warm.lodge"

echo "$DATA_MIB" >"$RESULTS/bundle-data-mib.txt"
out=$RESULTS/bundle-export.tsv
echo -e "run\tlodge_s\tqemuimg_c_s\ttar_zstd_s\tlodge_bytes\tqemuimg_bytes\ttar_zstd_bytes\tideal_bytes\ttar_zstd_sync_s" >"$out"
for i in $(seq "$RUNS"); do
  sync; t=$(now); "$LODGE" export bundle-src "$D/b.lodge" 2>/dev/null; a=$(elapsed "$t")
  sync; t=$(now); qemu-img convert -f qcow2 -O qcow2 -c "$D/data.qcow2" "$D/c.qcow2"; b=$(elapsed "$t")
  sync; t=$(now); tar -S -cf - -C "$D" data.qcow2 | zstd -1 -q -o "$D/t.tar.zst" -f; c=$(elapsed "$t")
  # lodge export syncs its file before it renames it into place; so
  # does qemu-img when it closes. The same pipe with a sync, to compare
  # like with like:
  rm -f "$D/t.tar.zst"
  sync; t=$(now); tar -S -cf - -C "$D" data.qcow2 | zstd -1 -q -o "$D/t.tar.zst" -f; sync "$D/t.tar.zst"; e=$(elapsed "$t")
  echo -e "$i\t$a\t$b\t$c\t$(stat -c %s "$D/b.lodge")\t$(stat -c %s "$D/c.qcow2")\t$(stat -c %s "$D/t.tar.zst")\t$(((DATA_MIB << 20) + text_zst))\t$e" | tee -a "$out"
  rm -f "$D/c.qcow2" "$D/t.tar.zst"
  [ "$i" = "$RUNS" ] || rm -f "$D/b.lodge"
done

out=$RESULTS/bundle-import.tsv
echo -e "run\tlodge_s\tcp_s\tcp_sync_s" >"$out"
for i in $(seq "$RUNS"); do
  sync; t=$(now); "$LODGE" import "$D/b.lodge" --name "bundle-imp-$i" >/dev/null 2>&1; a=$(elapsed "$t")
  sync; t=$(now); cp "$D/b.lodge" "$D/copy.lodge"; b=$(elapsed "$t")
  rm -f "$D/copy.lodge"
  sync; t=$(now); cp "$D/b.lodge" "$D/copy.lodge"; sync; c=$(elapsed "$t")
  rm -f "$D/copy.lodge"
  echo -e "$i\t$a\t$b\t$c" | tee -a "$out"
  "$LODGE" delete "bundle-imp-$i" >/dev/null
done
"$LODGE" delete bundle-src >/dev/null
"$LODGE" image delete bundledata >/dev/null
rm -rf "$D"
