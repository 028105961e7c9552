#!/usr/bin/env bash
# Bundles: `lodge export` of a stopped VM against `qemu-img convert -O
# qcow2 -c` and `tar -S | zstd -1` of the same disk; the bundle's size
# against the incompressible data plus the text compressed by zstd -1;
# `lodge import` against a plain `cp` of the bundle (and cp + sync, since
# an import is durable when it returns). The disk is 4 GiB virtual with
# 1 GiB of random data and 1 GiB of text (Go source); DATA_MIB sets the
# size of each half. Lodge and the comparisons alternate within each run.
# Then `lodge send` between two daemons on this host against nc (below).
# Writes results/bundle-*.tsv.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
DATA_MIB=${DATA_MIB:-1024}
"$ROOT/scripts/deps.sh" bench # nc, for the send comparison
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

# --- send: `lodge send` of the stopped VM to a second daemon on this host,
# HTTPS over loopback, against moving the bundle file with nc (the issue's
# measure), and against the same work done through nc: `lodge export -`
# piped through nc into `lodge import -` on the second daemon.
H2=$WORK/home2
SEND_PORT=${SEND_PORT:-18443}
NC_PORT=${NC_PORT:-18444}
rm -rf "$H2"
mkdir -p "$H2"
LODGE_HOME=$H2 "$LODGE" daemon --listen "127.0.0.1:$SEND_PORT" >"$WORK/daemon2.log" 2>&1 &
d2=$!
stop_d2() { kill "$d2" 2>/dev/null || true; wait "$d2" 2>/dev/null || true; rm -rf "$H2"; }
trap stop_d2 EXIT
for _ in $(seq 100); do LODGE_HOME=$H2 "$LODGE" host info >/dev/null 2>&1 && break; sleep 0.1; done
token=$(LODGE_HOME=$H2 "$LODGE" host token | sed -n "s/^token: *//p")
# listening PORT: wait until something listens on 127.0.0.1:PORT.
listening() { for _ in $(seq 100); do ss -ltn "sport = :$1" | grep -q LISTEN && return 0; sleep 0.02; done; return 1; }
out=$RESULTS/bundle-send.tsv
echo -e "run\tsend_s\tnc_file_s\tnc_pipeline_s\tbundle_bytes" >"$out"
for i in $(seq "$RUNS"); do
  sync; t=$(now)
  "$LODGE" send bundle-src --to "https://127.0.0.1:$SEND_PORT" --token "$token" --name "send-$i" >/dev/null
  a=$(elapsed "$t")
  LODGE_HOME=$H2 "$LODGE" delete "send-$i" >/dev/null
  nc -l 127.0.0.1 "$NC_PORT" >"$D/recv.lodge" &
  lp=$!
  listening "$NC_PORT"
  sync; t=$(now); nc -N 127.0.0.1 "$NC_PORT" <"$D/b.lodge"; wait "$lp"; b=$(elapsed "$t")
  cmp -s "$D/b.lodge" "$D/recv.lodge" || { echo "nc delivered a different file" >&2; exit 1; }
  rm -f "$D/recv.lodge"
  (nc -l 127.0.0.1 "$NC_PORT" | LODGE_HOME=$H2 "$LODGE" import - --name "pipe-$i" >/dev/null) &
  lp=$!
  listening "$NC_PORT"
  sync; t=$(now); "$LODGE" export bundle-src - 2>/dev/null | nc -N 127.0.0.1 "$NC_PORT"; wait "$lp"; c=$(elapsed "$t")
  LODGE_HOME=$H2 "$LODGE" delete "pipe-$i" >/dev/null
  echo -e "$i\t$a\t$b\t$c\t$(stat -c %s "$D/b.lodge")" | tee -a "$out"
done
stop_d2
trap - EXIT

"$LODGE" delete bundle-src >/dev/null
"$LODGE" image delete bundledata >/dev/null
rm -rf "$D"
