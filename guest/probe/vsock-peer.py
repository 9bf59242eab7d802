#!/usr/bin/env python3
"""A minimal vhost-user virtio-vsock backend, to test the probe's `vsock=` under QEMU on hosts
without /dev/vhost-vsock. It plays the host (CID 2) for one connection.

  vsock-peer.py SOCKET echo PORT MESSAGE      connect to guest PORT, send MESSAGE, expect it back,
                                              then SHUTDOWN; prints `peer_vsock=echo_ok` or `..._fail`
  vsock-peer.py SOCKET serve PORT             accept the guest's connection to PORT, answer each
                                              RW with b"re:" + its data; prints `peer_vsock=served`

QEMU side (guest memory must be shareable):
  -object memory-backend-memfd,id=mem,size=512M,share=on -M q35,memory-backend=mem -m 512
  -chardev socket,id=vs,path=SOCKET -device vhost-user-vsock-pci,chardev=vs,disable-legacy=on

Only what QEMU 7.2 and the probe use: split rings without EVENT_IDX, one memory table, queue 0
(rx, to the guest) and 1 (tx, from the guest); the event queue stays in QEMU.
"""
import mmap
import os
import select
import socket
import struct
import sys
import time

GUEST_CID = 3
HOST_CID = 2
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
PROTO_CONFIG = 1 << 9

REQ = {1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER", 5: "SET_MEM_TABLE",
       8: "SET_VRING_NUM", 9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE",
       12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES",
       16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE", 24: "GET_CONFIG",
       25: "SET_CONFIG"}

OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
HDR = struct.Struct("<QQIIIHHIII")  # 44 bytes


def log(*a):
    print("vsock-peer:", *a, file=sys.stderr, flush=True)


class Mem:
    def __init__(self):
        self.regions = []  # (gpa, size, uva, mmap, offset)

    def _find(self, addr, key):
        for r in self.regions:
            base = r[0] if key == "gpa" else r[2]
            if base <= addr < base + r[1]:
                return r[3], r[4] + addr - base
        raise ValueError(f"address {addr:#x} ({key}) outside guest memory")

    def read(self, gpa, n):
        m, o = self._find(gpa, "gpa")
        return m[o:o + n]

    def write(self, gpa, data):
        m, o = self._find(gpa, "gpa")
        m[o:o + len(data)] = data

    def uva_to_gpa(self, uva):
        for gpa, size, base, _, _ in self.regions:
            if base <= uva < base + size:
                return gpa + uva - base
        raise ValueError(f"uva {uva:#x} outside guest memory")


class Ring:
    def __init__(self):
        self.num = 0
        self.desc = self.avail = self.used = 0
        self.last_avail = 0
        self.used_idx = 0
        self.kick = None
        self.call = None

    def ready(self):
        return self.num and self.desc and self.kick is not None


