#!/usr/bin/env bash
# Build the Debian bookworm template guest: a systemd root disk for virtio-blk and an initramfs
# that mounts it, booted with the test guest's kernel (guest/linux).
#
# Outputs in $FERRO_BUILD/debian (default <repo>/build/debian):
#   debian.raw             ext4 root filesystem image, sparse ($FERRO_DEBIAN_SIZE, default 1G)
#   debian.qcow2           the same, as qcow2 (only allocated clusters; no compression)
#   debian-initrd.cpio.gz  busybox /init: virtio(-pci/-mmio) + virtio_blk, mount root=, switch_root
#   kernel.release         the kernel whose modules the image carries (= build/guest/kernel.release)
#   packages.txt           the image's packages and versions (dpkg-query)
# The kernel to boot is $FERRO_BUILD/guest/bzImage (or vmlinux), built by guest/linux/build.sh.
#
# Cached twice: the debootstrap tree is a tarball in $FERRO_BUILD/cache, keyed by the suite, the
# package list, the mirror and the mirror's Release date (a recipe change does not download it
# again); the outputs carry a stamp keyed by that, the kernel's stamp and every file of this
# directory, so a second run is instant.
# Needs root (debootstrap, chroot, files owned by root in the image), debootstrap, e2fsprogs
# (mkfs.ext4 -d), qemu-img, zstd, kmod, python3.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BUILD=${FERRO_BUILD:-$REPO/build}
CACHE=$BUILD/cache
OUT=$BUILD/debian
GUEST=$BUILD/guest
SIZE=${FERRO_DEBIAN_SIZE:-1G}
export PATH=$PATH:/usr/sbin:/sbin
export LC_ALL=C

SUITE=bookworm
# minbase + what a systemd guest on virtio needs: udev (device units for ttyS0, module autoload:
# virtio_net, button for the ACPI power button; it starts ferro-net@ethN), dbus (logind, which
# turns the power button into a clean shutdown), iproute2 (static addresses); networkd (DHCP) is
# part of systemd; iputils-ping/procps for tests.
INCLUDE=systemd-sysv,udev,dbus,kmod,iproute2,iputils-ping,procps,netbase
# Loaded by the initramfs in dependency order; missing or built-in ones are skipped (ext4, jbd2,
# mbcache, crc16 and crc32c are built into Debian's cloud kernel; listed for other configs).
MODULES=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio
         virtio_blk crc16 crc32c_generic mbcache jbd2 ext4)
# Units the template does not need; masked so they neither start nor cost boot time.
# (modprobe@X loads modules for features the image does not use: DRM, EFI pstore, device mapper;
# the debug/tracing/hugepages mounts are for debugging and huge-page users.) Each is a process
# start and a unit job, which cost seconds under nested virtualization.
MASK=(apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer
      e2scrub_reap.service fstrim.timer getty@tty1.service systemd-networkd-wait-online.service
      systemd-timesyncd.service modprobe@drm.service modprobe@efi_pstore.service
      modprobe@dm_mod.service systemd-pstore.service sys-kernel-debug.mount
      sys-kernel-tracing.mount dev-hugepages.mount)

log() { echo "debian: $*" >&2; }
secs() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

[[ $(id -u) -eq 0 ]] || { log "must run as root (debootstrap, chroot, root-owned files)"; exit 1; }
for tool in debootstrap mkfs.ext4 qemu-img zstd depmod python3; do
    command -v "$tool" >/dev/null || { log "missing $tool (scripts/deps.sh installs it)"; exit 1; }
done

# The kernel: the same package as the test guest. Its build is cached (instant when fresh) and
# leaves the depmod'ed module tree and busybox we reuse here.
"$REPO/guest/linux/build.sh"
KREL=$(cat "$GUEST/kernel.release")
KSTAMP=$(cat "$GUEST/.stamp")
MODSRC=$(readlink -f "$GUEST/modules")

