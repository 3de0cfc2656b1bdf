"""Build the broker from settings (:func:`create_server`) and run it (:func:`serve`)."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Protocol

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from keybroker.adapters.alerts import AlertDetector
from keybroker.adapters.audit_keys import ensure_default_keys
from keybroker.adapters.catalog import CachedCatalog
from keybroker.adapters.checkpoint_keys import checkpoint_signer
from keybroker.adapters.export import JournalExporter, Pseudonymizer
from keybroker.adapters.gauges import JournalState, StateGauges
from keybroker.adapters.hsm import HsmConfig, Pkcs11Keks
from keybroker.adapters.hsm_sessions import Locking
from keybroker.adapters.journal import Journal, JournalConfig
from keybroker.adapters.journal_lock import JournalLock, lock_directory, lock_slot
from keybroker.adapters.keystore import SqlKeyStore
from keybroker.adapters.metrics import (
    DecisionMetrics,
    configure_metrics,
    observe_certificate_expiry,
)
from keybroker.adapters.privacy_cache import PrivacyCache
from keybroker.adapters.privacystore import SqlPrivacyStore
from keybroker.adapters.prometheus import PrometheusEndpoint, check_ports
from keybroker.adapters.schema import require_current_schema
from keybroker.adapters.sqldb import Database, dialect_for
from keybroker.adapters.telemetry import (
    SpanRecorder,
    configure_tracing,
    instance_id,
    otlp_exporter,
    otlp_insecure,
    resource,
)
from keybroker.adapters.tokens import JwksKeys, TokenVerifier
from keybroker.core.admin import KeyAdmin
from keybroker.core.alerting import never_scheduled
from keybroker.core.broker import KeyBroker
from keybroker.core.decision import Decision, Outcome
from keybroker.core.keys import UNWRAPPABLE, KeySnapshot, VersionState
from keybroker.core.lifecycle import KeyLifecycle, LifecycleConfig
from keybroker.core.ports import Clock, DecisionRecorder
from keybroker.core.privacy import PrivacyService
from keybroker.core.privacy_replay import ReplayReport
from keybroker.core.retention import RetentionShredder
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import ConfigurationError, KeybrokerError, NotFoundError
from keybroker.server import admin_servicer, privacy_servicer
from keybroker.server.admin_servicer import KeyAdminServicer
from keybroker.server.cpus import available_cpus
from keybroker.server.engines import Engine, create_engine
from keybroker.server.guard import CallGuard, FanOut
from keybroker.server.handlers import HandlerRegistry, ServerOptions
from keybroker.server.hardening import disable_core_dumps
from keybroker.server.health import Health, HealthMonitor
from keybroker.server.limits import DenialLimiter, RateLimits
from keybroker.server.logs import configure_logging, set_worker
from keybroker.server.privacy_servicer import PrivacyServicer
from keybroker.server.probes import ProbeBoard, WorkerProbe, probe_server
from keybroker.server.refusals import RefusalLog
from keybroker.server.replay import replay_journal
from keybroker.server.servicer import SERVICE_NAME, KeyBrokerServicer
from keybroker.server.startup import bind_error, check_tls_material
from keybroker.server.tls_reload import ServerTls
from keybroker.settings import Settings, validate_for_serving
from keybroker.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    keybroker_pb2,
    keybroker_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)

log = logging.getLogger(__name__)

REGISTRY_SUBJECT = "keybroker:registry"
_DRAIN_SECONDS = 0.25  # calls refused with UNAVAILABLE before gRPC itself stops


@dataclass
class RunningBroker:
    """A started server and what it owns."""

    server: Engine
    port: int
    keks: Pkcs11Keks
    monitor: HealthMonitor
    health: health.HealthServicer
    tracer_provider: TracerProvider
    journal: Journal | None = None
    exporter: JournalExporter | None = None
    meter_provider: MeterProvider | None = None
    store: SqlKeyStore | None = None
    catalog: CachedCatalog | None = None
    lifecycle: KeyLifecycle | None = None
    privacy: PrivacyCache | None = None
    shredder: RetentionShredder | None = None
    draining: threading.Event = field(default_factory=threading.Event)
    journal_lock: JournalLock | None = None
    denials: DenialLimiter | None = None
    probe: WorkerProbe | None = None
    prometheus: PrometheusEndpoint | None = None
    tls: ServerTls | None = None
    jwks: JwksKeys | None = None

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; in-flight calls get ``grace`` seconds to finish.

        First a short drain: new calls are refused with UNAVAILABLE (``shutting_down``), which
        clients retry elsewhere, while health says NOT_SERVING. Only then does gRPC stop, so no
        call races its shutdown (gRPC cancels a call that arrives while it stops, and CANCELLED
        is not safe for a client to retry blindly)."""
        self.health.enter_graceful_shutdown()
        self.draining.set()
        if self.probe is not None:
            self.probe.set_ready(False)
        if grace:
            time.sleep(min(_DRAIN_SECONDS, grace))
        self.server.stop(grace).wait()
        if self.denials is not None:
            self.denials.stop()  # journals the aggregates still open
        self.monitor.stop()
        if self.jwks is not None:
            self.jwks.stop()
        if self.catalog is not None:
            self.catalog.stop()  # flushes usage counts
        if self.privacy is not None:
            self.privacy.close()  # flushes the recording registry
        if self.store is not None:
            self.store.close()
        if self.journal is not None:
            self.journal.close()  # writes a final signed checkpoint
        if self.journal_lock is not None:
            self.journal_lock.release()
        if self.exporter is not None:
            self.exporter.stop()  # one last bounded attempt; the rest goes after restart
        self.tracer_provider.shutdown()
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def open_journal(settings: Settings, worker: int) -> Journal | None:
    """The audit journal of this worker process, or None with ``[audit] enabled = false``."""
    audit = settings.audit
    if audit.dir is None:
        log.warning(
            "[audit] enabled = false: no durable journal; decisions are only exported as "
            "best-effort spans (not for production)"
        )
        return None
    chain_key, signing_key = audit.load_chain_key(), checkpoint_signer(settings)
    return Journal(
        JournalConfig(
            directory=audit.dir / f"w{worker}",
            chain_key=chain_key,
            signing_key=signing_key,
            fsync=audit.fsync,
            max_file_bytes=audit.max_file_bytes,
            max_file_age=audit.max_file_age,
            checkpoint_interval=audit.checkpoint_interval,
        )
    )


