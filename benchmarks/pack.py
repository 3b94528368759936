"""Install files for a machine without internet (the GPU benchmark machine), small enough to copy in parts.

    python benchmarks/pack.py prepare --out wheels [--python-version 3.12] [--cuda 130] [--have have.txt]
    python benchmarks/pack.py prepare --out wheels --wheels DIR      # pack wheels you already have
    python benchmarks/pack.py unpack wheels /tmp/wheels              # on the offline machine (benchmarks/gpu.sh)

`prepare` (on a machine with internet):
1. downloads, with `pip download`, the wheels of the project's dependencies for the offline machine's
   Python and platform (x86_64 Linux): pyproject.toml's dependencies without torch (the machine's own
   PyTorch is used), DALI for its CUDA (`--cuda 130` gives nvidia-dali-cuda130 at the pinned version), and
   the `bench` extra (a static ffmpeg for the benchmark corpus);
2. leaves out what the machine already has: `--have FILE` is the output of `python3 -m pip freeze --all` (or
   `pip list --format=freeze`, or bare names, one a line) run there; pinned lines also constrain the
   download, so the wheels fit the versions already installed there, and a pin that does not fit is
   dropped (that package is sent); for bare names, small wheels (`--send-small-mib`) are sent anyway, in
   case the machine's version does not fit;
3. packs the remaining wheels into one `wheels.tar.xz`: each wheel re-zipped without compression (pip
   checks the files against the wheel's RECORD, not the zip's compression), then xz over all of them,
   about a quarter smaller than the wheels themselves;
4. splits it into numbered folders of at most `--part-mib` MiB (`wheels/01/wheels.tar.xz.part-000`, ...),
   one folder per copy, and writes `SHA256SUMS` (of the pack and of each wheel) into the first.

`unpack SRC DEST` (standard library only, so it runs before anything is installed): finds under SRC plain
wheels, wheels split with `split` (`NAME.whl.part-*`) and packs (`*.tar.xz.part-*` or `*.tar.xz`), joins
parts by name order, checks every SHA256SUMS found, and leaves the wheels in DEST for
`pip install --no-index --find-links DEST`. A missing or damaged part is named, with exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterable

ROOT = Path(__file__).resolve().parent.parent
PACK = "wheels.tar.xz"
SUMS = "SHA256SUMS"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
MIB = 1 << 20


class PackError(Exception):
    """A problem with the input, said in one line with what to do; `main` exits with status 2."""


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(filename: str) -> str:
    return normalize(filename.split("-", 1)[0])


# ----------------------------------------------------------------------------------------------- prepare
def requirements(cuda: str | None) -> list[str]:
    """pyproject.toml's dependencies for the offline machine: no torch; DALI for `cuda`; the bench extra."""
    import tomllib  # Python 3.11+; `unpack` runs on older Pythons too

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = []
    for dep in project["dependencies"] + project["optional-dependencies"]["bench"]:
        name = normalize(re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0])
        if name == "torch":
            continue
        if name.startswith("nvidia-dali-cuda") and cuda:
            dep = re.sub(r"^nvidia-dali-cuda\d+", f"nvidia-dali-cuda{cuda}", dep)
        reqs.append(dep)
    return reqs


VERSION = re.compile(r"v?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", re.IGNORECASE)  # PEP 440, public part


def read_have(path: Path | None) -> tuple[set[str], dict[str, str]]:
    """Names the offline machine has, and the versions of those pinned (`name==version`; local labels such
    as +cu130 dropped; a version pip would not accept, e.g. a distribution's `1.1build1`, is left unpinned)."""
    if path is None:
        return set(), {}
    if not path.is_file():
        raise PackError(f"--have {path}: no such file; write it on the offline machine with "
                        "`python3 -m pip freeze --all > have.txt`")
    names, pins = set(), {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if " @ " in line:  # name @ file:///... (installed from a file or VCS): the name only
            names.add(normalize(line.split(" @ ", 1)[0]))
            continue
        if not line or line.startswith("-"):  # -e editable installs, pip options
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:==([^\s;+]+)(?:\+\S*)?)?", line)
        if not match:
            raise PackError(f"--have {path}: cannot read the line {line!r}; expected `name==version` or `name`")
        name = normalize(match[1])
        names.add(name)
        if match[2] and name != "torch" and VERSION.fullmatch(match[2]):
            pins[name] = match[2]
    return names, pins


