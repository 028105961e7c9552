#!/usr/bin/env bash
# Installs what Lodge needs from Debian's packages, only what is missing.
# Usage: scripts/deps.sh [run|guest|bench]...
set -euo pipefail

# e2fsprogs: debugfs reads single files out of backups. dnsmasq-base
# (the binary alone, no system service), iproute2 and iptables: private
# networks.
want=(qemu-system-x86 qemu-utils genisoimage e2fsprogs dnsmasq-base iproute2 iptables)
for set in "$@"; do
  case "$set" in
    run) ;;
    guest) want+=(busybox-static syslinux syslinux-common syslinux-efi mtools dosfstools e2fsprogs fdisk kmod cpio) ;;
    bench) want+=(libvirt-daemon-system libvirt-clients virtinst python3-libvirt jq netcat-openbsd) ;;
    *) echo "deps.sh: unknown set $set (run, guest, bench)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "Lodge needs these Debian packages: ${missing[*]}" >&2
  echo "Install them as root: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing or stale on a fresh machine.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
