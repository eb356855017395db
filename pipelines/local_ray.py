"""A warm local Ray that runs attach to: `tda ray up` starts it once, `tda ray down` stops it.

Starting an embedded Ray costs a run seconds (6 s without its dashboard, 10 s with it, on 2 cores);
a run with a warm one attaches in about one. `up` starts a detached Python process that starts Ray
the way an embedded run does (every server on 127.0.0.1, its own temp folder, the dashboard on
127.0.0.1 so Ray Train steps work) with token authentication on a token of its own (mode 600), and
records where it is in `$TDA_RAY_DIR/cluster.json` (default `~/.cache/tda/ray/`). A run without an
address (`--ray-address`, `run.ray_address`) attaches to the recorded Ray if its process is alive and
answers, and says so; else it starts an embedded Ray as before and says why. `down` stops the process
(SIGTERM: it shuts Ray down and removes its temp folder) and forgets the record.

This module does not import ray: the process that holds Ray is `pipelines.runner.serve_warm_ray`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import RayUnavailable
from pipelines.housekeeping import process_alive, remove_ray_temp_dir

RAY_DIR_ENV = "TDA_RAY_DIR"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


def ray_dir() -> Path:
    """Where the warm Ray's record, token and log live: $TDA_RAY_DIR, else ~/.cache/tda/ray."""
    return Path(os.environ.get(RAY_DIR_ENV) or Path.home() / ".cache" / "tda" / "ray")


def record_path() -> Path:
    return ray_dir() / "cluster.json"


@dataclass(frozen=True)
class WarmRay:
    """What `cluster.json` holds: the GCS address to attach to and the process that holds the Ray."""

    address: str  # 127.0.0.1:PORT, the GCS
    pid: int
    pid_start: str | None
    temp_dir: str
    token_path: str
    dashboard: str
    num_cpus: int
    started: str

    def alive(self) -> bool:
        return process_alive(self.pid, self.pid_start)

    def auth_env(self) -> dict[str, str]:
        """The environment a driver needs to attach (this Ray's own token)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}


def recorded() -> WarmRay | None:
    """The recorded warm Ray (alive or not); None if there is no readable record."""
    try:
        data = json.loads(record_path().read_text(encoding="utf-8"))
        return WarmRay(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_record(warm: WarmRay) -> None:
    """Record `warm` (written by the process that holds the Ray, once it is up)."""
    path = record_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(warm), indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def forget(warm: WarmRay | None = None) -> None:
    """Remove the record (only if it still names `warm`, when given)."""
    if warm is None or recorded() == warm:
        record_path().unlink(missing_ok=True)


def _new_token(folder: Path) -> Path:
    path = folder / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def up(num_cpus: int | None = None, timeout: float = START_TIMEOUT_S) -> tuple[WarmRay, bool]:
    """Start the warm Ray unless one is up: (it, whether it was started now)."""
    existing = recorded()
    if existing is not None and existing.alive():
        return existing, False
    forget(existing)
    folder = ray_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = _new_token(folder)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        RAY_DIR_ENV: str(folder),
    }
    code = "import sys; from pipelines.runner import serve_warm_ray; serve_warm_ray(int(sys.argv[1]))"
    with open(folder / "head.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(num_cpus or os.cpu_count() or 1)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command; not hit by its terminal's Ctrl-C
        )
    return _wait_up(proc, folder / "head.log", timeout), True


def _wait_up(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> WarmRay:
    deadline = time.monotonic() + timeout
    while (warm := recorded()) is None or warm.pid != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RayUnavailable(f"the warm Ray did not start (log {log}): {tail or 'no output'}")
        time.sleep(0.2)
    return warm


def down(timeout: float = STOP_TIMEOUT_S) -> WarmRay | None:
    """Stop the recorded warm Ray and forget it; returns what was recorded (None: nothing was)."""
    warm = recorded()
    if warm is None:
        return None
    if warm.alive():
        os.kill(warm.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while warm.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if warm.alive():
            os.kill(warm.pid, signal.SIGKILL)
    remove_ray_temp_dir(warm.temp_dir)  # whatever it left running (a no-op after a clean shutdown)
    forget(warm)
    return warm


def attachable() -> tuple[WarmRay | None, str | None]:
    """(the warm Ray to attach to, None) or (None, why a recorded one cannot be: its process is gone)."""
    warm = recorded()
    if warm is None:
        return None, None
    if not warm.alive():
        forget(warm)
        return None, f"the warm Ray recorded in {record_path()} (pid {warm.pid}) is gone"
    return warm, None


def describe(warm: WarmRay) -> dict[str, Any]:
    return {"address": warm.address, "pid": warm.pid, "cpus": warm.num_cpus, "dashboard": warm.dashboard}