def replay_with_own_journal(
    settings: Settings, *, dry_run: bool = False, quiet: bool = False
) -> ReplayReport | None:
    """Privacy replay (keybroker.server.replay) from a process that writes no journal itself:
    the parent of ``serve`` with several processes, or ``keybroker privacy replay``. Its
    re-applications go into chain ``w0``, taken for the time (the caller holds the journal
    directory: no broker writes it). None without ``[audit] dir``. ``quiet``: no log lines (the
    caller prints the report)."""
    root = settings.audit.dir
    if root is None:
        return None
    chain_key = settings.audit.load_chain_key()
    store = SqlPrivacyStore(open_database(settings, migrate=False if dry_run else None))
    try:
        if dry_run:
            return replay_journal(root, chain_key, store, None, dry_run=True, quiet=quiet)
        lock = lock_slot(root, 0)
        try:
            journal = open_journal(settings, 0)
            if journal is None:  # pragma: no cover - [audit] dir is set
                return None
            try:
                return replay_journal(root, chain_key, store, journal.record, quiet=quiet)
            finally:
                journal.close()
        finally:
            lock.release()
    finally:
        store.close()


def hsm_config(settings: Settings) -> HsmConfig:
    """The HSM adapter's configuration (reads the PIN file)."""
    hsm = settings.hsm
    locking: Locking = "global" if hsm.locking == "global" else "os"
    return HsmConfig(
        hsm.module,
        hsm.token_label,
        settings.read_pin(),
        iv_source=hsm.iv_source,
        sessions=hsm.sessions,
        locking=locking,
    )


def connect_hsm(settings: Settings) -> Pkcs11Keks:
    """Log in to the HSM (fail fast on a wrong PIN or an unknown token)."""
    os.environ.update(settings.hsm.env)
    keks = Pkcs11Keks(
        hsm_config(settings),
        probe_key=settings.keys.default,
    )
    keks.connect()
    keks.require_mechanisms()
    return keks


def open_database(settings: Settings, *, migrate: bool | None = None) -> Database:
    """The metadata database named by ``[state] url``, migrated to this version's schema (or,
    with ``[state] migrate = false`` or ``migrate=False``, checked to be at it)."""
    state = settings.state
    db = Database(dialect_for(state.url, base=settings.state_dir(), password=state.read_password()))
    try:
        if state.migrate if migrate is None else migrate:
            db.migrate()
        else:  # the schema is `keybroker migrate`'s job; this role may lack DDL rights
            require_current_schema(db)
    except BaseException:
        db.close()
        raise
    return db


def open_store(settings: Settings) -> SqlKeyStore:
    """The key metadata store (its own connection to the database)."""
    return SqlKeyStore(open_database(settings))


