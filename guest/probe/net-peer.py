#!/usr/bin/env python3
"""Host side of the probe's `net=bench` frames, on a tap (run it inside the tap's namespace).

  net-peer.py count IFACE SECS        count EtherType 0x88b5 frames from the guest for SECS
                                      seconds (or until 1 s passes without one, after the first)
                                      -> `peer_rx_frames=N peer_rx_bytes=B peer_rx_fps=F` and the
                                      tap's kernel counters over that window:
                                      `peer_tap_rx_packets=N peer_tap_rx_bytes=B peer_tap_rx_dropped=D`
  net-peer.py blast IFACE N LEN       send N broadcast frames of LEN bytes (same format)
                                      -> `peer_tx_frames=N peer_tx_fps=F`

Frame format (both directions): destination ff:ff:ff:ff:ff:ff, source MAC, EtherType 0x88b5,
"FVPB", a 32-bit big-endian sequence number, then bytes 0,1,2,... up to LEN (60..1514) bytes.
"""
import socket
import struct
import sys
import time

ETH_TYPE = 0x88B5


def frame(src, seq, length):
    head = b"\xff" * 6 + src + struct.pack("!H", ETH_TYPE) + b"FVPB" + struct.pack("!I", seq & 0xFFFFFFFF)
    return head + bytes(i & 0xFF for i in range(length - len(head)))


def tap_stats(iface):
    base = f"/sys/class/net/{iface}/statistics/"
    out = {}
    for k in ("rx_packets", "rx_bytes", "rx_dropped"):
        try:
            with open(base + k) as f:
                out[k] = int(f.read())
        except OSError:
            out[k] = 0
    return out


def count(iface, secs):
    before = tap_stats(iface)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
    s.bind((iface, 0))
    try:  # root may exceed net.core.rmem_max: the guest sends faster than Python reads
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 64 << 20)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    s.settimeout(0.2)
    end = time.monotonic() + secs
    frames = nbytes = 0
    first = last = 0.0
    while time.monotonic() < end:
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            if frames and time.monotonic() - last > 1.0:
                break
            continue
        if addr[2] == socket.PACKET_OUTGOING:  # our own `blast`, not the guest
            continue
        if len(data) >= 18 and data[14:18] == b"FVPB":
            now = time.monotonic()
            first = first or now
            last = now
            frames += 1
            nbytes += len(data)
    dt = last - first
    fps = int(frames / dt) if dt > 0 else 0
    print(f"peer_rx_frames={frames} peer_rx_bytes={nbytes} peer_rx_fps={fps}", flush=True)
    # The kernel's own counters for the tap over the same window (every frame the guest sent,
    # also those this Python reader was too slow for; dropped = the host's backlog overflowed).
    after = tap_stats(iface)
    d = {k: after[k] - before[k] for k in after}
    print(f"peer_tap_rx_packets={d['rx_packets']} peer_tap_rx_bytes={d['rx_bytes']} "
          f"peer_tap_rx_dropped={d['rx_dropped']}", flush=True)


def blast(iface, n, length):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    src = s.getsockname()[4][:6]
    t0 = time.monotonic()
    sent = 0
    for i in range(n):
        try:
            s.send(frame(src, i, length))
            sent += 1
        except OSError:
            time.sleep(0.0001)
    dt = time.monotonic() - t0
    print(f"peer_tx_frames={sent} peer_tx_fps={int(sent / dt) if dt > 0 else 0}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "count":
        count(sys.argv[2], float(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "blast":
        blast(sys.argv[2], int(sys.argv[3]), max(60, min(1514, int(sys.argv[4]))))
    else:
        sys.exit(__doc__)
