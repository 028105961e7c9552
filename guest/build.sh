#!/usr/bin/env bash
# Builds the Lodge test guest image, build/guest/tiny.qcow2, from Debian
# packages only (see guest/README.md). Run from anywhere:
#
#   bash guest/build.sh            # rebuild only if guest/ changed
#   bash guest/build.sh --force    # always rebuild (or FORCE=1)
#
# Everything but the apt steps runs unprivileged: no mount, no loop device.
# The .debs are cached in build/guest/debs/; delete that directory to pick
# up newer Debian packages.
set -euo pipefail

export LC_ALL=C
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export MTOOLS_SKIP_CHECK=1
umask 022

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST=$REPO/guest
OUT=$REPO/build/guest
DEBS=$OUT/debs
IMAGE=$OUT/tiny.qcow2

# --- what goes into the guest ------------------------------------------------
KERNEL_META=linux-image-cloud-amd64
GUEST_PACKAGES=(busybox-static qemu-guest-agent dropbear-bin)
# Providers of the shared libraries of the ELF binaries below; the ldd check
# fails the build, naming the library, if one is missing here.
LIB_PACKAGES=(libc6 libgcc-s1 libglib2.0-0 libpcre2-8-0 libudev1 libnuma1
	liburing2 libtomcrypt1 libtommath1 libgmp10)
ELF_BINARIES=(usr/sbin/qemu-ga usr/bin/dropbearkey usr/bin/dropbearconvert)
# dlopen()ed by glibc (pthread_cancel) rather than linked
EXTRA_LIBS=(lib/x86_64-linux-gnu/libgcc_s.so.1)

# Disk drivers, needed in the initramfs to find the root file system:
# virtio-blk, virtio-scsi, IDE (PIIX on the i440fx "pc" machine) and NVMe.
# Built-in ones (nvme, ext4 and its crc32c) are skipped automatically.
# virtio_rng: with a virtio-rng device the kernel RNG is seeded at once
# (otherwise generating SSH host keys waits ~1 s for it under TCG).
INITRD_MODULES=(virtio_pci virtio_rng virtio_blk virtio_scsi sd_mod ata_piix
	ata_generic nvme ext4)
# Loaded by the root file system's rcS, in this order.
ROOTFS_MODULES=("${INITRD_MODULES[@]}" virtio_net virtio_console virtio_balloon
	virtio_mem cdrom sr_mod isofs fat vfat nls_cp437 nls_ascii
	nls_utf8 nls_iso8859_1 button evdev)

CMDLINE="console=ttyS0,115200 root=LABEL=lodgeroot rw memhp_default_state=online memory_hotplug.online_policy=auto-movable quiet panic=-1 loglevel=4"

# Disk layout (MiB): MBR + gap | p1 FAT32 boot (syslinux BIOS + EFI) | p2 ext4 root
BOOT_START=1 BOOT_SIZE=48
ROOT_START=$((BOOT_START + BOOT_SIZE)) ROOT_SIZE=256
DISK_SIZE=$((ROOT_START + ROOT_SIZE))
DISK_ID=0x4c4f4447             # "LODG"
BOOT_VOLID=4c4f4447
ROOT_UUID=6c6f6467-6500-4000-8000-726f6f746673

SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin
SYSLINUX_EFI=/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi
SYSLINUX_E64=/usr/lib/syslinux/modules/efi64/ldlinux.e64

say() { echo "guest: $*" >&2; }
die() {
	echo "guest: error: $*" >&2
	exit 1
}

# --- up to date? ---------------------------------------------------------------
FORCE=${FORCE:-0}
case "${1:-}" in
--force | -f) FORCE=1 ;;
"") ;;
*) die "usage: $0 [--force]" ;;
esac
mkdir -p "$OUT" "$DEBS"
if command -v flock >/dev/null; then # one build at a time
	exec 9>"$OUT/.lock"
	flock 9
fi
if [ "$FORCE" != 1 ] && [ -f "$IMAGE" ] &&
	[ -z "$(find "$GUEST" -mindepth 1 -newer "$IMAGE" ! -name '*.md' -print -quit)" ]; then
	say "$IMAGE is up to date"
	exit 0
fi

START=$(date +%s.%N)

# --- host tools ------------------------------------------------------------------
as_root() {
	if [ "$(id -u)" = 0 ]; then
		"$@"
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
		sudo -n "$@"
	else
		die "needs root for: $*"
	fi
}