def event_recorder(journal: Journal | None, live: DecisionRecorder) -> Callable[[Decision], None]:
    """Record a lifecycle event nobody asked for: durable first (raises if it cannot), then live."""

    def record(decision: Decision) -> None:
        if journal is not None:
            journal.record(decision)
        live.record(decision)

    return record


def intent_recorder(journal: Journal | None) -> Callable[[Decision], object] | None:
    """Durable intent before effect: admin and privacy changes record their intent here before
    they are applied (raises if the journal cannot be written, and then nothing changes)."""
    return journal.record if journal is not None else None


def registry_conflict_recorder(record: Callable[[Decision], None]) -> Callable[[str], None]:
    """Audit a registration the registry refused after the call (two replicas registering one
    recording id within a refresh interval): a ``RegistryConflict`` decision, by the registry."""

    def conflict(recording_id: str) -> None:
        now = time.time_ns()
        record(
            Decision(
                service=SERVICE_NAME,
                operation="RegistryConflict",
                outcome=Outcome.DENY,
                reason="recording_registered",
                status_code="ALREADY_EXISTS",
                subject=REGISTRY_SUBJECT,
                recording_id=recording_id,
                started_ns=now,
                ended_ns=now,
            )
        )

    return conflict


def _forget_unusable(keks: Pkcs11Keks) -> Callable[[KeySnapshot, KeySnapshot], None]:
    """Drop in-process HSM copies of versions that may no longer be used (crypto-shredding must
    not wait for a restart)."""

    def listener(_old: KeySnapshot, new: KeySnapshot) -> None:
        for key in new.keys.values():
            for version in key.versions:
                if version.state not in UNWRAPPABLE:
                    keks.forget(KeyRef(key.name, version.version))

    return listener


def wrap_versions(snapshot: KeySnapshot) -> list[KeyRef]:
    """Every version new wraps may use (ENABLED): each gets a wrap -> unwrap self-test."""
    return [
        KeyRef(key.name, version.version)
        for key in snapshot.keys.values()
        for version in key.versions
        if version.state is VersionState.ENABLED
    ]


def require_keys(settings: Settings, keks: Pkcs11Keks, catalog: CachedCatalog) -> None:
    """The default key must exist; every version new wraps may use is self-tested now and
    whenever the metadata changes (a rotation here or on another replica). A version that fails
    is never used for wraps (and health says NOT_SERVING: :func:`watch_hsm`)."""
    require_default_key(settings, catalog)
    keks.ensure_self_tested(wrap_versions(catalog.snapshot()))
    catalog.on_change(lambda _old, new: keks.ensure_self_tested(wrap_versions(new)))


def watch_hsm(keks: Pkcs11Keks, health_state: Health) -> None:
    """Health follows the HSM connection and the KEK self-tests."""
    keks.on_health_change(health_state.watch("hsm", keks.healthy))
    keks.on_self_test_change(health_state.watch("kek_self_test", keks.self_tests_passed))


def publish_health(
    health_state: Health, probe: WorkerProbe | None, draining: threading.Event
) -> None:
    """Publish the health state now, and from now on also as this worker's readiness on the
    health port (NOT_SERVING once draining)."""
    if probe is not None:
        health_state.follow(lambda ok: probe.set_ready(ok and not draining.is_set()))
    health_state.publish()


def require_default_key(settings: Settings, catalog: CachedCatalog) -> None:
    try:
        catalog.snapshot().current(settings.keys.default)
    except NotFoundError:
        raise ConfigurationError(
            f"[keys] default: no key {settings.keys.default!r} on token "
            f"{settings.hsm.token_label!r}; create it with `keybroker kek create "
            f"{settings.keys.default} --offline --config FILE`"
        ) from None


@dataclass
class Observability:
    """Live decision recorders (alerts, metrics, spans) and the providers behind them."""

    recorder: FanOut
    tracer_provider: TracerProvider
    meter_provider: MeterProvider | None
    metrics: DecisionMetrics | None
    counters: FanOut = field(default_factory=lambda: FanOut(()))
    """The live recorders that count (alerts, metrics): they see every denial, also those the
    journal keeps only in an aggregate record (keybroker.server.limits)."""
    spans: FanOut = field(default_factory=lambda: FanOut(()))
    """The live span recorder alone (for records the counters must not count twice)."""
    service: Resource | None = None
    """This worker's OpenTelemetry resource (service.instance.id: keybroker.adapters.telemetry)."""
    prometheus: PrometheusEndpoint | None = None
    """The scrape endpoint to start once the broker serves (``[telemetry] prometheus_listen``)."""


