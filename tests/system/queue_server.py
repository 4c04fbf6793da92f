"""`octoflux serve` with two test-only faults in its engine, for the durable-queue tests.

    python tests/system/queue_server.py GATE_FILE [serve flags...]

A job whose prompt starts with `held` waits at each denoising step while GATE_FILE exists (a shutdown
still interrupts it); a job whose prompt starts with `kill-worker` kills its own process (SIGKILL)
when it starts, every time it is run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import octoflux.app as app_module
from octoflux.cli import main

HELD, KILLER = "held", "kill-worker"


def faulty(engine_factory, gate: Path):
    def factory(settings, library=None):
        engine = engine_factory(settings, library)
        generate = engine.generate

        def generate_with_faults(spec, should_stop=lambda: False, on_step=None):
            if spec.prompt.startswith(KILLER):
                os.kill(os.getpid(), signal.SIGKILL)

            def step() -> bool:
                while spec.prompt.startswith(HELD) and gate.exists():
                    if should_stop():
                        return True
                    time.sleep(0.05)
                return should_stop()

            return generate(spec, should_stop=step, on_step=on_step)

        engine.generate = generate_with_faults
        return engine

    return factory


def run(gate: Path, argv: list[str]) -> None:
    create_app = app_module.create_app

    def create_faulty_app(settings, engine_factory=app_module.build_engine, on_load_failure=None):
        return create_app(settings, faulty(engine_factory, gate), on_load_failure)

    app_module.create_app = create_faulty_app
    main(["serve", *argv])


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2:])
