"""What every client shares: construction (targets, TLS, token, retry and balancing service
config), the calls built from the service descriptors, and the two ways a call runs.

The blocking and asyncio clients differ only in :meth:`_Blocking._run` / :meth:`_Async._run`
and in how they close; every RPC is declared once (``keybroker.client._api``).

The mTLS files are watched (``keybroker.client._tls``): when they change, the next call opens a
new channel with them, and the previous channel is closed once its last running call is done.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import grpc
import grpc.aio
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from keybroker.client import _calls
from keybroker.client._calls import Op, Plan, Steps, TlsFiles, Work
from keybroker.client._tls import TlsWatch
from keybroker.client.retry import RetryPolicy
from keybroker.client.tokens import TokenProvider, as_provider

T = TypeVar("T")


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target for a target string or a list of ``address:port`` replicas.

    A string is used as is (``host:port``, ``dns:///name:port``, ``ipv4:a:p,b:p``). A list of
    IP-literal addresses becomes gRPC's static ``ipv4:``/``ipv6:`` target (all of one family);
    host names cannot be listed statically: give one ``dns:///`` name that resolves to them all.
    """
    if isinstance(target, str):
        return target
    items = list(target)
    if not items:
        raise ValueError("no target")
    if len(items) == 1:
        return items[0]
    families = set()
    for item in items:
        host, _, port = item.rpartition(":")
        try:
            version = ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).version
        except ValueError:
            raise ValueError(
                f"{item!r}: a list of targets must be IP:port addresses; for host names use one "
                "'dns:///name:port' that resolves to every replica"
            ) from None
        if not port.isdigit() or (version == 6) != host.startswith("["):
            raise ValueError(f"{item!r}: give IPv4 as a.b.c.d:port and IPv6 as [addr]:port")
        families.add(version)
    if len(families) != 1:
        raise ValueError("a list of targets must be all IPv4 or all IPv6")
    return f"ipv{families.pop()}:{','.join(items)}"


def service_config(services: list[str], retry: RetryPolicy, load_balancing: str) -> str:
    """gRPC service config: the balancing policy, and retry/wait-for-ready for ``services``."""
    return json.dumps(
        {
            "loadBalancingConfig": [{load_balancing: {}}],
            "methodConfig": [retry.method_config(services)],
        }
    )


def method_callables(
    channel: grpc.Channel | grpc.aio.Channel, service: ServiceDescriptor
) -> dict[str, Any]:
    """A unary-unary callable per method of ``service``, built from its descriptor.

    The SDK uses these instead of the generated ``*_pb2_grpc`` stubs, which refuse to import
    under a grpcio older than the grpcio-tools that generated them: so keybroker-client runs on
    a wide range of grpcio.
    """
    calls = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        calls[method.name] = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
    return calls


class _Connection:
    """One channel, its method callables, and the calls running on it."""

    __slots__ = ("active", "calls", "channel", "retired")

    def __init__(self, channel: Any, calls: dict[str, Any]) -> None:
        self.channel = channel
        self.calls = calls
        self.active = 0
        self.retired = False  # replaced: closed when ``active`` drops to 0