def worker_resource(settings: Settings, worker: int) -> Resource:
    """The OpenTelemetry resource of worker ``worker``: its own ``service.instance.id``."""
    place = settings.audit.dir or settings.state_dir()
    return resource(
        settings.telemetry,
        instance=instance_id(socket.gethostname(), place, worker),
        worker=worker,
    )


def build_observability(
    settings: Settings,
    keks: Pkcs11Keks,
    journal: Journal | None,
    span_processor: SpanProcessor | None,
    catalog: CachedCatalog | None = None,
    *,
    tls: ServerTls | None = None,
    worker: int = 0,
) -> Observability:
    telemetry = settings.telemetry
    service = worker_resource(settings, worker)
    provider, live_spans = configure_tracing(
        telemetry, extra_processor=span_processor, otlp=journal is None, service=service
    )
    meter_provider, decision_metrics = None, None
    prometheus = (
        PrometheusEndpoint(telemetry.prometheus_listen, worker)
        if telemetry.prometheus_listen
        else None
    )
    if telemetry.otlp_endpoint or prometheus is not None:
        meter_provider = configure_metrics(
            telemetry.otlp_endpoint,
            otlp_insecure(telemetry) if telemetry.otlp_endpoint else False,
            telemetry.otlp_timeout,
            service,
            extra_readers=[prometheus.reader] if prometheus is not None else [],
        )
        decision_metrics = DecisionMetrics(meter_provider)
        if tls is not None:
            observe_certificate_expiry(meter_provider, tls.expires_in)
        keks.observe(decision_metrics.hsm_call)
        if journal is not None:
            journal.on_flush(decision_metrics.journal_flush)
    scheduled = (
        (lambda name, version: catalog.snapshot().is_scheduled_for_destruction(name, version))
        if catalog is not None
        else never_scheduled
    )
    live: list[DecisionRecorder] = [
        AlertDetector(
            settings.alerts,
            is_scheduled_for_destruction=scheduled,
            tracer_provider=provider,
            meter_provider=meter_provider,
        )
    ]
    if decision_metrics is not None:
        live.append(decision_metrics)
    counters = FanOut(list(live))
    spans: list[DecisionRecorder] = [SpanRecorder(provider)] if live_spans else []
    return Observability(
        FanOut(live + spans),
        provider,
        meter_provider,
        decision_metrics,
        counters,
        FanOut(spans),
        service,
        prometheus,
    )


def register_gauges(
    obs: Observability,
    keks: Pkcs11Keks,
    catalog: CachedCatalog,
    privacy: PrivacyCache,
    journal: Journal | None,
) -> None:
    """The state gauges (keybroker.adapters.gauges), when metrics are exported at all."""
    if obs.meter_provider is None:
        return
    StateGauges(
        obs.meter_provider,
        hsm_healthy=lambda: keks.healthy,
        staleness={"keys": catalog.staleness, "privacy": privacy.staleness},
        journal=(
            JournalState(lambda: journal.backlog, lambda: journal.healthy)
            if journal is not None
            else None
        ),
    )


def start_exporter(
    settings: Settings,
    journal: Journal | None,
    metrics: DecisionMetrics | None,
    service: Resource | None = None,
) -> JournalExporter | None:
    """Export the journal over OTLP when both exist (see keybroker.adapters.export)."""
    if journal is None or not settings.telemetry.otlp_endpoint:
        return None
    pseudonym_key = settings.audit.load_pseudonym_key()
    exporter = JournalExporter(
        journal.directory,
        otlp_exporter(settings.telemetry),
        service or resource(settings.telemetry),
        durable_seq=lambda: journal.durable_seq,
        pseudonymize=Pseudonymizer(pseudonym_key) if pseudonym_key else None,
        batch_size=settings.audit.export_batch_size,
        max_backoff=settings.audit.export_max_backoff,
    )
    exporter.start()
    if metrics is not None:
        metrics.observe_export_lag(lambda: journal.durable_seq - exporter.position)
    return exporter


def start_telemetry(
    settings: Settings,
    obs: Observability,
    *,
    journal: Journal | None,
    keks: Pkcs11Keks,
    catalog: CachedCatalog,
    privacy: PrivacyCache,
) -> JournalExporter | None:
    """Just before gRPC starts: the state gauges, the Prometheus endpoint (a port in use stops
    start-up, exit 2, before anything serves) and the journal's OTLP export."""
    register_gauges(obs, keks, catalog, privacy, journal)
    if obs.prometheus is not None:
        obs.prometheus.start()
    return start_exporter(settings, journal, obs.metrics, obs.service)


