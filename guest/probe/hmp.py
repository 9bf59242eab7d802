#!/usr/bin/env python3
"""Sends one human-monitor command to a QEMU `-monitor unix:PATH,server,nowait` socket.
Usage: hmp.py PATH COMMAND"""
import socket
import sys
import time

s = socket.socket(socket.AF_UNIX)
for _ in range(50):
    try:
        s.connect(sys.argv[1])
        break
    except OSError:
        time.sleep(0.1)
s.sendall(sys.argv[2].encode() + b"\n")
time.sleep(0.3)
s.close()
