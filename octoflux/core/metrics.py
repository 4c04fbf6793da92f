"""Every Prometheus metric the server exports, defined once; other modules import and update them.

Metrics live in prometheus-client's default registry, which also carries the process collector
(`process_resident_memory_bytes`, CPU seconds, open fds) that the load benchmark reads.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# Seconds: from a 2-step tiny model on CPU to a 50-step 16-image FLUX.1-dev batch.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)

QUEUE_DEPTH = Gauge("octoflux_queue_depth", "Jobs waiting for the worker, not counting the running one")
JOBS_IN_FLIGHT = Gauge("octoflux_jobs_in_flight", "Jobs the worker is running now (0 or 1)")
ASYNC_QUEUED = Gauge(
    "octoflux_async_jobs_queued",
    "Async jobs waiting in the state store's queue, for every process sharing it",
)

REQUEST_SECONDS = Histogram(
    "octoflux_request_seconds",
    "Generate latency, from accepting the request to the encoded body (async: until stored)",
    ["mode", "api"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "octoflux_queue_wait_seconds",
    "Time a job waited in the queue before the worker started it",
    ["mode", "api"],
    buckets=LATENCY_BUCKETS,
)
GPU_SECONDS = Histogram(
    "octoflux_generation_seconds",
    "Time the worker spent in the pipeline for one job",
    ["mode"],
    buckets=LATENCY_BUCKETS,
)
STEP_SECONDS = Histogram(
    "octoflux_denoising_step_seconds",
    "Time between consecutive denoising step callbacks",
    buckets=STEP_BUCKETS,
)
IMAGES_GENERATED = Counter("octoflux_images_generated", "Images returned to clients", ["mode"])
ERRORS = Counter("octoflux_errors", "Failed requests and jobs by kind", ["kind"])

# The LoRA cache (octoflux/pipelines/loras/cache.py) knows nothing of Prometheus: it reports events to the
# listener `lora_event_recorder()` returns, which the app passes in as `LoraCache(on_event=...)`.
LORA_LOAD_SECONDS = Histogram("octoflux_lora_load_seconds", "Time to read and attach one LoRA adapter")
LORA_SWITCH_SECONDS = Histogram("octoflux_lora_switch_seconds", "Time to change the active LoRA set")
LORA_EVICTIONS = Counter("octoflux_lora_evictions_total", "LoRA adapters removed from the pipeline")
LORA_CACHE_HITS = Counter("octoflux_lora_cache_hits", "LoRA activations served by a resident adapter")
LORA_CACHE_MISSES = Counter("octoflux_lora_cache_misses", "LoRA activations that loaded weights from disk")


def lora_event_recorder() -> Callable[[str, float | None], None]:
    """The `on_event` listener for `LoraCache`: each cache event updates its metric."""
    counted = {"hit": LORA_CACHE_HITS, "miss": LORA_CACHE_MISSES, "evict": LORA_EVICTIONS}
    timed = {"load": LORA_LOAD_SECONDS, "switch": LORA_SWITCH_SECONDS}

    def record(event: str, seconds: float | None) -> None:
        if event in counted:
            counted[event].inc()
        elif event in timed and seconds is not None:
            timed[event].observe(seconds)

    return record


# Per API key, labelled by the key's name, never its secret (octoflux/core/quotas.py).
KEY_JOBS = Gauge("octoflux_key_jobs", "Jobs waiting or running, by API key name", ["key"])
KEY_IMAGES = Counter("octoflux_key_images", "Images admitted, by API key name", ["key"])
KEY_REFUSED = Counter(
    "octoflux_key_refused", "Requests refused by a key's quota, by key name and limit", ["key", "limit"]
)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


# Webhooks (octoflux/webhooks/dispatcher.py): one count per attempt, by what became of it.
WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
WEBHOOK_DELIVERIES = Counter(
    "octoflux_webhook_deliveries",
    "Webhook attempts by outcome: delivered, retry (will be sent again), failed (gave up), refused (address)",
    ["outcome"],
)
WEBHOOK_ATTEMPT_SECONDS = Histogram(
    "octoflux_webhook_attempt_seconds",
    "One webhook attempt, from resolving the host to the receiver's answer",
    buckets=WEBHOOK_BUCKETS,
)
WEBHOOK_DELIVERY_SECONDS = Histogram(
    "octoflux_webhook_delivery_seconds",
    "From enqueueing a webhook to its delivery, retries included",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
