"""Small raw corpora for tests, made with ffmpeg: good clips, no-audio, short-audio, truncated, garbage,
and a variable-frame-rate clip."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path


def ffmpeg_clip(path: Path, seconds: float = 2.0, audio: bool = True, audio_seconds: float | None = None,
                size: str = "160x120", tone: int = 440, pattern: str = "testsrc2") -> Path:
    """An H.264 mp4 with an optional AAC tone; `audio_seconds` shorter than `seconds` makes a clip whose
    container declares more than its audio stream holds."""
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is needed for the test media: apt-get install -y ffmpeg")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size={size}:rate=10:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={tone}:sample_rate=22050:duration={audio_seconds or seconds}"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-threads", "1"]
    cmd += ["-c:a", "aac", "-ac", "1"] if audio else []
    cmd += [str(path)]
    subprocess.run(cmd, check=True)
    return path


# A variable-frame-rate clip: VFR_SLOW_FPS for the first VFR_SWITCH s, then VFR_FAST_FPS; every frame shows
# a white bar on black whose left edge is at x = VFR_BAR_SPEED * t px (t its presentation time).
VFR_SECONDS, VFR_SWITCH, VFR_SLOW_FPS, VFR_FAST_FPS, VFR_BAR_SPEED, VFR_BAR_WIDTH = 5.0, 2.0, 5, 25, 50, 8


def vfr_clip(path: Path) -> Path:
    """An H.264 mp4 (no audio) whose frame rate changes mid-clip, timestamps kept as generated: frames
    are dropped from a 25 fps source (`select`) and muxed with `-fps_mode vfr`, so nothing is re-timed."""
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is needed for the test media: apt-get install -y ffmpeg")
    path.parent.mkdir(parents=True, exist_ok=True)
    keep_every = VFR_FAST_FPS // VFR_SLOW_FPS
    bar = f"if(between(X,{VFR_BAR_SPEED}*T,{VFR_BAR_SPEED}*T+{VFR_BAR_WIDTH - 1}),235,16)"
    graph = (f"color=c=black:s=320x64:r={VFR_FAST_FPS}:d={VFR_SECONDS},format=gray,geq=lum='{bar}',"
             f"select='gte(t,{VFR_SWITCH})+not(mod(n,{keep_every}))',format=yuv420p")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", graph, "-fps_mode", "vfr",
                    "-c:v", "libx264", "-preset", "ultrafast", "-threads", "1", str(path)], check=True)
    return path


def truncate(path: Path, keep: float = 0.4) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def kinetics_sound_corpus(root: Path, n_per_class: int = 3) -> dict[str, list[str]]:
    """Kinetics-400 layout with two Kinetics-Sound classes and one class outside it, plus bad items.

    Returns the stems of the special cases by kind."""
    classes = ["playing drums", "playing piano", "abseiling"]
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    kinds: dict[str, list[str]] = {"good": [], "no_audio": [], "short_audio": [], "truncated": [],
                                   "garbage": [], "missing": [], "other_class": []}
    for split in rows:
        for c, label in enumerate(classes):
            for i in range(n_per_class):
                yid = f"{split[:2]}{c}x{i}Ab-_{i}"
                start = 10 * i
                stem = f"{yid}_{start:06d}_{start + 10:06d}"
                rows[split].append({"label": label, "youtube_id": yid, "time_start": start,
                                    "time_end": start + 10, "split": split})
                path = root / split / f"{stem}.mp4"
                kind = "other_class" if label == "abseiling" else "good"
                if kind == "good" and split == "train" and c == 0:
                    kind = ["good", "no_audio", "short_audio"][i % 3]
                if kind == "good" and split == "train" and c == 1 and i == 1:
                    kind = "truncated"
                if kind == "good" and split == "val" and c == 1 and i == 0:
                    kind = "garbage"
                if kind == "good" and split == "val" and c == 0 and i == 1:
                    kind = "missing"
                kinds[kind].append(stem)
                if kind == "missing":
                    continue
                if kind == "garbage":
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"this is not a video at all\n" * 100)
                    continue
                ffmpeg_clip(path, audio=kind != "no_audio", audio_seconds=0.3 if kind == "short_audio" else None,
                            tone=300 + 100 * c + 10 * i)
                if kind == "truncated":
                    truncate(path)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        with open(root / "annotations" / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
            writer.writeheader()
            writer.writerows(split_rows)
    return kinds


def ave_corpus(root: Path) -> dict[str, list[str]]:
    """AVE layout: Annotations.txt, {train,val,test}Set.txt with `&`-separated fields, AVE/<id>.mp4."""
    categories = ["Church bell", "Dog", "Violin, fiddle"]
    lines = {"train": [], "val": [], "test": []}
    kinds: dict[str, list[str]] = {"good": [], "no_audio": [], "missing": []}
    n = 0
    for split in lines:
        for c, category in enumerate(categories):
            video_id = f"{split}V{c}-{n:03d}"
            n += 1
            kind = "good"
            if split == "test" and c == 2:
                kind = "missing"
            elif split == "train" and c == 1:
                kind = "no_audio"
            kinds[kind].append(video_id)
            lines[split].append(f"{category}&{video_id}&good&0&10")
            if kind != "missing":
                ffmpeg_clip(root / "AVE" / f"{video_id}.mp4", audio=kind != "no_audio", tone=500 + 50 * c)
    header = "Category&VideoID&Quality&StartTime&EndTime"
    (root / "Annotations.txt").write_text("\n".join([header] + sum(lines.values(), [])) + "\n")
    for split, split_lines in lines.items():
        (root / f"{split}Set.txt").write_text("\n".join([header] + split_lines) + "\n")
    return kinds


# ------------------------------------------------------------------ vision-language and AV-MNIST layouts
def class_image(path: Path, cls: int, variant: int, size: tuple[int, int] = (72, 96), mode: str = "RGB") -> Path:
    """A small JPEG whose colour and stripe position tell the class (so a short training run can learn it)."""
    import numpy as np
    from PIL import Image

    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[:] = [(60 * cls) % 256, (150 + 40 * cls) % 256, (90 * cls + 30) % 256]
    band = (cls * h // 5) % (h - 8)
    pixels[band:band + 8] = 255 - pixels[band:band + 8]
    pixels[:, variant % w] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format="JPEG", quality=90)
    return path


MM_IMDB_GENRES = ["Drama", "Comedy", "Horror"]  # three of the 23, and one outside them
GENRE_WORDS = {"Drama": "family tears secret", "Comedy": "funny wedding chaos", "Horror": "ghost night blood"}


def mm_imdb_corpus(root: Path) -> dict[str, list[str]]:
    """MM-IMDB release layout under `root/mmimdb`: split.json (train/dev/test id lists) and
    dataset/<id>.json (genres, plot list, title, ...) + dataset/<id>.jpeg; 20 movies with bad cases."""
    data = root / "mmimdb" / "dataset"
    data.mkdir(parents=True)
    splits: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    kinds: dict[str, list[str]] = {k: [] for k in ("good", "no_plot", "no_poster", "bad_image", "other_script",
                                                   "bad_utf8", "no_genre", "no_json")}
    special = {1: "no_plot", 2: "no_poster", 3: "bad_image", 4: "other_script", 5: "bad_utf8", 6: "no_genre",
               7: "no_json", 14: "no_poster", 17: "no_plot"}
    for i in range(20):
        movie_id = f"{i:07d}"
        split = "train" if i < 12 else "dev" if i < 15 else "test"
        splits[split].append(movie_id)
        kind = special.get(i, "good")
        kinds[kind].append(movie_id)
        if kind == "no_json":
            continue
        genres = [MM_IMDB_GENRES[i % 3]] + ([MM_IMDB_GENRES[(i + 1) % 3]] if i % 4 == 0 else [])
        if kind == "no_genre":
            genres = ["Reality-TV"]
        plot = [f"A story of {' '.join(GENRE_WORDS[g] for g in genres if g in GENRE_WORDS)} number {i}."]
        if kind == "other_script":
            plot = ["東京の夜、幽霊が現れる。", "Призрак появляется ночью."]
        meta = {"title": f"Movie {i}", "genres": genres, "imdb_id": movie_id, "year": 1990 + i}
        if kind != "no_plot":
            meta["plot"] = plot
        text = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        if kind == "bad_utf8":  # Latin-1 bytes inside an otherwise UTF-8 file
            text = text.replace(b"number", b"caf\xe9 \xff number")
        (data / f"{movie_id}.json").write_bytes(text)
        if kind == "bad_image":
            (data / f"{movie_id}.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
        elif kind != "no_poster":
            class_image(data / f"{movie_id}.jpeg", i % 3, i, mode="L" if i == 8 else "RGB")
    (root / "mmimdb" / "split.json").write_text(json.dumps(splits))
    return kinds


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "baklava"]
FOOD_WORDS = {"apple_pie": "apple pie recipe cinnamon", "baby_back_ribs": "ribs barbecue smoked pork",
              "baklava": "baklava honey pastry walnuts"}


def food101_corpus(root: Path) -> dict[str, list[str]]:
    """UPMC Food-101 layout: images/{train,test}/<class>/<class>_<n>.jpg and header-less
    texts/{train,test}_titles.csv rows (file,title,class), with an empty row, a blank title, an image that
    does not decode, a title in another script and one with invalid UTF-8 bytes."""
    kinds: dict[str, list[str]] = {k: [] for k in ("good", "no_title", "bad_image", "other_script", "bad_utf8",
                                                   "missing_image")}
    (root / "texts").mkdir(parents=True)
    for split, per_class in (("train", 5), ("test", 2)):
        lines: list[bytes] = []
        for c, name in enumerate(FOOD_CLASSES):
            for n in range(per_class):
                file = f"{name}_{n}.jpg"
                key = f"{split}_{name}_{n}"
                title = f"{FOOD_WORDS[name]} best homemade {n}".encode()
                kind = "good"
                if split == "train" and n == 1:
                    kind = ["no_title", "other_script", "bad_utf8"][c]
                if split == "train" and n == 2 and c == 0:
                    kind = "bad_image"
                if split == "test" and n == 1 and c == 2:
                    kind = "missing_image"
                kinds[kind].append(key)
                if kind == "no_title":
                    title = b""
                elif kind == "other_script":
                    title = "ضلوع مشوية 烤排骨 ребрышки".encode()
                elif kind == "bad_utf8":
                    title = b"baklava p\xe2tisserie \xc3 honey"
                path = root / "images" / split / name / file
                if kind == "bad_image":
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"GIF89a but not an image at all" * 10)
                elif kind != "missing_image":
                    class_image(path, c, n)
                lines.append(b'"' + file.encode() + b'","' + title + b'",' + name.encode())
            if split == "train" and c == 0:
                lines.append(b"")  # an empty CSV row
        (root / "texts" / f"{split}_titles.csv").write_bytes(b"\n".join(lines) + b"\n")
    return kinds


def av_mnist_corpus(root: Path, n_train: int = 24, n_test: int = 8) -> dict[str, list[str]]:
    """The AV-MNIST arrays MultiBench reads, under `root/avmnist`: image/{train,test}_data.npy (N x 784
    uint8), audio/{train,test}_data.npy (N x 112 x 112 float, 0..255), {train,test}_labels.npy; only
    three digits, drawn as class-dependent bars so a short run can learn them."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = root / "avmnist"
    for sub in ("image", "audio"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        audio = rng.uniform(0, 60, size=(n, 112, 112)).astype(np.float32)
        for i, d in enumerate(labels):
            images[i, 4 + 7 * d: 10 + 7 * d, 4:24] = 250
            audio[i, 10 + 30 * d: 30 + 30 * d, :] += 180
        np.save(base / "image" / f"{split}_data.npy", images.reshape(n, 784))
        np.save(base / "audio" / f"{split}_data.npy", audio)
        np.save(base / f"{split}_labels.npy", labels.astype(np.int64))
    return {"train": [f"train_{i:05d}" for i in range(n_train)], "test": [f"test_{i:05d}" for i in range(n_test)]}