class ClientBase:
    """Construction, token, retry and balancing; subclasses set ``service`` and mix in a runner."""

    service: ClassVar[ServiceDescriptor]
    default_timeout: ClassVar[float] = 5.0
    default_retry: ClassVar[RetryPolicy] = RetryPolicy()

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        tls: TlsFiles,
        token: str | TokenProvider,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        load_balancing: str = "round_robin",
        server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        """``target``: one gRPC target or a list of replica addresses (:func:`channel_target`).
        ``timeout``: the deadline of each broker operation in seconds, retries included.
        ``retry``: :class:`RetryPolicy` (UNAVAILABLE only). ``load_balancing``: gRPC policy
        (``round_robin`` spreads calls over every address; ``pick_first`` uses one).
        ``server_name``: the name to check the broker's certificate against, when the target
        does not carry it (an IP list). ``options``: extra gRPC channel arguments."""
        self._retry = retry or self.default_retry
        self._timeout = self.default_timeout if timeout is None else timeout
        self._token = as_provider(token)
        config = service_config([self.service.full_name], self._retry, load_balancing)
        opts: list[tuple[str, Any]] = [
            ("grpc.service_config", config),
            ("grpc.service_config_disable_resolution", 1),  # DNS TXT never sets our policy
            ("grpc.enable_retries", 1),
        ]
        if server_name is None and not isinstance(target, str) and len(target) > 1:
            raise ValueError(
                "several target addresses: give server_name, the name every replica's "
                "certificate carries (it is checked for each connection)"
            )
        if server_name is not None:
            opts.append(("grpc.ssl_target_name_override", server_name))
        opts.extend(options)
        self._target = channel_target(target)
        self._options = opts
        self._tls = TlsWatch(tls)
        self._lock = threading.Lock()
        self._conn = self._connect(tls.credentials())

    def _connect(self, creds: grpc.ChannelCredentials) -> _Connection:
        channel = self._open(self._target, creds, self._options)
        return _Connection(channel, method_callables(channel, self.service))

    @property
    def _channel(self) -> Any:
        """The channel new calls use."""
        return self._conn.channel

    def _acquire(self) -> tuple[_Connection, _Connection | None]:
        """The connection for the next call (counted as running until :meth:`_release`), and
        the one it replaced if the TLS files changed just now and nothing runs on that one any
        more (the caller closes it)."""
        creds = self._tls.changed()
        idle = None
        with self._lock:
            if creds is not None:
                old, self._conn = self._conn, self._connect(creds)
                old.retired = True
                idle = old if old.active == 0 else None
            conn = self._conn
            conn.active += 1
        return conn, idle

    def _release(self, conn: _Connection) -> bool:
        """One call on ``conn`` is done; True if ``conn`` was replaced and is now idle."""
        with self._lock:
            conn.active -= 1
            return conn.retired and conn.active == 0

    @classmethod
    def from_files(
        cls,
        target: str | Sequence[str],
        *,
        ca_file: str | Path,
        cert_file: str | Path,
        key_file: str | Path,
        token: str | TokenProvider,
        **kwargs: Any,
    ) -> Self:
        """The client with mTLS material from PEM files."""
        tls = TlsFiles(Path(ca_file), Path(cert_file), Path(key_file))
        return cls(target, tls=tls, token=token, **kwargs)

    def _open(
        self, target: str, creds: grpc.ChannelCredentials, options: list[tuple[str, Any]]
    ) -> Any:
        raise NotImplementedError

    def _invoke(self, conn: _Connection, op: Op[Any]) -> Any:
        """Start ``op`` on ``conn``: its response (blocking) or an awaitable (asyncio)."""
        return conn.calls[op.method](
            op.request, metadata=_calls.metadata(self._token()), timeout=self._timeout
        )


class _Blocking(ClientBase):
    """Runs calls on a blocking channel; local work inline."""

    def _open(
        self, target: str, creds: grpc.ChannelCredentials, options: list[tuple[str, Any]]
    ) -> grpc.Channel:
        return grpc.secure_channel(target, creds, options=options)

    def _run(self, plan: Plan[T]) -> T:
        with closing(Steps(plan)) as steps:
            for step in steps:
                steps.reply(step.fn() if isinstance(step, Work) else self._call(step))
            return steps.value

    def _call(self, op: Op[Any]) -> Any:
        conn, idle = self._acquire()
        if idle is not None:
            idle.channel.close()
        try:
            return op.result(self._invoke(conn, op))
        except grpc.RpcError as exc:
            raise _calls.translate(exc) from None
        finally:
            if self._release(conn):
                conn.channel.close()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Async(ClientBase):
    """Runs calls on a grpc.aio channel; local work (file I/O, AES-GCM) in a worker thread."""

    def _open(
        self, target: str, creds: grpc.ChannelCredentials, options: list[tuple[str, Any]]
    ) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(target, creds, options=options)

    async def _run(self, plan: Plan[T]) -> T:
        with closing(Steps(plan)) as steps:
            for step in steps:
                work = asyncio.to_thread(step.fn) if isinstance(step, Work) else self._call(step)
                steps.reply(await work)
            return steps.value

    async def _call(self, op: Op[Any]) -> Any:
        conn, idle = self._acquire()
        if idle is not None:
            await idle.channel.close(None)
        try:
            return op.result(await self._invoke(conn, op))
        except grpc.RpcError as exc:
            raise _calls.translate(exc) from None
        finally:
            if self._release(conn):
                await conn.channel.close(None)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
