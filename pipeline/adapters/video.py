"""Video datasets: one source clip per sample (kinetics_sound, ave, av_digits), decoded into T frames at
`fps` (by presentation time) and the audio track as 16 kHz mono."""
from __future__ import annotations

import csv
import io
from importlib import resources
from pathlib import Path
from statistics import median

from pipeline.adapters.corpus import (
    DB_CUTOFF,
    SPLITS,
    Corpus,
    Reject,
    Sample,
    SampleKind,
    SourceError,
    audio_members,
    collect,
    frame_size,
    read_annotation,
    read_csv_rows,
    require_dir,
    require_file,
    sample_members,
    source_problem,
    split_problem,
)
from pipeline.decode import DecodeError, decode_audio_file, decode_clip
from pipeline.encode import encode_frame, encode_image_file, encode_text
from pipeline.options import BuildContext, BuildOptions
from pipeline.text import load_tokenizer
from shards.format import AudioInfo, VisualInfo, frame_member, sanitize_key
from shards.masks import key_uniform

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
        members.update(audio_members(clip.audio, opts))
    row = dict(meta, audio_seconds=round(len(clip.audio) / opts.sample_rate, 3) if has_audio else 0.0)
    partial = []
    if clip.audio_note:
        partial.append(Reject(sample.key, sample.split, sample.source, "audio", clip.audio_note, kept=True))
    return members, row, partial


def clip_visual_info(opts: BuildOptions) -> VisualInfo:
    """T frames at fps, short side `size`, ImageNet normalisation."""
    return VisualInfo(frames=opts.frames, fps=opts.fps, short_side=opts.size, jpeg_quality=opts.jpeg_quality,
                      crop=min(224, opts.size), **IMAGENET)


def waveform_audio_info(opts: BuildOptions, rows: list[dict]) -> AudioInfo:
    """Waveform parameters and the log-mel the loaders compute; `seconds` is the median clip's audio. With
    `--audio-features logmel`, the stored log-mel's member, dtype and shape instead of the codec."""
    seconds = [r["audio_seconds"] for r in rows if r["has_audio"]]
    mel = {"n_mels": opts.n_mels, "n_fft": opts.n_fft, "win_length": opts.win_length, "hop_length": opts.hop_length,
           "db_cutoff": DB_CUTOFF, "sample_rate": opts.sample_rate, "channels": 1}
    if opts.audio_features == "logmel":
        n_frames = int(round(opts.audio_seconds * opts.sample_rate)) // opts.hop_length + 1
        return AudioInfo(kind="logmel_array", member="logmel.npy", dtype="float16", shape=[opts.n_mels, n_frames],
                         seconds=opts.audio_seconds, **mel)
    return AudioInfo(kind="waveform", codec=opts.audio_codec, seconds=round(median(seconds), 1) if seconds else 0.0,
                     **mel)


VIDEO = SampleKind("video", encode_clip, clip_visual_info, waveform_audio_info)


def encode_media_sample(sample: Sample, src: Path, opts: BuildOptions, ctx: BuildContext,
                        out: Path | None = None, audio_track: bool = True) -> tuple[dict[str, bytes], dict, list[Reject]]:
    """A sample of separate media (`Sample.kind` "video", "image" or "none" for its visual source): frames
    from the video (T at fps) or the image (one), audio from `audio_source` or else the video's track
    (`audio_track=False`: never the track), text as token ids. A video or image that does not decode
    rejects the row; audio that does not decode
    leaves the sample without audio when it has another modality."""
    frames: dict[str, bytes] = {}
    times: list[float] = []
    track, duration, note = None, 0.0, None
    if sample.kind == "video":
        clip = decode_clip(src / sample.source, opts.frames, opts.fps, opts.sample_rate)
        frames = {frame_member(i): encode_frame(f, opts.size, opts.jpeg_quality) for i, f in enumerate(clip.frames)}
        times, duration = clip.frame_times, clip.duration
        if audio_track:
            track, note = clip.audio, clip.audio_note
    elif sample.kind == "image":
        frames = {frame_member(0): encode_image_file(src / sample.source, opts.size, opts.jpeg_quality)}
    if sample.audio_source:
        try:
            track, declared = decode_audio_file(src / sample.audio_source, opts.sample_rate)
            duration, note = duration or declared, None
        except DecodeError as exc:
            if not (frames or sample.text):
                raise
            track, note = None, f"{sample.audio_source}: {exc.reason}"
    meta = {"key": sample.key, "split": sample.split, "label": sample.label, "labels": list(sample.labels),
            "source": sample.source or sample.audio_source, "duration": round(duration, 3),
            "has_visual": bool(frames), "has_audio": track is not None, "has_text": sample.text is not None,
            "frame_size": frame_size(frames)}
    if times:
        meta["frame_times"] = [round(t, 3) for t in times]
    members = sample_members(meta, sample, ctx, frames)
    if track is not None:
        members.update(audio_members(track, opts))
    if sample.text is not None:
        tokenizer = load_tokenizer(str(out), ctx.tokenizer, opts.max_len)
        members["text.npy"], members["text.txt.zst"] = encode_text(sample.text, tokenizer)
    partial = []
    if note:
        partial.append(Reject(sample.key, sample.split, sample.source or sample.audio_source, "audio", note, kept=True))
    if sample.text_replaced:
        partial.append(Reject(sample.key, sample.split, sample.source, "text",
                              f"{sample.text_replaced} invalid UTF-8 sequence(s) replaced by U+FFFD", kept=True))
    row = dict(meta, audio_seconds=round(len(track) / opts.sample_rate, 3) if track is not None else 0.0,
               text_replaced=sample.text_replaced)
    return members, row, partial


