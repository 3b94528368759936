"""Video datasets: one source clip per sample (kinetics_sound, ave, av_digits), decoded into T frames at
`fps` (by presentation time) and the audio track as 16 kHz mono."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from statistics import median

from pipeline.adapters.corpus import (
    SPLITS, Corpus, Reject, Sample, SampleKind, SourceError, collect, read_annotation, read_csv_rows, require_dir,
    require_file, sample_members, frame_size,
)
from pipeline.decode import decode_clip
from pipeline.encode import encode_audio, encode_frame
from pipeline.options import BuildContext, BuildOptions
from shards.format import frame_member, sanitize_key

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def encode_clip(sample: Sample, src: Path, opts: BuildOptions, ctx: BuildContext,
                out: Path | None = None) -> tuple[dict[str, bytes], dict, list[Reject]]:
    """Decode one clip and encode its members: T JPEG frames and the audio (WAV or FLAC) when it has any."""
    clip = decode_clip(src / sample.source, opts.frames, opts.fps, opts.sample_rate)
    has_audio = clip.audio is not None
    frames = {frame_member(i): encode_frame(frame, opts.size, opts.jpeg_quality) for i, frame in enumerate(clip.frames)}
    meta = {"key": sample.key, "split": sample.split, "label": sample.label, "source": sample.source,
            "duration": round(clip.duration, 3), "has_visual": True, "has_audio": has_audio,
            "frame_times": [round(t, 3) for t in clip.frame_times], "frame_size": frame_size(frames)}
    members = sample_members(meta, sample, ctx, frames)
    if has_audio:
        members[opts.audio_codec] = encode_audio(clip.audio, opts.sample_rate, opts.audio_codec)
    row = dict(meta, audio_seconds=round(len(clip.audio) / opts.sample_rate, 3) if has_audio else 0.0)
    partial = []
    if clip.audio_note:
        partial.append(Reject(sample.key, sample.split, sample.source, "audio", clip.audio_note, kept=True))
    return members, row, partial


def clip_visual_info(opts: BuildOptions) -> dict:
    """T frames at fps, short side `size`, ImageNet normalisation."""
    return {"frames": opts.frames, "fps": opts.fps, "short_side": opts.size, "format": "jpeg",
            "jpeg_quality": opts.jpeg_quality, "crop": min(224, opts.size), **IMAGENET}


def waveform_audio_info(opts: BuildOptions, rows: list[dict]) -> dict:
    """Waveform parameters and the log-mel the loaders compute; `seconds` is the median clip's audio."""
    seconds = [r["audio_seconds"] for r in rows if r["has_audio"]]
    return {"kind": "waveform", "sample_rate": opts.sample_rate, "codec": opts.audio_codec, "channels": 1,
            "seconds": round(median(seconds), 1) if seconds else 0.0, "n_mels": opts.n_mels,
            "n_fft": opts.n_fft, "win_length": opts.win_length, "hop_length": opts.hop_length,
            "db_cutoff": 80.0}


VIDEO = SampleKind("video", encode_clip, clip_visual_info, waveform_audio_info)


K400_REPLACEMENTS = "replacement/replacement_for_corrupted_k400"
"""Where the public Kinetics-400 download (cvdfoundation/kinetics-dataset, `k400_downloader.sh` and
`k400_extractor.sh`) unpacks `replacement_for_corrupted_k400.tgz`: re-encoded copies of train clips whose
originals are corrupted, matched to them by file stem, or by the 11-character YouTube id as that
repository's `arrange_by_classes.py` does."""


def kinetics_sound_classes(classes_file: Path | None = None) -> list[str]:
    """The shipped Kinetics-Sound class list, or `classes_file` (one Kinetics-400 name per line)."""
    if classes_file is not None:
        text = require_file(classes_file, "classes file", "pass an existing file").read_text(encoding="utf-8")
    else:
        text = resources.files("pipeline").joinpath("kinetics_sound_classes.txt").read_text(encoding="utf-8")
    return [c.strip() for c in text.splitlines() if c.strip()]


def _k400_clips(src: Path) -> dict[tuple[str, int], str]:
    """(YouTube id, start second) -> the clip to read, relative to --src, over `{train,val,test}/` with
    the download's replacement clips taking the place of the originals."""
    found: dict[tuple[str, int], str] = {}
    for folder in [*SPLITS, K400_REPLACEMENTS]:
        for path in sorted((src / folder).glob("*.mp4")):
            parsed = _k400_stem(path.stem)
            if parsed:
                found[parsed] = f"{folder}/{path.name}"
    return found


def _k400_stem(stem: str) -> tuple[str, int] | None:
    """`<11-char YouTube id>_<start>[_<end>]` -> (id, start), or None. YouTube ids may hold `_` and `-`."""
    if len(stem) < 13 or stem[11] != "_":
        return None
    start = stem[12:].split("_")[0]
    return (stem[:11], int(start)) if start.isdigit() else None


