#!/usr/bin/env bash
# modules.sh ROOT KREL DECOMP_DIR MODULE...
#
# Print "DEST SRC" lines, one per kernel module file needed to load MODULE... in dependency
# order (each module once, dependencies first). DEST is the path inside an initramfs
# (lib/modules/KREL/...), SRC the host file to pack. ROOT is an extracted kernel package on
# which `depmod -b ROOT KREL` has run (the .deb ships no modules.dep). Modules that do not
# exist (or are built in) are skipped quietly, so one list serves several kernel configs.
# Compressed modules (.ko.xz/.ko.zst/.ko.gz) are decompressed into DECOMP_DIR, because
# busybox insmod cannot read them and it keeps the guest's init trivial.
set -euo pipefail
root=$1 krel=$2 decomp=$3
shift 3
export PATH=$PATH:/usr/sbin:/sbin   # modprobe lives in /usr/sbin for non-root users

declare -A seen=()
for m in "$@"; do
    # --show-depends prints "insmod PATH" lines, dependencies first, and needs no root.
    deps=$(modprobe -d "$root" -S "$krel" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}') || true
    for path in $deps; do
        [[ -n ${seen[$path]:-} ]] && continue
        seen[$path]=1
        rel=${path#"$root"/}              # lib/modules/KREL/kernel/...
        rel=${rel#usr/}                   # a usrmerged package may use usr/lib/modules
        case "$path" in
            *.ko.xz)  src=$decomp/${rel%.xz};  dec=(xz -dc) ;;
            *.ko.zst) src=$decomp/${rel%.zst}; dec=(zstd -dcq) ;;
            *.ko.gz)  src=$decomp/${rel%.gz};  dec=(gzip -dc) ;;
            *)        src=$path; dec=() ;;
        esac
        if [[ ${#dec[@]} -gt 0 && ! -s $src ]]; then
            mkdir -p "$(dirname "$src")"
            "${dec[@]}" "$path" > "$src.tmp" && mv "$src.tmp" "$src"
        fi
        dest=$rel
        [[ ${#dec[@]} -gt 0 ]] && dest=${rel%.*}
        echo "$dest $src"
    done
done
