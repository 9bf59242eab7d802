#!/usr/bin/env python3
"""Extract the ELF vmlinux from an x86 bzImage: extract-vmlinux.py BZIMAGE OUT

The compressed kernel is located through the boot protocol's setup header (payload_offset
at 0x248 and payload_length at 0x24c, relative to the protected-mode code that starts at
(setup_sects + 1) * 512), rather than by scanning for a magic number: the LZ4 magic
02 21 4C 18 occurs several times in Debian's cloud bzImage. The payload ends with the
4-byte little-endian uncompressed size appended by the kernel build, which lz4 would take
for a block header ("trailing garbage"): we strip it and check the output size against it.
Supports LZ4 legacy frames (Debian's cloud kernel), gzip, xz and zstd payloads.
"""
import os
import struct
import subprocess
import sys

DECOMPRESSORS = [
    (b"\x02\x21\x4c\x18", ["lz4", "-d", "-c", "-q"]),   # LZ4 legacy frame
    (b"\x1f\x8b", ["gzip", "-d", "-c", "-q"]),
    (b"\xfd7zXZ\x00", ["xz", "-d", "-c", "-q"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-d", "-c", "-q"]),
]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    data = open(src, "rb").read()
    if data[0x202:0x206] != b"HdrS":
        sys.exit(f"{src}: not a bzImage (no HdrS setup header)")
    setup_sects = data[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    payload = data[pm_start + payload_offset: pm_start + payload_offset + payload_length]
    (expected_size,) = struct.unpack_from("<I", payload, len(payload) - 4)
    for magic, cmd in DECOMPRESSORS:
        if payload.startswith(magic):
            break
    else:
        sys.exit(f"{src}: unknown payload compression (starts with {payload[:6].hex()})")
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        # Strip the appended size; lz4/gzip may still warn about padding, so judge the
        # result by its size and ELF magic, not by the tool's exit status alone.
        p = subprocess.run(cmd, input=payload[:-4], stdout=f, stderr=subprocess.PIPE)
    size = os.path.getsize(tmp)
    with open(tmp, "rb") as f:
        head = f.read(4)
    if head != b"\x7fELF" or size != expected_size:
        os.unlink(tmp)
        sys.exit(f"{src}: extraction failed ({cmd[0]} rc={p.returncode}, size {size} != {expected_size} "
                 f"or not ELF): {p.stderr.decode(errors='replace').strip()}")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