INLINE_METHODS = frozenset(
    {
        f"/{SERVICE_NAME}/GenerateDataKey",
        f"/{SERVICE_NAME}/GenerateWrappedDataKey",
        f"/{SERVICE_NAME}/UnwrapDataKey",
        f"/{SERVICE_NAME}/RewrapDataKey",
        "/grpc.health.v1.Health/Check",
    }
)
"""Answered on the loop thread (engine "loop": keybroker.server.loop); every other method, and
every method on the "grpc" engine, runs on a pool thread."""


def guards(
    settings: Settings,
    verifier: TokenVerifier,
    obs: Observability,
    journal: Journal | None,
    draining: threading.Event,
) -> tuple[Callable[[str], CallGuard], DenialLimiter | None]:
    """The guard maker for each service, and the denial limiter they share (started; the
    broker stops it)."""
    limits = settings.limits
    rates = RateLimits.of(limits.certificate_rate, limits.subject_rate, limits.burst)
    denials = (
        # journal and span only: the counters saw each aggregated denial already
        DenialLimiter(limits.denials_per_minute, event_recorder(journal, obs.spans))
        if limits.denials_per_minute
        else None
    )
    if denials is not None:
        denials.start()

    def guard(service: str) -> CallGuard:
        return CallGuard(
            service=service,
            verifier=verifier.verify,
            recorder=obs.recorder,
            require_cnf=settings.auth.require_cnf,
            durable=journal,
            draining=draining,
            limits=rates if service == SERVICE_NAME else None,  # the data plane's rates
            denials=denials,
            counters=obs.counters,
        )

    return guard, denials


