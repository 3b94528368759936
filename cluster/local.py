"""A local multi-node Ray cluster: one head node (GCS, dashboard, job API) and N worker nodes, all on
this machine, each a `ray start` of its own.

    python -m cluster.local start --workers 2 [--cpus-per-node 1] [--dir work/cluster]
                                  [--port 6379] [--dashboard-port 8265] [--auth token|disabled]
    eval "$(python -m cluster.local status)"    # the environment `ray job submit` needs
    ray job submit --working-dir . -- python trainer/launch.py --config trainer/configs/av_digits.toml
    python -m cluster.local stop

`start` prints (stdout) shell `export` lines for the CLI and writes DIR/cluster.json: the addresses, the
auth setting and, per node, its session id and the PIDs it started. Each node's `ray start` runs in a
session of its own (setsid) with CLUSTER_LOCAL_ID=<a fresh id> in its environment, which every process
Ray starts inherits: this cluster's processes are exactly the members of those sessions and the
processes carrying the id (job drivers run in sessions of their own), plus their descendants. `stop`
ends them the way `ray stop` does (raylets, then the other processes, then the GCS; SIGKILL after a
grace period) without touching any other Ray process of the user, checks that they are gone and
removes the state. Processes are found through /proc (Linux). Node logs are under the temp dir
recorded in the state (removed on stop).

Authentication on ray 2.60 (tried here): `ray start --head` turns token auth on when RAY_AUTH_MODE=token,
or when RAY_AUTH_MODE is unset and a token file exists (~/.ray/auth_token, which a local `ray.init()`
creates); the CLI (`ray status`, `ray job submit`) sends the token only when RAY_AUTH_MODE=token is in
its own environment, and fails with "Unauthorized: Missing authentication token" otherwise. So the mode
is made explicit: `--auth token` (the default) writes a fresh token to DIR/auth_token and runs every node
with RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=DIR/auth_token, and the printed environment has the same two
variables; `--auth disabled` runs the nodes, and prints, RAY_AUTH_MODE=disabled. `ray status` does not
accept the dashboard's http:// address: give it `--address <head address>` (printed too); nor does
`ray.init()`, so a driver run directly on this machine (not through `ray job submit`) needs
RAY_ADDRESS=<head address>.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
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
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("cluster.local")

DEFAULT_DIR = Path("work/cluster")
STATE_NAME = "cluster.json"
TOKEN_NAME = "auth_token"
LOCK_NAME = ".lock"
HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
GRACE_S = 10.0
AUTH_MODES = ("token", "disabled")
MARKER_ENV = "CLUSTER_LOCAL_ID"
# Variables of the caller's environment that would point the nodes at another cluster or token.
_CLEARED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                "RAY_AUTH_TOKEN_PATH")


class ClusterError(RuntimeError):
    """A usage error: a cluster already runs from the directory, none to stop, a port is taken (exit 2)."""


@dataclass
class ProcessRecord:
    """One process a node's `ray start` left running; `create_time` guards against PID reuse."""

    pid: int
    name: str
    create_time: float

    def alive(self) -> bool:
        proc = _read_proc(self.pid)
        return proc is not None and proc.same_as(self.create_time) and not proc.zombie


@dataclass
class NodeRecord:
    """A node: its role, the session id of its `ray start` (shared by all its processes), its temp dir."""

    role: str
    session: int
    temp_dir: str
    processes: list[ProcessRecord]