class Backend:
    def __init__(self, conn):
        self.c = conn
        self.mem = Mem()
        self.rings = [Ring(), Ring()]
        self.features = 0
        self.pending_rx = []  # packets for the guest

    # ---- vhost-user messages ----
    def recv_msg(self):
        data, fds, _, _ = socket.recv_fds(self.c, 12, 16)
        if not data:
            return None
        while len(data) < 12:
            data += self.c.recv(12 - len(data))
        req, flags, size = struct.unpack("<III", data)
        payload = b""
        while len(payload) < size:
            more, f2, _, _ = socket.recv_fds(self.c, size - len(payload), 16)
            if not more:
                return None
            payload += more
            fds += f2
        return req, flags, payload, fds

    def reply(self, req, payload):
        self.c.sendall(struct.pack("<III", req, 0x1 | 0x4, len(payload)) + payload)

    def handle(self, req, flags, p, fds):
        name = REQ.get(req, str(req))
        if req == 1:
            self.reply(req, struct.pack("<Q", F_VERSION_1 | F_PROTOCOL_FEATURES))
        elif req == 2:
            self.features = struct.unpack_from("<Q", p)[0]
        elif req == 15:
            self.reply(req, struct.pack("<Q", PROTO_CONFIG))
        elif req == 17:
            self.reply(req, struct.pack("<Q", 2))
        elif req == 24:
            off, size, fl = struct.unpack_from("<III", p)
            cfg = struct.pack("<Q", GUEST_CID).ljust(size, b"\0")[:size]
            self.reply(req, struct.pack("<III", off, size, fl) + cfg)
        elif req == 5:
            n = struct.unpack_from("<I", p)[0]
            for m in self.mem.regions:
                m[3].close()
            self.mem.regions = []
            for i in range(n):
                gpa, size, uva, off = struct.unpack_from("<QQQQ", p, 8 + 32 * i)
                mm = mmap.mmap(fds[i], size + off, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                os.close(fds[i])
                self.mem.regions.append((gpa, size, uva, mm, off))
            fds = []
        elif req == 8:
            i, num = struct.unpack_from("<II", p)
            self.rings[i].num = num
        elif req == 9:
            i, _, desc, used, avail, _ = struct.unpack_from("<IIQQQQ", p)
            r = self.rings[i]
            r.desc, r.used, r.avail = (self.mem.uva_to_gpa(a) for a in (desc, used, avail))
        elif req == 10:
            i, num = struct.unpack_from("<II", p)
            self.rings[i].last_avail = num
            self.rings[i].used_idx = num
        elif req == 11:
            i = struct.unpack_from("<I", p)[0]
            r = self.rings[i]
            self.reply(req, struct.pack("<II", i, r.last_avail))
            r.kick = None
        elif req in (12, 13):
            v = struct.unpack_from("<Q", p)[0]
            i = v & 0xFF
            fd = None if v & 0x100 else fds.pop(0)
            if i < 2:
                if req == 12:
                    self.rings[i].kick = fd
                else:
                    self.rings[i].call = fd
        elif req in (3, 4, 14, 16, 18, 25):
            pass
        else:
            log("unhandled", name)
        for fd in fds:
            os.close(fd)

    # ---- rings ----
    def chains(self, r):
        """Available chains: (head, [(addr, len, writable)])."""
        avail_idx = struct.unpack("<H", self.mem.read(r.avail + 2, 2))[0]
        while r.last_avail != avail_idx:
            head = struct.unpack("<H", self.mem.read(r.avail + 4 + 2 * (r.last_avail % r.num), 2))[0]
            r.last_avail = (r.last_avail + 1) & 0xFFFF
            bufs, d = [], head
            for _ in range(r.num):
                addr, ln, fl, nxt = struct.unpack("<QIHH", self.mem.read(r.desc + 16 * d, 16))
                bufs.append((addr, ln, bool(fl & 2)))
                if not fl & 1:
                    break
                d = nxt
            yield head, bufs

    def put_used(self, r, head, ln):
        self.mem.write(r.used + 4 + 8 * (r.used_idx % r.num), struct.pack("<II", head, ln))
        r.used_idx = (r.used_idx + 1) & 0xFFFF
        self.mem.write(r.used + 2, struct.pack("<H", r.used_idx))
        if r.call is not None:
            os.write(r.call, struct.pack("<Q", 1))

    def from_guest(self):
        r = self.rings[1]
        out = []
        if not r.ready():
            return out
        for head, bufs in list(self.chains(r)):
            data = b"".join(self.mem.read(a, n) for a, n, w in bufs if not w)
            self.put_used(r, head, 0)
            if len(data) >= HDR.size:
                h = HDR.unpack_from(data)
                out.append((h, data[HDR.size:HDR.size + h[4]]))
        return out

    def to_guest(self):
        r = self.rings[0]
        if not r.ready() or not self.pending_rx:
            return
        avail_idx = struct.unpack("<H", self.mem.read(r.avail + 2, 2))[0]
        while self.pending_rx and r.last_avail != avail_idx:
            head, bufs = next(self.chains(r))
            pkt = self.pending_rx.pop(0)
            left, total = pkt, 0
            for a, n, w in bufs:
                if w and left:
                    self.mem.write(a, left[:n])
                    total += min(n, len(left))
                    left = left[n:]
            self.put_used(r, head, total)

    def send(self, op, src_port, dst_port, data=b"", flags=0, fwd=0):
        self.pending_rx.append(HDR.pack(HOST_CID, GUEST_CID, src_port, dst_port, len(data), 1, op, flags,
                                        256 * 1024, fwd) + data)
        self.to_guest()

    def pump(self, timeout):
        """Serves vhost-user messages and kicks for up to `timeout` s; returns guest packets."""
        fds = [self.c] + [r.kick for r in self.rings if r.kick is not None]
        ready, _, _ = select.select(fds, [], [], timeout)
        for f in ready:
            if f is self.c:
                m = self.recv_msg()
                if m is None:
                    raise EOFError
                self.handle(*m)
            else:
                os.read(f, 8)
        self.to_guest()
        return self.from_guest()


def main():
    if len(sys.argv) < 4 or sys.argv[2] not in ("echo", "serve"):
        sys.exit(__doc__)
    path, mode, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    msg = sys.argv[4].encode() if len(sys.argv) > 4 else b"probe-echo-test"
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(30)
    conn, _ = srv.accept()
    b = Backend(conn)
    deadline = time.monotonic() + 30
    my_port, got, sent, fwd, result = 5000, b"", False, 0, None
    try:
        while time.monotonic() < deadline and result is None:
            pkts = b.pump(0.05)
            if mode == "echo" and not sent and b.rings[0].ready() and b.rings[1].ready():
                # The guest posts its rx buffers before DRIVER_OK: wait for them, then connect.
                if struct.unpack("<H", b.mem.read(b.rings[0].avail + 2, 2))[0] != 0:
                    b.send(OP_REQUEST, my_port, port)
                    sent = True
            for h, data in pkts:
                src_cid, dst_cid, sport, dport, ln, typ, op, fl, alloc, gfwd = h
                if mode == "echo":
                    if op == OP_RESPONSE:
                        b.send(OP_RW, my_port, port, msg)
                    elif op == OP_RW:
                        got += data
                        fwd += len(data)
                        if len(got) >= len(msg):
                            b.send(OP_SHUTDOWN, my_port, port, flags=3, fwd=fwd)
                    elif op == OP_RST:
                        result = "echo_ok" if got == msg else f"echo_fail:{got!r}"
                else:
                    if op == OP_REQUEST and dport == port:
                        my_port, peer = port, sport
                        b.send(OP_RESPONSE, port, peer)
                    elif op == OP_RW:
                        fwd += len(data)
                        b.send(OP_RW, port, peer, b"re:" + data, fwd=fwd)
                    elif op == OP_SHUTDOWN:
                        b.send(OP_RST, port, peer)
                        result = "served"
                    elif op == OP_REQUEST:
                        b.send(OP_RST, dport, sport)
        print(f"peer_vsock={result or 'timeout'}", flush=True)
        # Keep serving QEMU until it goes away (it stops the rings when the guest resets).
        end = time.monotonic() + 10
        while time.monotonic() < end:
            b.pump(0.1)
    except (EOFError, ConnectionResetError, BrokenPipeError):
        if result is None:
            print("peer_vsock=timeout", flush=True)


if __name__ == "__main__":
    main()
