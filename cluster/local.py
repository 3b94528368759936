"""A local multi-node Ray cluster: a head and N worker nodes on this machine, each a `ray start --block` of its own,
recorded in a state directory so that `stop` ends exactly those nodes (cluster/README.md: token auth, layout).

    python -m cluster.local start --workers 2 [--cpus-per-node 1]   # prints the `ray job submit` environment
    eval "$(python -m cluster.local status)"
    python -m cluster.local stop
"""
from __future__ import annotations

import argparse
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
# Variables of the caller's environment that would point the nodes or the CLI at another cluster or token.
_CLEARED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class ClusterError(RuntimeError):
    """A usage error: a cluster already runs from the directory, none is recorded, a port is taken (exit 2)."""


@dataclass
class ClusterInfo:
    """What `start` records in DIR/cluster.json: the addresses, the auth, per node the PID of its `ray start`."""

    state_dir: str
    address: str  # the head's GCS address: `ray status --address`, ray.init() run on this machine
    dashboard_url: str  # the job API: RAY_ADDRESS of `ray job submit`
    token_path: str  # the cluster's token (RAY_AUTH_MODE=token), 0600
    temp_root: str  # the nodes' temp dirs (sessions, logs) and the outputs of their `ray start`
    pids: list[int] = field(default_factory=list)  # the head's first

    def alive(self) -> list[int]:
        """The nodes' `ray start --block` processes still running (each exits when a process of its node dies)."""
        return [pid for pid in self.pids if _running(pid)]

    def env(self) -> dict[str, str]:
        """The environment of `ray job submit`; with `--address ADDRESS`, of `ray status`."""
        return {"RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def cli_env(self) -> dict[str, str]:
        """os.environ without the variables naming another cluster or token, plus `env()`: for `ray` subprocesses."""
        return {**{k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}, **self.env()}

    def exports(self) -> str:
        """Shell lines for `eval`."""
        lines = [f"# Ray cluster from {self.state_dir}: head {self.address} + {len(self.pids) - 1} worker node(s)"]
        lines += [f"export {key}={value}" for key, value in self.env().items()]
        return "\n".join([*lines, "unset RAY_AUTH_TOKEN  # it would take precedence over the file",
                          f"# ray status --address {self.address}",
                          f"# python -m cluster.local stop --dir {self.state_dir}"])

    def save(self) -> None:
        (Path(self.state_dir) / STATE_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")


def load_cluster(state_dir: Path | str = DEFAULT_DIR) -> ClusterInfo:
    """The cluster recorded in `state_dir`; ClusterError if there is none."""
    path = Path(state_dir).resolve() / STATE_NAME
    if not path.is_file():
        raise ClusterError(f"no cluster state in {path}; nothing was started from {state_dir} (or it was stopped)")
    return ClusterInfo(**json.loads(path.read_text()))


def _running(pid: int) -> bool:
    """Whether `pid` still runs as the session leader our `ray start` is; reaps it if it exited as our child."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child (started by another `cluster.local start`), or reaped
        pass
    try:
        return os.getsid(pid) == pid
    except ProcessLookupError:
        return False


def _bind(port: int) -> int | None:
    """Bind `port` for a moment (0: any free one); the port, or None if it is in use."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return None
        return sock.getsockname()[1]


def _write_private(path: Path, text: str) -> None:
    """Write a secret to a new file, 0600 from its creation whatever the umask: a leftover is removed first,
    O_CREAT|O_EXCL (with O_NOFOLLOW) refuses any file or link that appears in its place."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)
        out.write(text)


def _wait_ready(pid: int, out: Path, deadline: float) -> None:
    """Wait until the `ray start --block` writing `out` says its node is up (registered with the GCS);
    RuntimeError with the end of `out` if it exits or time runs out."""
    while "block forever" not in (text := out.read_text(errors="replace")):
        if not _running(pid) or time.monotonic() > deadline:
            tail = "\n".join(text.splitlines()[-15:])
            raise RuntimeError(f"`ray start` {'timed out' if _running(pid) else 'failed'}; the end of {out}:\n{tail}")
        time.sleep(0.2)


def start_cluster(workers: int, cpus_per_node: int = 1, state_dir: Path | str = DEFAULT_DIR, *,
                  head_cpus: int | None = None, gpus_per_node: int | None = None, port: int = 6379,
                  dashboard_port: int = 8265, timeout_s: float = 120.0) -> ClusterInfo:
    """Start a head (`head_cpus` CPUs, default `cpus_per_node`; no GPUs) and `workers` worker nodes, recorded in
    `state_dir`; port 0 picks a free one. ClusterError if one from `state_dir` runs or a port is taken;
    RuntimeError if a node fails to start (the nodes started are stopped, their logs kept)."""
    state_dir = Path(state_dir).resolve()
    if (state_dir / STATE_NAME).is_file():
        if load_cluster(state_dir).alive():
            raise ClusterError(f"a Ray cluster started from {state_dir} is already running; stop it first: "
                               f"python -m cluster.local stop --dir {state_dir}")
        stop_cluster(state_dir)  # its nodes are gone: clear what they left
    for name, wanted in (("--port", port), ("--dashboard-port", dashboard_port)):
        if wanted and _bind(wanted) is None:
            raise ClusterError(f"port {wanted} ({name}) is in use, probably by another Ray cluster; pass another "
                               f"{name}, or 0 for a free one")
    state_dir.mkdir(parents=True, exist_ok=True)
    _write_private(state_dir / TOKEN_NAME, secrets.token_hex(32))
    port, dashboard_port = port or _bind(0), dashboard_port or _bind(0)
    info = ClusterInfo(str(state_dir), f"{HOST}:{port}", f"http://{HOST}:{dashboard_port}", str(state_dir / TOKEN_NAME),
                       tempfile.mkdtemp(prefix="ray-local-"))
    info.save()
    bin_dir = str(Path(sys.executable).parent)  # job entrypoints run in the nodes' environment: `python` is ours
    env = {**{k: v for k, v in info.cli_env().items() if k != "RAY_ADDRESS"}, "PATH": bin_dir + os.pathsep +
           os.environ.get("PATH", ""), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once on SIGTERM
    root, deadline = Path(info.temp_root), time.monotonic() + timeout_s

    def launch(index: int, cpus: int, args: list[str]) -> tuple[int, Path]:
        cmd = [shutil.which("ray", path=bin_dir) or "ray", "start", "--block", "--node-ip-address", HOST,
               "--temp-dir", str(root / f"n{index}"), "--num-cpus", str(cpus), "--dashboard-agent-listen-port", "0",
               "--disable-usage-stats", *args]
        with open(root / f"n{index}.out", "wb") as out:
            info.pids.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True).pid)
        info.save()  # from here on `stop` ends whatever this start leaves behind
        return info.pids[-1], root / f"n{index}.out"

    try:  # the head first, once it is up the workers (in parallel)
        head = launch(0, cpus_per_node if head_cpus is None else head_cpus, [
            "--head", "--port", str(port), "--dashboard-host", HOST, "--dashboard-port", str(dashboard_port),
            "--ray-client-server-port", str(_bind(0)), "--num-gpus", "0"])
        _wait_ready(*head, deadline)
        gpus = [] if gpus_per_node is None else ["--num-gpus", str(gpus_per_node)]
        for node in [launch(i, cpus_per_node, ["--address", info.address, *gpus]) for i in range(1, workers + 1)]:
            _wait_ready(*node, deadline)
    except BaseException:
        log.error("starting the cluster failed; stopping its nodes (logs kept in %s)", info.temp_root)
        stop_cluster(state_dir, keep_logs=bool(info.pids))
        raise
    log.info("Ray cluster up: head %s + %d worker node(s), dashboard %s", info.address, workers, info.dashboard_url)
    return info


def stop_cluster(state_dir: Path | str = DEFAULT_DIR, grace_s: float = 15.0, keep_logs: bool = False) -> ClusterInfo:
    """SIGTERM the recorded `ray start --block` processes, workers first: each stops its node's processes, which
    also die with it (Ray's kernel fate-sharing); SIGKILL after `grace_s`. Then remove the state."""
    info = load_cluster(state_dir)
    for pids in (info.pids[1:], info.pids[:1]):
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for pid in filter(_running, pids):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while any(map(_running, pids)) and time.monotonic() < deadline:
                time.sleep(0.1)
    if info.alive():
        raise RuntimeError(f"nodes of the cluster from {info.state_dir} still run: PIDs {info.alive()}")
    if not keep_logs:
        shutil.rmtree(info.temp_root, ignore_errors=True)
    Path(info.token_path).unlink(missing_ok=True)
    (Path(info.state_dir) / STATE_NAME).unlink()
    log.info("stopped the Ray cluster from %s (%d node(s))", info.state_dir, len(info.pids))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name, help=text, description=text) for name, text in (
        ("start", "Start a head and N worker nodes on this machine; print the head's address and the environment "
                  "`ray job submit` needs. Exit 2: a cluster from --dir runs, or a port is taken."),
        ("status", "Print that environment again; exit 1 if a node is down, 2 if nothing is recorded in --dir."),
        ("stop", "Stop exactly the nodes started from --dir (no other Ray on this machine), remove the state."))}
    start = commands["start"]
    start.add_argument("--workers", type=int, required=True, help="worker nodes besides the head")
    start.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs of each node (default 1)")
    start.add_argument("--head-cpus", type=int, help="logical CPUs of the head (default: --cpus-per-node)")
    start.add_argument("--gpus-per-node", type=int, help="GPUs of each worker node (default: Ray's detection)")
    start.add_argument("--port", type=int, default=6379, help="the head's GCS port (default 6379; 0: a free one)")
    start.add_argument("--dashboard-port", type=int, default=8265, help="job API port (default 8265; 0: a free one)")
    for command in commands.values():
        command.add_argument("--dir", dest="state_dir", type=Path, default=DEFAULT_DIR,
                             help=f"state: cluster.json (addresses, node PIDs), auth_token (default {DEFAULT_DIR})")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        command = args.pop("command")
        if command == "start":
            print(start_cluster(**args).exports())
        elif command == "stop":
            stop_cluster(**args)
        else:
            info = load_cluster(**args)
            print(info.exports())
            down = len(info.pids) - len(info.alive())
            log.log(logging.ERROR if down else logging.INFO, "%d of %d node(s) down", down, len(info.pids))
            return 1 if down else 0
    except RuntimeError as exc:  # ClusterError: a usage error (exit 2); else a node failed to start or stop
        log.error("%s", exc)
        return 2 if isinstance(exc, ClusterError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
