#!/usr/bin/env bash
# The KVM lab: run a script inside a Linux VM that has a real (nested) /dev/kvm, on any host.
#
# QEMU's software CPU (TCG, -cpu max) emulates AMD-V with nested paging; the Debian cloud
# kernel inside loads its own kvm-amd from the initramfs, so KVM users (ferro-vmm, QEMU -accel
# kvm) run inside the lab as on an AMD machine. See lab/README.md.
#
#   lab/lab.sh run [--timeout SECS] [--mem MiB] [--smp N] [--with-qemu] [--add SRC[:DEST]]... SCRIPT|-
#   lab/lab.sh shell [--mem MiB] [--smp N] [--with-qemu] [--add SRC[:DEST]]...
#   lab/lab.sh check
#   lab/lab.sh build            (build the cached parts only)
#
# The initrd is a concatenation of cpio archives, which Linux unpacks one after the other:
#   base (cached)  busybox, kvm/net/vhost modules, /init, the test guest under /guest/
#   qemu (cached)  with --with-qemu: qemu-system-x86_64, its libraries and firmware
#   run  (per run) the --add files (+ their ldd libraries and loader) and SCRIPT as /lab/script.sh
# Exit status: the script's; 124 on timeout; 125 if the lab failed (boot, kvm, QEMU).
# The console streams to stdout; build messages and the log path go to stderr.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BUILD=${FERRO_BUILD:-$REPO/build}
export FERRO_BUILD=$BUILD
LAB=$BUILD/lab
GUEST=$BUILD/guest
MKCPIO=$REPO/guest/linux/mkcpio.py
QEMU=${LAB_QEMU:-qemu-system-x86_64}   # the QEMU that runs the lab (on the host)

# Modules the lab kernel loads (dependencies are added automatically, in order).
LAB_MODULES=(kvm_amd tun tap veth bridge vhost_net vhost_vsock)
# Bump when the base recipe in this file changes (lab/init and the modules are hashed anyway).
BASE_RECIPE=3
# Firmware QEMU needs for `-M q35` and `-M microvm` with -kernel (file names QEMU looks up in
# its firmware path: /usr/share/qemu, /usr/share/seabios, /usr/lib/ipxe/qemu).
QEMU_FIRMWARE=(bios-256k.bin bios.bin bios-microvm.bin qboot.rom linuxboot.bin linuxboot_dma.bin
               pvh.bin multiboot.bin multiboot_dma.bin kvmvapic.bin efi-virtio.rom vgabios-stdvga.bin)

