"""benchmarks/pack.py: wheels packed into numbered parts for an offline machine, joined, checked and
installed again by pip; bad parts named with exit status 2."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACK_PY = ROOT / "benchmarks" / "pack.py"
spec = importlib.util.spec_from_file_location("bench_pack", PACK_PY)
pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack)


def make_wheel(folder: Path, name: str, version: str, payload_bytes: int, seed: int) -> Path:
    """A valid pure-Python wheel whose module holds `payload_bytes` of incompressible data."""
    rng = __import__("random").Random(seed)
    payload = base64.b64encode(rng.randbytes(payload_bytes)).decode()
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\nPAYLOAD = {payload!r}\n".encode(),
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def run_pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PACK_PY), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture()
def packed(tmp_path: Path) -> tuple[Path, list[Path]]:
    src = tmp_path / "wheels"
    src.mkdir()
    wheels = [make_wheel(src, "alpha_pkg", "1.0", 120_000, 1), make_wheel(src, "beta_pkg", "2.3", 90_000, 2),
              make_wheel(src, "gamma_pkg", "0.1", 1_000, 3)]
    done = run_pack("prepare", "--out", str(tmp_path / "parts"), "--wheels", str(src), "--part-mib", "0.05",
                    "--have", str(write(tmp_path / "have.txt", "gamma-pkg==0.1\n")))
    assert done.returncode == 0, done.stderr
    return tmp_path / "parts", wheels


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_pack_splits_into_numbered_folders_leaves_out_what_the_machine_has_and_round_trips(
        packed: tuple[Path, list[Path]], tmp_path: Path) -> None:
    parts, wheels = packed
    folders = sorted(p.name for p in parts.iterdir())
    assert len(folders) >= 3 and folders == [f"{i:02d}" for i in range(1, len(folders) + 1)]
    for folder in parts.iterdir():
        assert sum(f.stat().st_size for f in folder.iterdir() if f.name != "SHA256SUMS") <= 0.05 * 2**20 + 1
    sums = (parts / "01" / "SHA256SUMS").read_text()
    assert "wheels.tar.xz" in sums and "alpha_pkg-1.0" in sums and "gamma_pkg" not in sums

    done = run_pack("unpack", str(parts), str(tmp_path / "restored"))
    assert done.returncode == 0, done.stderr
    restored = sorted(p.name for p in (tmp_path / "restored").glob("*.whl"))
    assert restored == ["alpha_pkg-1.0-py3-none-any.whl", "beta_pkg-2.3-py3-none-any.whl"]
    for wheel in wheels[:2]:  # same members and bytes, stored instead of deflated
        with zipfile.ZipFile(wheel) as a, zipfile.ZipFile(tmp_path / "restored" / wheel.name) as b:
            assert a.namelist() == b.namelist()
            assert all(a.read(n) == b.read(n) for n in a.namelist())
            assert {i.compress_type for i in b.infolist()} == {zipfile.ZIP_STORED}

    site = tmp_path / "site"  # pip accepts them offline and checks RECORD
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--disable-pip-version-check", "--find-links", str(tmp_path / "restored"),
                           "--target", str(site), "alpha_pkg", "beta_pkg"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (site / "alpha_pkg" / "__init__.py").read_text().startswith("VERSION = '1.0'")


def test_unpack_names_a_missing_part(packed: tuple[Path, list[Path]], tmp_path: Path) -> None:
    parts, _ = packed
    for f in (parts / "02").iterdir():
        f.unlink()
    done = run_pack("unpack", str(parts), str(tmp_path / "restored"))
    assert done.returncode == 2
    assert "part 001 is missing" in done.stderr and "Traceback" not in done.stderr


def test_unpack_refuses_a_damaged_part_before_unpacking(packed: tuple[Path, list[Path]], tmp_path: Path) -> None:
    parts, _ = packed
    part = next((parts / "02").iterdir())
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    done = run_pack("unpack", str(parts), str(tmp_path / "restored"))
    assert done.returncode == 2 and "differ from SHA256SUMS" in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "restored").glob("*.whl"))


def test_unpack_joins_wheels_split_by_hand_and_checks_them(tmp_path: Path) -> None:
    src = tmp_path / "copied"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    wheel = make_wheel(tmp_path, "delta_pkg", "4.0", 50_000, 4)
    data = wheel.read_bytes()
    (src / "a" / f"{wheel.name}.part-aa").write_bytes(data[:30_000])
    (src / "b" / f"{wheel.name}.part-ab").write_bytes(data[30_000:])
    plain = make_wheel(src / "b", "eps_pkg", "1.0", 100, 5)
    (src / "a" / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {wheel.name}\n")
    done = run_pack("unpack", str(src), str(tmp_path / "restored"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "restored" / wheel.name).read_bytes() == data
    assert (tmp_path / "restored" / plain.name).is_file()


def test_unpack_without_the_folder_says_how_to_make_it(tmp_path: Path) -> None:
    done = run_pack("unpack", str(tmp_path / "nowhere"), str(tmp_path / "restored"))
    assert done.returncode == 2 and "pack.py prepare" in done.stderr


def test_have_file_gives_names_and_pins_without_local_labels_or_torch(tmp_path: Path) -> None:
    names, pins = pack.read_have(write(tmp_path / "have.txt", (
        "numpy==2.5.2\ntorch==2.11.0+cu130\nPyYAML==6.0.2\n-e git+https://example.org/x.git#egg=x\n"
        "mylib @ file:///tmp/mylib-1.0-py3-none-any.whl\nscipy\ndistro-info==1.1build1\n# comment\n")))
    assert names == {"numpy", "torch", "pyyaml", "mylib", "scipy", "distro-info"}
    assert pins == {"numpy": "2.5.2", "pyyaml": "6.0.2"}  # normalised names, as pip reports conflicts
    with pytest.raises(pack.PackError, match="cannot read the line"):
        pack.read_have(write(tmp_path / "bad.txt", "numpy>=2 <3\n"))
    done = run_pack("prepare", "--out", str(tmp_path / "o"), "--have", str(tmp_path / "missing.txt"))
    assert done.returncode == 2 and "pip freeze --all" in done.stderr


def test_requirements_leave_out_torch_and_pick_the_dali_build_for_the_cuda_version() -> None:
    reqs = pack.requirements("130")
    assert not any(r.startswith("torch") for r in reqs)
    dali = [r for r in reqs if r.startswith("nvidia-dali")]
    assert len(dali) == 1 and dali[0].startswith("nvidia-dali-cuda130==")
    assert any(r.startswith("imageio-ffmpeg") for r in reqs) and any(r.startswith("ray[") for r in reqs)
    assert [r for r in pack.requirements("") if r.startswith("nvidia-dali")][0].startswith("nvidia-dali-cuda120==")


def test_bare_names_leave_out_big_wheels_but_send_small_ones(tmp_path: Path) -> None:
    src = tmp_path / "wheels"
    src.mkdir()
    make_wheel(src, "alpha_pkg", "1.0", 120_000, 1)
    make_wheel(src, "gamma_pkg", "0.1", 1_000, 3)
    done = run_pack("prepare", "--out", str(tmp_path / "parts"), "--wheels", str(src), "--send-small-mib", "0.05",
                    "--have", str(write(tmp_path / "have.txt", "alpha-pkg\ngamma_pkg\n")))
    assert done.returncode == 0, done.stderr
    assert "leaving out 1 wheel(s)" in done.stdout and "alpha_pkg-1.0" in done.stdout
    assert run_pack("unpack", str(tmp_path / "parts"), str(tmp_path / "restored")).returncode == 0
    assert [p.name for p in (tmp_path / "restored").glob("*.whl")] == ["gamma_pkg-0.1-py3-none-any.whl"]


def test_gpu_script_without_wheels_says_how_to_make_them_and_keeps_its_log(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "w"),
           "WHEELS": str(tmp_path / "no-wheels"), "VENV": str(tmp_path / "venv"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    log = (tmp_path / "out" / "gpu.log").read_text()
    assert "pack.py prepare" in log and "gpu.sh: exit code 2" in log
    assert not (tmp_path / "venv").exists()  # nothing installed before the wheels are there


def test_parts_join_in_split_order_past_a_thousand_and_duplicates_are_named(tmp_path: Path) -> None:
    names = [f"w.tar.xz.part-{i:03d}" for i in (1000, 101, 999, 0, 1001)]
    order = [p.name.rsplit("-", 1)[1] for p in pack.group_parts(tmp_path / n for n in names)["w.tar.xz"]]
    assert order == ["000", "101", "999", "1000", "1001"]
    split_names = [f"x.whl.part-{s}" for s in ("zaaa", "aa", "yz", "ab")]
    order = [p.name.rsplit("-", 1)[1] for p in pack.group_parts(tmp_path / n for n in split_names)["x.whl"]]
    assert order == ["aa", "ab", "yz", "zaaa"]
    with pytest.raises(pack.PackError, match="part-000 is there twice"):
        pack.check_parts("w.tar.xz", [tmp_path / "01" / "w.tar.xz.part-000", tmp_path / "x" / "w.tar.xz.part-000"])
    with pytest.raises(pack.PackError, match="part 001, 002 are missing"):
        pack.check_parts("w.tar.xz", [tmp_path / "w.tar.xz.part-000", tmp_path / "w.tar.xz.part-003"])


def test_a_hand_split_wheel_with_a_part_missing_and_no_checksum_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "copied"
    src.mkdir()
    data = make_wheel(tmp_path, "delta_pkg", "4.0", 50_000, 4).read_bytes()
    (src / "delta_pkg-4.0-py3-none-any.whl.part-aa").write_bytes(data[:30_000])
    done = run_pack("unpack", str(src), str(tmp_path / "restored"))
    assert done.returncode == 2 and "not a whole wheel" in done.stderr and "Traceback" not in done.stderr


def test_pinned_wheels_of_another_version_are_sent_and_bad_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "wheels"
    src.mkdir()
    make_wheel(src, "alpha_pkg", "1.0", 120_000, 1)
    make_wheel(src, "beta_pkg", "2.3", 90_000, 2)
    have = write(tmp_path / "have.txt", "alpha-pkg==1.0\nbeta_pkg==1.9\n")
    done = run_pack("prepare", "--out", str(tmp_path / "parts"), "--wheels", str(src), "--have", str(have))
    assert done.returncode == 0, done.stderr
    assert "leaving out 1 wheel(s)" in done.stdout and "alpha_pkg-1.0" in done.stdout
    done = run_pack("prepare", "--out", str(tmp_path / "p0"), "--wheels", str(src), "--part-mib", "0")
    assert done.returncode == 2 and "--part-mib" in done.stderr and not (tmp_path / "p0").exists()
    (src / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    done = run_pack("prepare", "--out", str(tmp_path / "p1"), "--wheels", str(src))
    assert done.returncode == 2 and "not a readable wheel" in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "p1").iterdir())  # no partial pack left: a rerun may use the same --out


def test_unpack_replaces_the_wheels_of_an_earlier_unpack(packed: tuple[Path, list[Path]], tmp_path: Path) -> None:
    parts, _ = packed
    dest = tmp_path / "restored"
    dest.mkdir()
    (dest / "nvidia_dali_cuda130-2.4.0-py3-none-any.whl").write_bytes(b"old")
    done = run_pack("unpack", str(parts), str(dest))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dest.glob("*.whl")) == ["alpha_pkg-1.0-py3-none-any.whl",
                                                          "beta_pkg-2.3-py3-none-any.whl"]
