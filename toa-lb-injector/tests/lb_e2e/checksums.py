#!/usr/bin/env python3
"""Checks the TCP and UDP checksum of every segment and datagram an
interface receives, for the kernel datapath's end-to-end tests (an oracle
apart from the project's code). A UDP datagram may carry a UOA: an IPv4
option (outside the checksum) or an opp header (IP protocol 248, skipped:
the UDP checksum's pseudo-header says 17).

Usage: checksums.py IFACE SECONDS SOURCE_PREFIX...

Captures incoming IPv4 and IPv6 TCP segments from sources that start with
one of SOURCE_PREFIX (the LB's SNAT addresses) until SECONDS pass without
one, and prints one
JSON object: how many verified with a full checksum, how many arrived with
CHECKSUM_PARTIAL (the kernel then says so in PACKET_AUXDATA, and the
checksum field must hold the folded pseudo-header sum for the device to
finish), how many were wrong, and how many SYNs, pure ACKs and segments
with data carried a TOA (kind 254); for UDP the same under udp_*, and how
many datagrams carried a UOA (udp_uoa) and of those how many were empty
carriers (udp_carriers). forged_toa: frames of any kind, fragments
included, that hold the TOA the tests forge (10.9.9.9:1, kind 254) anywhere.
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
# The TOA the tests forge: kind 254, length 8, port 1, 10.9.9.9.
FORGED = bytes.fromhex("fe0800010a090909")


def fold(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def options_codes(opts):
    """The codes of an IPv4 option list."""
    codes, i = [], 0
    while i < len(opts):
        code = opts[i]
        if code == 0:
            break
        if code == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        codes.append(code)
        i += opts[i + 1]
    return codes


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
    counts = {"full_ok": 0, "partial_ok": 0, "bad": 0, "syn_toa": 0, "ack_toa": 0, "data_toa": 0, "bad_examples": []}
    counts.update({"udp_full_ok": 0, "udp_partial_ok": 0, "udp_uoa": 0, "udp_carriers": 0, "forged_toa": 0})
    # Other traffic (health probes) keeps coming: the deadline moves only with ours.
    deadline = time.monotonic() + seconds
    try:
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            data, ancillary, _, addr = s.recvmsg(65600, 1024)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            if FORGED in data:
                counts["forged_toa"] += 1
            status = 0
            for level, kind, value in ancillary:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status = struct.unpack("I", value[:4])[0]
            ethertype = struct.unpack("!H", data[12:14])[0]
            if ethertype == 0x800:
                ihl = (data[14] & 15) * 4
                total = struct.unpack("!H", data[16:18])[0]
                proto = data[23]
                if proto not in (6, 17, 248):
                    continue
                if struct.unpack("!H", data[20:22])[0] & 0x3FFF:
                    continue  # a fragment: no whole segment to check
                ip = data[14 : 14 + total]
                src = socket.inet_ntop(socket.AF_INET, ip[12:16])
                segment = ip[ihl:]
                uoa = 0x1F in options_codes(ip[20:ihl])
            elif ethertype == 0x86DD:
                payload = struct.unpack("!H", data[18:20])[0]
                proto = data[20]
                if proto not in (6, 17, 248):
                    continue
                ip = data[14 : 14 + 40 + payload]
                src = socket.inet_ntop(socket.AF_INET6, ip[8:24])
                segment = ip[40:]
                uoa = False
            else:
                continue
            if proto == 248:  # opp: its header, then UDP
                segment = segment[struct.unpack("!H", segment[2:4])[0] :]
                proto, uoa = 17, True
            if ethertype == 0x800:
                pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(segment))
            else:
                pseudo = ip[8:40] + struct.pack("!IxxxB", len(segment), proto)
            if not any(src.startswith(p) for p in prefixes):
                continue
            deadline = time.monotonic() + seconds
            at = 16 if proto == 6 else 6
            prefix = "" if proto == 6 else "udp_"
            if status & TP_STATUS_CSUMNOTREADY:
                field = struct.unpack("!H", segment[at : at + 2])[0]
                ok = field == fold(pseudo)
                kind = prefix + "partial_ok"
            else:
                ok = fold(pseudo + segment) == 0xFFFF
                kind = prefix + "full_ok"
            if ok:
                counts[kind] += 1
            else:
                counts["bad"] += 1
                counts["bad_examples"].append(segment[:60].hex())
            if proto == 17:
                if uoa:
                    counts["udp_uoa"] += 1
                    if len(segment) == 8:
                        counts["udp_carriers"] += 1
                continue
            flags, doff = segment[13], (segment[12] >> 4) * 4
            if has_toa(segment):
                if flags & 0x12 == 0x02:
                    counts["syn_toa"] += 1
                elif flags & 0x17 == 0x10 and len(segment) == doff:
                    counts["ack_toa"] += 1
                elif len(segment) > doff:
                    counts["data_toa"] += 1
    except socket.timeout:
        pass
    print(json.dumps(counts), flush=True)


main()
