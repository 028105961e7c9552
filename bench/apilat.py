#!/usr/bin/python3
"""API latency with N VMs defined: Lodge's REST API on its unix socket
against libvirt's API through its own Python binding, one persistent
connection each, calls alternated. Prints TSV rows:
op <tab> n <tab> i <tab> lodge_s <tab> libvirt_s."""
import http.client
import socket
import sys
import time

import libvirt


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("lodge")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def lodge_get(conn, url):
    conn.request("GET", url)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise SystemExit(f"lodge GET {url}: {r.status} {body[:200]!r}")
    return body


def main():
    sock, n, reps, lodge_prefix, lv_prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    lc = UnixHTTP(sock)
    vc = libvirt.open("qemu:///system")
    for i in range(1, reps + 1):
        name = (i * 7919) % n + 1  # spread over the whole set
        t = time.perf_counter(); lodge_get(lc, f"/v1/vms/{lodge_prefix}{name}"); a = time.perf_counter() - t
        t = time.perf_counter(); vc.lookupByName(f"{lv_prefix}{name}").info(); b = time.perf_counter() - t
        print(f"api_get\t{n}\t{i}\t{a:.6f}\t{b:.6f}")
        t = time.perf_counter(); lodge_get(lc, "/v1/vms"); a = time.perf_counter() - t
        t = time.perf_counter(); doms = vc.listAllDomains(); [d.info() for d in doms]; b = time.perf_counter() - t
        print(f"api_list\t{n}\t{i}\t{a:.6f}\t{b:.6f}")


main()
