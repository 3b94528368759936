"""The papers' datasets as the field uses them: the 31 Kinetics-Sound classes of a real Kinetics-400
download, its replacement clips, the lineage's split lists, and AVE's ambiguous video ids.

One tiny real clip is hard-linked under every name a corpus needs, so these corpora cost one ffmpeg run."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.adapters.video import K400_REPLACEMENTS, ave, kinetics_sound, kinetics_sound_classes
from pipeline.build import BuildOptions, build_shards
from pipeline.cli import main
from tests.media import ffmpeg_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ffmpeg_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=1.0, size="64x48")


def link(clip: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.link(clip, path)


def youtube_id(i: int) -> str:
    return f"yt{i:04d}_x-{i % 10}Ab"[:11]  # 11 characters, with `_` and `-` as real ids have


def k400_corpus(root: Path, clip: Path, classes: list[str], split: str = "train") -> list[dict]:
    """A Kinetics-400-layout corpus with one clip per class name."""
    rows = []
    for i, label in enumerate(classes):
        yid = youtube_id(i)
        rows.append({"label": label, "youtube_id": yid, "time_start": 10, "time_end": 20, "split": split})
        link(clip, root / split / f"{yid}_000010_000020.mp4")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"{split}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_the_shipped_class_list_is_the_31_kinetics_sound_classes_sorted() -> None:
    classes = kinetics_sound_classes()
    assert len(classes) == 31 and classes == sorted(classes)
    assert {"stomping grapes", "tickling"} <= set(classes)
    assert not {"fingerpicking", "typing"} & set(classes)  # not Kinetics-400 class names
    assert classes.index("dribbling basketball") == 4 and classes.index("playing harmonica") == 13  # OGM-GE lists


def test_a_k400_corpus_with_every_listed_class_has_all_31_classes(clip: Path, tmp_path: Path) -> None:
    classes = kinetics_sound_classes()
    k400_corpus(tmp_path / "k400", clip, classes + ["abseiling"])
    corpus = kinetics_sound(tmp_path / "k400")
    assert sorted({s.label for s in corpus.samples}) == list(range(31))
    assert corpus.skipped_labels == {"abseiling": 1}


def test_a_replacement_clip_is_read_in_place_of_its_corrupted_original(clip: Path, tmp_path: Path) -> None:
    root = tmp_path / "k400"
    rows = k400_corpus(root, clip, ["bowling", "singing"])
    broken = root / "train" / f"{rows[0]['youtube_id']}_000010_000020.mp4"
    broken.unlink()
    broken.write_bytes(b"corrupted download\n" * 100)
    link(clip, root / K400_REPLACEMENTS / broken.name)
    build_shards("kinetics_sound", root, tmp_path / "out", BuildOptions(size=32), workers=1, progress=False)
    manifest = {r["key"]: r for r in pq.read_table(tmp_path / "out/kinetics_sound/manifest.parquet").to_pylist()}
    assert manifest[broken.stem]["source"] == f"{K400_REPLACEMENTS}/{broken.name}"
    assert manifest[broken.stem]["label_name"] == "bowling"
    assert pq.read_table(tmp_path / "out/kinetics_sound/rejects.parquet").num_rows == 0


def test_lineage_split_lists_choose_the_samples_and_their_labels(clip: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """OGM-GE's my_train.txt rows are `<id>_<start:06d>_<end:06d>,10,<label>`; my_test.txt rows have an
    unpadded start and no end. The CSVs are not needed."""
    root = tmp_path / "k400"
    ids = [youtube_id(i) for i in range(5)]
    for i, yid in enumerate(ids):
        link(clip, root / ("train" if i < 3 else "val") / f"{yid}_000010_000020.mp4")
    link(clip, root / K400_REPLACEMENTS / f"{ids[2]}_000010_000020.mp4")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "my_train.txt").write_bytes(
        f"{ids[0]}_000010_000020,10,4\r\n{ids[1]}_000010_000020,10,13\r\n{ids[2]}_000010_000020,10,30\r\n"
        f"nothere1234_000010_000020,10,1\r\n".encode())
    (lists / "my_test.txt").write_text(f"{ids[3]}_10,10,26\n{ids[4]}_10,10,31\n")
    assert main(["-q", "build-shards", "kinetics_sound", "--src", str(root), "--out", str(tmp_path / "out"),
                 "--size", "32", "--split-list", f"train={lists / 'my_train.txt'}",
                 "--split-list", f"test={lists / 'my_test.txt'}"]) == 0
    ds = tmp_path / "out" / "kinetics_sound"
    rows = {r["key"]: r for r in pq.read_table(ds / "manifest.parquet").to_pylist()}
    assert {k: (r["split"], r["label_name"]) for k, r in rows.items()} == {
        f"{ids[0]}_000010_000020": ("train", "dribbling basketball"),
        f"{ids[1]}_000010_000020": ("train", "playing harmonica"),
        f"{ids[2]}_000010_000020": ("train", "tickling"),
        f"{ids[3]}_000010_000020": ("test", "stomping grapes"),
    }
    assert rows[f"{ids[2]}_000010_000020"]["source"].startswith(K400_REPLACEMENTS)
    reasons = sorted(r["reason"] for r in pq.read_table(ds / "rejects.parquet").to_pylist())
    assert reasons[0] == "label 31 is not a class index 0..30"
    assert reasons[1].startswith("listed clip nothere1234_000010_000020 not found")
    assert main(["-q", "build-shards", "kinetics_sound", "--src", str(root), "--out", str(tmp_path / "o2"),
                 "--split-list", "training=x.txt"]) == 2
    assert "use SPLIT=FILE with SPLIT one of train, val, test" in capsys.readouterr().err


def ave_corpus_with_duplicates(root: Path, clip: Path) -> None:
    """AVE layout where one id is labelled twice differently (as 45 ids of the release are), one id
    appears twice with the same label, and the rest once."""
    lines = {"train": ["Banjo&dup0diff000&good&0&10", "Dog&single00001&good&0&10", "Dog&dupsame00001&good&0&10"],
             "val": ["Mandolin&dup0diff000&good&0&10", "Dog&dupsame00001&good&0&10"],
             "test": ["Banjo&single00002&good&0&10"]}
    for vid in ("dup0diff000", "single00001", "dupsame00001", "single00002"):
        link(clip, root / "AVE" / f"{vid}.mp4")
    (root / "Annotations.txt").write_text("\n".join(sum(lines.values(), [])) + "\n")
    for split, split_lines in lines.items():
        (root / f"{split}Set.txt").write_text("\n".join(split_lines) + "\n")


def test_ave_ids_labelled_twice_differently_are_dropped_and_each_row_rejected(clip: Path, tmp_path: Path) -> None:
    ave_corpus_with_duplicates(tmp_path / "AVE_Dataset", clip)
    corpus = ave(tmp_path / "AVE_Dataset")
    assert {(s.key, s.split, corpus.classes[s.label]) for s in corpus.samples} == {
        ("single00001", "train", "Dog"), ("dupsame00001", "train", "Dog"), ("single00002", "test", "Banjo")}
    ambiguous = [r for r in corpus.rejects if r.reason.startswith("ambiguous video id")]
    assert sorted(r.split for r in ambiguous) == ["train", "val"]
    assert all("2 rows of Annotations.txt label it Banjo, Mandolin" in r.reason for r in ambiguous)
    first = ave(tmp_path / "AVE_Dataset", duplicates="first")
    assert ("dup0diff000", "train", "Banjo") in {(s.key, s.split, first.classes[s.label]) for s in first.samples}


def test_an_adapter_option_of_another_dataset_exits_2(clip: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    ave_corpus_with_duplicates(tmp_path / "AVE_Dataset", clip)
    assert main(["-q", "build-shards", "ave", "--src", str(tmp_path / "AVE_Dataset"), "--out", str(tmp_path / "o"),
                 "--split-list", "train=x.txt"]) == 2
    assert "--split-list does not apply to ave" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ vision-language

def test_food101_split_json_and_class_index_of_missing_aware_prompts_are_honoured(tmp_path: Path) -> None:
    """split.json lists image names per split (val images lie in images/train/), class_idx.json gives
    the class order; an image listed without a title row and one with a title but not listed are rejected."""
    import json

    from pipeline.adapters.vision_language import food101
    from tests.media import FOOD_CLASSES, food101_corpus

    root = tmp_path / "food"
    food101_corpus(root)
    order = {"baklava": 0, "apple_pie": 1, "baby_back_ribs": 2}
    (root / "class_idx.json").write_text(json.dumps(order))
    split = {"train": ["apple_pie_0.jpg", "baklava_3.jpg"], "val": ["apple_pie_3.jpg"],
             "test": ["baklava_0.jpg", "no_title_anywhere_7.jpg"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    corpus = food101(root, split_json=tmp_path / "split.json")  # class_idx.json found at the root
    assert corpus.classes == ["baklava", "apple_pie", "baby_back_ribs"] and set(FOOD_CLASSES) == set(corpus.classes)
    got = {(s.key, s.split, corpus.classes[s.label]) for s in corpus.samples}
    assert got == {("train_apple_pie_0", "train", "apple_pie"), ("train_baklava_3", "train", "baklava"),
                   ("train_apple_pie_3", "val", "apple_pie"), ("test_baklava_0", "test", "baklava")}
    reasons = [r.reason for r in corpus.rejects]
    assert "listed in split.json but no row of texts/*_titles.csv has it" in reasons
    assert sum(r == "not listed in split.json" for r in reasons) > 0


def test_food101_class_index_that_is_not_a_permutation_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.media import food101_corpus

    root = tmp_path / "food"
    food101_corpus(root)
    (tmp_path / "idx.json").write_text('{"baklava": 0, "apple_pie": 2}')
    assert main(["-q", "build-shards", "food101", "--src", str(root), "--out", str(tmp_path / "o"),
                 "--class-index", str(tmp_path / "idx.json")]) == 2
    assert "indices 0..N-1" in capsys.readouterr().err


def test_mm_imdb_reorganised_layout_of_missing_aware_prompts_is_read(tmp_path: Path) -> None:
    """images/<id>.jpeg, labels/<id>.json and split.json instead of dataset/<id>.{json,jpeg}."""
    import shutil

    from pipeline.adapters.vision_language import mm_imdb
    from tests.media import mm_imdb_corpus

    original = tmp_path / "orig"
    mm_imdb_corpus(original)
    root = tmp_path / "reorganised"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(original / "mmimdb" / "split.json", root / "split.json")
    for path in (original / "mmimdb" / "dataset").iterdir():
        shutil.copy(path, root / ("labels" if path.suffix == ".json" else "images") / path.name)
    a, b = mm_imdb(original), mm_imdb(root)
    assert [(s.key, s.split, s.labels, s.text) for s in a.samples] == [(s.key, s.split, s.labels, s.text) for s in b.samples]
    assert all(s.source.startswith("images/") for s in b.samples if s.source)


# ------------------------------------------------------------------------------------ CREMA-D, VGGSound

def crema_d_corpus(root: Path, clip: Path, silent: Path, wav: Path) -> list[str]:
    """CREMA-D layout: VideoFlash/<name>.flv (here with a different audio track than the WAV) and
    AudioWAV/<name>.wav for 10 actors x 6 emotions; one name without WAV, one without video."""
    names = []
    for actor in range(1001, 1011):
        for emotion in ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG"):
            name = f"{actor}_DFA_{emotion}_XX"
            names.append(name)
            if name != "1002_DFA_SAD_XX":
                link(clip, root / "VideoFlash" / f"{name}.flv")
            if name != "1003_DFA_HAP_XX":
                link(wav, root / "AudioWAV" / f"{name}.wav")
    return names


@pytest.fixture(scope="module")
def crema_media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    import subprocess

    d = tmp_path_factory.mktemp("crema")
    flv = d / "clip.flv"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1",
                    "-f", "lavfi", "-i", "sine=frequency=300:duration=1", "-c:v", "flv1", "-c:a", "libmp3lame",
                    "-ar", "22050", str(flv)], check=True)
    wav = d / "voice.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=900:duration=2.5",
                    "-ar", "16000", "-ac", "1", str(wav)], check=True)
    return flv, wav, d


def test_crema_d_speaker_disjoint_split_lineage_class_order_and_audio_from_the_wav(crema_media, tmp_path: Path) -> None:
    from pipeline.adapters.video import CREMA_D_CLASSES, crema_d

    flv, wav, _ = crema_media
    root = tmp_path / "CREMA-D"
    crema_d_corpus(root, flv, flv, wav)
    corpus = crema_d(root)
    assert corpus.classes == CREMA_D_CLASSES == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    speakers = {split: {s.key.split("_")[0] for s in corpus.samples if s.split == split} for split in ("train", "val", "test")}
    assert all(speakers.values()) and not (speakers["train"] & (speakers["val"] | speakers["test"]))
    build_shards("crema_d", root, tmp_path / "out", BuildOptions(size=32, shard_size=16), workers=1, progress=False)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out/crema_d/manifest.parquet").to_pylist()}
    assert len(rows) == 60
    assert 2.4 < rows["1001_DFA_NEU_XX"]["audio_seconds"] < 2.6  # the 2.5 s WAV, not the 1 s FLV track
    assert not rows["1003_DFA_HAP_XX"]["has_audio"] and rows["1003_DFA_HAP_XX"]["has_visual"]  # no WAV, no track
    assert rows["1002_DFA_SAD_XX"]["has_audio"] and not rows["1002_DFA_SAD_XX"]["has_visual"]
    assert rows["1001_DFA_ANG_XX"]["label_name"] == "ANG" and rows["1001_DFA_ANG_XX"]["label"] == 5


def test_crema_d_lineage_lists_choose_train_and_test(crema_media, tmp_path: Path) -> None:
    from pipeline.adapters.video import crema_d

    flv, wav, _ = crema_media
    root = tmp_path / "CREMA-D"
    names = crema_d_corpus(root, flv, flv, wav)
    (tmp_path / "train.csv").write_text("".join(f"{n},{n.split('_')[2]}\r\n" for n in names[:50]))
    (tmp_path / "test.csv").write_text("".join(f"{n},{n.split('_')[2]}\n" for n in names[50:]) + "bogus,XXX\n")
    corpus = crema_d(root, split_lists={"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"})
    by_split = {sp: sorted(s.key for s in corpus.samples if s.split == sp) for sp in ("train", "val", "test")}
    assert by_split["test"] == sorted(names[50:]) and len(by_split["train"]) + len(by_split["val"]) == 50
    assert by_split["val"]  # a fixed share of train, OGM-GE having no val
    assert any("'bogus' is not <actor>_<sentence>_<emotion>_<level>" in r.reason for r in corpus.rejects)


def test_vggsound_csv_and_the_download_scripts_clip_names(clip: Path, tmp_path: Path) -> None:
    from pipeline.adapters.video import vggsound

    root = tmp_path / "vggsound"
    rows = [("---g-f_I2yQ", 1, "people marching", "test"), ("--0PQM4-hqg", 30, "waterfall burbling", "train"),
            ("-AbCdEfGh1i", 0, "dog barking", "train"), ("ZZZZZZZZZZZ", 10, "dog barking", "train"),
            ("zyxwvutsrqp", 5, '"engine, idling"', "train"), ("short", 5, "x", "train")]
    (root).mkdir()
    (root / "vggsound.csv").write_text("".join(f"{a},{b},{c},{d}\n" for a, b, c, d in rows))
    link(clip, root / "video" / "---g-f_I2yQ_000001.mp4")  # official lists: start zero-padded
    link(clip, root / "train" / "--0PQM4-hqg_30.mp4")  # OGM-GE: unpadded
    link(clip, root / "clips" / "dog barking" / "-AbCdEfGh1i_000000_000010.mp4")  # the Kinetics crawler
    link(clip, root / "zyxwvutsrqp_000005.mkv")
    corpus = vggsound(root)
    assert corpus.classes == ["dog barking", "engine, idling", "people marching", "waterfall burbling"]
    assert {s.key: s.source for s in corpus.samples} == {
        "---g-f_I2yQ_000001": "video/---g-f_I2yQ_000001.mp4", "--0PQM4-hqg_000030": "train/--0PQM4-hqg_30.mp4",
        "-AbCdEfGh1i_000000": "clips/dog barking/-AbCdEfGh1i_000000_000010.mp4",
        "zyxwvutsrqp_000005": "zyxwvutsrqp_000005.mkv"}
    reasons = {r.key: r.reason for r in corpus.rejects}
    assert reasons["ZZZZZZZZZZZ_000010"] == "clip ZZZZZZZZZZZ_000010 not downloaded"
    assert any(r.reason.startswith("expected youtube_id,start_seconds,label,split") for r in corpus.rejects)