def _replacements(src: Path) -> dict[str, str]:
    """Stem or YouTube id of a corrupted original -> its replacement clip relative to --src."""
    out: dict[str, str] = {}
    for path in sorted((src / K400_REPLACEMENTS).glob("*.mp4")):
        out.setdefault(path.stem[:11], f"{K400_REPLACEMENTS}/{path.name}")
        out[path.stem] = f"{K400_REPLACEMENTS}/{path.name}"
    return out


def kinetics_sound(src: Path, classes_file: Path | None = None,
                   split_lists: dict[str, Path] | None = None) -> Corpus:
    """Kinetics-Sound from the public Kinetics-400 download: `{split}/<youtube_id>_<start:06d>_<end:06d>.mp4`
    and `annotations/<split>.csv` (label,youtube_id,time_start,time_end,split), keeping the 31 Kinetics-Sound
    classes. A clip of the download's `replacement/replacement_for_corrupted_k400/` folder is read in place
    of its corrupted original.

    The class list (`pipeline/kinetics_sound_classes.txt`, sorted, label index = position) is the 31 classes
    the lineage trains on, as listed by a maintainer in IBM/AdaMML issue #3: with `stomping grapes` and
    `tickling`, without `fingerpicking`/`typing` (not Kinetics-400 names). The sorted position agrees with
    the label indices of OGM-GE's `data/KineticSound/my_train.txt` (`--4-0ihtnBU_000058_000068,10,4` is
    dribbling basketball in the K400 train.csv; 4 is its sorted position).

    `split_lists` ({split: file}) reproduces the papers' 14,799 / 2,597 clips instead of the CSVs: OGM-GE's
    `my_train.txt` / `my_test.txt` rows `<youtube_id>_<start>[_<end>],10,<label index>` (the test list has
    unpadded starts and no end), each clip looked up by YouTube id and start second in the download."""
    require_dir(src, "kinetics_sound")
    classes = kinetics_sound_classes(classes_file)
    replaced: dict[str, int] = {}
    if split_lists:
        return _kinetics_from_lists(src, classes, split_lists, replaced)
    csvs = sorted((src / "annotations").glob("*.csv"))
    if not csvs:
        raise SourceError(
            f"no annotation CSVs in {src / 'annotations'}; the Kinetics-400 release has "
            f"annotations/{{train,val,test}}.csv with columns label,youtube_id,time_start,time_end,split "
            f"(or pass the lineage's split lists with --split-list train=my_train.txt --split-list test=my_test.txt)")
    rows = []
    for path in csvs:
        rows.extend((path.stem, r) for r in read_csv_rows(
            path, src, ("label", "youtube_id", "time_start", "time_end"),
            "label,youtube_id,time_start,time_end,split", replaced))
    replacements = _replacements(src)

    def make(item):
        csv_split, row = item
        split = (row.get("split") or csv_split).strip()
        try:
            stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        except (TypeError, ValueError):
            return Reject(sanitize_key(str(row.get("youtube_id") or "row")), split, "", "annotation",
                          f"malformed row {dict(row)}")
        source = replacements.get(stem) or replacements.get(stem[:11]) if split == "train" else None
        return sanitize_key(stem), split, (row.get("label") or "").strip(), source or f"{split}/{stem}.mp4"

    skipped: dict[str, int] = {}
    samples, rejects = collect(rows, src, classes, make, skipped)
    return Corpus("kinetics_sound", ["visual", "audio"], classes, samples, rejects, VIDEO,
                  skipped_labels=skipped, annotation_replaced=replaced)


def _kinetics_from_lists(src: Path, classes: list[str], split_lists: dict[str, Path],
                         replaced: dict[str, int]) -> Corpus:
    """Kinetics-Sound samples exactly as listed in the lineage's split files (see `kinetics_sound`)."""
    clips = _k400_clips(src)
    rows = []
    for split, path in sorted(split_lists.items()):
        require_file(path, f"--split-list {split}", "pass OGM-GE's my_train.txt / my_test.txt")
        for n, line in enumerate(read_annotation(path, src, replaced).splitlines(), start=1):
            if line.strip():
                rows.append((split, path.name, n, [f.strip() for f in line.split(",")]))

    def make(item):
        split, name, n, fields = item
        parsed = _k400_stem(fields[0]) if len(fields) == 3 else None
        if parsed is None or not fields[2].lstrip("-").isdigit():
            return Reject("", "", f"{name} line {n}", "annotation",
                          f"expected <youtube_id>_<start>[_<end>],10,<label index>; got {','.join(fields)!r}")
        label = int(fields[2])
        key = sanitize_key(fields[0])
        if not 0 <= label < len(classes):
            return Reject(key, "", f"{name} line {n}", "annotation",
                          f"label {label} is not a class index 0..{len(classes) - 1}")
        rel = clips.get(parsed)
        if rel is None:
            return Reject(key, split, f"{name} line {n}", "source",
                          f"listed clip {fields[0]} not found in {', '.join(SPLITS)}/ or {K400_REPLACEMENTS}/")
        return sanitize_key(Path(rel).stem), split, classes[label], rel

    samples, rejects = collect(rows, src, classes, make)
    return Corpus("kinetics_sound", ["visual", "audio"], classes, samples, rejects, VIDEO,
                  annotation_replaced=replaced)