@dataclass
class ClusterInfo:
    """What `start` recorded in DIR/cluster.json."""

    state_dir: str
    address: str  # the head's GCS address: `ray status --address`, `ray start --address`
    dashboard_url: str  # the job API: RAY_ADDRESS for `ray job submit`
    client_address: str  # Ray Client: ray.init("ray://...")
    auth_mode: str  # "token" or "disabled"
    token_path: str | None
    temp_root: str
    cluster_id: str  # the value of MARKER_ENV in the environment of every process of the cluster
    nodes: list[NodeRecord]

    @property
    def pids(self) -> list[int]:
        return [p.pid for node in self.nodes for p in node.processes]

    def alive(self) -> list[ProcessRecord]:
        """The recorded processes still running."""
        return [p for node in self.nodes for p in node.processes if p.alive()]

    def auth_env(self) -> dict[str, str]:
        env = {"RAY_AUTH_MODE": self.auth_mode}
        if self.token_path:
            env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        return env

    def env(self) -> dict[str, str]:
        """The environment for `ray job submit` (RAY_ADDRESS) and `ray status --address ADDRESS`."""
        return {"RAY_ADDRESS": self.dashboard_url, **self.auth_env()}

    def cli_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A full environment for subprocesses (`ray job submit`, `ray status`): `base` (default
        os.environ) without variables that would point at another cluster or token, plus `env()`."""
        base = os.environ if base is None else base
        return {**{k: v for k, v in base.items() if k not in _CLEARED_ENV}, **self.env()}

    def exports(self) -> str:
        """Shell lines for `eval`: the environment, and as comments how to use it."""
        lines = [f"# Ray cluster from {self.state_dir}: head {self.address}, "
                 f"{len(self.nodes) - 1} worker node(s), dashboard {self.dashboard_url}"]
        lines += [f"export {key}={value}" for key, value in self.env().items()]
        if self.token_path:  # RAY_AUTH_TOKEN would take precedence over RAY_AUTH_TOKEN_PATH
            lines.append("unset RAY_AUTH_TOKEN")
        lines += [f"# ray status --address {self.address}",
                  "# ray job submit --working-dir . -- python trainer/launch.py --config ...",
                  f"# a driver run here directly: RAY_ADDRESS={self.address} python trainer/launch.py ...",
                  f"# python -m cluster.local stop --dir {self.state_dir}"]
        return "\n".join(lines)

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> ClusterInfo | None:
        path = Path(state_dir) / STATE_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        nodes = [NodeRecord(n["role"], n["session"], n["temp_dir"],
                            [ProcessRecord(**p) for p in n["processes"]]) for n in data.pop("nodes")]
        return cls(**data, nodes=nodes)


def load_cluster(state_dir: Path | str = DEFAULT_DIR) -> ClusterInfo:
    """The cluster recorded in `state_dir`; ClusterError if there is none."""
    info = ClusterInfo.load(Path(state_dir))
    if info is None:
        raise ClusterError(f"no cluster state in {Path(state_dir) / STATE_NAME}; nothing was started "
                           f"from {state_dir} (or it was stopped)")
    return info


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise start/stop/status on one state directory."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    """An unused port from the kernel's ephemeral range (outside Ray's worker ports, 10002-19999)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if found is None:
        raise RuntimeError("the `ray` command is not installed (pip install 'ray[default]')")
    return found


@dataclass(frozen=True)
class _Proc:
    """What /proc/PID/stat says about a process."""

    pid: int
    name: str
    ppid: int
    session: int
    create_time: float  # seconds since the epoch, to 1/CLK_TCK
    zombie: bool  # exited, all threads gone, not reaped yet

    def same_as(self, create_time: float) -> bool:
        return abs(self.create_time - create_time) < 0.05


@functools.cache
def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read_proc(pid: int) -> _Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1: stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 of proc(5): state
    # A leader whose other threads still run shows as a zombie too: it is gone once it is the last one.
    zombie = fields[0] in "ZX" and int(fields[17]) <= 1
    return _Proc(pid, name, int(fields[1]), int(fields[3]), _boot_time() + int(fields[19]) / _CLOCK_TICKS,
                 zombie)