def download(reqs: list[str], dest: Path, python_version: str, pins: dict[str, str]) -> dict[str, str]:
    """`pip download` of `reqs` and their dependencies as binary wheels for x86_64 Linux and `python_version`,
    the offline machine's versions (`pins`) preferred. A pin the project cannot use (pip names it in a
    conflict, or has no such wheel) is dropped and the download retried: that package is then sent and
    installed beside the machine's own. Each retry drops a pin, so it ends. Returns the pins kept."""
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    print("pack.py: " + " ".join(cmd[2:6]) + f" ... {len(reqs)} requirements for CPython {python_version}", flush=True)
    pins = dict(pins)
    with tempfile.TemporaryDirectory(prefix="pack-constraints-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        while True:
            constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
            done = subprocess.run(cmd + ["--constraint", str(constraints)] + reqs, capture_output=True, text=True)
            if done.returncode == 0:
                return pins
            said = done.stdout + done.stderr
            named = re.findall(r"The user requested \(constraint\) ([^\s,=]+)==", said)
            named += re.findall(r"No matching distribution found for ([^\s,=]+)==", said)
            clashes = sorted({normalize(n) for n in named} & set(pins))
            if not clashes:
                print(done.stdout[-4000:] + done.stderr[-4000:], file=sys.stderr)
                raise PackError("pip download failed (above); check --python-version and the requirements")
            for name in clashes:
                print(f"pack.py: the offline machine's {name}=={pins.pop(name)} does not fit the project's "
                      "requirements; sending a version that does", flush=True)


def stored_wheel(path: Path, out: BinaryIO) -> None:
    """The wheel re-zipped into `out` without compression, same members in the same order (RECORD stays
    valid), one member in memory at a time."""
    try:
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                clone = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                clone.external_attr, clone.create_system = info.external_attr, info.create_system
                clone.compress_type, clone.file_size = zipfile.ZIP_STORED, info.file_size
                with src.open(info) as data, dst.open(clone, "w", force_zip64=info.file_size > 2**31) as target:
                    shutil.copyfileobj(data, target, 4 * MIB)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PackError(f"{path}: not a readable wheel ({exc}); download it again") from None


@contextlib.contextmanager
def xz_writer(raw: BinaryIO, preset: int):
    """An xz stream into `raw`: the `xz` program on all cores where there is one, else Python's lzma."""
    if shutil.which("xz") is None:
        with lzma.open(raw, "wb", preset=preset) as xz:
            yield xz
        return
    proc = subprocess.Popen(["xz", f"-{preset}", "-T0", "-c"], stdin=subprocess.PIPE, stdout=raw)
    try:
        yield proc.stdin
        proc.stdin.close()
    except BrokenPipeError:
        pass
    finally:
        if not proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        if proc.wait() != 0:
            raise PackError(f"xz failed with exit status {proc.returncode}")


def pack(wheels: list[Path], out: Path, part_bytes: int, preset: int = 6) -> list[Path]:
    """wheels -> out/01/wheels.tar.xz.part-000, ... (at most part_bytes per folder) + out/01/SHA256SUMS."""
    if not wheels:
        raise PackError("no wheels to pack: the offline machine already has everything, or the folder is empty")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise PackError(f"--out {out} is not empty; give a new folder")
    sums = {}
    packed = out / PACK
    total = 0
    try:
        with open(packed, "wb") as raw, xz_writer(raw, preset) as xz, tarfile.open(fileobj=xz, mode="w|") as tar, \
                tempfile.TemporaryFile(dir=out) as stored:
            for i, wheel in enumerate(sorted(wheels, key=lambda p: p.name), 1):
                stored.seek(0)
                stored.truncate()
                stored_wheel(wheel, stored)
                info = tarfile.TarInfo(wheel.name)
                info.size, info.mtime, info.mode = stored.tell(), 0, 0o644
                stored.seek(0)
                sums[wheel.name] = hashlib.file_digest(stored, "sha256").hexdigest()
                stored.seek(0)
                tar.addfile(info, stored)
                total += wheel.stat().st_size
                print(f"pack.py: [{i}/{len(wheels)}] {wheel.name} ({wheel.stat().st_size / MIB:.1f} MiB)", flush=True)
    except BaseException:
        packed.unlink(missing_ok=True)  # a rerun into the same --out starts clean
        raise
    sums[PACK] = sha256_file(packed)
    size = packed.stat().st_size
    folders = []
    with open(packed, "rb") as f:
        for n in range(1, -(-size // part_bytes) + 1):
            folder = out / f"{n:02d}"
            folder.mkdir()
            (folder / f"{PACK}.part-{n - 1:03d}").write_bytes(f.read(part_bytes))
            folders.append(folder)
    packed.unlink()
    (folders[0] / SUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
    print(f"pack.py: {len(wheels)} wheels, {total / MIB:.0f} MiB -> {PACK} {size / MIB:.0f} MiB in {len(folders)} "
          f"folder(s) of at most {part_bytes / MIB:g} MiB: {', '.join(str(f) for f in folders)}")
    return folders


def wheel_version(filename: str) -> str:
    return filename.split("-")[1]


def prepare(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.part_mib * MIB < 1:
        raise PackError(f"--part-mib {args.part_mib}: give a size above 0 (MiB per part, e.g. 60)")
    names, pins = read_have(Path(args.have) if args.have else None)
    with tempfile.TemporaryDirectory(prefix="pack-") as tmp:
        if args.wheels:
            src = Path(args.wheels)
            if not src.is_dir():
                raise PackError(f"--wheels {src}: no such folder")
        else:
            src = Path(tmp)
            kept = download(requirements(args.cuda), src, args.python_version, pins)
            names -= set(pins) - set(kept)  # pins that did not fit: that package is sent
            pins = kept
        wheels = sorted(src.glob("*.whl"))

        def machine_has(wheel: Path) -> bool:
            """A pinned package is left out only at the machine's version; one known by name only, unless its
            wheel is small: pip installs that only where the machine's version does not fit the project."""
            name = wheel_name(wheel.name)
            if name in pins:
                return normalize(wheel_version(wheel.name)) == normalize(pins[name])
            return name in names and wheel.stat().st_size >= args.send_small_mib * MIB

        skipped = [w for w in wheels if machine_has(w)]
        if skipped:
            print(f"pack.py: leaving out {len(skipped)} wheel(s) the offline machine has: "
                  f"{', '.join(w.name for w in skipped)}")
        pack([w for w in wheels if w not in skipped], out, int(args.part_mib * MIB), args.preset)


# ----------------------------------------------------------------------------------------------- unpack
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


class Joined(io.RawIOBase):
    """The parts of one file read back to back, hashing as it goes."""

    def __init__(self, parts: list[Path]) -> None:
        self.parts, self.current, self.sha = list(parts), None, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.current is None:
                if not self.parts:
                    return 0
                self.current = open(self.parts.pop(0), "rb")
            n = self.current.readinto(buffer)
            if n:
                self.sha.update(memoryview(buffer)[:n])
                return n
            self.current.close()
            self.current = None


def group_parts(files: Iterable[Path]) -> dict[str, list[Path]]:
    """NAME.part-xxx files by NAME, each list in the order `split` names them (shorter suffixes first: `split`
    lengthens them as it runs out, and pack.py numbers 000 ... 999, 1000, ...)."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(f.name.rsplit(".part-", 1)[0], []).append(f)
    order = lambda p: (len(p.name.rsplit(".part-", 1)[1]), p.name)  # noqa: E731
    return {name: sorted(parts, key=order) for name, parts in sorted(groups.items())}


def check_parts(name: str, parts: list[Path]) -> None:
    """The same part copied twice is named with its paths; pack.py's numbered parts (000, 001, ...) must
    have no gap."""
    seen: dict[str, Path] = {}
    for part in parts:
        if part.name in seen:
            raise PackError(f"{name}: {part.name} is there twice ({seen[part.name]} and {part}); keep one")
        seen[part.name] = part
    suffixes = [p.name.rsplit(".part-", 1)[1] for p in parts]
    if all(s.isdigit() and len(s) >= 3 for s in suffixes):
        have = {int(s) for s in suffixes}
        missing = [i for i in range(max(have) + 1) if i not in have]
        if missing:
            listed = ", ".join(f"{i:03d}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise PackError(f"{name}: part {listed} {'is' if len(missing) == 1 else 'are'} missing "
                            f"({len(parts)} of {max(have) + 1} here); copy every numbered folder before unpacking")


def extract_wheels(name: str, stream: BinaryIO, dest: Path) -> None:
    """The wheels of a pack (a tar of plain `*.whl` members, nothing else) into dest."""
    with tarfile.open(fileobj=stream, mode="r|xz") as tar:
        for member in tar:
            if not member.isfile() or "/" in member.name or not member.name.endswith(".whl"):
                raise PackError(f"{name}: unexpected member {member.name!r}; not a pack of pack.py")
            with tar.extractfile(member) as data, open(dest / member.name, "wb") as f:
                shutil.copyfileobj(data, f, 4 * MIB)


def unpack(src: Path, dest: Path) -> list[Path]:
    if not src.is_dir():
        raise PackError(f"no wheel folder {src}; make one with `python benchmarks/pack.py prepare` "
                        "(see benchmarks/README.md)")
    src, dest = src.resolve(), dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    stale = list(dest.glob("*.whl")) if dest != src else []
    if stale:  # another pack's wheels would be installed along with this one's
        print(f"pack.py: removing {len(stale)} wheel(s) of an earlier unpack from {dest}", flush=True)
        for wheel in stale:
            wheel.unlink()
    sums: dict[str, str] = {}
    for f in sorted(src.rglob(SUMS)):
        for line in f.read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                sums[name.lstrip("*")] = digest
    files = [f for f in src.rglob("*") if f.is_file() and dest not in f.parents]
    for f in files:
        if f.name.endswith(".whl") and f.parent != dest:
            shutil.copyfile(f, dest / f.name)
    joined_wheels = []
    for name, parts in group_parts(f for f in files if ".part-" in f.name).items():
        check_parts(name, parts)
        print(f"pack.py: joining {name} from {len(parts)} part(s)", flush=True)
        if name in sums:  # check before unpacking, so that a bad part is named as such
            joined = Joined(parts)
            while joined.read(4 * MIB):
                pass
            if joined.sha.hexdigest() != sums[name]:
                raise PackError(f"{name}: the joined parts differ from {SUMS}: a part is damaged, cut short or "
                                "from another pack; copy the parts again")
        stream = io.BufferedReader(Joined(parts), 4 * MIB)
        try:
            if name.endswith((".tar.xz", ".txz")):
                extract_wheels(name, stream, dest)
            else:
                with open(dest / name, "wb") as f:
                    shutil.copyfileobj(stream, f, 4 * MIB)
                joined_wheels.append(dest / name)
        except (tarfile.TarError, lzma.LZMAError, EOFError) as exc:
            raise PackError(f"{name}: cannot unpack the joined parts ({exc}); copy the parts again") from None
    for f in [f for f in files if f.name.endswith((".tar.xz", ".txz"))]:
        try:
            with open(f, "rb") as stream:
                extract_wheels(f.name, stream, dest)
        except (tarfile.TarError, lzma.LZMAError, EOFError) as exc:
            raise PackError(f"{f}: cannot unpack it ({exc}); copy it again") from None
    wheels = sorted(dest.glob("*.whl"))
    for wheel in wheels:
        if wheel.name in sums:
            if sha256_file(wheel) != sums[wheel.name]:
                raise PackError(f"{wheel.name}: checksum differs from {SUMS}; copy it again")
        elif wheel in joined_wheels:  # joined by hand with no checksum: at least a whole zip
            try:
                with zipfile.ZipFile(wheel) as zf:
                    bad = zf.testzip()
            except zipfile.BadZipFile:
                bad = "its directory"
            if bad:
                raise PackError(f"{wheel.name}: joined from its parts, it is not a whole wheel ({bad} is damaged): "
                                "a part is missing or damaged; copy the parts again")
    print(f"pack.py: {len(wheels)} wheels in {dest}, "
          f"{sum(w.name in sums for w in wheels)} checked against {SUMS}", flush=True)
    return wheels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="download and pack the wheels (needs internet, or --wheels)")
    p.add_argument("--out", required=True, help="new folder for the numbered part folders")
    p.add_argument("--python-version", default="3.12", help="the offline machine's Python (default 3.12)")
    p.add_argument("--cuda", default="130", help="DALI's CUDA build: 130 or 120 (default 130); '' keeps pyproject's")
    p.add_argument("--have", help="`pip freeze` of the offline machine: those packages are left out")
    p.add_argument("--wheels", help="pack the wheels in this folder instead of downloading")
    p.add_argument("--part-mib", type=float, default=60, help="largest part, MiB (default 60, above 0)")
    p.add_argument("--send-small-mib", type=float, default=1.0,
                   help="wheels smaller than this are sent even for packages in --have without a version (pip "
                        "uses them only where the machine's version does not fit); default 1")
    p.add_argument("--preset", type=int, default=6, choices=range(10), help="xz preset (default 6)")
    u = commands.add_parser("unpack", help="join, check and unpack parts into a folder of wheels")
    u.add_argument("src", help="the folder the parts were copied into (subfolders are searched)")
    u.add_argument("dest", help="folder for the wheels")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args)
        else:
            unpack(Path(args.src), Path(args.dest))
    except PackError as exc:
        print(f"pack.py: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
