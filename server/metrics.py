"""Every Prometheus metric the server exports, defined once; other modules import and update them.

Metrics live in prometheus-client's default registry, which also carries the process collector
(`process_resident_memory_bytes`, CPU seconds, open fds) that the load benchmark reads.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# Seconds: from a 2-step tiny model on CPU to a 50-step 16-image FLUX.1-dev batch.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)

QUEUE_DEPTH = Gauge("octoflux_queue_depth", "Jobs waiting for the worker, not counting the running one")
JOBS_IN_FLIGHT = Gauge("octoflux_jobs_in_flight", "Jobs the worker is running now (0 or 1)")
ASYNC_RESULTS = Gauge("octoflux_async_results", "Async jobs remembered (any status)")
ASYNC_RESULT_BYTES = Gauge("octoflux_async_result_bytes", "Bytes of finished async results held", ["where"])

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

# The LoRA cache's own metrics (hits, misses, load/switch time, evictions) live beside it in
# pipelines/loras.py, which must not import the server; they land in the same default registry.


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


# Webhooks (server/webhooks.py): one count per attempt, by what became of it.
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
