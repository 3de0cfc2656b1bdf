"""Recording format v1 benchmark: flat memory on a 2 GiB round trip, throughput against raw AES-GCM.

    .venv/bin/python bench/recording.py [--size-gib 2] [--mode auto|files|stream]
                                        [--roundtrip-runs 3] [--repeats 3]
                                        [--throughput-mib 256] [--min-seconds 0.5]
                                        [--segments-kib 64,256,1024] [--wait-quiet 0]

(a) Round trip. A child process encrypts a --size-gib plaintext with
    keybroker.client.recording.encrypt_stream under a random data key (default 256 KiB segments),
    then decrypts the result with decrypt_stream; --roundtrip-runs children in turn (medians).
    Mode "files": plaintext, ciphertext and decrypted output are real files in a temporary
    directory (the plaintext is written, and hashed, by this process once; each decrypted file
    is hashed after its child ends). Mode "stream": no disk; the child encrypts a generated
    stream into a pipe from one thread and decrypts the other end into a hashing sink. "auto"
    uses files when the disk has room for three copies. The child's peak RSS is reported twice:
    getrusage(RUSAGE_CHILDREN) ru_maxrss here and VmHWM from the child's /proc/self/status,
    next to its VmHWM before the work started. Target: under 100 MiB. Every round trip is
    checked by SHA-256 and by the file size the format predicts.
(b) Throughput, in memory, in this process: our encrypt_stream / decrypt_stream against raw
    cryptography AESGCM encrypt / decrypt (and encrypt_into / decrypt_into) of the same data in
    segments of the same size, round-robin within each repeat so that load hits every variant
    alike; each measurement makes whole passes over --throughput-mib until --min-seconds have
    gone by; medians over --repeats, ratios taken within a repeat. Ours reads its input through
    a file-like object (one copy into its segment buffer, as a stream must); raw encrypts
    slices of the buffer in place.

Prints a markdown table and writes it to bench/results/recording.md. The machine's load (uptime
and CPU busy outside this benchmark) is sampled before and after each part.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import cryptography
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.client.recording import (
    DEFAULT_SEGMENT_SIZE,
    TAG_SIZE,
    decrypt_stream,
    encrypt_stream,
    new_header,
)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MIB = 1024 * 1024
GIB = 1024 * MIB
BLOCK = MIB  # generated plaintext comes in blocks of 1 MiB
RSS_TARGET_MIB = 100


# -- machine load --------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user..steal (guest time is already in user)
    return total - idle, total


def busy_cores(seconds: float = 1.0) -> float:
    """How many CPUs were busy during a short sample (this process sleeps meanwhile)."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def uptime() -> str:
    try:
        done = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        one, five, fifteen = os.getloadavg()
        return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def load_note(label: str) -> str:
    note = f"{label}: `{uptime()}`; CPUs busy outside this benchmark: {busy_cores():.2f}"
    print(note, flush=True)
    return note


def wait_for_quiet(max_seconds: float, threshold: float = 0.3) -> str:
    """Wait (at most ``max_seconds``) until other processes keep less than ``threshold`` CPUs
    busy; say how it went."""
    if max_seconds <= 0:
        return "did not wait for a quiet moment (--wait-quiet 0)"
    start = time.monotonic()
    while True:
        busy = busy_cores(2.0)
        waited = time.monotonic() - start
        if busy < threshold:
            return f"waited {waited:.0f} s for a quiet moment (other CPU use {busy:.2f})"
        if waited >= max_seconds:
            return f"no quiet moment within {max_seconds:.0f} s (other CPU use {busy:.2f})"


# -- (a) the round trip, in a child process ------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _block_source() -> Callable[[int], bytes]:
    """Block ``i`` of the generated plaintext: 1 MiB of random bytes with ``i`` in front, so no
    two blocks are alike (a reordering bug would change the hash)."""
    base = os.urandom(BLOCK)

    def block(i: int) -> bytes:
        return struct.pack(">Q", i) + base[8:]

    return block


