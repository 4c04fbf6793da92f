"""`octoflux serve --api-keys-file`: a bad file stops the start in one line; SIGHUP re-reads it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers.engine_control import wait_until
from helpers.services import free_port

ROOT = Path(__file__).resolve().parents[3]
OLD, NEW = "sk-old-key-0123456789", "sk-new-key-0123456789"  # the same length: the file keeps its size


def keys_file(secret: str) -> str:
    return f'[[keys]]\nname = "ops"\nsecret = "{secret}"\nscopes = ["generate"]\n'


def command(tiny_checkpoint: str, keys: Path, port: int) -> list[str]:
    return [
        *(sys.executable, "-m", "octoflux.cli", "serve", "--model", tiny_checkpoint, "--device", "cpu"),
        *("--no-warmup", "--port", str(port), "--api-keys-file", str(keys)),
    ]


def test_a_malformed_keys_file_stops_the_start_with_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_file(OLD).replace('scopes = ["generate"]', 'scopes = ["generate"]\nquota = 1'))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        command(tiny_checkpoint, keys, free_port()),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"octoflux: keys file {keys}: key 1 ('ops'): unknown field 'quota' "
        "(allowed: images_per_minute, max_queued, name, scopes, secret, secret_sha256)"
    ]


def whoami(url: str, secret: str) -> int:
    return httpx.get(f"{url}/v1/whoami", headers={"Authorization": f"Bearer {secret}"}, timeout=5).status_code


def rewrite_keeping_mtime(path: Path, text: str) -> None:
    """A change only SIGHUP reveals: same size, same mtime, so the file poll sees nothing."""
    stat = path.stat()
    assert len(text) == stat.st_size
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.timeout(180)
def test_sighup_reloads_the_keys_and_a_bad_file_keeps_the_old_ones(tiny_checkpoint, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_file(OLD))
    port, log_path = free_port(), tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command(tiny_checkpoint, keys, port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return whoami(url, OLD) == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout=120, what="server start")
        rewrite_keeping_mtime(keys, keys_file(NEW))
        assert whoami(url, NEW) == 401  # not re-read without a signal

        process.send_signal(signal.SIGHUP)
        wait_until(lambda: whoami(url, NEW) == 200, what="the new key after SIGHUP")
        assert whoami(url, OLD) == 401

        rewrite_keeping_mtime(keys, keys_file(NEW).replace("[[keys]]", "[[keyz]]"))
        process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: "keeping the 1 keys loaded before" in log_path.read_text(), what="the logged error"
        )
        assert whoami(url, NEW) == 200
        assert process.poll() is None
    finally:
        process.kill()
        process.wait(10)
