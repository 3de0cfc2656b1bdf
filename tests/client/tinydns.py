"""A tiny authoritative DNS responder on 127.0.0.1 for tests: A and AAAA answers for the names it
is given (anything else: NXDOMAIN), over UDP. gRPC's c-ares resolver asks it when a target names
it as authority: ``dns://127.0.0.1:<port>/name:port``."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

_A, _AAAA = 1, 28


class TinyDns:
    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = {name.lower(): addrs for name, addrs in records.items()}
        self.queries: list[tuple[str, int]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                query, peer = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            self._sock.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        (qid,) = struct.unpack(">H", query[:2])
        at, labels = 12, []
        while query[at]:
            labels.append(query[at + 1 : at + 1 + query[at]].decode())
            at += 1 + query[at]
        (qtype,) = struct.unpack(">H", query[at + 1 : at + 3])
        name = ".".join(labels).lower()
        self.queries.append((name, qtype))
        answers = []
        for addr in self.records.get(name, []):
            ip = ipaddress.ip_address(addr)
            if (qtype, ip.version) in ((_A, 4), (_AAAA, 6)):
                # name as a pointer to the question, type, class IN, TTL 5 s, the address
                answers.append(b"\xc0\x0c" + struct.pack(">HHIH", qtype, 1, 5, len(ip.packed)))
                answers.append(ip.packed)
        rcode = 0 if name in self.records else 3
        count = len(answers) // 2
        header = struct.pack(">HHHHHH", qid, 0x8180 | rcode, 1, count, 0, 0)
        return header + query[12 : at + 5] + b"".join(answers)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(2)
        self._sock.close()