class _PatternReader(io.RawIOBase):
    """A readable stream of ``size`` generated bytes, hashed as they are handed out."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = _block_source()
        self.index = 0
        self.pending = memoryview(b"")
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.pending and self.left:
            self.pending = memoryview(self.block(self.index)[: self.left])
            self.index += 1
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self.pending))
        view[:n] = self.pending[:n]
        self.sha.update(self.pending[:n])
        self.pending = self.pending[n:]
        self.left -= n
        return n


class _HashingSink(io.RawIOBase):
    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        n = len(memoryview(b))
        self.size += n
        return n


def child_roundtrip(params: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child: encrypt, then decrypt; report times and memory."""
    segment_size = int(params["segment_size"])
    data_key = os.urandom(32)
    header = new_header("bench-recording", os.urandom(150), segment_size)
    hwm_before = _status_kib("VmHWM")
    rss_before = _status_kib("VmRSS")
    out: dict[str, Any] = {"hwm_before_kib": hwm_before, "rss_before_kib": rss_before}
    cpu0 = time.process_time()
    if params["mode"] == "files":
        plain, enc, dec = Path(params["plain"]), Path(params["enc"]), Path(params["dec"])
        t0 = time.perf_counter()
        with plain.open("rb") as src, enc.open("wb") as dst:
            out["encrypted_plaintext"] = encrypt_stream(src, dst, header, data_key)
        t1 = time.perf_counter()
        with enc.open("rb") as enc_src, dec.open("wb") as dec_dst:
            out["decrypted_plaintext"] = decrypt_stream(enc_src, dec_dst, lambda _h: data_key)
        t2 = time.perf_counter()
        out.update(encrypt_seconds=t1 - t0, decrypt_seconds=t2 - t1)
        out["encrypted_size"] = enc.stat().st_size
    else:
        size = int(params["size"])
        reader = _PatternReader(size)
        sink = _HashingSink()
        r, w = os.pipe()
        counted = {"encrypted_size": 0}
        errors: list[BaseException] = []

        class _CountingPipe(io.FileIO):
            def write(self, b: Any) -> int:
                n = super().write(b)
                counted["encrypted_size"] += n or 0
                return n or 0

        def produce() -> None:
            try:
                with _CountingPipe(w, "wb") as raw, io.BufferedWriter(raw, MIB) as dst:
                    out["encrypted_plaintext"] = encrypt_stream(
                        cast(BinaryIO, reader), cast(BinaryIO, dst), header, data_key
                    )
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        t0 = time.perf_counter()
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        with open(r, "rb", buffering=MIB) as pipe_src:
            out["decrypted_plaintext"] = decrypt_stream(
                pipe_src, cast(BinaryIO, sink), lambda _h: data_key
            )
        thread.join()
        if errors:
            raise errors[0]
        out["roundtrip_seconds"] = time.perf_counter() - t0
        out["encrypted_size"] = counted["encrypted_size"]
        out["plain_sha256"] = reader.sha.hexdigest()
        out["decrypted_sha256"] = sink.sha.hexdigest()
    out["header_size"] = len(header.encode())
    out["cpu_seconds"] = time.process_time() - cpu0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["user_seconds"], out["sys_seconds"] = usage.ru_utime, usage.ru_stime
    out["hwm_after_kib"] = _status_kib("VmHWM")
    return out


@dataclass
class Roundtrip:
    mode: str
    size: int
    segment_size: int
    children: list[dict[str, Any]]
    """One report per run, from the child."""
    walls: list[float]
    maxrss_children_kib: int
    verified: bool
    parent_hwm_kib: int
    """This process's VmHWM after the children (see the ru_maxrss note)."""


def _write_plaintext(path: Path, size: int) -> tuple[str, float]:
    block = _block_source()
    sha = hashlib.sha256()
    t0 = time.perf_counter()
    with path.open("wb") as fh:
        left, i = size, 0
        while left:
            chunk = block(i)[:left]
            fh.write(chunk)
            sha.update(chunk)
            left -= len(chunk)
            i += 1
    return sha.hexdigest(), time.perf_counter() - t0


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * MIB):
            sha.update(chunk)
    return sha.hexdigest()