def ave(src: Path, duplicates: str = "drop") -> Corpus:
    """AVE release (YapengTian/AVE-ECCV18 `data/`): `AVE/<VideoID>.mp4`, `Annotations.txt` and
    `{train,val,test}Set.txt` (`Category&VideoID&Quality&StartTime&EndTime`; the split files are the rows
    of Annotations.txt that `{train,val,test}_order.h5` index, 3,339 / 402 / 402). Classes are the 28
    sorted categories (OGM-GE reads them sorted from its `stat.txt`).

    Annotations.txt has 4,143 rows but 4,097 distinct video ids: 45 ids appear more than once, each time
    with different labels (Banjo/Mandolin, Male/Female speech, ...). By default (`duplicates="drop"`)
    every row of such an ambiguous id is rejected with the labels it has, as OGM-GE's
    `dataset/dataset.py` intends ("AVE, delete repeated labels"), so the label never depends on list
    order: 3,268 / 390 / 394 clips, 4,052 in all. `duplicates="first"` keeps each id's first row in a
    split, as PMR's `dataset/AVEDataset.py` does."""
    require_dir(src, "ave")
    if duplicates not in ("drop", "first"):
        raise SourceError(f"--duplicates {duplicates!r}: use drop (ambiguous ids left out) or first")
    fix = "the AVE release has Annotations.txt, trainSet.txt, valSet.txt, testSet.txt and the AVE/ video folder"
    replaced: dict[str, int] = {}
    annotations = _read_ave_list(require_file(src / "Annotations.txt", "Annotations.txt", fix), src, replaced)
    classes = sorted({row[0] for row in annotations})
    labels_of: dict[str, list[str]] = {}
    for row in annotations:
        labels_of.setdefault(row[1], []).append(row[0])
    ambiguous = {vid: labels for vid, labels in labels_of.items() if len(set(labels)) > 1}
    rows = []
    for split in SPLITS:
        path = require_file(src / f"{split}Set.txt", f"{split}Set.txt", fix)
        rows.extend((split, row) for row in _read_ave_list(path, src, replaced))

    def make(item):
        split, row = item
        category, video_id = row[0], row[1]
        rel = f"AVE/{video_id}.mp4"
        if duplicates == "drop" and video_id in ambiguous:
            return Reject(sanitize_key(video_id), split, rel, "annotation",
                          f"ambiguous video id: {len(ambiguous[video_id])} rows of Annotations.txt label it "
                          f"{', '.join(sorted(set(ambiguous[video_id])))}; dropped (--duplicates first keeps the first)")
        return sanitize_key(video_id), split, category, rel

    samples, rejects = collect(rows, src, classes, make)
    return Corpus("ave", ["visual", "audio"], classes, samples, rejects, VIDEO, annotation_replaced=replaced)


def _read_ave_list(path: Path, src: Path, replaced: dict[str, int]) -> list[list[str]]:
    rows = []
    for line in read_annotation(path, src, replaced).splitlines():
        fields = [f.strip() for f in line.split("&")]
        if len(fields) < 2 or fields[0] == "Category" or not fields[1]:
            continue  # header or blank line
        rows.append(fields)
    return rows


def av_digits(src: Path) -> Corpus:
    """The demo corpus of `pipeline make-demo av_digits`: `{split}/<clip_id>.mp4`,
    `annotations/{split}.csv` (clip_id,label,...) and `classes.txt`."""
    require_dir(src, "av_digits")
    fix = "make it with `pipeline make-demo av_digits --out DIR` and pass that DIR as --src"
    replaced: dict[str, int] = {}
    classes_txt = require_file(src / "classes.txt", "classes.txt", fix)
    classes = [c.strip() for c in read_annotation(classes_txt, src, replaced).splitlines() if c.strip()]
    csvs = sorted((src / "annotations").glob("*.csv"))
    if not csvs:
        raise SourceError(f"no annotation CSVs in {src / 'annotations'}; {fix}")
    rows = []
    for path in csvs:
        rows.extend(read_csv_rows(path, src, ("clip_id", "label", "split"), "clip_id,label,split,...", replaced))

    def make(row):
        clip_id, split = row["clip_id"] or "", (row["split"] or "").strip()
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < len(classes):  # -1 ("unlabelled") would index the class list from the end
            return Reject(sanitize_key(clip_id or "row"), "", "", "annotation",
                          f"label {row['label']!r} is not a class index 0..{len(classes) - 1} (row {dict(row)})")
        return sanitize_key(clip_id), split, classes[label], f"{split}/{clip_id}.mp4"

    samples, rejects = collect(rows, src, classes, make)
    return Corpus("av_digits", ["visual", "audio"], classes, samples, rejects, VIDEO, annotation_replaced=replaced)
