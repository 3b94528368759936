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


def kinetics_sound(src: Path, classes_file: Path | None = None) -> Corpus:
    """Kinetics-400 download (`{split}/<youtube_id>_<start:06d>_<end:06d>.mp4`, `annotations/<split>.csv`),
    keeping the Kinetics-Sound classes (shipped list, or `classes_file` with one name per line)."""
    require_dir(src, "kinetics_sound")
    if classes_file is not None:
        classes = [c.strip() for c in require_file(classes_file, "classes file", "pass an existing file").read_text().splitlines() if c.strip()]
    else:
        classes = resources.files("pipeline").joinpath("kinetics_sound_classes.txt").read_text().split("\n")
        classes = [c.strip() for c in classes if c.strip()]
    csvs = sorted((src / "annotations").glob("*.csv"))
    if not csvs:
        raise SourceError(
            f"no annotation CSVs in {src / 'annotations'}; the Kinetics-400 release has "
            f"annotations/{{train,val,test}}.csv with columns label,youtube_id,time_start,time_end,split")
    rows = []
    replaced: dict[str, int] = {}
    for path in csvs:
        rows.extend((path.stem, r) for r in read_csv_rows(
            path, src, ("label", "youtube_id", "time_start", "time_end"),
            "label,youtube_id,time_start,time_end,split", replaced))

    def make(item):
        csv_split, row = item
        split = (row.get("split") or csv_split).strip()
        try:
            stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        except (TypeError, ValueError):
            return Reject(sanitize_key(str(row.get("youtube_id") or "row")), split, "", "annotation",
                          f"malformed row {dict(row)}")
        return sanitize_key(stem), split, (row.get("label") or "").strip(), f"{split}/{stem}.mp4"

    skipped: dict[str, int] = {}
    samples, rejects = collect(rows, src, classes, make, skipped)
    return Corpus("kinetics_sound", ["visual", "audio"], classes, samples, rejects, VIDEO,
                  skipped_labels=skipped, annotation_replaced=replaced)


def ave(src: Path) -> Corpus:
    """AVE release: `AVE/<VideoID>.mp4`, `Annotations.txt` and `{train,val,test}Set.txt`
    (`Category&VideoID&Quality&StartTime&EndTime`); classes are the sorted categories of Annotations.txt."""
    require_dir(src, "ave")
    fix = "the AVE release has Annotations.txt, trainSet.txt, valSet.txt, testSet.txt and the AVE/ video folder"
    replaced: dict[str, int] = {}
    annotations = _read_ave_list(require_file(src / "Annotations.txt", "Annotations.txt", fix), src, replaced)
    classes = sorted({row[0] for row in annotations})
    rows = []
    for split in SPLITS:
        path = require_file(src / f"{split}Set.txt", f"{split}Set.txt", fix)
        rows.extend((split, row) for row in _read_ave_list(path, src, replaced))

    def make(item):
        split, row = item
        category, video_id = row[0], row[1]
        return sanitize_key(video_id), split, category, f"AVE/{video_id}.mp4"

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