# The mirror apt uses for $SUITE (debootstrap fetches from it too), and the date of its Release
# file as apt last saw it: a new mirror state means new package versions, hence a new tree.
# apt-get takes 0.5-3 s here, so the answer is remembered for as long as apt's lists are unchanged
# (as guest/linux/build.sh does).
lists_key=$(stat -c '%n %s %Y' /var/lib/apt/lists/*Release* 2>/dev/null | sha256sum | cut -c1-16)
mirror_file=$CACHE/debian-mirror-$lists_key
if [[ -n ${FERRO_DEBIAN_MIRROR:-} ]]; then
    MIRROR=$FERRO_DEBIAN_MIRROR
elif [[ -s $mirror_file ]]; then
    MIRROR=$(cat "$mirror_file")
else
    MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(IDENTIFIER)' 2>/dev/null |
        awk -v s="$SUITE" '$2 == s && $3 == "Packages" {print $1; exit}')
    MIRROR=${MIRROR:-http://deb.debian.org/debian/}
    mkdir -p "$CACHE"
    echo "$MIRROR" > "$mirror_file"
fi
rel_file=$(ls /var/lib/apt/lists/*_dists_${SUITE}_InRelease /var/lib/apt/lists/*_dists_${SUITE}_Release 2>/dev/null | head -n1 || true)
rel_date=$( [[ -n $rel_file ]] && sed -n 's/^Date: //p' "$rel_file" | head -n1 || true)
DBVER=$(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo unknown)
TKEY=$(echo "$SUITE minbase $INCLUDE $MIRROR ${rel_date:-nodate} debootstrap=$DBVER" | sha256sum | cut -c1-16)
TARBALL=$CACHE/debootstrap-$SUITE-$TKEY.tar.zst

# Every file of this recipe (names, contents, modes) goes into the key; README.md and lab/ (the
# lab check) do not change the image.
recipe=$(cd "$HERE" && find . -type f ! -name README.md ! -path './lab/*' | sort | while read -r f; do
    echo "$f $(stat -c %a "$f") $(sha256sum < "$f")"; done)
KEY=$( { echo "$TKEY $KREL $KSTAMP $SIZE ${MODULES[*]} ${MASK[*]}"; echo "$recipe"; } | sha256sum | cut -c1-16)
OUTPUTS=(debian.raw debian.qcow2 debian-initrd.cpio.gz kernel.release packages.txt)

fresh() {
    [[ -f $OUT/.stamp && $(cat "$OUT/.stamp") == "$KEY" ]] || return 1
    local f
    for f in "${OUTPUTS[@]}"; do [[ -e $OUT/$f ]] || return 1; done
}
report() {
    local f
    for f in debian.qcow2 debian.raw debian-initrd.cpio.gz; do
        printf '  %-24s %s (allocated %s)\n' "$f" "$(du -h --apparent-size "$OUT/$f" | cut -f1)" "$(du -h "$OUT/$f" | cut -f1)"
    done
    echo "  kernel: $GUEST/bzImage ($KREL)"
    echo "  boot:   -kernel $GUEST/bzImage -initrd $OUT/debian-initrd.cpio.gz -append 'console=ttyS0 root=/dev/vda ferro.ip=ADDR/PREFIX'"
}

if fresh; then
    log "up to date ($KREL, $OUT)"
    report
    exit 0
fi

t0=$(date +%s.%N)
mkdir -p "$CACHE" "$OUT"
# Concurrent builds serialize here; the second one finds the stamp fresh.
exec 9>"$OUT/.lock"
flock 9
if fresh; then
    log "up to date ($KREL, built concurrently)"
    report
    exit 0
fi
rm -f "$OUT/.stamp"

work=$(mktemp -d "$OUT/.work.XXXXXX")
# debootstrap mounts proc/sys (and, in a container, bind-mounts the host's /dev) inside its
# target; an interrupted run may leave them: unmount before deleting, and never cross into them.
cleanup() {
    awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
        umount -l "$m" || true
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
ROOT=$work/root
mkdir "$ROOT"

# 1. The debootstrap tree, from the cached tarball or fresh from the mirror.
if [[ -s $TARBALL ]]; then
    log "unpacking cached debootstrap tree ($(basename "$TARBALL"))"
else
    log "debootstrap --variant=minbase $SUITE from $MIRROR (include: $INCLUDE)"
    t=$(date +%s.%N)
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$work/bootstrap" "$MIRROR" > "$work/debootstrap.log" 2>&1 ||
        { tail -n 30 "$work/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }
    # The downloaded .debs are not needed in the image nor in the tarball.
    rm -rf "$work/bootstrap/var/cache/apt/archives/"*.deb
    tar -C "$work/bootstrap" --numeric-owner --xattrs --acls -cf - . | zstd -q -T0 -3 > "$TARBALL.tmp"
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$work/bootstrap"
    log "debootstrap took $(secs "$t") s; cached $(du -h "$TARBALL" | cut -f1) in $TARBALL"
fi
zstd -dcq "$TARBALL" | tar -C "$ROOT" --numeric-owner --xattrs --acls -xf -

# 2. Lean: no docs, man pages, translations, apt lists or caches (dpkg.cfg.d keeps them out later).
rm -rf "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/var/lib/apt/lists/* \
       "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/log/*.log
find "$ROOT/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +

# 3. The kernel's modules (udev loads virtio_net, virtio_rng, button... from here) and config.
#    bookworm is usrmerged: /lib -> usr/lib.
mkdir -p "$ROOT/usr/lib/modules" "$ROOT/boot"
cp -a "$MODSRC" "$ROOT/usr/lib/modules/$KREL"
cp "$GUEST/pkgroot/boot/config-$KREL" "$ROOT/boot/"
depmod -b "$ROOT" "$KREL"

# 4. Our files: hostname, hosts, fstab, units, scripts (rootfs/ mirrors the image's layout).
cp -r --preserve=mode "$HERE/rootfs/." "$ROOT/"
chown -R 0:0 "$ROOT/etc/systemd/system" "$ROOT/usr/local/sbin"
# Kernel names (eth0, eth1... in PCI order) instead of predictable ones: ferro.ip= is for
# "the first NIC", whatever slot the VMM gives it. Masking 99-default.link is systemd's switch.
mkdir -p "$ROOT/etc/systemd/network"
ln -sfn /dev/null "$ROOT/etc/systemd/network/99-default.link"
# debootstrap copied the build host's resolv.conf; the guest gets its own (ferro.dns= or DHCP).
echo "# ferro-net-setup writes name servers here from ferro.dns=" > "$ROOT/etc/resolv.conf"
# Root: password locked ('*'); the serial console logs in automatically (autologin.conf).
sed -i 's/^root:[^:]*:/root:*:/' "$ROOT/etc/shadow"
# An empty machine-id: every clone generates its own at first boot (systemd commits it once
# the root is writable), so clones never share one.
: > "$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"

# Units: enabled/masked with the image's own systemctl (offline in the chroot, no /proc needed).
chroot "$ROOT" systemctl -q set-default multi-user.target
# systemd-networkd is not enabled: ferro-net@IFACE starts it only for DHCP (see rootfs/).
chroot "$ROOT" systemctl -q enable \
    ferro-echo.socket ferro-http.socket ferro-ready.service serial-getty@ttyS0.service
chroot "$ROOT" systemctl -q mask "${MASK[@]}"

# Caches that ConditionNeedsUpdate= units would otherwise rebuild at first boot (hwdb, ld.so,
# the journal catalog), then mark /etc and /var as up to date with /usr.
chroot "$ROOT" ldconfig
chroot "$ROOT" systemd-hwdb update
chroot "$ROOT" journalctl -q --update-catalog 2>/dev/null || true
touch "$ROOT/usr"
touch -r "$ROOT/usr" "$ROOT/etc/.updated" "$ROOT/var/.updated"

chroot "$ROOT" dpkg-query -W -f='${Package} ${Version}\n' > "$work/packages.txt"

# 5. The root disk: ext4 filled from the tree (no mount, no loop device), a sparse raw file.
used=$(du -sh "$ROOT" | cut -f1)
log "root tree $used; mkfs.ext4 -d ($SIZE)"
truncate -s "$SIZE" "$work/debian.raw"
mkfs.ext4 -q -F -L ferro-root -m 0 -E root_owner=0:0 -d "$ROOT" "$work/debian.raw"
e2fsck -fn "$work/debian.raw" > "$work/fsck.log" 2>&1 || { cat "$work/fsck.log" >&2; log "fsck of the new image failed"; exit 1; }
# qcow2 without compression (the VMM's qcow2 refuses compressed clusters); zero blocks stay
# unallocated.
qemu-img convert -f raw -O qcow2 "$work/debian.raw" "$work/debian.qcow2"

# 6. The initramfs: the test guest's busybox and mkcpio.py, our /init, the virtio-blk modules.
"$REPO/guest/linux/modules.sh" "$GUEST/pkgroot" "$KREL" "$work/modcache" "${MODULES[@]}" > "$work/modules"
awk '{print "/" $1}' "$work/modules" > "$work/modules.order"
{
    echo "dir dev 0755"
    echo "nod dev/console 0600 c 5 1"     # init's stdout before devtmpfs is mounted
    echo "nod dev/null 0666 c 1 3"
    for d in proc sys newroot etc bin sbin usr/bin usr/sbin; do echo "dir $d 0755"; done
    echo "dir tmp 1777"
    echo "file init $HERE/init 0755"
    echo "file bin/busybox $GUEST/busybox 0755"
    "$GUEST/busybox" --list-full | grep -v '^bin/busybox$' | awk '{print "slink " $1 " /bin/busybox"}'
    echo "file etc/modules.order $work/modules.order 0644"
    awk '{print "file " $1 " " $2 " 0644"}' "$work/modules"
} > "$work/manifest"
python3 "$REPO/guest/linux/mkcpio.py" "$work/manifest" | gzip -9n > "$work/debian-initrd.cpio.gz"

# Publish (renames within $OUT's filesystem), stamp last.
for f in debian.raw debian.qcow2 debian-initrd.cpio.gz packages.txt; do mv "$work/$f" "$OUT/$f"; done
cp "$work/manifest" "$OUT/initrd.manifest"   # for reference: what the initramfs holds
echo "$KREL" > "$OUT/kernel.release"
echo "$KEY" > "$OUT/.stamp"
log "built in $(secs "$t0") s ($(wc -l < "$OUT/packages.txt") packages, root tree $used):"
report
