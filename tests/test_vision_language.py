"""mm_imdb, food101 and av_mnist end to end: raw layouts -> build-shards -> both loaders -> training -> eval.

The corpora are tiny copies of the public releases' layouts (tests/media.py), with the bad cases of
issue 5: a movie without plot or poster (kept without it), an image that does not decode (rejected
with the reason), text in other scripts and invalid UTF-8 (replaced and counted), an empty CSV row
(rejected). Training runs the UME stage's loop body directly (no Ray) for a few steps, then `evaluate`
scores the checkpoint under the vision-language protocol (missing rates for text or image)."""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests` has no __init__.py; make `tests.media` importable either way
    sys.path.insert(0, str(ROOT))

from pipeline.adapters import MMIMDB_GENRES  # noqa: E402
from pipeline.build import BuildOptions, build_shards  # noqa: E402
from pipeline.cli import main as pipeline_main  # noqa: E402
from pipeline.text import decode_text, words  # noqa: E402
from shards.format import read_dataset_info  # noqa: E402
from shards.loader import dali_available, make_loader  # noqa: E402
from shards.sample_refs import split_samples  # noqa: E402
from shards.verify import verify_dataset  # noqa: E402
from tests.media import FOOD_CLASSES, av_mnist_corpus, food101_corpus, mm_imdb_corpus  # noqa: E402

OPTIONS = BuildOptions(size=64, shard_size=4, max_len=24)
CROP = 32
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]
SECOND = {"mm_imdb": "text", "food101": "text", "av_mnist": "audio"}  # the modality besides visual

pytestmark = pytest.mark.filterwarnings(
    "ignore:Checkpointing enabled in a pipeline with external source:UserWarning")


@dataclass(frozen=True)
class Built:
    name: str
    path: Path  # OUT/<dataset>
    kinds: dict[str, list[str]]  # special cases of the raw corpus (ids or keys)
    manifest: dict[str, dict]  # key -> manifest row
    rejects: list[dict]


MAKERS = {"mm_imdb": mm_imdb_corpus, "food101": food101_corpus, "av_mnist": av_mnist_corpus}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """The three raw corpora, each built into shards once for the module."""
    out = tmp_path_factory.mktemp("vl_shards")
    result = {}
    for name, make in MAKERS.items():
        raw = tmp_path_factory.mktemp(f"raw_{name}")
        kinds = make(raw)
        build_shards(name, raw, out, OPTIONS, workers=2, progress=False)
        path = out / name
        manifest = {r["key"]: r for r in pq.read_table(path / "manifest.parquet").to_pylist()}
        rejects = pq.read_table(path / "rejects.parquet").to_pylist()
        result[name] = Built(name, path, kinds, manifest, rejects)
    return result


def _member(path: Path, split: str, key: str, ext: str) -> bytes | None:
    ref = next(r for r in split_samples(path, read_dataset_info(path), split) if r.key == key)
    if ext not in ref.members:
        return None
    offset, size = ref.members[ext]
    with open(ref.tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


# --------------------------------------------------------------------------------------------- build
def test_mm_imdb_keeps_movies_without_plot_or_poster_and_rejects_the_unusable(built: dict[str, Built]) -> None:
    b = built["mm_imdb"]
    for movie in b.kinds["no_plot"]:
        assert b.manifest[movie]["has_text"] is False and b.manifest[movie]["has_visual"] is True
        assert _member(b.path, b.manifest[movie]["split"], movie, "text.npy") is None
    for movie in b.kinds["no_poster"]:
        assert b.manifest[movie]["has_visual"] is False and b.manifest[movie]["has_text"] is True
        assert _member(b.path, b.manifest[movie]["split"], movie, "f0.jpg") is None
    reasons = {r["key"]: (r["stage"], r["reason"], r["kept"]) for r in b.rejects}
    (bad,) = b.kinds["bad_image"]
    assert bad not in b.manifest and reasons[bad][0] == "image" and "does not decode" in reasons[bad][1]
    (other,) = b.kinds["no_genre"]
    assert other not in b.manifest and "none of the 23 genres" in reasons[other][1]
    (gone,) = b.kinds["no_json"]
    assert gone not in b.manifest and reasons[gone][1] == "movie json not found"
    assert verify_dataset(b.path, progress=False) == []


def test_mm_imdb_labels_are_multi_hot_over_23_genres_and_split_dev_is_val(built: dict[str, Built]) -> None:
    b = built["mm_imdb"]
    info = read_dataset_info(b.path)
    assert info.multilabel and info.classes == list(MMIMDB_GENRES) and len(info.classes) == 23
    assert set(info.splits) == {"train", "val", "test"}
    movie = "0000000"  # genres Drama + Comedy (i % 4 == 0)
    row = b.manifest[movie]
    assert row["labels"] == [0, 1] and row["label_name"] == "Drama|Comedy"
    hot = np.frombuffer(_member(b.path, "train", movie, "label.npy"), np.float32, offset=128)
    assert hot.shape == (23,) and hot[:2].tolist() == [1.0, 1.0] and hot.sum() == 2
    assert _member(b.path, "train", movie, "cls") == b"0,1"


def test_text_is_token_ids_plus_zstd_raw_text_with_the_tokenizer_recorded(built: dict[str, Built]) -> None:
    b = built["mm_imdb"]
    info = read_dataset_info(b.path)
    assert info.text["tokenizer"] == "word-nfkc-v1" and info.text["max_len"] == OPTIONS.max_len
    vocab = (b.path / info.text["file"]).read_text(encoding="utf-8").split("\n")[:-1]
    assert vocab[:2] == ["[PAD]", "[UNK]"] and len(vocab) == info.text["vocab_size"]
    movie = "0000000"
    ids = np.frombuffer(_member(b.path, "train", movie, "text.npy"), np.int32, offset=128)
    raw = zstandard.ZstdDecompressor().decompress(_member(b.path, "train", movie, "text.txt.zst")).decode()
    assert raw.startswith("A story of family tears secret")
    assert ids.shape == (OPTIONS.max_len,) and ids.dtype == np.int32
    n = len(words(raw))
    assert (ids[:n] > 1).all() and (ids[n:] == 0).all()  # every word in the train vocabulary; zero padding
    assert [vocab[i] for i in ids[:3]] == ["a", "story", "of"]


def test_text_in_other_scripts_is_tokenised_and_invalid_utf8_is_replaced_and_counted(built: dict[str, Built]) -> None:
    b = built["mm_imdb"]
    (movie,) = b.kinds["other_script"]
    raw = zstandard.ZstdDecompressor().decompress(_member(b.path, "train", movie, "text.txt.zst")).decode()
    assert "幽霊" in raw and "Призрак" in raw
    ids = np.frombuffer(_member(b.path, "train", movie, "text.npy"), np.int32, offset=128)
    assert (ids > 1).sum() == len(words(raw)) > 5  # Han characters and Cyrillic words all in the vocabulary
    (bad,) = b.kinds["bad_utf8"]
    assert b.manifest[bad]["text_replaced"] == 2 and b.manifest[bad]["has_text"]
    kept = [r for r in b.rejects if r["key"] == bad]
    assert kept and kept[0]["kept"] and kept[0]["stage"] == "text"
    assert read_dataset_info(b.path).build["text_replaced"] == {"samples": 1, "sequences": 2}
    food = built["food101"]
    (bad_title,) = food.kinds["bad_utf8"]
    assert food.manifest[bad_title]["text_replaced"] == 2
    assert words("Crème BRÛLÉE ｆｕｌｌ-width 東京") == ["crème", "brûlée", "full", "width", "東", "京"]
    assert decode_text(b"caf\xe9 ok") == ("caf\ufffd ok", 1)


def test_food101_rejects_empty_rows_and_undecodable_images_and_keeps_empty_titles(built: dict[str, Built]) -> None:
    b = built["food101"]
    info = read_dataset_info(b.path)
    assert info.classes == FOOD_CLASSES and not info.multilabel and info.modalities == ["visual", "text"]
    empty = [r for r in b.rejects if r["reason"] == "empty CSV row"]
    assert len(empty) == 1 and empty[0]["source"].startswith("texts/train_titles.csv line ")
    (bad,) = b.kinds["bad_image"]
    reject = next(r for r in b.rejects if r["key"] == bad)
    assert reject["stage"] == "image" and "does not decode" in reject["reason"] and not reject["kept"]
    (missing,) = b.kinds["missing_image"]
    assert next(r for r in b.rejects if r["key"] == missing)["reason"] == "annotated file not found"
    (untitled,) = b.kinds["no_title"]
    assert b.manifest[untitled]["has_text"] is False and b.manifest[untitled]["has_visual"] is True
    assert {r["split"] for r in b.manifest.values()} == {"train", "val", "test"}  # val: 10% of train by key
    assert b.manifest["train_baklava_0"]["label"] == 2 and b.manifest["train_baklava_0"]["source"] == \
        "images/train/baklava/baklava_0.jpg"


def test_av_mnist_arrays_become_a_jpeg_frame_and_a_float32_spectrogram(built: dict[str, Built]) -> None:
    b = built["av_mnist"]
    info = read_dataset_info(b.path)
    assert info.audio["kind"] == "spectrogram_array" and info.audio["shape"] == [112, 112]
    assert {s: info.splits[s]["samples"] for s in info.splits} == {"train": 22, "val": 2, "test": 8}
    spec = np.load(io.BytesIO(_member(b.path, "train", "train_00001", "spec.npy")))
    assert spec.dtype == np.float32 and spec.shape == (112, 112) and spec[45:55].mean() > 180  # digit 1's band
    assert _member(b.path, "train", "train_00001", "f0.jpg")[:2] == b"\xff\xd8"
    assert b.manifest["train_00001"]["source"] == "avmnist/image/train_data.npy#1"
    assert verify_dataset(b.path, progress=False) == []


def test_build_shards_cli_prints_missing_text_per_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = tmp_path / "UPMC_Food101"
    food101_corpus(raw)
    code = pipeline_main(["-q", "build-shards", "food101", "--src", str(raw), "--out", str(tmp_path / "out"),
                          "--size", "32", "--max-len", "16", "--vocab-size", "10", "--workers", "1"])
    assert code == 0
    assert "train: 11 samples, 1 rejected, 0 without visual, 1 without text" in capsys.readouterr().out
    info = read_dataset_info(tmp_path / "out" / "food101")
    assert info.text["vocab_size"] == 10 and info.text["max_len"] == 16


# -------------------------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MAKERS))
def test_both_loaders_give_the_design_batches_with_natural_missingness(name: str, backend: str,
                                                                       built: dict[str, Built]) -> None:
    b = built[name]
    info = read_dataset_info(b.path)
    crop = None if name == "av_mnist" else CROP
    batches = list(make_loader(b.path, "train", 4, backend=backend, crop=crop, num_workers=1))
    n = info.splits["train"]["samples"]
    keys = [k for batch in batches for k in batch["key"]]
    assert len(keys) == n
    present = torch.cat([batch["present"] for batch in batches])
    for i, m in enumerate(info.modalities):
        assert int(present[:, i].sum()) == info.splits["train"][f"has_{m}"]
        assert present[:, i].tolist() == [b.manifest[k][f"has_{m}"] for k in keys]
    batch = batches[0]
    side = 28 if name == "av_mnist" else CROP
    assert batch["visual"].shape == (4, 1, 3, side, side) and batch["visual"].dtype == torch.float32
    if SECOND[name] == "text":
        assert batch["text"].shape == (4, OPTIONS.max_len) and batch["text"].dtype == torch.int64
        absent = ~torch.cat([x["present"][:, 1] for x in batches])
        assert (torch.cat([x["text"] for x in batches])[absent] == 0).all()
        assert "audio" not in batch
    else:
        assert batch["audio"].shape == (4, 1, 112, 112) and "text" not in batch
        assert 0.0 <= float(batch["audio"].min()) and float(batch["audio"].max()) <= 1.0  # scaled by 1/255
    labels = torch.cat([x["label"] for x in batches])
    if info.multilabel:
        assert labels.shape == (n, 23) and labels.dtype == torch.float32
        assert [torch.nonzero(row).flatten().tolist() for row in labels] == [b.manifest[k]["labels"] for k in keys]
    else:
        assert labels.tolist() == [b.manifest[k]["label"] for k in keys]


@needs_dali
@pytest.mark.parametrize("scenario", ["full", "missing:visual", "rate:visual=0.5", "SECOND"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_dali_and_torch_agree_on_text_spectrograms_and_masks(name: str, scenario: str,
                                                              built: dict[str, Built]) -> None:
    b = built[name]
    scenario = f"missing:{SECOND[name]}" if scenario == "SECOND" else scenario
    crop = None  # the stored short side: no resize (resize parity is pinned on video frames by test_loader)
    got = {backend: list(make_loader(b.path, "test", 4, backend=backend, crop=crop, scenario=scenario,
                                     num_workers=1)) for backend in ("dali", "torch")}
    for d, t in zip(got["dali"], got["torch"]):
        assert d["key"] == t["key"]
        assert torch.equal(d["present"], t["present"]) and torch.equal(d["label"], t["label"])
        assert torch.equal(d[SECOND[name]], t[SECOND[name]])  # ids and stored spectrograms exactly
        assert float((d["visual"] - t["visual"]).abs().max()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_augmentation_drops_text_or_image_but_never_both(backend: str, built: dict[str, Built]) -> None:
    from shards.masks import DropSpec

    b = built["mm_imdb"]
    spec = DropSpec("drop_one", {"full": 0.2, "visual": 0.4, "text": 0.4})
    loader = make_loader(b.path, "train", 3, backend=backend, train=True, augment=spec, crop=CROP, num_workers=1)
    present = torch.cat([batch["present"] for batch in loader])
    assert present.any(dim=1).all()
    assert not present.all(dim=1).all()  # something was dropped


# ---------------------------------------------------------------------------------- train and evaluate
def _config(path: Path, name: str, tmp_path: Path):
    from trainer.config import config_from_dict

    encoders = {"visual": "resnet18_frames", SECOND[name]: "text_transformer" if SECOND[name] == "text"
                else "resnet18_spec"}
    return config_from_dict({
        "data": {"dataset_dir": str(path), "batch_size": 4, "backend": "auto", "num_workers": 1,
                 "crop_size": 28 if name == "av_mnist" else CROP},
        "model": {"width": 8, "encoders": encoders},
        "train": {"epochs": 2, "optimizer": "adamw", "lr": 3e-3, "lr_milestones": []},
        "mma": {"drop_probs": {"full": 0.34, "visual": 0.33, SECOND[name]: 0.33}},
        "ray": {"storage_path": str(tmp_path), "run_name": name},
        "eval": {"rates": [0.3, 0.7]},
    }, source="test")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MAKERS))
def test_short_training_then_eval_with_missing_text_and_missing_image(name: str, built: dict[str, Built],
                                                                      tmp_path: Path) -> None:
    from trainer import recipe
    from trainer.checkpoint import save_state
    from trainer.evaluate import WEIGHTED_UME, Method, evaluate
    from trainer.train import build_optimizer, make_model, validate

    b = built[name]
    info = read_dataset_info(b.path)
    config = _config(b.path, name, tmp_path)
    model = make_model(config, info)
    optimizer, scheduler, plan = build_optimizer(config, recipe.STAGES["unimodal"], model)
    epochs = plan.limit
    loader = make_loader(b.path, "train", 4, train=True, crop=config.data.crop_size, num_workers=1)
    losses = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            loss = recipe.loss(recipe.STAGES["unimodal"], model(batch), batch, info.modalities, info.multilabel)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(np.isfinite(losses)) and len(losses) == epochs * (info.splits["train"]["samples"] // 4)
    val = validate(model, make_loader(b.path, "val", 4, crop=config.data.crop_size, num_workers=1),
                   torch.device("cpu"), info.modalities, info.multilabel)
    assert 0.0 <= val["val_acc"] <= 1.0
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_state(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epochs, stage="unimodal",
               config={}, metrics=val)

    second = SECOND[name]
    methods = [Method("UME", str(ckpt)), Method(f"{second}-only", str(ckpt), only=second),
               Method(WEIGHTED_UME, str(ckpt), weighted=True)]
    results = evaluate(config, methods)
    n = info.splits["test"]["samples"]
    assert results["samples"] == n and results["multilabel"] == info.multilabel
    expected = ["full", "missing:visual", f"missing:{second}", "rate:visual=0.3", "rate:visual=0.7",
                f"rate:{second}=0.3", f"rate:{second}=0.7"]
    assert results["scenarios"] == expected
    counts = results["present"]
    has = {m: info.splits["test"][f"has_{m}"] for m in info.modalities}
    assert counts["full"] == has
    assert counts["missing:visual"] == {"visual": 0, second: has[second]}
    assert counts[f"missing:{second}"] == {"visual": has["visual"], second: 0}
    assert counts[f"rate:{second}=0.7"][second] <= counts[f"rate:{second}=0.3"][second] <= has[second]
    metric_names = {"f1_macro", "f1_micro"} if info.multilabel else {"acc"}
    for method in results["methods"].values():
        assert set(method) == set(expected)
        for scores in method.values():
            assert set(scores) == metric_names and all(0.0 <= v <= 1.0 for v in scores.values())
    # the uni-modal row ignores the other modality, so dropping it changes nothing
    only = results["methods"][f"{second}-only"]
    assert only["full"] == only["missing:visual"]
    weights = results["branch_weights"][WEIGHTED_UME]
    assert set(weights) == set(info.modalities) and all(w > 0 for w in weights.values()), weights
    assert set(results["val_branches"]["scores"]) == set(results["test_branches"]) == set(info.modalities)


def test_a_local_hugging_face_tokenizer_replaces_the_default(tmp_path: Path) -> None:
    """`--tokenizer DIR` (a tokenizer.json made offline here) tokenises the text and is recorded."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "story": 3, "of": 4, "family": 5}
    hf = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    hf_dir = tmp_path / "tok"
    hf_dir.mkdir()
    hf.save(str(hf_dir / "tokenizer.json"))
    raw = tmp_path / "raw"
    mm_imdb_corpus(raw)
    options = BuildOptions(size=64, shard_size=4, max_len=24, tokenizer=str(hf_dir))
    build_shards("mm_imdb", raw, tmp_path / "out", options, workers=1, progress=False)
    path = tmp_path / "out" / "mm_imdb"
    info = read_dataset_info(path)
    assert info.text["tokenizer"] == "huggingface"
    ids = np.frombuffer(_member(path, "train", "0000000", "text.npy"), np.int32, offset=128)
    # "A story of ...": the tokenizer's own rules apply (this WordLevel one is case-sensitive: "A" is unknown)
    assert ids.shape == (24,) and list(ids[:3]) == [1, 3, 4]


@needs_dali
@pytest.mark.parametrize("name", list(MAKERS))
def test_the_gpu_pipeline_graph_is_well_formed_for_text_and_spectrograms(name: str, built: dict[str, Built]) -> None:
    """The device="gpu" graph of the text and stored-spectrogram datasets, defined without a GPU: frames
    and spectrograms go to the GPU, token ids stay on the CPU (the trainer moves them)."""
    from shards.masks import DropSpec

    b = built[name]
    loader = make_loader(b.path, "train", 4, backend="dali", device="gpu", train=True, num_workers=1, device_id=0,
                         augment=DropSpec("independent", {"visual": 0.3, SECOND[name]: 0.3}))
    pipe = loader.make_pipeline()
    pipe._build_graph()
    devices = [out.device for out in pipe._graph_outputs]
    assert devices == ["gpu", "cpu" if SECOND[name] == "text" else "gpu", "cpu"]