ensure_tools() {
	local need=() entry path pkg
	for entry in apt-get:apt dpkg-deb:dpkg ldd:libc-bin depmod:kmod modprobe:kmod \
		cpio:cpio gzip:gzip mkfs.vfat:dosfstools mcopy:mtools mmd:mtools \
		syslinux:syslinux "$SYSLINUX_MBR":syslinux-common \
		"$SYSLINUX_EFI":syslinux-efi "$SYSLINUX_E64":syslinux-efi \
		mkfs.ext4:e2fsprogs debugfs:e2fsprogs e2fsck:e2fsprogs \
		sfdisk:fdisk qemu-img:qemu-utils; do
		path=${entry%:*} pkg=${entry##*:}
		case "$path" in
		/*) [ -e "$path" ] && continue ;;
		*) command -v "$path" >/dev/null && continue ;;
		esac
		case " ${need[*]} " in *" $pkg "*) ;; *) need+=("$pkg") ;; esac
	done
	[ ${#need[@]} -eq 0 ] && return
	say "installing host tools: ${need[*]}"
	as_root apt-get install -y --no-install-recommends "${need[@]}" ||
		{ as_root apt-get update && as_root apt-get install -y --no-install-recommends "${need[@]}"; }
}

# --- Debian packages ---------------------------------------------------------------
deb_of() { # PACKAGE -> newest cached .deb
	local f
	f=$(find "$DEBS" -maxdepth 1 -name "${1}_*.deb" | sort -V | tail -n 1)
	[ -n "$f" ] || die "package $1 is not in $DEBS"
	echo "$f"
}

fetch() { # PACKAGE... -> download the ones not cached yet
	local missing=() p tmp
	for p; do
		[ -n "$(find "$DEBS" -maxdepth 1 -name "${p}_*.deb" -print -quit)" ] || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return
	say "downloading ${missing[*]}"
	tmp=$(mktemp -d "$DEBS/.partial.XXXXXX")
	if ! (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "${missing[@]}" >&2); then
		say "apt-get download failed; refreshing the package lists"
		as_root apt-get update -q >&2 || true
		(cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "${missing[@]}" >&2) ||
			{ rm -rf "$tmp"; die "cannot download ${missing[*]}"; }
	fi
	mv "$tmp"/*.deb "$DEBS"/
	rm -rf "$tmp"
}

ensure_tools

fetch "$KERNEL_META"
KERNEL_PKG=$(dpkg-deb -f "$(deb_of "$KERNEL_META")" Depends |
	grep -o 'linux-image-[0-9][^ ,]*-cloud-amd64' | head -n 1)
[ -n "$KERNEL_PKG" ] || die "cannot find the kernel package $KERNEL_META depends on"
PACKAGES=("$KERNEL_PKG" "${GUEST_PACKAGES[@]}" "${LIB_PACKAGES[@]}")
fetch "${PACKAGES[@]}"

# --- staging ----------------------------------------------------------------------
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
TMP_IMAGE=$OUT/.tiny.qcow2.$$
cleanup() {
	rm -f "$TMP_IMAGE"
	if [ "${KEEP_WORK:-0}" = 1 ]; then say "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

STAGE=$WORK/stage
mkdir -p "$STAGE"
for p in "${PACKAGES[@]}"; do
	dpkg-deb -x "$(deb_of "$p")" "$STAGE"
done
KVER=$(basename "$(find "$STAGE/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)")
[ -f "$STAGE/boot/vmlinuz-$KVER" ] || die "no kernel image for $KVER"
say "kernel $KVER ($KERNEL_PKG)"
depmod -b "$STAGE" "$KVER"

# modules_resolve NAME... -> "name" lines for modular ones (+ deps first),
# "@path" lines for the .ko files they need; built-in ones are skipped.
modules_resolve() {
	local m line
	for m; do
		modprobe -d "$STAGE" -S "$KVER" --show-depends "$m" >"$WORK/deps" 2>&1 ||
			die "module $m: $(cat "$WORK/deps")"
		while read -r line; do
			case "$line" in
			insmod\ *)
				line=${line#insmod }
				line=${line%% *}
				echo "@${line#"$STAGE/"}"
				;;
			builtin\ *) ;;
			*) die "module $m: unexpected modprobe output: $line" ;;
			esac
		done <"$WORK/deps"
		grep -q '^insmod ' "$WORK/deps" && echo "$m"
	done
	return 0
}

# install_modules ROOT LISTFILE NAME...: copies the modules and their
# dependencies, runs depmod and writes the load list.
install_modules() {
	local root=$1 list=$2 f
	shift 2
	modules_resolve "$@" >"$WORK/resolved"
	mkdir -p "$root/lib/modules/$KVER"
	grep '^@' "$WORK/resolved" | cut -c2- | sort -u | while read -r f; do
		mkdir -p "$root/$(dirname "$f")"
		cp "$STAGE/$f" "$root/$f"
	done
	for f in modules.order modules.builtin modules.builtin.modinfo; do
		cp "$STAGE/lib/modules/$KVER/$f" "$root/lib/modules/$KVER/"
	done
	depmod -b "$root" "$KVER"
	{
		echo "# kernel modules loaded at boot (generated by guest/build.sh)"
		grep -v '^@' "$WORK/resolved"
	} >"$root$list"
}

install_busybox() { # ROOT: busybox + a symlink per applet
	local root=$1 a
	mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
	cp "$STAGE/bin/busybox" "$root/bin/busybox"
	"$STAGE/bin/busybox" --list-full | while read -r a; do
		case "$a" in bin/busybox | linuxrc) continue ;; esac
		[ -e "$root/$a" ] || [ -L "$root/$a" ] || ln -s /bin/busybox "$root/$a"
	done
}

# install_elf ROOT BINARY...: copies binaries from the staging tree with
# the shared libraries ldd resolves inside it, plus the dynamic loader.
install_elf() {
	local root=$1 bin soname path
	shift
	for bin; do
		mkdir -p "$root/$(dirname "$bin")"
		cp "$STAGE/$bin" "$root/$bin"
		LD_LIBRARY_PATH="$STAGE/lib/x86_64-linux-gnu:$STAGE/usr/lib/x86_64-linux-gnu" \
			ldd "$STAGE/$bin" >"$WORK/ldd" || die "ldd $bin failed"
		while read -r soname _ path _; do
			case "$soname" in
			linux-vdso.so.* | "") continue ;;
			/lib64/ld-linux-x86-64.so.2)
				path=$STAGE/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
				soname=ld-linux-x86-64.so.2
				;;
			esac
			[ "$path" != "not" ] || die "$bin: $soname not found; add its package to LIB_PACKAGES"
			case "$path" in
			"$STAGE"/*) ;;
			*) die "$bin: $soname resolved outside the staging tree ($path); add its package to LIB_PACKAGES" ;;
			esac
			path=${path#"$STAGE/"}
			mkdir -p "$root/$(dirname "$path")"
			cp -L "$STAGE/$path" "$root/$(dirname "$path")/$soname"
		done <"$WORK/ldd"
	done
	mkdir -p "$root/lib64"
	ln -sfn /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
}

# --- initramfs -------------------------------------------------------------------
INITRD=$WORK/initramfs
mkdir -p "$INITRD"/{dev,proc,sys,run,tmp,newroot,etc}
install_busybox "$INITRD"
install_modules "$INITRD" /etc/modules.initrd "${INITRD_MODULES[@]}"
cp "$GUEST/initramfs/init" "$INITRD/init"
chmod 755 "$INITRD/init"
(cd "$INITRD" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --quiet) |
	gzip -9 -n >"$WORK/initrd.img"

# --- root file system ------------------------------------------------------------
ROOT=$WORK/rootfs
mkdir -p "$ROOT"/{dev,proc,sys,run,tmp,root,home,mnt,etc/ssh,etc/lodge,var/log,var/lib/cloud,var/tmp}
ln -s ../run "$ROOT/var/run"
ln -s /proc/self/mounts "$ROOT/etc/mtab"
# The overlay first: busybox applet links are only made where it has no file.
cp -dR --preserve=mode,timestamps "$GUEST/rootfs/." "$ROOT/"
install_busybox "$ROOT"
install_modules "$ROOT" /etc/lodge/modules "${ROOTFS_MODULES[@]}"
install_elf "$ROOT" "${ELF_BINARIES[@]}"
for lib in "${EXTRA_LIBS[@]}"; do
	cp -L "$STAGE/$lib" "$ROOT/$lib"
done
mkdir -p "$ROOT/etc/udhcpc"
ln -sfn /usr/share/udhcpc/default.script "$ROOT/etc/udhcpc/default.script"
chmod 700 "$ROOT/root"
chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
chmod 600 "$ROOT/etc/shadow"
busybox_ver=$(dpkg-deb -f "$(deb_of busybox-static)" Version)
qga_ver=$(dpkg-deb -f "$(deb_of qemu-guest-agent)" Version)
cat >"$ROOT/etc/os-release" <<EOF
PRETTY_NAME="Lodge test guest"
NAME="Lodge test guest"
ID=lodge-guest
ID_LIKE=debian
VERSION_ID=1
HOME_URL="https://github.com/lodge-vm/lodge"
EOF
cat >"$ROOT/etc/lodge/build-info" <<EOF
kernel=$KVER
kernel_package=$KERNEL_PKG $(dpkg-deb -f "$(deb_of "$KERNEL_PKG")" Version)
busybox=$busybox_ver
qemu_guest_agent=$qga_ver
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

truncate -s "${ROOT_SIZE}M" "$WORK/root.img"
mkfs.ext4 -q -F -L lodgeroot -U "$ROOT_UUID" -b 4096 -i 16384 -m 1 \
	-E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 \
	-d "$ROOT" "$WORK/root.img"
if [ "$(id -u)" != 0 ]; then
	# mkfs.ext4 -d copied our uid/gid: make everything root-owned.
	(cd "$ROOT" && find . -mindepth 1) | sed 's|^\.||' |
		awk '{ print "sif \"" $0 "\" uid 0"; print "sif \"" $0 "\" gid 0" }' >"$WORK/chown.debugfs"
	debugfs -w -f "$WORK/chown.debugfs" "$WORK/root.img" >/dev/null 2>"$WORK/debugfs.err" ||
		die "debugfs: $(cat "$WORK/debugfs.err")"
fi
e2fsck -fn "$WORK/root.img" >"$WORK/fsck.log" 2>&1 || die "e2fsck: $(cat "$WORK/fsck.log")"

# --- boot partition (FAT32: syslinux for BIOS and UEFI) ---------------------------
cat >"$WORK/syslinux.cfg" <<EOF
# Lodge test guest (generated by guest/build.sh)
DEFAULT lodge
PROMPT 0
TIMEOUT 1
NOESCAPE 1
LABEL lodge
	LINUX /vmlinuz
	INITRD /initrd.img
	APPEND $CMDLINE
EOF
FAT=$WORK/boot.img
truncate -s "${BOOT_SIZE}M" "$FAT"
mkfs.vfat -F 32 -s 1 -n LODGEBOOT -i "$BOOT_VOLID" -h $((BOOT_START * 2048)) "$FAT" >/dev/null
syslinux --install "$FAT"
mmd -i "$FAT" ::/EFI ::/EFI/BOOT
mcopy -i "$FAT" "$STAGE/boot/vmlinuz-$KVER" ::/vmlinuz
mcopy -i "$FAT" "$WORK/initrd.img" ::/initrd.img
mcopy -i "$FAT" "$WORK/syslinux.cfg" ::/syslinux.cfg
mcopy -i "$FAT" "$SYSLINUX_EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$FAT" "$SYSLINUX_E64" ::/EFI/BOOT/ldlinux.e64
mcopy -i "$FAT" "$WORK/syslinux.cfg" ::/EFI/BOOT/syslinux.cfg

# --- disk ----------------------------------------------------------------------
RAW=$WORK/disk.raw
truncate -s "${DISK_SIZE}M" "$RAW"
sfdisk -q --no-reread --no-tell-kernel "$RAW" <<EOF
label: dos
label-id: $DISK_ID
unit: sectors

start=$((BOOT_START * 2048)), size=$((BOOT_SIZE * 2048)), type=c, bootable
start=$((ROOT_START * 2048)), size=$((ROOT_SIZE * 2048)), type=83
EOF
dd if="$SYSLINUX_MBR" of="$RAW" bs=440 count=1 conv=notrunc status=none
dd if="$FAT" of="$RAW" bs=1M seek="$BOOT_START" conv=notrunc,sparse status=none
dd if="$WORK/root.img" of="$RAW" bs=1M seek="$ROOT_START" conv=notrunc,sparse status=none

qemu-img convert -q -f raw -O qcow2 "$RAW" "$TMP_IMAGE"
mv -f "$TMP_IMAGE" "$IMAGE"

END=$(date +%s.%N)
say "built $IMAGE ($(du -h "$IMAGE" | cut -f1) on disk, kernel $KVER) in $(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.1f", b - a }')s"