def encode_clip_and_audio_file(sample: Sample, src: Path, opts: BuildOptions, ctx: BuildContext,
                               out: Path | None = None) -> tuple[dict[str, bytes], dict, list[Reject]]:
    """Frames from the video, audio only from the separate audio file (CREMA-D's AudioWAV)."""
    return encode_media_sample(sample, src, opts, ctx, out, audio_track=False)


SEPARATE_AUDIO = SampleKind("video+audio file", encode_clip_and_audio_file, clip_visual_info, waveform_audio_info)


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


CREMA_D_CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
"""The six CREMA-D emotions in the lineage's label order: OGM-GE `dataset/CramedDataset.py`
(`class_dict = {'NEU':0, 'HAP':1, 'SAD':2, 'FEA':3, 'DIS':4, 'ANG':5}`), as BalanceBenchmark, PMR and AGM."""
VAL_FRACTION = 0.1


def crema_d(src: Path, split_lists: dict[str, Path] | None = None, seed: int = 0) -> Corpus:
    """The CREMA-D release (CheyneyComputerScience/CREMA-D): `AudioWAV/<name>.wav` and `VideoFlash/<name>.flv`,
    `<name>` = `<actor>_<sentence>_<emotion>_<level>` (e.g. `1001_DFA_ANG_XX`); 7,442 clips of 91 actors
    (1001-1091), six emotions from the name. The audio comes from the WAV file, not the video (as OGM-GE
    reads `AudioWAV/`); a clip with only one of the two files is kept without the other modality.

    Splits: the lineage's lists when given (`split_lists`, e.g. OGM-GE's `data/CREMAD/train.csv` and
    `test.csv`, header-less rows `<name>,<emotion>`: 6,698 / 744, not speaker-disjoint; `val` is then a
    fixed 10% of train by a hash of the key, OGM-GE having none), otherwise a seeded speaker-disjoint split
    of the actors (80 / 10 / 10 %), so test speakers are unseen."""
    require_dir(src, "crema_d")
    fix = "the CREMA-D release has AudioWAV/<name>.wav and VideoFlash/<name>.flv"
    wavs = {p.stem: p for p in (src / "AudioWAV").glob("*.wav")}
    videos = {p.stem: p for p in (src / "VideoFlash").glob("*.flv")}
    if not wavs and not videos:
        raise SourceError(f"{src}: no AudioWAV/*.wav and no VideoFlash/*.flv; {fix}")
    replaced: dict[str, int] = {}
    rows: list[tuple[str, str, str]] = []  # (name, split, where)
    if split_lists:
        for split, path in sorted(split_lists.items()):
            require_file(path, f"--split-list {split}", "pass OGM-GE's data/CREMAD/train.csv / test.csv")
            for n, line in enumerate(read_annotation(path, src, replaced).splitlines(), start=1):
                if line.strip():
                    rows.append((line.split(",")[0].strip(), split, f"{path.name} line {n}"))
    else:
        names = sorted(set(wavs) | set(videos))
        split_of = speaker_splits({n.split("_")[0] for n in names}, seed)
        rows = [(name, split_of[name.split("_")[0]], name) for name in names]
    samples: dict[str, Sample] = {}
    rejects: list[Reject] = []
    for name, split, where in rows:
        parts = name.split("_")
        if len(parts) != 4 or not parts[0].isdigit() or parts[2] not in CREMA_D_CLASSES:
            rejects.append(Reject("", "", where, "annotation",
                                  f"{name!r} is not <actor>_<sentence>_<emotion>_<level> with emotion one of "
                                  f"{', '.join(CREMA_D_CLASSES)}"))
            continue
        key = sanitize_key(name)
        video = f"VideoFlash/{name}.flv" if name in videos else ""
        audio = f"AudioWAV/{name}.wav" if name in wavs else ""
        if not video and not audio:
            rejects.append(Reject(key, split, where, "source", "neither VideoFlash/<name>.flv nor AudioWAV/<name>.wav"))
            continue
        if key in samples:
            rejects.append(Reject(key, split, where, "annotation", f"duplicate key (also in {samples[key].split})"))
            continue
        if split_lists and split == "train" and key_uniform(key, seed, "crema_d:val") < VAL_FRACTION:
            split = "val"
        for rel, what in ((video, "video VideoFlash"), (audio, "audio AudioWAV")):
            if not rel:
                rejects.append(Reject(key, split, where, "source", f"no {what}/{name} file; kept without it", kept=True))
        samples[key] = Sample(key, split, CREMA_D_CLASSES.index(parts[2]), video, kind="video" if video else "none",
                              audio_source=audio)
    ordered = sorted(samples.values(), key=lambda s: (s.split, s.key))
    return Corpus("crema_d", ["visual", "audio"], list(CREMA_D_CLASSES), ordered, rejects, SEPARATE_AUDIO,
                  annotation_replaced=replaced)


