"""The OpenBao baseline: ``bao server -dev -dev-tls`` on 127.0.0.1, transit, policy-scoped tokens.

Set-up uses the root token (mount transit, create key ``recordings``, encrypt 200 keys for the
batch rewrap bodies and rotate the key, write a policy that grants only ``update`` on
``transit/decrypt/recordings``, ``transit/datakey/plaintext/recordings`` and
``transit/rewrap/recordings``, create the tokens); load uses only the scoped tokens:

* typical: created with the policy; OpenBao attaches its built-in ``default`` policy as it does to
  every token unless told otherwise;
* lean: the same with ``no_default_policy=true`` (``default`` alone makes decrypt ~2.3x slower:
  the typical and lean rows of docs/PERFORMANCE.md).

Requests carry the same additional data the broker authenticates (the wrapped key's header), as
``associated_data``. Load comes from wrk (bench/wrk_post.lua), one request in flight per
connection, the server's CPU read from /proc like the broker's.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs
from report import Measurement

KEY = "recordings"
POLICY = "keybroker-bench"
POLICY_HCL = f"""
path "transit/decrypt/{KEY}" {{
  capabilities = ["update"]
}}
path "transit/datakey/plaintext/{KEY}" {{
  capabilities = ["update"]
}}
path "transit/rewrap/{KEY}" {{
  capabilities = ["update"]
}}
"""
DECRYPT = f"/v1/transit/decrypt/{KEY}"
DATAKEY = f"/v1/transit/datakey/plaintext/{KEY}"
REWRAP = f"/v1/transit/rewrap/{KEY}"
#: Batch sizes of the prepared rewrap bodies (``bodies`` keys ``rewrap-<n>``). OpenBao refuses
#: JSON with more than about a thousand strings ("high complexity"): 200 items with associated
#: data would be near its ceiling.
REWRAP_BATCHES = (100, 200)


class BaoError(RuntimeError):
    pass


@dataclass(frozen=True)
class OpenBao:
    child: procs.Child
    url: str
    tokens: Mapping[str, str]
    """``typical`` and ``lean`` policy-scoped tokens."""
    bodies: Mapping[str, Path]
    """JSON request bodies by endpoint path."""


class _Api:
    def __init__(self, url: str, ca_file: Path) -> None:
        self.url = url
        context = ssl.create_default_context(cafile=str(ca_file))
        # No proxies from the environment: the server is on loopback.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

    def call(
        self, method: str, path: str, token: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - https on loopback, built here
            self.url + path,
            data=data,
            method=method,
            headers={"X-Vault-Token": token, "Content-Type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise BaoError(f"{method} {path}: HTTP {exc.code} {exc.read()[:300]!r}") from None
        return json.loads(raw) if raw else {}


@contextmanager
def running_openbao(bao: Path, work: Path, aad: bytes, *, audit: bool = False) -> Iterator[OpenBao]:
    """A dev server; with ``audit``, a file audit device writes every request and response
    (declared in a config file: OpenBao refuses to enable audit devices through its API)."""
    name = "openbao-audit" if audit else "openbao"
    state = work / f"{name}-state"
    if state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True)
    port = procs.free_port()
    root = secrets.token_urlsafe(24)
    environ = {
        **os.environ,
        "HOME": str(state),
        "BAO_DEV_ROOT_TOKEN_ID": root,
        "BAO_LOG_LEVEL": "warn",
    }
    argv = [
        str(bao), "server", "-dev", "-dev-tls",
        f"-dev-tls-cert-dir={state}",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-dev-no-store-token",
    ]  # fmt: skip
    if audit:
        config = state / "audit.hcl"
        log_file = json.dumps(str(state / "audit.log"))
        config.write_text(
            f'audit "file" "file" {{\n  options = {{\n    file_path = {log_file}\n  }}\n}}\n'
        )
        argv.append(f"-config={config}")
    with procs.Child(argv, log=work / f"{name}.log", env=environ) as child:
        url = f"https://127.0.0.1:{port}"
        api = _wait_ready(child, url, state / "vault-ca.pem")
        devices = api.call("GET", "/v1/sys/audit", root).get("data", {})
        if bool(devices) != audit:
            raise SystemExit(
                f"bench: OpenBao audit devices {sorted(devices)}, wanted audit={audit}"
            )
        tokens, bodies = _set_up(api, root, aad, state)
        yield OpenBao(child, url, tokens, bodies)


def _wait_ready(child: procs.Child, url: str, ca_file: Path, timeout: float = 60.0) -> _Api:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise SystemExit(f"bench: OpenBao exited early:\n{child.output()}")
        if ca_file.exists():
            api = _Api(url, ca_file)
            try:
                health = api.call("GET", "/v1/sys/health", "")
            except (OSError, BaoError):
                pass
            else:
                if health.get("initialized") and not health.get("sealed"):
                    return api
        time.sleep(0.2)
    raise SystemExit(f"bench: OpenBao did not start in {timeout:.0f}s:\n{child.output()}")


def _set_up(
    api: _Api, root: str, aad: bytes, state: Path
) -> tuple[dict[str, str], dict[str, Path]]:
    api.call("POST", "/v1/sys/mounts/transit", root, {"type": "transit"})
    api.call("POST", f"/v1/transit/keys/{KEY}", root, {"type": "aes256-gcm96"})
    api.call("PUT", f"/v1/sys/policies/acl/{POLICY}", root, {"policy": POLICY_HCL})
    tokens: dict[str, str] = {}
    for kind, lean in (("typical", False), ("lean", True)):
        created = api.call(
            "POST",
            "/v1/auth/token/create",
            root,
            {"policies": [POLICY], "no_default_policy": lean, "ttl": "4h"},
        )
        tokens[kind] = created["auth"]["client_token"]
        policies = sorted(created["auth"]["policies"])
        expected = [POLICY] if lean else sorted([POLICY, "default"])
        if policies != expected:
            raise SystemExit(f"bench: OpenBao {kind} token has policies {policies}")

    ad = base64.b64encode(aad).decode()
    data_key = secrets.token_bytes(32)
    encrypted = api.call(
        "POST",
        f"/v1/transit/encrypt/{KEY}",
        root,
        {"plaintext": base64.b64encode(data_key).decode(), "associated_data": ad},
    )
    bodies: dict[str, Any] = {
        DECRYPT: {"ciphertext": encrypted["data"]["ciphertext"], "associated_data": ad},
        DATAKEY: {"bits": 256, "associated_data": ad},
    }
    # Batch rewrap: distinct ciphertexts under version 1, then a rotation, so every rewrap moves
    # a key from v1 to v2 (what RewrapDataKeys does after a rotation). Without associated data:
    # transit rewrap does not take it (it fails authentication), which only makes its job easier.
    batch: list[dict[str, Any]] = []
    while len(batch) < max(REWRAP_BATCHES):
        batch += api.call(
            "POST",
            f"/v1/transit/encrypt/{KEY}",
            root,
            {
                "batch_input": [
                    {"plaintext": base64.b64encode(secrets.token_bytes(32)).decode()}
                    for _ in range(100)
                ]
            },
        )["data"]["batch_results"]
    api.call("POST", f"/v1/transit/keys/{KEY}/rotate", root)
    for size in REWRAP_BATCHES:
        bodies[f"rewrap-{size}"] = {
            "batch_input": [{"ciphertext": item["ciphertext"]} for item in batch[:size]]
        }
    files: dict[str, Path] = {}
    for path, body in bodies.items():
        name = path if path.startswith("rewrap-") else path.rsplit("/", 2)[-2]
        files[path] = state / f"{name}.json"
        files[path].write_text(json.dumps(body))

    # The scoped tokens do what the load does, and nothing else.
    for token in tokens.values():
        plain = api.call("POST", DECRYPT, token, bodies[DECRYPT])["data"]["plaintext"]
        if base64.b64decode(plain) != data_key:
            raise SystemExit("bench: OpenBao decrypt returned a wrong key")
        made = api.call("POST", DATAKEY, token, bodies[DATAKEY])["data"]
        if len(base64.b64decode(made["plaintext"])) != 32:
            raise SystemExit("bench: OpenBao datakey returned a wrong-sized key")
        moved = api.call("POST", REWRAP, token, bodies["rewrap-100"])["data"]["batch_results"]
        if len(moved) != 100 or not all(
            str(r.get("ciphertext", "")).startswith("vault:v2:") for r in moved
        ):
            raise SystemExit(f"bench: OpenBao batch rewrap did not move 100 keys to v2: {moved[0]}")
        try:
            api.call("POST", f"/v1/transit/encrypt/{KEY}", token, {"plaintext": ""})
        except BaoError as exc:
            if "403" not in str(exc):
                raise
        else:
            raise SystemExit("bench: the OpenBao policy token may encrypt: not scoped")
    return tokens, files


def run_wrk(
    bao: OpenBao,
    path: str,
    kind: str,
    *,
    connections: int,
    threads: int,
    warmup: float,
    duration: float,
    log: Path,
    body: str | None = None,
) -> Measurement:
    """A warm-up wrk run, then the measured one with server CPU sampled around it. ``body``
    names a prepared body other than ``path``'s (e.g. ``rewrap-100``)."""
    env = {
        **os.environ,
        "BENCH_BODY_FILE": str(bao.bodies[body or path]),
        "BENCH_TOKEN": bao.tokens[kind],
    }
    script = Path(__file__).with_name("wrk_post.lua")
    threads = max(1, min(threads, connections))

    def wrk(seconds: float) -> tuple[dict[str, Any], float]:
        argv = [
            "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", str(script), bao.url + path,
        ]  # fmt: skip
        with log.open("ab") as err:
            proc = subprocess.run(
                argv, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                timeout=seconds + 60, check=False,
            )  # fmt: skip
            client = _children_cpu()
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line.removeprefix("RESULT ")), client
        raise SystemExit(f"bench: wrk failed (exit {proc.returncode}):\n{proc.stdout}")

    if warmup > 0:
        wrk(warmup)
    client0 = _children_cpu()
    before = procs.snapshot([bao.child.pid])
    result, client1 = wrk(duration)
    after = procs.snapshot([bao.child.pid])
    cpu = procs.delta(before, after)
    ok = int(result["requests"]) - int(result["errors"])
    seconds = float(result["seconds"])
    return Measurement(
        ok=ok,
        errors=int(result["errors"]),
        seconds=seconds,
        rate=ok / seconds,
        p50_ms=float(result["p50_us"]) / 1000,
        p99_ms=float(result["p99_us"]) / 1000,
        server_cpu_us=cpu.seconds * 1e6 / ok if ok else None,
        server_cores=cpu.cores,
        client_cpu_us=(client1 - client0) * 1e6 / max(1, int(result["requests"])),
        all_in_cpu_us=cpu.all_in_us(client1 - client0, ok),
        machine_busy=cpu.machine_busy_fraction,
    )


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for children (wrk runs are the only ones meanwhile)."""
    times = os.times()
    return times.children_user + times.children_system
