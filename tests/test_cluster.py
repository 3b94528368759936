"""The local Ray cluster (`cluster.local`): a head and a worker node come up, `ray status` and
`ray job submit` work with the printed environment, `stop` ends exactly the cluster's processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cluster.local
from cluster.local import MARKER_ENV, STATE_NAME, TOKEN_NAME, ClusterInfo, start_cluster, stop_cluster

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m cluster.local ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", "cluster.local", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def running(pid: int) -> bool:
    """True while /proc has the process and it has not exited (an unreaped zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def marked(info: ClusterInfo) -> list[int]:
    """Running processes that carry the cluster's id in their environment (workers started later too)."""
    marker = f"{MARKER_ENV}={info.cluster_id}".encode()
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0") and running(int(entry)):
                found.append(int(entry))
        except OSError:
            continue
    return found


def active_nodes(status_output: str) -> int:
    """The number of nodes `ray status` lists under "Active:"."""
    section = status_output.split("Active:", 1)[1].split("Pending:", 1)[0]
    return sum(1 for line in section.splitlines() if "node_" in line)


@pytest.mark.slow
def test_local_cluster_status_job_and_stop(tmp_path: Path) -> None:
    state, other_state = tmp_path / "cluster", tmp_path / "other"
    info = start_cluster(workers=1, cpus_per_node=1, state_dir=state, port=0, dashboard_port=0)
    other = None
    try:
        assert (state / STATE_NAME).is_file() and len(info.nodes) == 2
        assert all(node.processes for node in info.nodes) and all(running(pid) for pid in info.pids)
        assert marked(info)
        assert info.env()["RAY_ADDRESS"] == info.dashboard_url and info.auth_mode == "token"
        env = info.cli_env()

        status = subprocess.run([str(BIN / "ray"), "status", "--address", info.address], env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert active_nodes(status.stdout) == 2, status.stdout

        again = cli("start", "--workers", "1", "--dir", str(state), "--port", "0", "--dashboard-port", "0")
        assert again.returncode == 2 and "already running" in again.stderr, again.stderr
        taken = cli("start", "--workers", "0", "--dir", str(other_state),
                    "--port", info.address.rsplit(":", 1)[1])
        assert taken.returncode == 2 and "in use" in taken.stderr, taken.stderr

        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "script.py").write_text(
            "import ray\nray.init()\nprint(f'hello from a job on {len(ray.nodes())} nodes')\n")
        job = subprocess.run([str(BIN / "ray"), "job", "submit", "--working-dir", str(job_dir), "--",
                              "python", "script.py"], env=env, capture_output=True, text=True, timeout=120)
        assert job.returncode == 0, job.stdout + job.stderr
        assert "hello from a job on 2 nodes" in job.stdout, job.stdout

        # A second cluster on the machine: stopping the first must leave it alone.
        other = start_cluster(workers=0, cpus_per_node=1, state_dir=other_state, port=0, dashboard_port=0)
    finally:
        stop_cluster(state)
        if other is not None:
            assert all(running(pid) for pid in other.pids), "stopping one cluster hit another"
            stop_cluster(other_state)

    for stopped in (info, other):
        assert stopped is not None and not [pid for pid in stopped.pids if running(pid)]
        assert not marked(stopped)
        assert not Path(stopped.temp_root).exists()
    assert not (state / STATE_NAME).exists() and not (state / "auth_token").exists()

    nothing = cli("stop", "--dir", str(state))
    assert nothing.returncode == 2 and "no cluster state" in nothing.stderr, nothing.stderr


def test_token_file_is_private_from_its_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token is written into a file created 0600 (O_CREAT|O_EXCL), never into one that other users
    could open before a chmod; a leftover token file is replaced, not reused. No Ray node is started."""
    created = []
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if Path(path).name == TOKEN_NAME:
            stat = os.fstat(fd)
            created.append((flags, stat.st_mode & 0o777, stat.st_size))
        return fd

    seen = {}

    def stop_before_nodes(info: ClusterInfo, *args) -> None:
        seen["mode"] = os.stat(info.token_path).st_mode & 0o777
        seen["token"] = Path(info.token_path).read_text()
        seen["temp_root"] = info.temp_root
        raise RuntimeError("no nodes in this test")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(cluster.local, "_start_nodes", stop_before_nodes)
    leftover = tmp_path / TOKEN_NAME
    leftover.write_text("stale")
    leftover.chmod(0o644)
    umask = os.umask(0)  # the most permissive umask: a file made with default permissions would be 0666
    try:
        with pytest.raises(RuntimeError, match="no nodes in this test"):
            start_cluster(0, 1, tmp_path, port=0, dashboard_port=0)
    finally:
        os.umask(umask)
        shutil.rmtree(seen.get("temp_root", tmp_path / "none"), ignore_errors=True)
    assert len(created) == 1, "the token file must be created by os.open with its mode"
    flags, mode_at_creation, size_at_creation = created[0]
    assert flags & os.O_CREAT and flags & os.O_EXCL
    assert (mode_at_creation, size_at_creation) == (0o600, 0)  # private before a byte of the token is in it
    assert seen["mode"] == 0o600 and len(seen["token"]) == 64 and seen["token"] != "stale"
