#!/usr/bin/env python3
"""Write a newc cpio archive (the format Linux unpacks as an initramfs) from a manifest.

Why not GNU cpio: we need device nodes (/dev/console) without being root, files owned by
root whatever user builds, fixed mtimes (reproducible output), parent directories added
automatically (an archive appended to another must carry its own directories), and files
taken from anywhere on the host without copying them into a staging tree first.

Manifest lines (read from the files named on the command line, or stdin), fields separated
by whitespace; blank lines and lines starting with '#' are ignored. Modeled on the kernel's
gen_init_cpio:
    dir   PATH [MODE]
    file  PATH SRC [MODE]        SRC symlinks are followed; MODE defaults to SRC's
    slink PATH TARGET
    nod   PATH MODE c|b MAJOR MINOR
    tree  PATH SRCDIR            SRCDIR's contents go under PATH (symlinks kept as symlinks)
MODE is octal permission bits. The archive goes to stdout (or -o FILE); compress it by piping.
A later entry for the same PATH replaces the earlier one (last wins), so callers can override.
"""
import argparse
import os
import stat
import sys


class Cpio:
    def __init__(self, out):
        self.out = out
        self.ino = 1
        self.entries = {}   # archive path -> (kind, mode, data_source, rdev)
        self.order = []     # archive paths in first-seen order (parents before children)

    def _norm(self, path):
        path = os.path.normpath("/" + path).lstrip("/")
        if not path:
            raise ValueError("empty path")
        return path

    def _add(self, path, entry):
        path = self._norm(path)
        # Parents first: the kernel's unpacker does not create missing directories.
        parent = os.path.dirname(path)
        if parent and parent not in self.entries:
            self._add(parent, ("dir", 0o755, None, (0, 0)))
        if path not in self.entries:
            self.order.append(path)
        elif self.entries[path][0] == "dir" and entry[0] == "dir":
            return  # keep the first mode for repeated implicit directories
        self.entries[path] = entry

    def dir(self, path, mode=0o755):
        self._add(path, ("dir", mode, None, (0, 0)))

    def file(self, path, src, mode=None):
        if mode is None:
            mode = stat.S_IMODE(os.stat(src).st_mode)
        self._add(path, ("file", mode, src, (0, 0)))

    def slink(self, path, target):
        self._add(path, ("slink", 0o777, target, (0, 0)))

    def nod(self, path, mode, kind, major, minor):
        self._add(path, ("chr" if kind == "c" else "blk", mode, None, (major, minor)))

    def tree(self, path, srcdir):
        self.dir(path)
        for root, dirs, files in os.walk(srcdir):
            dirs.sort()
            rel = os.path.relpath(root, srcdir)
            base = path if rel == "." else os.path.join(path, rel)
            for name in dirs + sorted(files):
                src = os.path.join(root, name)
                dst = os.path.join(base, name)
                st = os.lstat(src)
                if stat.S_ISLNK(st.st_mode):
                    self.slink(dst, os.readlink(src))
                elif stat.S_ISDIR(st.st_mode):
                    self.dir(dst, stat.S_IMODE(st.st_mode))
                elif stat.S_ISREG(st.st_mode):
                    self.file(dst, src, stat.S_IMODE(st.st_mode))

    def _header(self, name, mode, size, rdev, nlink):
        name_b = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name_b), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields) + name_b
        self.out.write(hdr + b"\0" * (-len(hdr) % 4))

    def write(self):
        for path in self.order:
            kind, mode, src, rdev = self.entries[path]
            if kind == "dir":
                self._header(path, stat.S_IFDIR | mode, 0, rdev, 2)
            elif kind == "slink":
                data = src.encode()
                self._header(path, stat.S_IFLNK | mode, len(data), rdev, 1)
                self.out.write(data + b"\0" * (-len(data) % 4))
            elif kind in ("chr", "blk"):
                ftype = stat.S_IFCHR if kind == "chr" else stat.S_IFBLK
                self._header(path, ftype | mode, 0, rdev, 1)
            else:
                size = os.stat(src).st_size
                self._header(path, stat.S_IFREG | mode, size, rdev, 1)
                with open(src, "rb") as f:
                    while chunk := f.read(1 << 20):
                        self.out.write(chunk)
                self.out.write(b"\0" * (-size % 4))
        self._header("TRAILER!!!", 0, 0, (0, 0), 1)
        # Pad to 512 bytes so another archive can be appended at an aligned offset.
        pos = self.out.tell()
        self.out.write(b"\0" * (-pos % 512))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", nargs="*", help="manifest files (default: stdin)")
    ap.add_argument("-o", "--output", help="output file (default: stdout)")
    args = ap.parse_args()

    out = open(args.output, "wb") if args.output else open(sys.stdout.fileno(), "wb", closefd=False)
    # tell() must work for the final padding: buffer through a counting wrapper on pipes.
    out = _Counting(out)
    c = Cpio(out)
    lines = []
    if args.manifest:
        for m in args.manifest:
            with open(m) as f:
                lines += f.read().splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    for n, line in enumerate(lines, 1):
        f = line.split()
        if not f or f[0].startswith("#"):
            continue
        try:
            op = f[0]
            if op == "dir":
                c.dir(f[1], int(f[2], 8) if len(f) > 2 else 0o755)
            elif op == "file":
                c.file(f[1], f[2], int(f[3], 8) if len(f) > 3 else None)
            elif op == "slink":
                c.slink(f[1], f[2])
            elif op == "nod":
                c.nod(f[1], int(f[2], 8), f[3], int(f[4]), int(f[5]))
            elif op == "tree":
                c.tree(f[1], f[2])
            else:
                raise ValueError(f"unknown entry type {op!r}")
        except (IndexError, ValueError, OSError) as e:
            sys.exit(f"mkcpio: manifest line {n}: {line!r}: {e}")
    c.write()
    out.flush()


class _Counting:
    """A write-only stream wrapper that counts bytes, so tell() works on pipes too."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, b):
        self.n += len(b)
        return self.f.write(b)

    def tell(self):
        return self.n

    def flush(self):
        self.f.flush()


if __name__ == "__main__":
    main()