def run_roundtrip(
    size: int, segment_size: int, mode: str, workdir: Path | None, runs: int
) -> Roundtrip:
    """(a): ``runs`` round trips, each in a new child process."""
    params: dict[str, Any] = {"mode": mode, "size": size, "segment_size": segment_size}
    expected_sha = ""
    tmp = (
        Path(tempfile.mkdtemp(prefix="kb-recording-bench-", dir=workdir))
        if mode == "files"
        else None
    )
    children: list[dict[str, Any]] = []
    walls: list[float] = []
    verified = True
    segments = max(1, -(-size // segment_size))
    try:
        if tmp is not None:
            params.update(
                plain=str(tmp / "plain.bin"), enc=str(tmp / "enc.kbrec"), dec=str(tmp / "dec.bin")
            )
            print(f"  writing a {size / GIB:.2f} GiB plaintext file in {tmp} ...", flush=True)
            expected_sha, _ = _write_plaintext(Path(params["plain"]), size)
        for run in range(runs):
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(params)],
                capture_output=True,
                text=True,
                timeout=3600,
                check=False,
            )
            walls.append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise SystemExit(f"round-trip child failed:\n{done.stderr}")
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            child: dict[str, Any] = json.loads(line[len("RESULT ") :])
            children.append(child)
            if tmp is not None:
                got_sha = _sha256_file(Path(params["dec"]))
            else:
                expected_sha, got_sha = child["plain_sha256"], child["decrypted_sha256"]
            ok = (
                got_sha == expected_sha
                and child["encrypted_plaintext"] == size
                and child["decrypted_plaintext"] == size
                and child["encrypted_size"] == child["header_size"] + size + segments * TAG_SIZE
            )
            verified = verified and ok
            print(
                f"  run {run + 1}/{runs}: VmHWM {child['hwm_after_kib'] / 1024:.1f} MiB, "
                f"verified {'yes' if ok else 'NO'}",
                flush=True,
            )
        # A running maximum over every child waited for (the few `uptime`s are tiny).
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        parent_hwm = _status_kib("VmHWM")  # the most any pre-exec copy of this process held
        return Roundtrip(mode, size, segment_size, children, walls, maxrss, verified, parent_hwm)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# -- (b) throughput, in memory -------------------------------------------------------------


