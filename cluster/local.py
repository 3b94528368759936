"""A local multi-node Ray cluster: a head and N worker nodes on this machine, each a `ray start --block` in a session
of its own whose PID is recorded in DIR/cluster.json, so that `stop` ends exactly those nodes and no other Ray.
Token auth, ports and layout: cluster/README.md.

    python -m cluster.local start --workers 2 [--cpus-per-node 1]   # prints the `ray job submit` environment
    eval "$(python -m cluster.local status)"
    python -m cluster.local stop
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("cluster.local")

DEFAULT_DIR, STATE_NAME, TOKEN_NAME, HOST = Path("work/cluster"), "cluster.json", "auth_token", "127.0.0.1"
_CLEARED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class ClusterError(RuntimeError):
    """A usage error: a cluster already runs from the directory, none is recorded, a port is taken (exit 2)."""


@dataclass
class ClusterInfo:
    """What `start` records in DIR/cluster.json: the addresses, the token, per node the PID of its `ray start`."""

    state_dir: str
    address: str  # the head's GCS address: `ray status --address`, ray.init() run on this machine
    dashboard_url: str  # the job API: RAY_ADDRESS of `ray job submit`
    token_path: str  # the cluster's token (RAY_AUTH_MODE=token), 0600
    temp_root: str  # the nodes' temp dirs (sessions, logs) and the outputs of their `ray start`
    pids: list[int] = field(default_factory=list)  # the head's first

    def alive(self) -> list[int]:
        """The nodes' `ray start --block` processes still running (each exits when a process of its node dies)."""
        return [pid for pid in self.pids if _running(pid)]

    def cli_env(self) -> dict[str, str]:
        """os.environ without the variables naming another cluster or token, plus this one's: for `ray job submit`."""
        return {**{k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}, "RAY_ADDRESS": self.dashboard_url,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def exports(self) -> str:
        """Shell lines for `eval`: the variables `cli_env()` sets, the head's address for `ray status`."""
        return "\n".join([f"# Ray cluster from {self.state_dir}: head {self.address} + {len(self.pids) - 1} worker(s)",
                          *(f"export {k}={v}" for k, v in self.cli_env().items() if k in _CLEARED_ENV),
                          "unset RAY_AUTH_TOKEN  # it would take precedence over the file",
                          f"# ray status --address {self.address}; python -m cluster.local stop --dir {self.state_dir}"])

    def save(self) -> None:
        (Path(self.state_dir) / STATE_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")


def load_cluster(state_dir: Path | str = DEFAULT_DIR) -> ClusterInfo:
    """The cluster recorded in `state_dir`; ClusterError if there is none."""
    path = Path(state_dir).resolve() / STATE_NAME
    if not path.is_file():
        raise ClusterError(f"no cluster state in {path}; nothing was started from {state_dir} (or it was stopped)")
    return ClusterInfo(**json.loads(path.read_text()))


def _running(pid: int) -> bool:
    """Whether the `ray start` with this PID still runs: a session leader (`ray start` is one), not a child of
    this process that has exited (reaped here)."""
    with contextlib.suppress(ChildProcessError):  # not our child: `stop` from another process
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        return os.getsid(pid) == pid
    except ProcessLookupError:
        return False


def _port(port: int, flag: str) -> int:
    """`port`, or a free one for 0; ClusterError if something listens on it."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            raise ClusterError(f"port {port} ({flag}) is in use, probably by another Ray cluster; pass another "
                               f"{flag}, or 0 for a free one") from None
        return sock.getsockname()[1]


def start_cluster(workers: int, cpus_per_node: int = 1, state_dir: Path | str = DEFAULT_DIR, *,
                  head_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265,
                  timeout_s: float = 120.0) -> ClusterInfo:
    """Start a head (`head_cpus` CPUs, default `cpus_per_node`; no GPUs) and `workers` worker nodes, recorded in
    `state_dir`; port 0: a free one. ClusterError if one from `state_dir` runs or a port is taken; RuntimeError if a
    node fails to start (the nodes started are stopped, their logs kept)."""
    state_dir = Path(state_dir).resolve()
    if (state_dir / STATE_NAME).is_file() and load_cluster(state_dir).alive():
        raise ClusterError(f"a Ray cluster started from {state_dir} is already running; stop it first: "
                           f"python -m cluster.local stop --dir {state_dir}")
    if (state_dir / STATE_NAME).is_file():
        stop_cluster(state_dir)  # its nodes are gone: clear what they left
    port, dashboard_port = _port(port, "--port"), _port(dashboard_port, "--dashboard-port")
    state_dir.mkdir(parents=True, exist_ok=True)
    token = state_dir / TOKEN_NAME
    token.unlink(missing_ok=True)  # a leftover is replaced; O_EXCL refuses a file or link appearing in its place
    with os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as out:
        out.write(secrets.token_hex(32))  # into a file private from its creation, whatever the umask
    info = ClusterInfo(str(state_dir), f"{HOST}:{port}", f"http://{HOST}:{dashboard_port}", str(token),
                       tempfile.mkdtemp(prefix="ray-local-"))
    bin_dir = str(Path(sys.executable).parent)  # job entrypoints run in the nodes' environment: `python` is ours
    env = {**{k: v for k, v in info.cli_env().items() if k != "RAY_ADDRESS"}, "PATH": bin_dir + os.pathsep +
           os.environ.get("PATH", ""), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once on SIGTERM
    deadline = time.monotonic() + timeout_s

    def launch(cpus: int, *args: str) -> None:
        out = Path(info.temp_root) / f"n{len(info.pids)}"
        cmd = [shutil.which("ray", path=bin_dir) or "ray", "start", "--block", "--node-ip-address", HOST, "--temp-dir",
               str(out), "--num-cpus", str(cpus), "--dashboard-agent-listen-port", "0", "--disable-usage-stats", *args]
        with open(out.with_suffix(".out"), "wb") as log_file:
            info.pids.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                              start_new_session=True).pid)
        info.save()  # from here on `stop` ends whatever this start leaves behind

    info.save()
    try:  # the head first, once it is up the workers (in parallel)
        launch(cpus_per_node if head_cpus is None else head_cpus, "--head", "--port", str(port), "--dashboard-host",
               HOST, "--dashboard-port", str(dashboard_port), "--ray-client-server-port",
               str(_port(0, "--ray-client-server-port")), "--num-gpus", "0")
        _wait_for_nodes(info, env, deadline)
        for _ in range(workers):
            launch(cpus_per_node, "--address", info.address)
        _wait_for_nodes(info, env, deadline)
    except BaseException:
        log.error("starting the cluster failed; stopping its nodes (logs kept in %s)", info.temp_root)
        stop_cluster(state_dir, keep_logs=bool(info.pids))
        raise
    log.info("Ray cluster up: head %s + %d worker node(s), dashboard %s", info.address, workers, info.dashboard_url)
    return info


def _wait_for_nodes(info: ClusterInfo, env: dict[str, str], deadline: float) -> None:
    """Until `ray status` lists every node started as active (what the autoscaler and placement groups see, a
    little after each `ray start` is up); RuntimeError with the end of its output when a node's process dies."""
    cmd = [shutil.which("ray", path=env["PATH"]) or "ray", "status", "--address", info.address]
    while time.monotonic() < deadline:
        for n, pid in enumerate(info.pids):
            if not _running(pid):
                out = Path(info.temp_root) / f"n{n}.out"
                raise RuntimeError(f"`ray start` failed; the end of {out}:\n"
                                   + "\n".join(out.read_text(errors="replace").splitlines()[-15:]))
        shown = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60).stdout
        if shown.partition("Active:")[2].partition("Pending:")[0].count("node_") >= len(info.pids):
            return
        time.sleep(0.5)
    raise RuntimeError(f"`ray start` timed out: the cluster from {info.state_dir} did not list its {len(info.pids)} "
                       f"nodes in time; their output is in {info.temp_root}")


def stop_cluster(state_dir: Path | str = DEFAULT_DIR, grace_s: float = 15.0, keep_logs: bool = False) -> ClusterInfo:
    """SIGTERM every recorded `ray start --block`: each stops its node's processes, which also die with it (Ray's
    kernel fate-sharing); SIGKILL after `grace_s`, then to what is left in their process groups. Then remove the
    state and (unless `keep_logs`) the temp dirs."""
    info = load_cluster(state_dir)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in info.alive():
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while info.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    if info.alive():
        raise RuntimeError(f"nodes of the cluster from {info.state_dir} still run: PIDs {info.alive()}")
    for pid in info.pids:  # what a node left in its process group (the `ray start` leads it), e.g. a worker
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    if not keep_logs:
        shutil.rmtree(info.temp_root, ignore_errors=True)
    Path(info.token_path).unlink(missing_ok=True)
    (Path(info.state_dir) / STATE_NAME).unlink()
    log.info("stopped the Ray cluster from %s (%d node(s))", info.state_dir, len(info.pids))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "status", "stop"), help="start (exit 2: one from --dir runs, or "
                        "a port is taken); status: print the environment again (exit 1: a node is down); stop")
    parser.add_argument("--dir", dest="state_dir", type=Path, default=DEFAULT_DIR,
                        help=f"state: cluster.json (addresses, node PIDs) and auth_token (default {DEFAULT_DIR})")
    parser.add_argument("--workers", type=int, default=1, help="start: worker nodes besides the head (default 1)")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="start: logical CPUs of each node (default 1)")
    parser.add_argument("--port", type=int, default=6379, help="start: the head's GCS port (default 6379; 0: any)")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="start: job API port (default 8265; 0: any)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "stop":
            stop_cluster(args.state_dir)
            return 0
        info = load_cluster(args.state_dir) if args.command == "status" else start_cluster(
            args.workers, args.cpus_per_node, args.state_dir, port=args.port, dashboard_port=args.dashboard_port)
    except RuntimeError as exc:  # ClusterError: a usage error (exit 2); else a node failed to start or stop
        log.error("%s", exc)
        return 2 if isinstance(exc, ClusterError) else 1
    print(info.exports())
    if down := len(info.pids) - len(info.alive()):
        log.error("%d of %d node(s) down", down, len(info.pids))
    return 1 if down else 0


if __name__ == "__main__":
    sys.exit(main())
