#!/usr/bin/env bash
# Build the Linux test guest from Debian packages: the cloud kernel and a busybox initramfs.
#
# Outputs in $FERRO_BUILD/guest (default <repo>/build/guest):
#   bzImage            the package's vmlinuz, as is
#   vmlinux            the ELF kernel inside it (for PVH / ELF loaders)
#   kernel.release     e.g. 6.1.0-56-cloud-amd64
#   initramfs.cpio.gz  busybox + virtio modules + /init (guest/linux/init)
#   modules            symlink to the package's lib/modules/<release> (depmod'ed; the lab uses it)
#   pkgroot/           the extracted kernel package; busybox the static busybox
# Cached: a stamp keyed by the package versions and these scripts makes a second run instant.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BUILD=${FERRO_BUILD:-$REPO/build}
CACHE=$BUILD/cache
OUT=$BUILD/guest
export PATH=$PATH:/usr/sbin:/sbin

META=linux-image-cloud-amd64
# Loaded by the guest's /init in dependency order; missing ones are skipped.
# virtio_mmio is extra: QEMU microvm (acpi=on) describes its virtio-mmio devices in ACPI.
MODULES=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio
         virtio_blk failover net_failover virtio_net virtio_rng virtio_balloon
         vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport pvpanic pvpanic_mmio)

log() { echo "guest: $*" >&2; }   # stderr: stdout of some functions is captured

# Resolve the versioned kernel package the meta package points to, and candidate versions.
resolve() {
    KPKG=$(apt-cache depends "$META" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
    KVER=$(apt-cache policy "$KPKG" 2>/dev/null | awk '$1 == "Candidate:" {print $2}')
    BBVER=$(apt-cache policy busybox-static 2>/dev/null | awk '$1 == "Candidate:" {print $2}')
}
# apt-cache takes ~1 s here (container images often disable apt's binary cache), so
# remember the answer for as long as the package lists are unchanged.
lists_key=$(stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -c1-16)
resolved=$CACHE/resolved-$lists_key
if [[ -s $resolved ]]; then
    read -r KPKG KVER BBVER < "$resolved"
else
    resolve
fi
if [[ -z $KPKG || -z $KVER || $KVER == "(none)" || -z $BBVER || $BBVER == "(none)" ]]; then
    # A fresh machine may have empty package lists.
    log "apt-get update (package lists do not know $META)"
    apt-get update -qq >/dev/null
    resolve
fi
[[ -n $KPKG && -n $KVER && $KVER != "(none)" ]] || { echo "guest: cannot resolve $META" >&2; exit 1; }
mkdir -p "$CACHE"
[[ -s $resolved ]] || echo "$KPKG $KVER $BBVER" > "$resolved"

# The stamp covers package versions and every file of this recipe (init, helpers, this script).
KEY=$( { echo "$KPKG=$KVER busybox-static=$BBVER ${MODULES[*]}"; cat "$HERE"/build.sh "$HERE"/init "$HERE"/*.py "$HERE"/modules.sh; } | sha256sum | cut -c1-16)
OUTPUTS=(bzImage vmlinux kernel.release initramfs.cpio.gz modules)
if [[ -f $OUT/.stamp && $(cat "$OUT/.stamp") == "$KEY" ]]; then
    ok=1
    for f in "${OUTPUTS[@]}"; do [[ -e $OUT/$f ]] || ok=0; done
    if [[ $ok == 1 ]]; then
        log "up to date ($KPKG $KVER, $OUT)"
        exit 0
    fi
fi

t0=$(date +%s.%N)
mkdir -p "$CACHE" "$OUT"
# Concurrent builds (parallel tests) serialize here; the second one finds the stamp fresh.
exec 9>"$OUT/.lock"
flock 9
if [[ -f $OUT/.stamp && $(cat "$OUT/.stamp") == "$KEY" ]]; then
    log "up to date ($KPKG $KVER, built concurrently)"
    exit 0
fi
rm -f "$OUT/.stamp"

# apt-get download names files with the epoch's colon URL-encoded.
deb_path() { echo "$CACHE/${1}_${2//:/%3a}_amd64.deb"; }
fetch() {
    local pkg=$1 ver=$2 deb
    deb=$(deb_path "$pkg" "$ver")
    if [[ ! -s $deb ]]; then
        log "downloading $pkg $ver"
        # As root, apt's _apt sandbox user cannot write into our cache dir: skip the sandbox.
        local opts=()
        [[ $(id -u) -eq 0 ]] && opts=(-o APT::Sandbox::User=root)
        (cd "$CACHE" && apt-get download -qq "${opts[@]}" "$pkg=$ver")
    fi
    echo "$deb"
}
KDEB=$(fetch "$KPKG" "$KVER")
BBDEB=$(fetch busybox-static "$BBVER")

log "extracting $KPKG $KVER"
rm -rf "$OUT/pkgroot" "$OUT/bbroot" "$OUT/modcache"
dpkg-deb -x "$KDEB" "$OUT/pkgroot"
dpkg-deb -x "$BBDEB" "$OUT/bbroot"
cp "$OUT/bbroot/bin/busybox" "$OUT/busybox"
rm -rf "$OUT/bbroot"

# The release is the directory name under lib/modules (usrmerged packages use usr/lib).
MODDIR=$(find "$OUT/pkgroot" -maxdepth 4 -path '*/lib/modules/*' -type d | head -n1)
KREL=$(basename "$MODDIR")
echo "$KREL" > "$OUT/kernel.release"
depmod -b "$OUT/pkgroot" "$KREL"
ln -sfn "${MODDIR#"$OUT"/}" "$OUT/modules"

cp "$OUT/pkgroot/boot/vmlinuz-$KREL" "$OUT/bzImage"
log "extracting vmlinux from bzImage"
python3 "$HERE/extract-vmlinux.py" "$OUT/bzImage" "$OUT/vmlinux"

# The initramfs, described as a manifest for mkcpio.py (device nodes without root, owner root).
log "packing initramfs"
work=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$HERE/modules.sh" "$OUT/pkgroot" "$KREL" "$OUT/modcache" "${MODULES[@]}" > "$work/modules"
awk '{print "/" $1}' "$work/modules" > "$work/modules.order"
{
    echo "dir dev 0755"
    echo "nod dev/console 0600 c 5 1"     # init's stdout before devtmpfs is mounted
    echo "nod dev/null 0666 c 1 3"
    for d in proc sys root etc bin sbin usr/bin usr/sbin; do echo "dir $d 0755"; done
    echo "dir tmp 1777"
    echo "file init $HERE/init 0755"
    echo "file bin/busybox $OUT/busybox 0755"
    # One symlink per applet at its canonical place (bin/, sbin/, usr/bin/, usr/sbin/).
    "$OUT/busybox" --list-full | grep -v '^bin/busybox$' | awk '{print "slink " $1 " /bin/busybox"}'
    echo "file etc/modules.order $work/modules.order 0644"
    awk '{print "file " $1 " " $2 " 0644"}' "$work/modules"
} > "$work/manifest"
python3 "$HERE/mkcpio.py" "$work/manifest" | gzip -9n > "$work/initramfs.cpio.gz"
mv "$work/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
cp "$work/manifest" "$OUT/initramfs.manifest"   # for reference: what is inside

echo "$KEY" > "$OUT/.stamp"
t1=$(date +%s.%N)
log "built $KREL in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s: $OUT/{bzImage,vmlinux,initramfs.cpio.gz}"
