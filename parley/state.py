"""Where `parley up` says what it started, so `parley status` (and `export`) in another terminal
find that fleet without PARLEY_REDIS_URL: a small JSON file in the user's runtime directory
($XDG_RUNTIME_DIR/parley, else ~/.cache/parley), written once the fleet is ready and removed when
it stops. A file left by a `parley up` that was killed is ignored (its pid is gone)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def state_dir(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "parley"
    return Path(env.get("HOME") or Path.home()) / ".cache" / "parley"


def state_file(env: dict[str, str] | None = None) -> Path:
    return state_dir(env) / "up.json"


def write(state: dict, env: dict[str, str] | None = None) -> Path:
    path = state_file(env)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.chmod(tmp, 0o600)  # it names the fleet's Redis: the user's own business
    tmp.replace(path)  # a reader never sees half a file
    return path


def remove(env: dict[str, str] | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_file(env).unlink()


def read(env: dict[str, str] | None = None) -> dict | None:
    """The running fleet's state, or None (none written, unreadable, or its `parley up` died)."""
    try:
        state = json.loads(state_file(env).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not _alive(int(state.get("pid", 0))):
        return None
    return state


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