def speaker_splits(actors: set[str], seed: int) -> dict[str, str]:
    """Actor -> train / val / test: the actors ordered by a seeded hash, the first 10% (at least one)
    test, the next 10% (at least one) val, the rest train; speaker-disjoint and deterministic."""
    order = sorted(actors, key=lambda a: (key_uniform(a, seed, "crema_d:speaker"), a))
    n_held = max(1, round(0.1 * len(order))) if len(order) >= 3 else 0
    return {a: "test" if i < n_held else "val" if i < 2 * n_held else "train" for i, a in enumerate(order)}


VGGSOUND_EXTENSIONS = (".mp4", ".mkv", ".webm", ".flv")


def vggsound(src: Path, csv_file: Path | None = None) -> Corpus:
    """VGGSound (hche11/VGGSound): the public `vggsound.csv`, header-less rows
    `youtube_id,start_seconds,label,split` (`train`/`test`; 183,971 / 15,496 rows, 309 classes; labels with
    commas are quoted), and the downloaded 10 s clips anywhere under --src, named as the common download
    scripts name them: `<youtube_id>_<start:06d>.mp4` (the official lists, `data/test.csv`),
    `<youtube_id>_<start>.mp4` (OGM-GE's `dataset/VGGSoundDataset.py`) or `<youtube_id>_<start:06d>_<end:06d>.mp4`
    (the Kinetics crawler), also .mkv/.webm/.flv. Classes are sorted, as the official loader
    (`datasets/dataloader.py`: `sorted(classes)`) does. Clips that were never downloaded are rejected
    (`source`); `val` is a fixed 10% of train by a hash of the key (VGGSound has none)."""
    require_dir(src, "vggsound")
    path = csv_file or src / "vggsound.csv"
    require_file(path, "vggsound.csv", "pass the public vggsound.csv (youtube_id,start_seconds,label,split)")
    replaced: dict[str, int] = {}
    rows = list(csv.reader(io.StringIO(read_annotation(path, src, replaced), newline="")))
    clips: dict[tuple[str, int], str] = {}
    for clip in sorted(p for p in src.rglob("*") if p.suffix in VGGSOUND_EXTENSIONS and p.is_file()):
        parsed = _k400_stem(clip.stem)
        if parsed:
            clips.setdefault(parsed, clip.relative_to(src).as_posix())
    classes = sorted({r[2].strip() for r in rows if _vggsound_row(r)})
    if not classes:
        raise SourceError(f"{path}: no row youtube_id,start_seconds,label,split")
    index = {c: i for i, c in enumerate(classes)}
    samples: dict[str, Sample] = {}
    rejects: list[Reject] = []
    root = src.resolve()
    for n, row in enumerate(rows, start=1):
        where = f"{path.name} line {n}"
        if not _vggsound_row(row):
            rejects.append(Reject("", "", where, "annotation",
                                  f"expected youtube_id,start_seconds,label,split; got {row!r}"))
            continue
        yid, start, label, split = row[0].strip(), int(row[1]), row[2].strip(), row[3].strip()
        key = sanitize_key(f"{yid}_{start:06d}")
        problem = split_problem(split, key, where, ("train", "test"))
        if problem:
            rejects.append(problem)
            continue
        rel = clips.get((yid, start))
        if rel is None:
            rejects.append(Reject(key, split, where, "source", f"clip {yid}_{start:06d} not downloaded"))
            continue
        problem = source_problem(src, root, rel, key, split, samples)
        if problem:
            rejects.append(problem)
            continue
        if split == "train" and key_uniform(key, 0, "vggsound:val") < VAL_FRACTION:
            split = "val"
        samples[key] = Sample(key, split, index[label], rel)
    ordered = sorted(samples.values(), key=lambda s: (s.split, s.key))
    return Corpus("vggsound", ["visual", "audio"], classes, ordered, rejects, VIDEO, annotation_replaced=replaced)


def _vggsound_row(row: list[str]) -> bool:
    return len(row) == 4 and len(row[0].strip()) == 11 and row[1].strip().isdigit() and bool(row[2].strip())
