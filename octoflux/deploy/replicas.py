"""`octoflux serve --replicas N`: the same app as a Ray Serve deployment, one model replica per GPU.

Each replica is one Ray actor running `create_app(settings)` (engine, queue, auth, limits, probes,
metrics) behind Ray Serve's FastAPI ingress; Ray's HTTP proxy listens on --host/--port and sends
each request to the less loaded of two replicas. What outlives a request lives in the state store,
so any replica answers for any job or asset. Only imported when Ray is wanted: `--replicas 1`
never imports Ray. Importing this module loads no torch: Ray's proxy imports it too.

Errors Ray produces itself (a replica killed mid-request, no replica up) would reach clients as a
bare 500 or a text 503; `proxy_middlewares` (loaded into Ray's proxy through
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) turns them into JSON errors in the shape of the API the
path belongs to (octoflux/api/common/dialects.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading

from ray import serve
from starlette.middleware import Middleware

from octoflux.api.common.dialects import send_error
from octoflux.api.common.request_log import REPLICA_HEADER
from octoflux.core.errors import Problem
from octoflux.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "octoflux"
DEPLOYMENT_NAME = "OctofluxReplica"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "octoflux.deploy.replicas.proxy_middlewares"
# Autoscaling aims at this many ongoing requests per replica: each runs one job at a time.
TARGET_ONGOING_REQUESTS = 1.0
RETRY_AFTER_S = 5
# What a client hears when the replica running its request died (Ray's proxy gives it no answer).
REPLICA_LOST = "request failed: the worker running it was lost; retry it"


# ---------------------------------------------------------------- the deployment


@serve.ingress()
class OctofluxReplica:
    """One model replica: the app of `create_app` with its own engine and job queue."""

    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        self._reporter: asyncio.Task | None = None

    def __serve_build_asgi_app__(self):
        from octoflux.api.common.request_log import configure_access_log
        from octoflux.app import create_app

        configure_access_log()
        # --context-parallel N: this replica is rank 0 of N processes on this node, one per GPU Ray gave it.
        self.ranks = None
        if _gpus_per_replica(self.settings) > 1:
            from octoflux.deploy.context_parallel import RankGroup

            self.ranks = RankGroup.start(self.settings)
        app = (
            create_app(self.settings, self.ranks.engine_factory) if self.ranks else create_app(self.settings)
        )
        self.service = app.state.service
        if self.ranks is not None:  # refuse new work at once; check_health then has Ray replace the replica
            self.ranks.on_lost = lambda reason: threading.Thread(
                target=self.service.drain, daemon=True
            ).start()
        register_deployment_metrics(self.service.state)
        return app

    def check_health(self) -> None:
        """A lost context-parallel rank fails the health check: Ray replaces the whole replica."""
        if self.ranks is not None and self.ranks.lost_reason is not None:
            raise RuntimeError(self.ranks.lost_reason)

    def __del__(self) -> None:
        # Ray Serve calls this after the app's shutdown drained the queue: the other ranks go with it.
        if getattr(self, "ranks", None) is not None:
            self.ranks.stop()

    async def reconfigure(self, config: dict) -> None:
        """Called once at start (user_config is set for this): the replica joins routing only once
        its model is loaded, so a request never reaches a replica that would answer 503 loading."""
        while not self.service.ready:
            if self.service.load_error:
                raise RuntimeError(self.service.load_error)
            await asyncio.sleep(0.1)
        if self._reporter is None:
            self._reporter = asyncio.ensure_future(self._report_load())

    async def _report_load(self) -> None:
        """Queue depth, jobs in flight and readiness in the store, for the deployment's /metrics."""
        from octoflux.core.async_jobs import REPLICA_HEARTBEAT_S

        service = self.service
        while True:
            load = {"queue_depth": service.jobs.depth, "in_flight": service.jobs.in_flight}
            load["ready"] = service.ready
            with contextlib.suppress(Exception):  # the store being down is logged by the heartbeat
                await asyncio.to_thread(service.state.put_replica_load, service.replica, load)
            await asyncio.sleep(REPLICA_HEARTBEAT_S)