def _all_procs() -> list[_Proc]:
    procs = (_read_proc(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return [proc for proc in procs if proc is not None]


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's
        return False


def _cluster_processes(info: ClusterInfo) -> list[_Proc]:
    """The cluster's running processes: the members of its nodes' sessions and the processes carrying its
    id, with all their descendants. The id alone is not enough (a process that sets its title, as Ray's
    workers and dashboard modules do, overwrites its /proc/PID/environ), and a session counts only while
    it holds a process that is provably ours (carrying the id, or recorded): Linux does not reuse a
    session id while any member lives, so such a session cannot be someone else's."""
    marker = f"{MARKER_ENV}={info.cluster_id}".encode()
    recorded = {p.pid: p.create_time for node in info.nodes for p in node.processes}
    procs = [proc for proc in _all_procs() if not proc.zombie]
    marked = [proc for proc in procs if _has_marker(proc.pid, marker)]
    sessions = {node.session for node in info.nodes}
    proven = {proc.session for proc in marked} | {
        proc.session for proc in procs if proc.pid in recorded and proc.same_as(recorded[proc.pid])}
    children: dict[int, list[_Proc]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    found: dict[int, _Proc] = {}
    todo = marked + [proc for proc in procs if proc.session in sessions & proven]
    while todo:
        proc = todo.pop()
        if proc.pid not in found:
            found[proc.pid] = proc
            todo += children.get(proc.pid, [])
    return sorted(found.values(), key=lambda proc: proc.pid)


def _running(procs: list[_Proc]) -> list[_Proc]:
    alive = []
    for proc in procs:
        now = _read_proc(proc.pid)
        if now is not None and now.same_as(proc.create_time) and not now.zombie:
            alive.append(proc)
    return alive


def _signal_and_wait(procs: list[_Proc], grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, SIGKILL what is left, wait until it is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for proc in _running(procs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while _running(procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _running(procs)
        if not left:
            return
        log.warning("%d process(es) still running %.0f s after %s: %s", len(left), wait_s, sig.name,
                    ", ".join(f"{proc.name} ({proc.pid})" for proc in left))


def _terminate(info: ClusterInfo, grace_s: float) -> None:
    """End every process of the cluster: raylets first, then the rest, the GCS last (as `ray stop`)."""
    for _ in range(3):  # a process may be spawned while the others shut down: sweep again
        procs = _cluster_processes(info)
        if not procs:
            return
        raylets = [p for p in procs if p.name == "raylet"]
        gcs = [p for p in procs if p.name == "gcs_server"]
        others = [p for p in procs if p not in raylets and p not in gcs]
        log.info("stopping %d process(es): %d raylet(s), %d other(s), %d GCS", len(procs), len(raylets),
                 len(others), len(gcs))
        for bucket in (raylets, others, gcs):
            _signal_and_wait(bucket, grace_s)


def _remove_files(info: ClusterInfo, keep_logs: bool = False) -> None:
    """Remove the state, the token and (unless `keep_logs`) the nodes' temp dirs."""
    if not keep_logs:
        shutil.rmtree(info.temp_root, ignore_errors=True)
    if info.token_path:
        Path(info.token_path).unlink(missing_ok=True)
    (Path(info.state_dir) / STATE_NAME).unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    """Write a secret to a new file that is owner-only (0600) from its creation, whatever the umask: a
    leftover file is removed first, O_EXCL refuses to follow a link planted in its place."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)  # a umask can only take bits away; make the mode exactly 0600
        out.write(text)


def _launch(cmd: list[str], env: dict[str, str], out: Path) -> subprocess.Popen:
    """Run a `ray start` in a new session; its output goes to `out`."""
    log.debug("running %s", " ".join(cmd))
    with open(out, "wb") as out_file:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out_file,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, out: Path, deadline: float) -> None:
    """Wait for a `ray start` to return; RuntimeError with the end of its output if it failed."""
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        tail = "\n".join(out.read_text(errors="replace").splitlines()[-15:])
        what = "timed out" if code is None else f"failed (exit {code})"
        raise RuntimeError(f"`ray start` {what}; the end of its output ({out}):\n{tail}")


def _record(info: ClusterInfo, session: int) -> list[ProcessRecord]:
    """The cluster's processes in the session of one node's `ray start`."""
    return [ProcessRecord(proc.pid, proc.name, proc.create_time)
            for proc in _cluster_processes(info) if proc.session == session]


def _reported_nodes(info: ClusterInfo) -> int:
    """How many nodes the autoscaler's report (what `ray status` prints) counts as active or idle;
    0 while the dashboard or the report is not there yet."""
    request = urllib.request.Request(f"{info.dashboard_url}/api/cluster_status")
    if info.token_path:
        request.add_header("Authorization", "Bearer " + Path(info.token_path).read_text().strip())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            report = json.load(response)["data"]["clusterStatus"]["autoscalerReport"]
        return sum(sum((report.get(kind) or {}).values()) for kind in ("activeNodes", "idleNodes"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def start_cluster(workers: int, cpus_per_node: int = 1, state_dir: Path | str = DEFAULT_DIR, *,
                  head_cpus: int | None = None, gpus_per_node: int | None = None, port: int = 6379,
                  dashboard_port: int = 8265, auth: str = "token", object_store_memory: int | None = None,
                  timeout_s: float = START_TIMEOUT_S) -> ClusterInfo:
    """Start a head node and `workers` worker nodes on this machine and record them in `state_dir`.

    `port`/`dashboard_port` 0 picks free ports. The head gets `head_cpus` CPUs (default `cpus_per_node`)
    and no GPUs; worker nodes get `gpus_per_node` GPUs (default: Ray's detection). CPUs are logical, so
    overcommitting a small machine is fine. Raises ClusterError if a cluster from `state_dir` is running
    or a port is taken, RuntimeError if a node fails to start (after stopping the nodes it started)."""
    if workers < 0 or cpus_per_node < 0:
        raise ClusterError("--workers and --cpus-per-node must be >= 0")
    if auth not in AUTH_MODES:
        raise ClusterError(f"--auth must be one of {AUTH_MODES}, not {auth!r}")
    state_dir = Path(state_dir).resolve()
    with _locked(state_dir):
        old = ClusterInfo.load(state_dir)
        if old is not None:
            if old.alive():
                raise ClusterError(f"a Ray cluster started from {state_dir} is already running (head "
                                   f"{old.address}); stop it first: python -m cluster.local stop --dir "
                                   f"{state_dir}")
            log.warning("removing the state of a cluster from %s whose processes are all gone", state_dir)
            _terminate(old, GRACE_S)
            _remove_files(old)

        for name, wanted in (("--port", port), ("--dashboard-port", dashboard_port)):
            if wanted and not _port_free(wanted):
                raise ClusterError(f"port {wanted} ({name}) is in use, probably by another Ray cluster; "
                                   f"pass another {name}, or 0 for a free one")
        if port and port == dashboard_port:
            raise ClusterError(f"--port and --dashboard-port are both {port}")
        gcs_port = port or _free_port(set())
        dash_port = dashboard_port or _free_port({gcs_port})
        client_port = _free_port({gcs_port, dash_port})

        token_path = None
        if auth == "token":
            token_path = state_dir / TOKEN_NAME
            _write_private(token_path, secrets.token_hex(32))
        info = ClusterInfo(state_dir=str(state_dir), address=f"{HOST}:{gcs_port}",
                           dashboard_url=f"http://{HOST}:{dash_port}",
                           client_address=f"ray://{HOST}:{client_port}", auth_mode=auth,
                           token_path=str(token_path) if token_path else None,
                           temp_root=tempfile.mkdtemp(prefix="ray-local-"), cluster_id=secrets.token_hex(8),
                           nodes=[])
        try:
            _start_nodes(info, (gcs_port, dash_port, client_port), workers, cpus_per_node, head_cpus,
                         gpus_per_node, object_store_memory, time.monotonic() + timeout_s)
        except BaseException:
            log.error("starting the cluster failed; stopping the nodes it started (logs kept in %s)",
                      info.temp_root)
            _terminate(info, grace_s=2.0)
            _remove_files(info, keep_logs=True)
            raise
    log.info("Ray cluster up: head %s + %d worker node(s), dashboard %s, state %s", info.address, workers,
             info.dashboard_url, state_dir / STATE_NAME)
    return info


def _start_nodes(info: ClusterInfo, head_ports: tuple[int, int, int], workers: int, cpus_per_node: int,
                 head_cpus: int | None, gpus_per_node: int | None, object_store_memory: int | None,
                 deadline: float) -> None:
    """Run the head's `ray start` (GCS, dashboard and Ray Client ports), then the workers' (in
    parallel); record each node; wait until `ray status` would list all nodes."""
    env = {**{k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}, **info.auth_env(),
           MARKER_ENV: info.cluster_id}
    # Job entrypoints (`python script.py`) run in the nodes' environment: resolve `python` and `ray` to
    # this interpreter's, even when its virtual environment is not activated.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    ray = _ray_executable()
    root = Path(info.temp_root)

    def node_cmd(index: int, cpus: int) -> list[str]:
        cmd = [ray, "start", "--node-ip-address", HOST, "--temp-dir", str(root / f"n{index}"),
               "--num-cpus", str(cpus), "--dashboard-agent-listen-port", "0", "--disable-usage-stats"]
        return cmd + (["--object-store-memory", str(object_store_memory)] if object_store_memory else [])

    gcs_port, dash_port, client_port = map(str, head_ports)
    head = node_cmd(0, cpus_per_node if head_cpus is None else head_cpus) + [
        "--head", "--port", gcs_port, "--include-dashboard", "true", "--dashboard-host", HOST,
        "--dashboard-port", dash_port, "--ray-client-server-port", client_port, "--num-gpus", "0"]
    log.info("starting the head node at %s (temp dir %s)", info.address, root / "n0")
    proc = _launch(head, env, root / "n0.out")
    info.nodes.append(NodeRecord("head", proc.pid, str(root / "n0"), []))
    info.save()  # from here on `stop` can clean up whatever this start leaves behind
    _finish(proc, root / "n0.out", deadline)
    info.nodes[0].processes = _record(info, proc.pid)

    gpus = [] if gpus_per_node is None else ["--num-gpus", str(gpus_per_node)]
    procs = []
    for index in range(1, workers + 1):
        cmd = node_cmd(index, cpus_per_node) + ["--address", info.address] + gpus
        procs.append(_launch(cmd, env, root / f"n{index}.out"))
        info.nodes.append(NodeRecord("worker", procs[-1].pid, str(root / f"n{index}"), []))
    info.save()
    log.info("starting %d worker node(s)", workers)
    for index, proc in enumerate(procs, start=1):
        _finish(proc, root / f"n{index}.out", deadline)
        info.nodes[index].processes = _record(info, proc.pid)
    info.save()

    while (alive := _reported_nodes(info)) < workers + 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {alive} of {workers + 1} nodes came up; logs under {root}")
        time.sleep(0.5)


def stop_cluster(state_dir: Path | str = DEFAULT_DIR, grace_s: float = GRACE_S) -> ClusterInfo:
    """Stop exactly the processes of the cluster recorded in `state_dir`, check that the recorded PIDs
    are gone, remove the state. ClusterError if nothing is recorded there."""
    state_dir = Path(state_dir).resolve()
    with _locked(state_dir):
        info = load_cluster(state_dir)
        _terminate(info, grace_s)
        left = info.alive()
        if left:
            raise RuntimeError(f"processes of the cluster are still running: "
                               f"{', '.join(f'{p.name} ({p.pid})' for p in left)}")
        _remove_files(info)
    log.info("stopped the Ray cluster from %s (head %s, %d node(s))", state_dir, info.address,
             len(info.nodes))
    return info


def cluster_status(state_dir: Path | str = DEFAULT_DIR) -> tuple[ClusterInfo, bool]:
    """The recorded cluster and whether every node's raylet (and the head's GCS) still runs."""
    state_dir = Path(state_dir).resolve()
    with _locked(state_dir):
        info = load_cluster(state_dir)
    healthy = True
    for node in info.nodes:
        alive = {p.name for p in node.processes if p.alive()}
        needed = {"raylet", "gcs_server"} if node.role == "head" else {"raylet"}
        ok = needed <= alive
        healthy &= ok
        log.info("%-6s session %-7d %s: %d/%d recorded processes alive", node.role, node.session,
                 "up" if ok else "DOWN", len([p for p in node.processes if p.alive()]), len(node.processes))
    return info, healthy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a head node and N worker nodes; print the environment",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    start.add_argument("--workers", type=int, required=True, help="worker nodes besides the head")
    start.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs of each node")
    start.add_argument("--head-cpus", type=int, default=None, help="logical CPUs of the head "
                       "(default: --cpus-per-node; 0 keeps tasks off the head)")
    start.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs of each worker node (default: Ray's detection); the head gets none")
    start.add_argument("--port", type=int, default=6379, help="the head's GCS port (0: a free one)")
    start.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job API (0: free)")
    start.add_argument("--auth", choices=AUTH_MODES, default="token",
                       help="token: a fresh token in DIR/auth_token; disabled: no authentication")
    start.add_argument("--object-store-memory", type=int, default=None,
                       help="object store bytes per node (default: Ray's, about 30%% of RAM per node)")
    for command in (start, sub.add_parser("stop", help="stop the cluster started from --dir"),
                    sub.add_parser("status", help="print the environment; log node liveness")):
        command.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "start":
            info = start_cluster(args.workers, args.cpus_per_node, args.dir, head_cpus=args.head_cpus,
                                 gpus_per_node=args.gpus_per_node, port=args.port,
                                 dashboard_port=args.dashboard_port, auth=args.auth,
                                 object_store_memory=args.object_store_memory)
            print(info.exports())
        elif args.command == "stop":
            stop_cluster(args.dir)
        else:
            info, healthy = cluster_status(args.dir)
            print(info.exports())
            return 0 if healthy else 1
    except ClusterError as exc:
        log.error("%s", exc)
        return 2
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
