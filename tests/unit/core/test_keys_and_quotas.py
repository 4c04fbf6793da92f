"""The keys file (parsing, reloading) and per-key quotas, without a server."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from octoflux.core.quotas import Quota, QuotaExceeded
from octoflux.core.tenants import KeysFileError, KeyTable, Tenant, env_tenants, parse_keys_file

SECRET = "sk-team-a-0123456789"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()
GOOD = f"""
[[keys]]
name = "team-a"
secret = "{SECRET}"
scopes = ["generate", "assets"]
max_queued = 8
images_per_minute = 60

[[keys]]
name = "ops"
secret_sha256 = "sha256:{hashlib.sha256(b"sk-ops-0123456789").hexdigest()}"
scopes = ["admin"]
"""


def write(tmp_path, text: str):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_a_keys_file_gives_named_keys_with_scopes_and_limits(tmp_path):
    team, ops = parse_keys_file(write(tmp_path, GOOD))
    assert team == Tenant("team-a", DIGEST, frozenset({"generate", "assets"}), 8, 60)
    assert (team.allows("generate"), team.allows("assets"), team.allows("metrics")) == (True, True, False)
    assert ops.is_admin and ops.allows("metrics") and ops.allows("assets") and ops.asset_space is None
    assert team.asset_space == DIGEST


def test_a_key_keeps_its_owner_when_it_moves_from_the_environment_into_the_file(tmp_path):
    """Async jobs and assets are owned by sha256(secret), so they stay readable by the same secret."""
    (from_env,) = env_tenants([SECRET])
    (from_file, _) = parse_keys_file(write(tmp_path, GOOD))
    assert from_env.owner == from_file.owner == DIGEST
    assert from_env.name == f"key-{DIGEST[:8]}" and SECRET not in from_env.name


BAD = {
    "not toml": ("[[keys]\nname = 1", "not valid TOML"),
    "extra field": (GOOD.replace("max_queued = 8", "max_queued = 8\nquota = 3"), "unknown field 'quota'"),
    "extra top level": ("owner = 'x'\n" + GOOD, "unknown top-level field 'owner'"),
    "no secret": (GOOD.replace(f'secret = "{SECRET}"\n', ""), "exactly one of `secret` and `secret_sha256`"),
    "both secrets": (
        GOOD.replace('name = "team-a"', f'name = "team-a"\nsecret_sha256 = "{DIGEST}"'),
        "exactly one",
    ),
    "short hash": (
        GOOD.replace('secret_sha256 = "sha256:', 'secret_sha256 = "sha256:ab'),
        "64 lowercase hex",
    ),
    "unknown scope": (GOOD.replace('["admin"]', '["root"]'), "unknown scope 'root'"),
    "no scopes": (GOOD.replace('["admin"]', "[]"), "non-empty list"),
    "zero limit": (GOOD.replace("max_queued = 8", "max_queued = 0"), "`max_queued` must be a whole number"),
    "bad name": (GOOD.replace('"team-a"', '"team a"'), "`name` must be"),
    "same name": (GOOD.replace('"ops"', '"team-a"'), "two keys have the same name 'team-a'"),
    "same secret": (
        GOOD + GOOD.split("[[keys]]")[1].replace('"team-a"', '"copy"').join(["[[keys]]", ""]),
        "same secret",
    ),
}


def test_a_secret_in_the_file_and_the_environment_is_the_files_key(tmp_path):
    table = KeyTable([SECRET, "sk-env-only-0123456789"], write(tmp_path, GOOD))
    assert table.find(SECRET).name == "team-a"
    assert table.find("sk-env-only-0123456789").scopes == frozenset({"generate", "assets", "metrics"})
    assert table.find("sk-unknown-0123456789") is None


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_malformed_keys_file_is_one_line_naming_the_file_and_the_problem(tmp_path, case):
    text, words = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(KeysFileError) as caught:
        parse_keys_file(path)
    message = str(caught.value)
    assert words in message and str(path) in message
    assert "\n" not in message.strip()
    assert SECRET not in message


def test_reload_takes_a_changed_file_and_keeps_the_old_keys_when_it_is_bad(tmp_path, caplog):
    path = write(tmp_path, GOOD)
    table = KeyTable([], path)
    assert table.find(SECRET).name == "team-a"
    assert table.find("sk-new-0123456789") is None

    path.write_text(GOOD.replace(SECRET, "sk-new-0123456789"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    table._checked_at = 0  # the next lookup looks at the file again
    assert table.find("sk-new-0123456789").name == "team-a"
    assert table.find(SECRET) is None

    path.write_text("[[keys]]\nname = ")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert table.reload() is False
    assert table.find("sk-new-0123456789").name == "team-a"
    assert "keeping the 2 keys loaded before" in caplog.text


def test_reload_reads_the_file_even_when_its_mtime_and_size_did_not_change(tmp_path):
    """What SIGHUP does: the file is read whatever its stat says."""
    path = write(tmp_path, GOOD)
    stat = path.stat()
    table = KeyTable([], path)
    other = "sk-team-z-0123456789"  # as long as SECRET: same size
    path.write_text(GOOD.replace(SECRET, other))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    table._checked_at = 0
    assert table.find(other) is None  # the poll sees no change
    assert table.reload() is True
    assert table.find(other).name == "team-a"


def tenant(**limits) -> Tenant:
    return Tenant("t", DIGEST, frozenset({"generate"}), **limits)


def test_max_queued_refuses_past_the_limit_until_a_job_ends():
    quota = Quota(tenant(max_queued=2))
    first, _second = quota.admit(1), quota.admit(1)
    with pytest.raises(QuotaExceeded) as caught:
        quota.admit(1)
    assert caught.value.status == 429 and 1 <= caught.value.retry_after <= 60
    first()
    first()  # a second release gives back nothing more
    quota.admit(1)
    with pytest.raises(QuotaExceeded):
        quota.admit(1)


def test_images_per_minute_retry_after_is_when_enough_images_leave_the_window(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("octoflux.core.quotas.time.monotonic", lambda: now[0])
    quota = Quota(tenant(images_per_minute=4))
    quota.admit(2)()
    now[0] += 20
    quota.admit(2)()
    now[0] += 10
    with pytest.raises(QuotaExceeded) as caught:
        quota.admit(1)
    assert caught.value.retry_after == 30  # the first two images leave the window at t=1060
    now[0] += 30
    quota.admit(2)


def test_one_request_larger_than_the_per_minute_limit_names_the_field():
    with pytest.raises(Exception) as caught:
        Quota(tenant(images_per_minute=2)).admit(3)
    assert getattr(caught.value, "field", None) == "num_images"
