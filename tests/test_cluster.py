"""The local Ray cluster (`cluster.local`): a head and a worker node come up, `ray status` and `ray job submit` work
with the printed environment, `stop` ends exactly that cluster's nodes (not another one), the token file is private."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cluster.local
from cluster.local import STATE_NAME, TOKEN_NAME, start_cluster, stop_cluster

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
JOB = """import os, ray
ray.init()
actor = ray.remote(type("Keeper", (), {"pid": lambda self: os.getpid()})).options(
    name="keeper", lifetime="detached", num_cpus=0).remote()
print(f"hello from a job on {len(ray.nodes())} nodes; pids {os.getpid()} {ray.get(actor.pid.remote())}")
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m cluster.local ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", "cluster.local", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def running(pid: int) -> bool:
    """True while the process exists and has not exited (an unreaped zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.mark.slow
def test_local_cluster_status_job_and_stop(tmp_path: Path) -> None:
    state, other_state = tmp_path / "cluster", tmp_path / "other"
    started = cli("start", "--workers", "1", "--dir", str(state), "--port", "0", "--dashboard-port", "0")
    assert started.returncode == 0, started.stderr
    info = cluster.local.load_cluster(state)
    other = None
    try:
        assert "export RAY_AUTH_MODE=token" in started.stdout and f"RAY_ADDRESS={info.dashboard_url}" in started.stdout
        assert len(info.pids) == 2 and info.alive() == info.pids
        assert (state / TOKEN_NAME).stat().st_mode & 0o777 == 0o600
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
                   if line.startswith("export "))

        status = subprocess.run([str(BIN / "ray"), "status", "--address", info.address], env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        active = status.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
        assert active.count("node_") == 2, status.stdout
        assert cli("status", "--dir", str(state)).returncode == 0

        again = cli("start", "--workers", "1", "--dir", str(state), "--port", "0", "--dashboard-port", "0")
        assert again.returncode == 2 and "already running" in again.stderr, again.stderr
        taken = cli("start", "--workers", "0", "--dir", str(other_state), "--port", info.address.rsplit(":", 1)[1])
        assert taken.returncode == 2 and "in use" in taken.stderr, taken.stderr

        (tmp_path / "job").mkdir()
        (tmp_path / "job" / "script.py").write_text(JOB)
        job = subprocess.run([str(BIN / "ray"), "job", "submit", "--working-dir", str(tmp_path / "job"), "--",
                              "python", "script.py"], env=env, capture_output=True, text=True, timeout=120)
        assert job.returncode == 0, job.stdout + job.stderr
        assert "hello from a job on 2 nodes" in job.stdout, job.stdout
        keeper = int(re.search(r"pids \d+ (\d+)", job.stdout).group(1))
        assert running(keeper)  # a detached actor outlives its job: `stop` must end it with its node

        # A second cluster on the machine: stopping the first must leave it alone.
        other = start_cluster(workers=0, cpus_per_node=1, state_dir=other_state, port=0, dashboard_port=0)
    finally:
        stopped = cli("stop", "--dir", str(state))
        assert stopped.returncode == 0, stopped.stderr
        if other is not None:
            assert other.alive() == other.pids, "stopping one cluster hit another"
            stop_cluster(other_state)

    for gone in (info, other):
        assert gone is not None and not gone.alive() and not Path(gone.temp_root).exists()
    assert not running(keeper)
    assert not (state / STATE_NAME).exists() and not (state / TOKEN_NAME).exists()
    nothing = cli("status", "--dir", str(state))
    assert nothing.returncode == 2 and "no cluster state" in nothing.stderr, nothing.stderr


def test_token_file_is_private_from_its_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token is written into a file created 0600 (O_CREAT|O_EXCL), never into one that other users could
    open before a chmod; a leftover token file is replaced, not reused. No Ray node is started."""
    created, seen = [], {}
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if Path(path).name == TOKEN_NAME:
            stat = os.fstat(fd)
            created.append((flags, stat.st_mode & 0o777, stat.st_size))
        return fd

    def no_nodes(*args, **kwargs):
        token = tmp_path / TOKEN_NAME
        seen.update(mode=token.stat().st_mode & 0o777, token=token.read_text())
        raise RuntimeError("no nodes in this test")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(cluster.local.subprocess, "Popen", no_nodes)
    leftover = tmp_path / TOKEN_NAME
    leftover.write_text("stale")
    leftover.chmod(0o644)
    umask = os.umask(0)  # the most permissive umask: a file made with default permissions would be 0666
    try:
        with pytest.raises(RuntimeError, match="no nodes in this test"):
            start_cluster(0, 1, tmp_path, port=0, dashboard_port=0)
    finally:
        os.umask(umask)
    assert not (tmp_path / STATE_NAME).exists()  # the failed start cleaned up after itself
    assert len(created) == 1, "the token file must be created by os.open with its mode"
    flags, mode_at_creation, size_at_creation = created[0]
    assert flags & os.O_CREAT and flags & os.O_EXCL
    assert (mode_at_creation, size_at_creation) == (0o600, 0)  # private before a byte of the token is in it
    assert seen["mode"] == 0o600 and len(seen["token"]) == 64 and seen["token"] != "stale"