log() { echo "lab: $*" >&2; }
fail() { echo "lab: $*" >&2; exit 125; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

# The cached segments stay uncompressed: measured under TCG, unpacking a 75 MB plain cpio costs
# less lab CPU time than gunzip/zstd of it, and plain archives concatenate trivially (mkcpio.py
# pads each to 512 bytes; the kernel only finds a following archive at an aligned offset).

key_of() { sha256sum | cut -c1-16; }

# ---------------------------------------------------------------- base segment (cached)
# Cached segments are built under a lock, so concurrent lab runs (parallel tests) do not race.
lock_lab() {
    mkdir -p "$LAB"
    exec 8>"$LAB/.lock"
    flock 8
}
unlock_lab() { flock -u 8; }

build_base() {
    "$REPO/guest/linux/build.sh" >&2
    local krel key out=$LAB/base.cpio
    krel=$(cat "$GUEST/kernel.release")
    key=$( { echo "$BASE_RECIPE ${LAB_MODULES[*]}"; cat "$GUEST/.stamp" "$HERE/init" "$MKCPIO" "$REPO/guest/linux/modules.sh"; } | key_of)
    if [[ -s $out && -f $LAB/base.stamp && $(cat "$LAB/base.stamp") == "$key" ]]; then
        return
    fi
    log "building base initramfs"
    local t0 work
    t0=$(date +%s.%N)
    lock_lab
    if [[ -s $out && -f $LAB/base.stamp && $(cat "$LAB/base.stamp") == "$key" ]]; then
        unlock_lab; return     # another run built it while we waited
    fi
    work=$(mktemp -d "$LAB/.work.XXXXXX")
    "$REPO/guest/linux/modules.sh" "$GUEST/pkgroot" "$krel" "$GUEST/modcache" "${LAB_MODULES[@]}" > "$work/modules"
    awk '{print "/" $1}' "$work/modules" > "$work/lab-modules.order"
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$work/passwd"
    printf 'root:x:0:\nkvm:x:36:\n' > "$work/group"
    printf '127.0.0.1 localhost\n' > "$work/hosts"
    {
        echo "dir dev 0755"
        echo "nod dev/console 0600 c 5 1"
        echo "nod dev/null 0666 c 1 3"
        for d in proc sys root etc bin sbin usr/bin usr/sbin lab guest; do echo "dir $d 0755"; done
        echo "dir tmp 1777"
        echo "file init $HERE/init 0755"
        echo "file bin/busybox $GUEST/busybox 0755"
        "$GUEST/busybox" --list-full | grep -v '^bin/busybox$' | awk '{print "slink " $1 " /bin/busybox"}'
        echo "file etc/lab-modules.order $work/lab-modules.order 0644"
        for f in passwd group hosts; do echo "file etc/$f $work/$f 0644"; done
        awk '{print "file " $1 " " $2 " 0644"}' "$work/modules"
        # The Linux test guest, for nested VMs.
        for f in bzImage vmlinux initramfs.cpio.gz kernel.release; do echo "file guest/$f $GUEST/$f 0644"; done
    } > "$work/manifest"
    python3 "$MKCPIO" -o "$work/base" "$work/manifest"
    mv "$work/base" "$out"
    echo "$key" > "$LAB/base.stamp"
    rm -rf "$work"
    unlock_lab
    log "base initramfs built in $(elapsed "$t0") s ($(du -h "$out" | cut -f1))"
}

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

# ldd_deps FILE: the shared libraries and the dynamic loader FILE needs (nothing if static).
ldd_deps() {
    ldd "$1" 2>/dev/null | awk '
        $2 == "=>" && $3 ~ /^\// {print $3}
        $2 == "=>" && $3 == "not" {print "MISSING " $1}
        $1 ~ /^\// {print $1}' || true
}

# manifest_file DEST SRC: manifest lines for one file, plus its libraries if it is a dynamic ELF.
manifest_file() {
    local dest=$1 src=$2 lib
    echo "file $dest $src"
    # (NULs dropped: bash warns about them in a substitution, and the ELF magic has none.)
    if [[ $(head -c 4 "$src" 2>/dev/null | tr -d '\0') == $'\x7fELF' ]]; then
        for lib in $(ldd_deps "$src"); do
            [[ $lib == MISSING ]] && { log "warning: $src needs a library ldd cannot find"; continue; }
            echo "file $lib $lib"
        done
    fi
}

# ---------------------------------------------------------------- qemu segment (cached)
build_qemu() {
    local bin out=$LAB/qemu.cpio key name dir found m
    bin=$(command -v qemu-system-x86_64) || fail "--with-qemu: qemu-system-x86_64 is not installed (run scripts/deps.sh)"
    bin=$(readlink -f "$bin")
    key=$( { stat -c '%s %Y' "$bin"; echo "${QEMU_FIRMWARE[*]}"; declare -f build_qemu manifest_file ldd_deps; } | key_of)
    if [[ -s $out && -f $LAB/qemu.stamp && $(cat "$LAB/qemu.stamp") == "$key" ]]; then
        return
    fi
    local t0
    t0=$(date +%s.%N)
    lock_lab
    if [[ -s $out && -f $LAB/qemu.stamp && $(cat "$LAB/qemu.stamp") == "$key" ]]; then
        unlock_lab; return
    fi
    log "building qemu segment"
    {
        manifest_file usr/bin/qemu-system-x86_64 "$bin"
        # Accelerator modules are loaded at run time (TCG fallback); KVM is built in.
        m=/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so
        if [[ -f $m ]]; then manifest_file "$m" "$m"; fi
        for name in "${QEMU_FIRMWARE[@]}"; do
            found=0
            for dir in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
                if [[ -e $dir/$name ]]; then echo "file $dir/$name $dir/$name"; found=1; fi
            done
            [[ $found == 1 ]] || log "note: firmware $name not found on the host, skipped"
        done
    } > "$LAB/qemu.manifest.tmp"
    mv "$LAB/qemu.manifest.tmp" "$LAB/qemu.manifest"
    python3 "$MKCPIO" -o "$out.tmp" "$LAB/qemu.manifest"
    mv "$out.tmp" "$out"
    echo "$key" > "$LAB/qemu.stamp"
    unlock_lab
    log "qemu segment built in $(elapsed "$t0") s ($(du -h "$out" | cut -f1))"
}

# ---------------------------------------------------------------- run segment
# add_manifest SRC[:DEST] -> manifest lines. DEST defaults to SRC for an absolute SRC, else
# /bin/NAME for an executable and /lab/NAME for anything else.
add_manifest() {
    local spec=$1 src dest
    src=${spec%%:*}
    if [[ $spec == *:* ]]; then dest=${spec#*:}; else dest=""; fi
    [[ -e $src ]] || fail "--add $spec: $src does not exist"
    if [[ -z $dest ]]; then
        if [[ $src == /* ]]; then dest=$src
        elif [[ -x $src && ! -d $src ]]; then dest=/bin/$(basename "$src")
        else dest=/lab/$(basename "$src"); fi
    fi
    if [[ -d $src ]]; then
        echo "tree $dest $(readlink -f "$src")"
    else
        manifest_file "$dest" "$(readlink -f "$src")"
    fi
}

# ---------------------------------------------------------------- running QEMU
MEM=3072 SMP=2 TIMEOUT=600 WITH_QEMU=0 ADDS=()
parse_opts() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --timeout) TIMEOUT=$2; shift 2 ;;
            --mem) MEM=$2; shift 2 ;;
            --smp) SMP=$2; shift 2 ;;
            --with-qemu) WITH_QEMU=1; shift ;;
            --add) ADDS+=("$2"); shift 2 ;;
            --add=*) ADDS+=("${1#--add=}"); shift ;;
            -h|--help) usage ;;
            -) REST+=("$1"); shift ;;          # SCRIPT from stdin
            -*) echo "lab: unknown option $1" >&2; usage ;;
            *) REST+=("$1"); shift ;;
        esac
    done
}

# prepare SCRIPT_FILE: build everything and write the run directory's initrd.
prepare() {
    local script=$1
    build_base
    [[ $WITH_QEMU == 1 ]] && build_qemu
    RUNDIR=$LAB/runs/$(date +%Y%m%d-%H%M%S)-$$
    mkdir -p "$RUNDIR"
    # Keep the 20 newest runs.
    # shellcheck disable=SC2012  # our own directory names: no odd characters
    ls -1dt "$LAB"/runs/*/ 2>/dev/null | tail -n +21 | xargs -r rm -rf
    {
        echo "file lab/script.sh $script 0755"
        local a
        for a in "${ADDS[@]}"; do add_manifest "$a"; done
    } > "$RUNDIR/run.manifest"
    # The run segment stays uncompressed: it changes every run and is small.
    python3 "$MKCPIO" -o "$RUNDIR/run.cpio" "$RUNDIR/run.manifest"
    local segs=("$LAB/base.cpio")
    [[ $WITH_QEMU == 1 ]] && segs+=("$LAB/qemu.cpio")
    cat "${segs[@]}" "$RUNDIR/run.cpio" > "$RUNDIR/initrd"
    rm -f "$RUNDIR/run.cpio"
    # The initrd is big (the base alone is ~75 MB): delete it when we exit, keep the log.
    trap 'rm -f "$RUNDIR/initrd"' EXIT
    LOG=$RUNDIR/console.log
}

# The lab VM. The kernel is booted as a PVH ELF (vmlinux): that skips decompressing the
# bzImage under TCG (~1 s). qboot instead of SeaBIOS is faster and prints nothing.
# -no-reboot: a lab kernel panic (panic=-1) ends QEMU instead of looping. softlockup_panic=1:
# a soft lockup of the lab kernel itself (not of a nested guest, whose console only passes
# through) is a panic, so a livelocked lab ends at once with 125 (see watch_lab).
# kvm_amd gets vgif=0 (lab/init reads KVM_AMD_OPTS): with TCG's virtual GIF, about one nested
# 4-vCPU Linux boot in ten ended in a triple fault of an AP, and once the lab kernel itself died
# in its vCPU thread (stack guard page hit in error_entry); with vgif=0, 32 of 32 booted.
# LAB_KVM_AMD_OPTS overrides it (commas between options; empty for kvm_amd's defaults).
qemu_cmd() {
    QCMD=("$QEMU" -accel "${LAB_ACCEL:-tcg}" -cpu "${LAB_CPU:-max}" -M q35 -m "$MEM" -smp "$SMP"
          -bios /usr/share/qemu/qboot.rom -nodefaults -no-user-config -display none -no-reboot
          -kernel "$GUEST/vmlinux" -initrd "$RUNDIR/initrd"
          -append "console=ttyS0 quiet panic=-1 softlockup_panic=1 KVM_AMD_OPTS=${LAB_KVM_AMD_OPTS-vgif=0} ${LAB_CMDLINE:-}")
}

# lab_status QEMU_EXIT: the lab's exit status from the console log (and a reason on stderr).
lab_status() {
    local qrc=$1 status reason
    status=$(grep -a '^LAB-EXIT=[0-9]*$' "$LOG" | tail -n 1 | cut -d= -f2 || true)
    reason=$(grep -a '^LAB-FAIL: ' "$LOG" | head -n 1 | cut -d' ' -f2- || true)
    if [[ -s ${STUCK:-/nonexistent} ]]; then
        echo "lab: $(cat "$STUCK")" >&2; echo 125
    elif [[ $qrc == 124 || $qrc == 137 ]]; then
        echo "lab: timed out after $TIMEOUT s" >&2; echo 124
    elif [[ -n $status ]]; then
        echo "$status"
    elif [[ -n $reason ]]; then
        echo "lab: $reason" >&2; echo 125
    elif grep -aq 'Kernel panic - not syncing: softlockup' "$LOG"; then
        echo "lab: the lab kernel locked up ($(grep -a -m1 'BUG: soft lockup' "$LOG" | sed 's/.*BUG: //'))" >&2
        echo 125
    elif [[ $qrc != 0 ]]; then
        echo "lab: QEMU failed (exit $qrc) before the lab finished" >&2; echo 125
    else
        echo "lab: the lab ended without LAB-EXIT (kernel panic or reboot?)" >&2; echo 125
    fi
}

# Seconds without a heartbeat (lab/init writes one to the lab's ttyS1 every 5 s) after which
# a running lab counts as stuck; the first one is due once the lab has booted.
LAB_HB_LIMIT=${LAB_HB_LIMIT:-60}

# watch_lab: runs beside the lab's QEMU (its pid in $RUNDIR/qemu.pid) and ends it when the lab
# is stuck, with the reason in $STUCK, so that lab_status reports 125 (the lab failed) and the
# caller can run again at once instead of waiting out the timeout. QEMU TCG's emulated AMD-V
# sometimes livelocks both lab CPUs in kvm_amd while a nested SMP guest starts: the lab kernel
# then reports a soft lockup (softlockup_panic=1 makes that a panic, which ends QEMU), or
# prints nothing and its user space stops: the heartbeat goes quiet. Neither recovers.
watch_lab() {
    local hb=$1 pid="" age
    while :; do
        sleep 2
        [[ -n $pid ]] || pid=$(cat "$RUNDIR/qemu.pid" 2>/dev/null || true)
        [[ -n $pid ]] || continue
        kill -0 "$pid" 2>/dev/null || return 0
        age=$(( $(date +%s) - $(stat -c %Y "$hb") ))
        if (( age > LAB_HB_LIMIT )); then
            echo "the lab's heartbeat stopped $age s ago (lab kernel stuck); ended it" > "$STUCK"
            kill -TERM "$pid" 2>/dev/null || true
            sleep 5
            kill -KILL "$pid" 2>/dev/null || true
            return 0
        fi
    done
}

cmd_run() {
    REST=()
    parse_opts "$@"
    [[ ${#REST[@]} -eq 1 ]] || usage
    local script=${REST[0]}
    if [[ $script == - ]]; then
        mkdir -p "$LAB"
        script=$(mktemp "$LAB/stdin-script.XXXXXX")
        cat > "$script"
    fi
    [[ -f $script ]] || fail "script $script not found"
    command -v "$QEMU" >/dev/null || fail "$QEMU not found (run scripts/deps.sh)"
    prepare "$(readlink -f "$script")"
    [[ ${REST[0]} == - ]] && rm -f "$script"    # packed into the run archive already
    qemu_cmd
    local t0 rc=0 qrc
    t0=$(date +%s.%N)
    # Stream the console live (sed -u: unbuffered, drops the serial line's CRs) and keep a log.
    # stdin is /dev/null so the lab never reads the caller's terminal. --foreground keeps QEMU
    # in our process group, so Ctrl-C reaches it (and ends it) instead of orphaning it.
    # The watcher ends a stuck lab early (see watch_lab); ttyS1 carries the heartbeat.
    local hb=$RUNDIR/heartbeat watcher
    STUCK=$RUNDIR/stuck
    : > "$hb"; : > "$LOG"; rm -f "$STUCK"
    watch_lab "$hb" &
    watcher=$!
    set +e
    timeout --foreground -k 10 "$TIMEOUT" "${QCMD[@]}" -serial stdio -serial "file:$hb" \
        -pidfile "$RUNDIR/qemu.pid" -monitor none < /dev/null | sed -u 's/\r$//' | tee "$LOG"
    qrc=${PIPESTATUS[0]}
    set -e
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    rc=$(lab_status "$qrc")
    echo "lab: ${script##*/}: exit $rc after $(elapsed "$t0") s; console log: $LOG" >&2
    return "$rc"
}

cmd_shell() {
    REST=()
    parse_opts "$@"
    [[ ${#REST[@]} -eq 0 ]] || usage
    mkdir -p "$LAB"
    printf '%s\n' 'echo "lab shell: /guest has the test guest; Ctrl-A X quits QEMU, exit powers off"' \
        'exec setsid cttyhack sh -l' > "$LAB/shell-script.sh"
    prepare "$LAB/shell-script.sh"
    qemu_cmd
    # mux=on gives QEMU's Ctrl-A escapes (Ctrl-A X quits); signal=off passes Ctrl-C to the lab.
    local qrc=0
    "${QCMD[@]}" -chardev stdio,id=con,mux=on,signal=off,logfile="$LOG" -serial chardev:con -mon chardev=con || qrc=$?
    # The log has the serial line's CRs; lab_status greps whole lines.
    sed -i 's/\r$//' "$LOG"
    return "$(lab_status "$qrc")"
}

cmd_check() {
    REST=()
    parse_opts "$@"
    mkdir -p "$LAB"
    # kvm_amd logs e.g. "kvm_amd: Nested Paging enabled"; SVM features come from /proc/cpuinfo.
    cat > "$LAB/check-script.sh" <<'EOF'
line=$(dmesg | grep -E 'kvm_amd|SVM|svm' | grep -iE 'nested paging|svm|kvm_amd' | head -n 1 | sed 's/^\[[^]]*\] //')
[ -c /dev/kvm ] || { echo "kvm-in-lab: FAILED (no /dev/kvm)"; exit 1; }
grep -qw svm /proc/cpuinfo || { echo "kvm-in-lab: FAILED (no svm flag)"; exit 1; }
echo "kvm-in-lab: ok (${line:-kvm_amd loaded})"
EOF
    local rc=0 out
    out=$(cmd_run --timeout "${TIMEOUT:-300}" "$LAB/check-script.sh" 2>&1) || rc=$?
    if grep -q '^kvm-in-lab: ok' <<<"$out"; then
        grep '^kvm-in-lab: ok' <<<"$out"
    else
        echo "$out"
        echo "kvm-in-lab: FAILED" >&2
        [[ $rc == 0 ]] && rc=1
    fi
    return "$rc"
}

case "${1:-}" in
    run) shift; cmd_run "$@" ;;
    shell) shift; cmd_shell "$@" ;;
    check) shift; cmd_check "$@" ;;
    build) shift; REST=(); parse_opts "$@"; build_base; [[ $WITH_QEMU == 1 ]] && build_qemu; log "up to date: $LAB" ;;
    *) usage ;;
esac