def _gpus_per_replica(settings: Settings) -> int:
    """GPUs (CPU slots with --device cpu) each replica holds: --context-parallel's rank count."""
    from octoflux.pipelines.parallel import parse_layout

    layout = parse_layout(settings.context_parallel)
    return layout.world if layout is not None else 1


def replica_count(settings: Settings, gpus: float) -> int:
    """--replicas as a number; `auto` is one per GPU Ray sees (per N GPUs with --context-parallel N)."""
    if settings.replicas != "auto":
        return int(settings.replicas)
    if settings.device == "cpu":
        raise SystemExit("octoflux: --replicas auto counts GPUs; with --device cpu give a number")
    per_replica = _gpus_per_replica(settings)
    if gpus < per_replica:
        if per_replica == 1:
            raise SystemExit("octoflux: --replicas auto found no GPU in the Ray cluster")
        raise SystemExit(f"octoflux: --replicas auto found fewer than {per_replica} GPUs in the Ray cluster")
    return int(gpus) // per_replica


def deployment_options(settings: Settings, replicas: int) -> dict:
    """Ray Serve options of the deployment: placement, load limits, scaling, shutdown."""
    on_cpu = settings.device == "cpu"
    options: dict = {
        "name": DEPLOYMENT_NAME,
        # One actor per replica holding all its ranks' devices: Ray shows it (and the rank processes it
        # starts) exactly those GPUs, all on one node.
        "ray_actor_options": {"num_cpus": _gpus_per_replica(settings)}
        if on_cpu
        else {"num_gpus": _gpus_per_replica(settings)},
        # A replica holds its running job and --max-queue more; Ray sends it at most --max-queue
        # requests at once (one place of slack: a request still encoding its answer counts for
        # Ray while its job is done), so a full replica is skipped while another has room (Ray's
        # own balancing is not exact under a burst). Ray counts a burst's requests as queued in
        # the proxy until each is assigned, so the proxy may hold as many as all replicas do; past
        # that Ray answers back-pressure, which ProxyErrors turns into our 429 with Retry-After.
        "max_ongoing_requests": max(settings.max_queue, 1),
        "max_queued_requests": max(settings.max_queue, 1) * max(replicas, settings.max_replicas),
        # On shutdown Ray stops routing to the replica, lets its ongoing requests finish, then
        # runs the app's shutdown, which drains the rest as the single process does on SIGTERM.
        "graceful_shutdown_timeout_s": settings.shutdown_timeout + 10,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "user_config": {},  # so that Ray calls `reconfigure` once at start
    }
    if settings.max_replicas:
        low = settings.min_replicas or 1
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": max(settings.max_replicas, low),
            "initial_replicas": min(max(replicas, low), max(settings.max_replicas, low)),
            "target_ongoing_requests": TARGET_ONGOING_REQUESTS,
        }
    else:
        options["num_replicas"] = replicas
    return options


def application(settings: Settings, replicas: int):
    options = deployment_options(settings, replicas)
    return serve.deployment(OctofluxReplica).options(**options).bind(settings.model_dump(mode="json"))


def build(args: dict):
    """Application builder for `serveConfigV2` (KubeRay): settings from OCTOFLUX_* env and `args`."""
    import ray

    settings = Settings(**{k: str(v) if k == "replicas" else v for k, v in args.items()})
    return application(settings, replica_count(settings, ray.cluster_resources().get("GPU", 0)))


# ---------------------------------------------------------------- Ray and Serve


def init_ray(address: str | None = None, **kwargs) -> bool:
    """Connect to `address`, or start a local Ray instance; True when this call started it.

    The proxy's error middleware is named in the environment first, so the Ray processes started
    here inherit it; a joined cluster must set it in its own environment (deploy/kuberay does).
    """
    import ray

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    if ray.is_initialized():
        return False
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    ray.init(address=address or "local", **kwargs)
    return not address


def start(settings: Settings) -> None:
    """Start Serve's proxy on --host/--port and deploy; returns once every replica has its model."""
    import ray

    serve.start(http_options={"host": settings.host, "port": settings.port})
    replicas = replica_count(settings, ray.cluster_resources().get("GPU", 0))
    serve.run(application(settings, replicas), name=APP_NAME, route_prefix="/")


