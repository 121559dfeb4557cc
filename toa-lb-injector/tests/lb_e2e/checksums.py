#!/usr/bin/env python3
"""Checks the TCP checksum of every segment an interface receives, for the
kernel datapath's end-to-end test (an oracle apart from the project's code).

Usage: checksums.py IFACE SECONDS SOURCE_PREFIX...

Captures incoming IPv4 and IPv6 TCP segments from sources that start with
one of SOURCE_PREFIX (the LB's SNAT addresses) until SECONDS pass without
one, and prints one
JSON object: how many verified with a full checksum, how many arrived with
CHECKSUM_PARTIAL (the kernel then says so in PACKET_AUXDATA, and the
checksum field must hold the folded pseudo-header sum for the device to
finish), how many were wrong, and how many SYNs and pure ACKs carried a TOA
(kind 254).
"""
import json
import socket
import struct
import sys
import time

ETH_P_ALL = 3
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_CSUMNOTREADY = 8


def fold(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def has_toa(segment):
    doff = (segment[12] >> 4) * 4
    opts, i = segment[20:doff], 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        if kind == 254:
            return True
        i += opts[i + 1]
    return False


def main():
    iface, seconds, prefixes = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    print("ready", flush=True)
    counts = {"full_ok": 0, "partial_ok": 0, "bad": 0, "syn_toa": 0, "ack_toa": 0, "bad_examples": []}
    # Other traffic (health probes) keeps coming: the deadline moves only with ours.
    deadline = time.monotonic() + seconds
    try:
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            data, ancillary, _, addr = s.recvmsg(65600, 1024)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            status = 0
            for level, kind, value in ancillary:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status = struct.unpack("I", value[:4])[0]
            ethertype = struct.unpack("!H", data[12:14])[0]
            if ethertype == 0x800:
                ihl = (data[14] & 15) * 4
                total = struct.unpack("!H", data[16:18])[0]
                if data[23] != 6:
                    continue
                ip = data[14 : 14 + total]
                src = socket.inet_ntop(socket.AF_INET, ip[12:16])
                segment = ip[ihl:]
                pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(segment))
            elif ethertype == 0x86DD:
                payload = struct.unpack("!H", data[18:20])[0]
                if data[20] != 6:
                    continue
                ip = data[14 : 14 + 40 + payload]
                src = socket.inet_ntop(socket.AF_INET6, ip[8:24])
                segment = ip[40:]
                pseudo = ip[8:40] + struct.pack("!IxxxB", len(segment), 6)
            else:
                continue
            if not any(src.startswith(p) for p in prefixes):
                continue
            deadline = time.monotonic() + seconds
            if status & TP_STATUS_CSUMNOTREADY:
                field = struct.unpack("!H", segment[16:18])[0]
                ok = field == fold(pseudo)
                kind = "partial_ok"
            else:
                ok = fold(pseudo + segment) == 0xFFFF
                kind = "full_ok"
            if ok:
                counts[kind] += 1
            else:
                counts["bad"] += 1
                counts["bad_examples"].append(segment[:60].hex())
            flags, doff = segment[13], (segment[12] >> 4) * 4
            if has_toa(segment):
                if flags & 0x12 == 0x02:
                    counts["syn_toa"] += 1
                elif flags & 0x17 == 0x10 and len(segment) == doff:
                    counts["ack_toa"] += 1
    except socket.timeout:
        pass
    print(json.dumps(counts), flush=True)


main()