def grpc_server(
    settings: Settings,
    servicer: KeyBrokerServicer,
    admin: KeyAdminServicer,
    privacy: PrivacyServicer,
    health_servicer: health.HealthServicer,
    *,
    heartbeats: Callable[[str], Callable[[], None]] | None = None,
    tls: ServerTls,
) -> tuple[Engine, int]:
    """The gRPC server (``[server] engine``) with the KeyBroker, health and reflection services,
    bound over mTLS (client certificates required; ``tls`` follows the files as they are
    renewed)."""
    registry = HandlerRegistry()
    keybroker_pb2_grpc.add_KeyBrokerServicer_to_server(servicer, registry)  # type: ignore[no-untyped-call]
    admin_pb2_grpc.add_KeyAdminServicer_to_server(admin, registry)  # type: ignore[no-untyped-call]
    privacy_pb2_grpc.add_PrivacyServicer_to_server(privacy, registry)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registry)
    reflection.enable_server_reflection(
        (
            keybroker_pb2.DESCRIPTOR.services_by_name["KeyBroker"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["KeyAdmin"].full_name,
            privacy_pb2.DESCRIPTOR.services_by_name["Privacy"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        registry,  # type: ignore[arg-type]  # it only calls add_*_handlers
    )
    server = create_engine(
        settings.server.engine,
        registry,
        inline=INLINE_METHODS,
        options=ServerOptions(
            pool_threads=settings.server.threads,
            stream_threads=settings.limits.stream_threads,
            streams_per_connection=settings.limits.streams_per_connection,
            stream_queue=settings.limits.stream_queue,
            channel_options=(
                ("grpc.max_receive_message_length", settings.server.max_message_bytes),
                ("grpc.max_send_message_length", settings.server.max_message_bytes),
                ("grpc.so_reuseport", 1),
            ),
        ),
        refusals=RefusalLog(),
        heartbeats=heartbeats,
    )
    try:
        port = server.add_secure_port(settings.server.listen, tls.credentials())
    except RuntimeError:
        port = 0
    if port == 0:
        raise bind_error(settings.server.listen)
    return server, port


def check_before_start(settings: Settings) -> None:
    """What must hold before anything is opened or bound: settings, then the TLS files; then the
    default journal's keys, generated if missing (first start without ``[audit] dir``)."""
    validate_for_serving(settings)
    check_tls_material(settings.tls)
    prepare_default_journal(settings)


def prepare_default_journal(settings: Settings) -> None:
    """Generate the key files of the default journal that do not exist yet (a first start
    without ``[audit] dir``); several processes may race here safely (keybroker.adapters.
    audit_keys). A journal elsewhere (``[audit] dir`` given) needs its key files to exist."""
    layout = settings.audit_layout()
    if settings.audit.dir != layout.journal:
        return
    created = ensure_default_keys(settings.audit, layout)
    if created:
        log.info(
            "[audit] generated %s in %s for the journal in %s (back them up)",
            ", ".join(p.name for p in created),
            layout.keys,
            settings.audit.dir,
        )


def lock_journal_slot(settings: Settings, worker: int) -> JournalLock | None:
    """Worker ``worker``'s journal slot, taken before the HSM, the store or the port."""
    return None if settings.audit.dir is None else lock_slot(settings.audit.dir, worker)


def create_server(
    settings: Settings,
    *,
    clock: Clock = time.time,
    span_processor: SpanProcessor | None = None,
    worker: int = 0,
    replay: bool = True,
    probe: WorkerProbe | None = None,
) -> RunningBroker:
    """Check the settings and TLS files, take this worker's journal slot (one writer per
    journal), connect to the HSM, wire the services and start listening. Fails fast.

    ``replay``: before serving, re-apply the journal's privacy changes the metadata database
    lacks (keybroker.server.replay); ``serve`` with several processes does it once, before
    the workers start, and passes False. ``probe``: where this worker reports readiness and
    heartbeats for the health port."""
    check_before_start(settings)
    lock = lock_journal_slot(settings, worker)
    try:
        running = _create_server(
            settings,
            clock=clock,
            span_processor=span_processor,
            worker=worker,
            replay=replay,
            probe=probe,
        )
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    running.journal_lock = lock
    return running


def open_privacy(
    settings: Settings, *, clock: Clock, record: Callable[[Decision], None], replay: bool
) -> PrivacyCache:
    """The privacy state (its own connection to the database), not loaded yet; with ``replay``,
    first the journal's privacy changes the database lacks are re-applied (keybroker.server
    .replay), so the first load serves nothing less strict than the journal."""
    state = settings.state
    cache = PrivacyCache(
        SqlPrivacyStore(open_database(settings)),
        max_staleness=state.max_staleness,
        refresh_interval=state.refresh_interval,
        clock=clock,
        on_conflict=registry_conflict_recorder(record),
    )
    if replay and settings.audit.dir is not None:
        try:
            replay_journal(settings.audit.dir, settings.audit.load_chain_key(), cache.store, record)
        except BaseException:
            cache.store.close()
            raise
    return cache


def _create_server(
    settings: Settings,
    *,
    clock: Clock,
    span_processor: SpanProcessor | None,
    worker: int,
    replay: bool,
    probe: WorkerProbe | None = None,
) -> RunningBroker:
    tls = ServerTls(settings.tls)
    store = open_store(settings)
    keks = connect_hsm(settings)
    auth = settings.auth
    jwks = JwksKeys(
        file=auth.jwks_file,
        url=auth.jwks_url,
        ca_file=auth.jwks_ca_file,
        min_interval=auth.jwks_refresh_interval,
        max_interval=auth.jwks_max_refresh_interval,
        max_stale=auth.jwks_max_staleness,
    )
    jwks.start()
    verifier = TokenVerifier(auth, jwks, clock=clock)
    journal = open_journal(settings, worker)
    state = settings.state
    epochs = settings.keys.epoch_scheme()
    shredder: RetentionShredder | None = None

    def scheduler_tick() -> None:
        lifecycle.run_due()
        if shredder is not None:
            shredder.run_due()
        lifecycle.reconcile()

    catalog = CachedCatalog(
        store,
        refresh_interval=state.refresh_interval,
        usage_flush_interval=state.usage_flush_interval,
        listen=store.database.notifications,
        tick=scheduler_tick,
        tick_interval=state.scheduler_interval,
        heartbeat=probe.heartbeat("catalog") if probe is not None else None,
    )
    catalog.on_change(_forget_unusable(keks))
    obs = build_observability(
        settings, keks, journal, span_processor, catalog, tls=tls, worker=worker
    )
    privacy_cache = open_privacy(
        settings, clock=clock, record=event_recorder(journal, obs.recorder), replay=replay
    )
    lifecycle = KeyLifecycle(
        store,
        keks,
        clock=clock,
        config=LifecycleConfig(
            destruction_window=settings.keys.destruction_window,
            min_destruction_window=settings.keys.min_destruction_window,
            reconcile_after=state.reconcile_after,
        ),
        record_event=event_recorder(journal, obs.recorder),
        after_change=catalog.refresh,
        held_under=privacy_cache.store.held_under,
    )
    lifecycle.reconcile(full=True)
    catalog.refresh(force=True)
    privacy_cache.refresh()
    catalog.also_refresh(privacy_cache.refresh)
    require_keys(settings, keks, catalog)

    draining = threading.Event()
    guard, denials = guards(settings, verifier, obs, journal, draining)

    broker = KeyBroker(
        keks,
        catalog,
        clock=clock,
        default_key=settings.keys.default,
        default_retention_seconds=settings.keys.default_retention,
        privacy=privacy_cache,
        epochs=epochs,
        ensure_key=lambda name: lifecycle.ensure_key(name, "retention_epoch_key"),
        max_retention_seconds=settings.keys.max_retention,
    )
    shredder = (
        RetentionShredder(
            epochs,
            keys=store,
            privacy=privacy_cache.store,
            broker=broker,
            lifecycle=lifecycle,
            clock=clock,
        )
        if epochs is not None
        else None
    )
    admin = KeyAdmin(
        lifecycle, mfa_required=auth.admin_require_mfa, intent=intent_recorder(journal)
    )
    privacy = PrivacyService(
        privacy_cache.store,
        privacy_cache,
        clock=clock,
        mfa_required=auth.admin_require_mfa,
        intent=intent_recorder(journal),
    )

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_state = Health(
        health_servicer,
        [SERVICE_NAME, admin_servicer.SERVICE_NAME, privacy_servicer.SERVICE_NAME],
    )
    starting = health_state.watch("starting", False)
    publish_health(health_state, probe, draining)
    watch_hsm(keks, health_state)
    privacy_cache.on_health_change(health_state.watch("privacy", True))
    probes = [keks.check, privacy_cache.check, tls.probe]
    if journal is not None:
        journal.on_health_change(health_state.watch("journal", journal.healthy))
        probes.append(journal.check)

    server, port = grpc_server(
        settings,
        KeyBrokerServicer(broker, guard(SERVICE_NAME)),
        KeyAdminServicer(admin, guard(admin_servicer.SERVICE_NAME)),
        PrivacyServicer(privacy, broker, guard(privacy_servicer.SERVICE_NAME), settings.audit.dir),
        health_servicer,
        heartbeats=probe.heartbeat if probe is not None else None,
        tls=tls,
    )
    exporter = start_telemetry(
        settings, obs, journal=journal, keks=keks, catalog=catalog, privacy=privacy_cache
    )
    server.start()
    catalog.start()
    starting(True)
    monitor = HealthMonitor(
        probes,
        settings.hsm.health_interval,
        heartbeat=probe.heartbeat("health-monitor") if probe is not None else None,
    )
    monitor.start()
    log.info("keybroker listening on port %d (pid %d), engine %s", port, os.getpid(), server.engine)
    return RunningBroker(
        server,
        port,
        keks,
        monitor,
        health_servicer,
        obs.tracer_provider,
        journal,
        exporter,
        obs.meter_provider,
        store,
        catalog,
        lifecycle,
        privacy_cache,
        shredder,
        draining,
        denials=denials,
        probe=probe,
        tls=tls,
        jwks=jwks,
        prometheus=obs.prometheus,
    )


def _serve_one(
    settings: Settings, worker: int = 0, probe: WorkerProbe | None = None, *, replay: bool = True
) -> None:
    # Before the server starts: from its first call it must stop gracefully (drain, final
    # journal checkpoint). A SIGTERM between "listening" and the handler (the heap settling took
    # that long) killed a worker outright, and the health port closed without ever saying
    # NOT_SERVING. A signal during start-up stops the broker as soon as it has started.
    stopping = _stop_on_signal(f"grace {settings.server.grace_period}s")
    broker = create_server(settings, worker=worker, replay=replay, probe=probe)
    settle_heap()
    # Wake up now and then: the kernel may deliver the signal to one of gRPC's threads, and
    # Python then runs the handler only when the main thread next executes bytecode. An
    # untimed wait() could sleep through SIGTERM for ever (seen once in a clean-clone test run
    # as a broker that never stopped).
    while not stopping.wait(0.2):
        if broker.server.failed:
            break
    broker.stop(settings.server.grace_period)
    if broker.server.failed:
        raise SystemExit("keybroker: the gRPC server loop failed (see the log); exiting")


def settle_heap() -> None:
    """After start-up: collect once, then move every object alive now (modules, the wiring,
    loaded state) out of the cyclic garbage collector's reach (``gc.freeze``).

    The collector's full passes otherwise walk those hundreds of thousands of start-up objects
    again and again while serving: about 18 million instructions a pass, some 30,000 per
    UnwrapDataKey over a 600-call window that holds one (callgrind; docs/PERFORMANCE.md). Frozen
    objects are still freed by reference counting when released; only reference cycles among
    them would stay, and start-up objects live as long as the process anyway."""
    gc.collect()
    gc.freeze()


class _Failures(Protocol):
    def put(self, obj: BaseException, /) -> None: ...

    def empty(self) -> bool: ...


def _worker(
    settings: Settings, worker: int, probe: WorkerProbe | None, failures: _Failures
) -> None:
    """A spawned worker process. A start-up error the command line would turn into one line
    and an exit code (a configuration error: 2; an unavailable HSM or database: 1) goes to the
    supervisor, which reports it as ``keybroker serve`` of a single process does; this process
    then exits with that code, without a traceback."""
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format, worker)
    disable_core_dumps()  # dumpability is reset by exec: each spawned worker sets its own
    try:
        _serve_one(settings, worker, probe, replay=False)  # the parent replayed (serve)
    except (KeybrokerError, OSError) as exc:
        try:
            failures.put(exc)
        except Exception:  # noqa: BLE001 - cannot be sent: say it here, as the CLI would
            log.error("worker %d did not start: %s", worker, exc)  # noqa: TRY400 - no trace
        sys.exit(2 if isinstance(exc, ConfigurationError) else 1)


_held: list[JournalLock] = []


def _hold_journal(settings: Settings, processes: int) -> None:
    """Take the journal directory for as long as this process runs (before any worker binds),
    and make sure no leftover worker of another broker still writes one of our slots; each
    worker then takes its own slot ``w<N>`` (create_server)."""
    if settings.audit.dir is None:
        return
    _held.append(lock_directory(settings.audit.dir))
    if processes > 1:
        for worker in range(processes):
            lock_slot(settings.audit.dir, worker).release()


def liveness_bound(settings: Settings) -> float:
    """Seconds without a turn after which a loop counts as stuck: ``[server] liveness_timeout``
    beyond the longest interval a loop sleeps between turns."""
    longest = max(1.0, settings.state.refresh_interval, settings.hsm.health_interval)
    return settings.server.liveness_timeout + longest


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT. With ``processes > 1``, or a health port, spawn workers (the
    port shared with SO_REUSEPORT) and supervise them; the supervisor serves the health port."""
    disable_core_dumps()
    processes = settings.server.processes or available_cpus()
    if not settings.server.processes:
        log.info("[server] processes = auto: %d (CPU quota and affinity)", processes)
    check_before_start(settings)
    _hold_journal(settings, processes)
    if processes == 1 and not settings.server.health_listen:
        set_worker(0)  # log lines name the worker as in a multi-process broker
        _serve_one(settings)
        return
    if settings.telemetry.prometheus_listen:
        check_ports(settings.telemetry.prometheus_listen, processes)
    # Before the replay and the workers: a SIGTERM during start-up (a rollout that changes its
    # mind) stops the supervisor and its workers in order instead of killing it outright and
    # leaving its workers behind.
    stopping = _stop_on_signal("the workers")
    replay_with_own_journal(settings)  # once, before any worker serves
    if stopping.is_set():
        log.info("stopped before the workers started")
        return
    _supervise(settings, processes, stopping)


def _stop_on_signal(how: str) -> threading.Event:
    """An event set by SIGTERM or SIGINT (the handlers are installed now); ``how`` is logged."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping (%s)", signum, how)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stopping


def _supervise(settings: Settings, processes: int, stopping: threading.Event) -> None:
    ctx = multiprocessing.get_context("spawn")  # each worker initialises the HSM itself
    board = ProbeBoard.shared(processes, ctx)
    probes: Engine | None = None
    if settings.server.health_listen:
        probes, _port = probe_server(
            board, settings.server.health_listen, liveness_bound(settings), settings.server.engine
        )
    failures = ctx.SimpleQueue()
    workers = [
        ctx.Process(
            target=_worker,
            args=(settings, i, board.for_worker(i), failures),
            name=f"keybroker-{i}",
        )
        for i in range(processes)
    ]
    try:
        for w in workers:
            w.start()
        _watch_workers(workers, failures, stopping)
        for w in workers:
            if w.pid is not None and w.is_alive():
                os.kill(w.pid, signal.SIGTERM)
        for w in workers:
            w.join(settings.server.grace_period + 5)
    finally:
        if probes is not None:
            probes.stop(None).wait(5)
    if not failures.empty():  # a worker's start-up error, reported as a single process would
        raise failures.get()
    if any(w.exitcode not in (0, None) for w in workers) and not stopping.is_set():
        raise SystemExit(1)


def _watch_workers(
    workers: Sequence[multiprocessing.process.BaseProcess],
    failures: _Failures,
    stopping: threading.Event,
) -> None:
    """Wait until ``stopping`` is set (SIGTERM/SIGINT) or a worker exits."""
    while not stopping.wait(0.5):
        if any(not w.is_alive() for w in workers):
            if failures.empty():  # else its start-up error is reported (serve)
                log.error("a worker process exited; stopping the others")
            break