def stop(started_ray: bool) -> None:
    """Drain and remove every replica; then stop Serve and Ray when this process started them.

    The application goes first, while the proxies still hold their clients' connections: Ray stops
    routing to the replicas and lets their requests finish. `serve.shutdown()` alone stops the
    proxies at the same time, which drops every request in flight.
    """
    import ray

    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    if started_ray:
        with contextlib.suppress(Exception):
            serve.shutdown()
    ray.shutdown()


def serve_replicas(settings: Settings) -> None:
    """`octoflux serve --replicas N`: deploy, serve until SIGTERM/SIGINT, drain, leave no Ray behind."""
    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        if stopping.is_set():  # a second signal: stop at once (the finally below still runs)
            raise SystemExit(1)
        log.info("received %s: draining every replica", signal.Signals(signum).name)
        stopping.set()

    started_ray = init_ray(settings.ray_address or None)
    # After ray.init, which installs a SIGTERM handler of its own that aborts the process.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if not stopping.is_set():
            start(settings)
            log.info("octoflux: replicas serving on http://%s:%s", settings.host, settings.port)
        while not stopping.wait(1.0):
            pass
    except RuntimeError as exc:  # Serve could not deploy (e.g. the model does not load)
        raise SystemExit(f"octoflux: {exc}") from None
    finally:
        stop(started_ray)


# ---------------------------------------------------------------- the deployment's /metrics


def register_deployment_metrics(store) -> None:
    """`octoflux_deployment_*` gauges: every replica's last load report, summed (once per process)."""
    from prometheus_client import REGISTRY
    from prometheus_client.core import GaugeMetricFamily

    from octoflux.core.async_jobs import LEASE_S

    class DeploymentLoad:
        def collect(self):
            try:
                loads = list(store.replica_loads(LEASE_S).values())
            except Exception:  # a scrape never fails because the store does
                return
            sums = {
                "queue_depth": ("Jobs waiting, summed over every replica", "queue_depth"),
                "jobs_in_flight": ("Jobs running, summed over every replica", "in_flight"),
            }
            for name, (text, key) in sums.items():
                yield GaugeMetricFamily(f"octoflux_deployment_{name}", text, sum(x[key] for x in loads))
            ready = sum(1 for x in loads if x.get("ready"))
            yield GaugeMetricFamily("octoflux_deployment_replicas_ready", "Replicas ready to serve", ready)
            yield GaugeMetricFamily("octoflux_deployment_replicas", "Replicas reporting", len(loads))

    if not getattr(register_deployment_metrics, "done", False):
        REGISTRY.register(DeploymentLoad())
        register_deployment_metrics.done = True


# ---------------------------------------------------------------- in Ray's HTTP proxy


def proxy_middlewares() -> list[Middleware]:
    """Loaded by Ray's proxy (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ProxyErrors)]


def ray_problem(status: int, body: bytes) -> Problem:
    """What to answer for a response Ray made itself (no replica wrote it)."""
    if status == 429 or b"backpressure" in body.lower():
        busy = "server busy: every replica's queue is full; retry"
        return Problem(429, "queue_full", busy, retry_after=RETRY_AFTER_S)
    if status == 503:
        return Problem(503, "not_ready", "no replica is ready to serve; retry", retry_after=RETRY_AFTER_S)
    if status == 408:
        return Problem(504, "timeout", "request timed out")
    return Problem(503, "worker_lost", REPLICA_LOST)


class ProxyErrors:
    """ASGI middleware in Ray's proxy: a response without X-OctoFlux-Replica did not come from our
    app, so Ray wrote it (or wrote nothing: a replica died mid-request); answer in our JSON instead.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        passed = False
        held: dict | None = None
        held_body = b""

        async def guard(message) -> None:
            nonlocal passed, held, held_body
            if message["type"] == "http.response.start" and not passed and held is None:
                ours = any(name.lower() == REPLICA_HEADER for name, _ in message.get("headers", []))
                if ours or message["status"] < 400:
                    passed = True
                else:
                    held = message
                    return
            if held is not None:
                held_body += message.get("body", b"")
                return
            await send(message)

        try:
            await self.app(scope, receive, guard)
        except Exception:
            if passed:
                raise
            log.warning("request to a replica failed in the proxy", exc_info=True)
        if passed:
            return
        await send_error(send, scope.get("path", ""), ray_problem(held["status"] if held else 500, held_body))