class _NullSink(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(memoryview(b))


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


@dataclass
class Workload:
    data: bytes
    segment_size: int
    key: bytes
    ours_file: bytes
    raw_segments: list[bytes]
    raw_joined: bytes
    prefix: bytes


def prepare(data: bytes, segment_size: int) -> Workload:
    key = os.urandom(32)
    header = new_header("bench-throughput", os.urandom(150), segment_size)
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, header, key)
    prefix = os.urandom(7)
    aead = AESGCM(key)
    view = memoryview(data)
    count = -(-len(data) // segment_size)
    raw = [
        aead.encrypt(
            _nonce(prefix, i, i == count - 1),
            view[i * segment_size : (i + 1) * segment_size],
            None,
        )
        for i in range(count)
    ]
    # The variants must agree before they are timed.
    back = io.BytesIO()
    decrypt_stream(io.BytesIO(out.getvalue()), back, lambda _h: key)
    nonces = [_nonce(prefix, i, i == count - 1) for i in range(count)]
    if back.getvalue() != data or b"".join(map(aead.decrypt, nonces, raw, [None] * count)) != data:
        raise SystemExit("throughput set-up: a variant does not round-trip")
    return Workload(data, segment_size, key, out.getvalue(), raw, b"".join(raw), prefix)


def ours_encrypt(w: Workload) -> None:
    header = new_header("bench-throughput", b"w" * 150, w.segment_size)
    encrypt_stream(io.BytesIO(w.data), cast(BinaryIO, _NullSink()), header, w.key)


def ours_decrypt(w: Workload) -> None:
    decrypt_stream(io.BytesIO(w.ours_file), cast(BinaryIO, _NullSink()), lambda _h: w.key)


def raw_encrypt(w: Workload) -> None:
    aead, view, s = AESGCM(w.key), memoryview(w.data), w.segment_size
    count = -(-len(w.data) // s)
    for i in range(count):
        aead.encrypt(_nonce(w.prefix, i, i == count - 1), view[i * s : (i + 1) * s], None)


def raw_encrypt_into(w: Workload) -> None:
    aead, view, s = AESGCM(w.key), memoryview(w.data), w.segment_size
    buf = memoryview(bytearray(s + TAG_SIZE))
    count = -(-len(w.data) // s)
    for i in range(count):
        chunk = view[i * s : (i + 1) * s]
        aead.encrypt_into(
            _nonce(w.prefix, i, i == count - 1), chunk, None, buf[: len(chunk) + TAG_SIZE]
        )


def raw_decrypt(w: Workload) -> None:
    aead = AESGCM(w.key)
    count = len(w.raw_segments)
    for i, seg in enumerate(w.raw_segments):
        aead.decrypt(_nonce(w.prefix, i, i == count - 1), seg, None)


def raw_decrypt_into(w: Workload) -> None:
    aead = AESGCM(w.key)
    buf = memoryview(bytearray(w.segment_size))
    count = len(w.raw_segments)
    for i, seg in enumerate(w.raw_segments):
        aead.decrypt_into(
            _nonce(w.prefix, i, i == count - 1), seg, None, buf[: len(seg) - TAG_SIZE]
        )


def raw_encrypt_stream(w: Workload) -> None:
    """The least a streaming encryptor must do: read each segment from the same kind of source
    into one buffer, encrypt_into another (no look-ahead, no header, no sink)."""
    aead, s, src = AESGCM(w.key), w.segment_size, io.BytesIO(w.data)
    buf, out = memoryview(bytearray(s)), memoryview(bytearray(s + TAG_SIZE))
    count = -(-len(w.data) // s)
    for i in range(count):
        n = src.readinto(buf)
        aead.encrypt_into(_nonce(w.prefix, i, i == count - 1), buf[:n], None, out[: n + TAG_SIZE])


def raw_decrypt_stream(w: Workload) -> None:
    aead, s, src = AESGCM(w.key), w.segment_size, io.BytesIO(w.raw_joined)
    buf, out = memoryview(bytearray(s + TAG_SIZE)), memoryview(bytearray(s))
    count = len(w.raw_segments)
    for i in range(count):
        n = src.readinto(buf)
        aead.decrypt_into(_nonce(w.prefix, i, i == count - 1), buf[:n], None, out[: n - TAG_SIZE])


VARIANTS: dict[str, Callable[[Workload], None]] = {
    "ours_enc": ours_encrypt,
    "raw_enc_stream": raw_encrypt_stream,
    "raw_enc": raw_encrypt,
    "raw_enc_into": raw_encrypt_into,
    "ours_dec": ours_decrypt,
    "raw_dec_stream": raw_decrypt_stream,
    "raw_dec": raw_decrypt,
    "raw_dec_into": raw_decrypt_into,
}


def run_throughput(
    size: int, segment_sizes: list[int], repeats: int, min_seconds: float
) -> tuple[dict[int, dict[str, list[float]]], list[float]]:
    """(b): MB/s per segment size and variant, one list entry per repeat; and the CPU share
    (process CPU time / wall time) of each measurement."""
    data = os.urandom(size)
    loads = {s: prepare(data, s) for s in segment_sizes}
    for s in segment_sizes:  # warm-up
        for fn in VARIANTS.values():
            fn(loads[s])
    rates: dict[int, dict[str, list[float]]] = {s: {k: [] for k in VARIANTS} for s in segment_sizes}
    shares: list[float] = []
    for r in range(repeats):
        for s in segment_sizes:
            for name, fn in VARIANTS.items():
                passes = 0
                c0, t0 = time.process_time(), time.perf_counter()
                while True:  # whole passes over the data until min_seconds have gone by
                    fn(loads[s])
                    passes += 1
                    wall = time.perf_counter() - t0
                    if wall >= min_seconds:
                        break
                shares.append((time.process_time() - c0) / wall)
                rates[s][name].append(size * passes / 1e6 / wall)
        print(f"  repeat {r + 1}/{repeats} done", flush=True)
    return rates, shares


# -- report ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _has_aes_ni() -> bool:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return " aes " in f" {line.split(':', 1)[1]} "
    return False


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / MIB
    return 0.0


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def _ratio(num: list[float], den: list[float]) -> str:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return f"{statistics.median(ratios):.2f}\N{MULTIPLICATION SIGN}"


def render(
    *,
    args: argparse.Namespace,
    command: str,
    rt: Roundtrip | None,
    rates: dict[int, dict[str, list[float]]] | None,
    shares: list[float],
    notes: list[str],
) -> str:
    lines = [
        f"# Recording format v1 benchmark — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {os.cpu_count()} CPUs ({_cpu_model()}, AES-NI "
        f"{'yes' if _has_aes_ni() else 'no'}), {_mem_total_gib():.1f} GiB RAM, "
        f"Linux {platform.release()}.",
        f"Software: Python {platform.python_version()}, cryptography {cryptography.__version__} "
        f"({openssl_backend.openssl_version_text()}).",
        f"Command: `{command}`",
        "",
        "Load:",
        "",
        *[f"* {n}" for n in notes],
        "",
    ]
    if rt is not None:
        kids = rt.children
        hwm_after = [c["hwm_after_kib"] / 1024 for c in kids]
        hwm_before = [c["hwm_before_kib"] / 1024 for c in kids]
        growth = [after - before for after, before in zip(hwm_after, hwm_before, strict=True)]

        def per_run(values: list[float], unit: str, digits: int = 1) -> str:
            listed = " / ".join(f"{v:,.{digits}f}" for v in values)
            if len(values) == 1:
                return f"{listed} {unit}"
            return f"median {statistics.median(values):,.{digits}f} {unit} (runs: {listed})"

        if rt.mode == "files":
            source = (
                "real files on disk: a generated plaintext file (written once), the encrypted "
                "file and the decrypted file, in a temporary directory on the root filesystem; "
                "the page cache is not dropped, so reads mostly hit memory"
            )
            speed_rows = [
                "| encrypt, file to file | "
                + per_run([rt.size / 1e6 / c["encrypt_seconds"] for c in kids], "MB/s", 0)
                + " |",
                "| decrypt, file to file | "
                + per_run([rt.size / 1e6 / c["decrypt_seconds"] for c in kids], "MB/s", 0)
                + " |",
            ]
        else:
            source = (
                "a generated stream (no disk): encrypt in one thread into a pipe, decrypt the "
                "other end into a SHA-256 sink"
            )
            speed_rows = [
                "| round trip (both directions at once) | "
                + per_run([rt.size / 1e6 / c["roundtrip_seconds"] for c in kids], "MB/s", 0)
                + " |"
            ]
        peak = max(hwm_after)
        lines += [
            f"## (a) Round trip of {rt.size / GIB:g} GiB in a child process, {len(kids)} run(s)",
            "",
            f"Source and sink: {source}. Segment size {rt.segment_size // 1024} KiB, a random "
            "data key, `encrypt_stream` then `decrypt_stream`, a new child process per run.",
            "",
            "| measure | value |",
            "|---|--:|",
            f"| **peak RSS, child VmHWM at the end** | {per_run(hwm_after, 'MiB')} |",
            f"| peak RSS, getrusage(RUSAGE_CHILDREN).ru_maxrss (max over runs) | "
            f"{rt.maxrss_children_kib / 1024:.1f} MiB (an upper bound: Linux also counts the "
            f"pre-exec copy of this process, VmHWM {rt.parent_hwm_kib / 1024:.1f} MiB) |",
            f"| child VmHWM before the work (interpreter + imports) | "
            f"{per_run(hwm_before, 'MiB')} |",
            f"| growth during the round trip | {per_run(growth, 'MiB')} |",
            f"| target | < {RSS_TARGET_MIB} MiB: {'met' if peak < RSS_TARGET_MIB else 'NOT met'} |",
            f"| SHA-256 of decrypted == plaintext, sizes as the format says | "
            f"{'yes, every run' if rt.verified else 'NO'} |",
            *speed_rows,
            "| child CPU, user + sys, of wall | "
            + per_run(
                [
                    (c["user_seconds"] + c["sys_seconds"]) / w * 100
                    for c, w in zip(kids, rt.walls, strict=True)
                ],
                "%",
                0,
            )
            + " |",
            "| child sys share of CPU (kernel: page cache, copies) | "
            + per_run(
                [c["sys_seconds"] / (c["user_seconds"] + c["sys_seconds"]) * 100 for c in kids],
                "%",
                0,
            )
            + " |",
            "",
        ]
    if rates is not None:
        lines += [
            f"## (b) Throughput, in memory: whole passes over {args.throughput_mib} MiB until "
            f"{args.min_seconds:g} s have passed, per measurement",
            "",
            "MB/s = 10^6 plaintext bytes per second, median of "
            f"{args.repeats} repeats; ratios are taken within a repeat, then the median. "
            "*ours* = `encrypt_stream` / `decrypt_stream` from a BytesIO source to a discarding "
            "sink. *raw, streamed* = the least a stream must do: `readinto` one buffer from the "
            "same kind of source, then `encrypt_into` / `decrypt_into` another (no look-ahead, "
            "header, key derivation or sink). *raw AESGCM* = `AESGCM.encrypt` / `decrypt` of "
            "each segment's slice of the in-memory data (allocates each output); *raw into* = "
            "`encrypt_into` / `decrypt_into` of the slices into one reused buffer (the ceiling). "
            "Every raw variant uses the same segment size and STREAM nonces.",
            "",
            "| segment | operation | ours | raw, streamed | raw AESGCM | raw into "
            "| ours ÷ raw AESGCM | ours ÷ raw, streamed |",
            "|--:|---|--:|--:|--:|--:|--:|--:|",
        ]
        for s, r in rates.items():
            med = {k: statistics.median(v) for k, v in r.items()}
            for op, k in (("encrypt", "enc"), ("decrypt", "dec")):
                lines.append(
                    f"| {s // 1024} KiB | {op} | {_fmt(med[f'ours_{k}'])} "
                    f"| {_fmt(med[f'raw_{k}_stream'])} | {_fmt(med[f'raw_{k}'])} "
                    f"| {_fmt(med[f'raw_{k}_into'])} "
                    f"| {_ratio(r[f'ours_{k}'], r[f'raw_{k}'])} "
                    f"| {_ratio(r[f'ours_{k}'], r[f'raw_{k}_stream'])} |"
                )
        lines += [
            "",
            f"CPU share of this process during the measurements (CPU time ÷ wall time): min "
            f"{min(shares):.2f}, median {statistics.median(shares):.2f} (1.00 = a whole core; "
            "less means other processes took it).",
            "",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size-gib", type=float, default=2.0, help="round-trip size (2)")
    p.add_argument("--mode", choices=["auto", "files", "stream"], default="auto")
    p.add_argument("--workdir", type=Path, help="where the files go (default: the temp dir)")
    p.add_argument(
        "--segment-kib", type=int, default=DEFAULT_SEGMENT_SIZE // 1024, help="round trip (256)"
    )
    p.add_argument("--roundtrip-runs", type=int, default=3, help="round trips, medians (3)")
    p.add_argument("--repeats", type=int, default=3, help="throughput repeats (3)")
    p.add_argument("--throughput-mib", type=int, default=256, help="data per measurement (256)")
    p.add_argument(
        "--min-seconds", type=float, default=0.5, help="time per throughput measurement (0.5)"
    )
    p.add_argument("--segments-kib", default="64,256,1024", help="throughput segment sizes")
    p.add_argument("--skip-roundtrip", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="wait up to this many seconds for other CPU use to drop below 0.3 cores (0)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.size_gib <= 64 or not 1 <= args.repeats <= 20:
        p.error("--size-gib must be in (0, 64] and --repeats 1..20")
    if not 1 <= args.roundtrip_runs <= 10:
        p.error("--roundtrip-runs must be 1..10")
    if not 1 <= args.throughput_mib <= 4096 or not 0 < args.min_seconds <= 60:
        p.error("--throughput-mib must be 1..4096 and --min-seconds in (0, 60]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child_roundtrip(json.loads(args.child))), flush=True)
        return 0
    command = " ".join([".venv/bin/python", "bench/recording.py", *sys.argv[1:]])
    notes = [wait_for_quiet(args.wait_quiet)]
    size = int(args.size_gib * GIB)
    rt: Roundtrip | None = None
    if not args.skip_roundtrip:
        mode = args.mode
        if mode == "auto":
            free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free
            mode = "files" if free >= 3 * size + GIB else "stream"
        notes.append(load_note("before (a)"))
        print(f"(a) round trip of {args.size_gib:g} GiB, mode {mode} ...", flush=True)
        rt = run_roundtrip(size, args.segment_kib * 1024, mode, args.workdir, args.roundtrip_runs)
        notes.append(load_note("after (a)"))
    rates: dict[int, dict[str, list[float]]] | None = None
    shares: list[float] = []
    if not args.skip_throughput:
        seg_sizes = [int(x) * 1024 for x in args.segments_kib.split(",") if x]
        notes.append(load_note("before (b)"))
        print(f"(b) throughput, {args.throughput_mib} MiB x {args.repeats} repeats ...", flush=True)
        rates, shares = run_throughput(
            args.throughput_mib * MIB, seg_sizes, args.repeats, args.min_seconds
        )
        notes.append(load_note("after (b)"))
    report = render(args=args, command=command, rt=rt, rates=rates, shares=shares, notes=notes)
    print()
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recording.md").write_text(report + "\n", encoding="utf-8")
    print(f"written to {RESULTS / 'recording.md'}")
    if rt is not None and not rt.verified:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
