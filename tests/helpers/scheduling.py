"""How `pytest -n 2 --dist loadfile` splits the suite: whole modules, the slowest handed out first.

A module runs on one worker, so its module-scoped servers start once. Both Ray modules form one
unit: two Ray clusters at once would fight over two cores. Without an order, xdist hands out the
modules with most tests first and leaves a slow module of few tests (inductor) to run alone at the end.
"""

from __future__ import annotations

from xdist.scheduler import LoadFileScheduling

RAY = "ray"
RAY_MODULES = {"tests/system/test_replicas.py", "tests/system/test_replicas_sigterm.py"}
# Slowest first, as `--durations` measured them; every other module follows in collection order.
SLOWEST = [
    RAY,
    "tests/system/test_context_parallel.py",
    "tests/unit/pipelines/test_inductor.py",
    "tests/system/test_durable_queue.py",
    "tests/system/test_readme_examples.py",
    "tests/unit/pipelines/test_parallel.py",
    "tests/api/common/test_family.py",
    "tests/system/test_store_damage.py",
    "tests/api/common/test_tenants_reload.py",
    "tests/system/test_shutdown.py",
    "tests/system/test_bench.py",
    "tests/system/test_cli.py",
    "tests/api/octoai/test_webhooks_api.py",
]


class SlowestModulesFirst(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
        module = super()._split_scope(nodeid)
        return RAY if module in RAY_MODULES else module

    def _assign_work_unit(self, node) -> None:
        waiting = next((scope for scope in SLOWEST if scope in self.workqueue), None)
        if waiting is not None:
            self.workqueue.move_to_end(waiting, last=False)
        super()._assign_work_unit(node)
