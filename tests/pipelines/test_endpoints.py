"""An embedded run's Ray listens on loopback only, checked on the live sockets of its processes."""

from __future__ import annotations

import os
import time

# 127.0.0.1 on an IPv6 socket reads ::ffff:127.0.0.1 (Ray's gRPC servers)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _session_processes(psutil, session_dir: str) -> list:
    """This process (the driver), its descendants (GCS, raylet, dashboard, agents, workers) and any
    other process whose command line names the session's directory."""
    me = psutil.Process()
    procs = {me.pid: me}
    for child in me.children(recursive=True):
        procs[child.pid] = child
    for proc in psutil.process_iter():
        try:
            if proc.pid not in procs and any(session_dir in arg for arg in proc.cmdline()):
                procs[proc.pid] = proc
        except psutil.Error:  # gone, or not ours
            continue
    return list(procs.values())


def _listeners(psutil, session_dir: str) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, command line) of every listening TCP socket of the session's processes."""
    found = []
    for proc in _session_processes(psutil, session_dir):
        try:
            name = " ".join(proc.cmdline()).strip()[:80] or proc.name()
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:  # the process ended meanwhile
            continue
        found += [(c.laddr.ip, c.laddr.port, proc.pid, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _check_listeners(ray, psutil) -> None:
    node = ray._private.worker._global_node
    # the servers that must be up before the check means anything: GCS, raylet, dashboard agent (gRPC,
    # Prometheus metrics), runtime env agent, dashboard; not the ones on fixed ports that another Ray
    # on this machine may hold (the agent's HTTP 52365, the autoscaler's and dashboard's metrics)
    expected = {
        _port(node.gcs_address),
        node.node_manager_port,
        node.metrics_agent_port,
        node.metrics_export_port,
        node.runtime_env_agent_port,
        _port(node.webui_url),  # 8265 or, when taken, the next free one
    }
    deadline = time.monotonic() + 60
    while True:
        listeners = _listeners(psutil, node.get_session_dir_path())
        missing = expected - {port for _, port, _, _ in listeners}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"Ray servers not listening on ports {sorted(missing)}: {sorted(listeners)}"

    exposed = sorted(entry for entry in listeners if entry[0] not in LOOPBACK)
    assert not exposed, "the embedded Ray listens beyond loopback:\n" + "\n".join(
        f"  {ip}:{port}  pid {pid}  {name}" for ip, port, pid, name in exposed
    )


def test_embedded_ray_listens_on_loopback_only(ray_session):
    ray = ray_session
    import psutil  # Ray ships it (ray/thirdparty_files, on sys.path once ray is imported)

    @ray.remote
    def task_pid() -> int:
        return os.getpid()

    @ray.remote
    class Actor:
        def pid(self) -> int:
            return os.getpid()

    actor = Actor.remote()
    try:
        # a task worker and an actor exist, each with its own gRPC server
        assert len(set(ray.get([task_pid.remote(), actor.pid.remote()]))) == 2
        _check_listeners(ray, psutil)
    finally:
        ray.kill(actor)
