"""Where `parley up` leaves its state for `parley status` (parley/state.py)."""

from __future__ import annotations

import os
import stat

from parley import state


def test_runtime_dir_first_then_the_users_cache(tmp_path):
    assert state.state_file({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "parley" / "up.json"
    home = {"HOME": str(tmp_path)}
    assert state.state_file(home) == tmp_path / ".cache" / "parley" / "up.json"


def test_written_private_read_back_and_removed(tmp_path):
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    path = state.write({"redis_url": "redis://127.0.0.1:7/0", "pid": os.getpid()}, env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state.read(env)["redis_url"] == "redis://127.0.0.1:7/0"
    state.remove(env)
    state.remove(env)  # twice is fine
    assert state.read(env) is None


def test_garbage_or_a_missing_pid_reads_as_no_fleet(tmp_path):
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    state.write({"redis_url": "redis://x/0"}, env)
    assert state.read(env) is None
    state.state_file(env).write_text("{not json")
    assert state.read(env) is None
