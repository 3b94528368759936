"""Pretrained transformers encoders (hf_text, hf_vision, hf_audio): tiny random models saved with save_pretrained,
mm_imdb shards tokenised with the text model's own tokenizer.json, the recipe end to end on Ray, freezing and
per-encoder learning rates, and the one-line errors of a wrong folder, tokenizer or model."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.build import BuildOptions, build_shards  # noqa: E402
from shards.format import read_dataset_info  # noqa: E402
from shards.loader import make_loader  # noqa: E402
from tests.media import mm_imdb_corpus  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.launch import main as launch_main  # noqa: E402
from trainer.models import build_encoder, model_for_dataset, param_groups  # noqa: E402

CONFIG = ROOT / "trainer" / "configs" / "mm_imdb_pretrained.toml"
WORDS = ("a story of family tears secret funny wedding chaos ghost night blood number movie").split()
DATA_NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # what dataset.json records (ImageNet)
MODEL_NORM = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # a CLIP/ViT-style preprocessor
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_bert(folder: Path, words: tuple[str, ...] = WORDS) -> Path:
    """A WordPiece tokenizer.json ([PAD] = 0, [CLS] ... [SEP]) and a 1-layer BERT of its vocabulary size."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", *words, *map(str, range(20))])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), max_position_embeddings=64, pad_token_id=0, **TINY)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def save_vit(folder: Path, pooler: bool = True) -> Path:
    torch.manual_seed(1)
    config = transformers.ViTConfig(image_size=32, patch_size=8, **TINY)
    transformers.ViTModel(config, add_pooling_layer=pooler).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        **MODEL_NORM, "size": {"height": 32, "width": 32}, "do_normalize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_resize": True}))
    return folder


def save_ast(folder: Path) -> Path:
    torch.manual_seed(2)
    config = transformers.ASTConfig(num_mel_bins=16, max_length=32, patch_size=8, frequency_stride=8,
                                    time_stride=8, **TINY)
    transformers.ASTModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "ASTFeatureExtractor", "num_mel_bins": 16, "max_length": 32,
        "mean": -4.2677393, "std": 4.5689974, "do_normalize": True, "sampling_rate": 16000}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    return {"bert": save_bert(root / "bert"), "vit": save_vit(root / "vit"), "ast": save_ast(root / "ast")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    """The mm_imdb fixture corpus tokenised with the tiny BERT's tokenizer.json (`--tokenizer DIR`)."""
    raw = tmp_path_factory.mktemp("raw_mm_imdb")
    mm_imdb_corpus(raw)
    out = tmp_path_factory.mktemp("hf_shards")
    build_shards("mm_imdb", raw, out, BuildOptions(size=48, shard_size=4, max_len=24, tokenizer=str(models["bert"])),
                 workers=1, progress=False)
    return out / "mm_imdb"


def test_hf_text_ignores_trailing_padding_and_keeps_the_models_pooled_output(models: dict[str, Path]) -> None:
    encoder = build_encoder("hf_text", width=64, pretrained=str(models["bert"]), max_len=16).eval()
    bert = transformers.BertModel.from_pretrained(models["bert"], local_files_only=True).eval()
    assert encoder.out_dim == 32
    tokens = torch.tensor([[2, 6, 7, 8, 3, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        features = encoder(tokens)
        direct = bert(input_ids=tokens[:1, :5]).pooler_output
    torch.testing.assert_close(features[:1], direct)
    assert torch.equal(features[1], torch.zeros(32))
    with torch.no_grad():  # more padding changes nothing; a changed real token does
        torch.testing.assert_close(encoder(torch.cat([tokens, torch.zeros(2, 5, dtype=torch.long)], 1)), features)
        assert not torch.allclose(encoder(tokens.index_fill(1, torch.tensor([2]), 9))[0], features[0])


def test_hf_vision_undoes_the_loader_normalisation_resizes_and_averages_frames(models: dict[str, Path]) -> None:
    encoder = build_encoder("hf_vision", width=64, pretrained=str(models["vit"]), params=DATA_NORM).eval()
    vit = transformers.ViTModel.from_pretrained(models["vit"], local_files_only=True).eval()
    torch.manual_seed(3)
    images = torch.rand(2, 3, 3, 48, 48)  # [B, T, 3, H, W] pixel values in [0, 1], 48 px: resized to 32
    mean, std = (torch.tensor(DATA_NORM[k]).view(3, 1, 1) for k in ("mean", "std"))
    loader_frames = (images - mean) / std  # what the loaders give
    model_in = (F.interpolate(images.flatten(0, 1), size=(32, 32), mode="bilinear", antialias=True) - 0.5) / 0.5
    with torch.no_grad():
        features = encoder(loader_frames)
        direct = vit(pixel_values=model_in).pooler_output.view(2, 3, -1).mean(dim=1)
    assert features.shape == (2, 32)
    torch.testing.assert_close(features, direct, rtol=1e-4, atol=1e-5)


def test_a_pooler_the_weights_lack_is_removed_and_the_mean_of_the_hidden_states_used(tmp_path: Path) -> None:
    folder = save_vit(tmp_path / "vit_no_pooler", pooler=False)
    encoder = build_encoder("hf_vision", width=64, pretrained=str(folder), params=DATA_NORM).eval()
    assert encoder.model.pooler is None
    x = torch.zeros(1, 1, 3, 32, 32)
    with torch.no_grad():
        hidden = encoder.model(pixel_values=x[:, 0] * encoder.scale + encoder.shift).last_hidden_state
        torch.testing.assert_close(encoder(x), hidden.mean(dim=1))


def test_hf_audio_takes_the_loaders_logmel_and_names_a_mel_mismatch(models: dict[str, Path]) -> None:
    audio = {"kind": "waveform", "sample_rate": 16000, "seconds": 0.3, "n_mels": 16, "n_fft": 400,
             "win_length": 400, "hop_length": 160, "db_cutoff": 80.0, "dataset": "av_digits"}
    encoder = build_encoder("hf_audio", width=64, pretrained=str(models["ast"]), params=audio).eval()
    with torch.no_grad():
        features = encoder(torch.randn(3, 1, 16, 31))  # 31 frames, padded to max_length 32
    assert features.shape == (3, encoder.out_dim) == (3, 32) and torch.isfinite(features).all()
    with pytest.raises(ValueError, match=r"takes num_mel_bins=16, the av_digits shards have n_mels=64; rebuild them "
                                         r"with pipeline build-shards av_digits \.\.\. --n-mels 16"):
        build_encoder("hf_audio", width=64, pretrained=str(models["ast"]), params=dict(audio, n_mels=64))
    with pytest.raises(ValueError, match="spectrogram arrays"):
        build_encoder("hf_audio", width=64, pretrained=str(models["ast"]),
                      params={"kind": "spectrogram_array", "shape": [112, 112], "dataset": "av_mnist"})


def test_the_shards_tokenizer_must_be_the_models(models: dict[str, Path], shards: Path, tmp_path: Path) -> None:
    info = read_dataset_info(shards)
    assert info.text["tokenizer"] == "huggingface" and info.text["vocab_size"] == 5 + len(WORDS) + 20
    params = dict(info.text, dataset="mm_imdb")
    other = save_bert(tmp_path / "other_bert", words=WORDS[::-1])
    with pytest.raises(ValueError, match=r"another tokenizer\.json .*; rebuild the shards with: pipeline build-shards "
                                         r"mm_imdb --src RAW --out OUT --tokenizer .*other_bert"):
        build_encoder("hf_text", width=64, pretrained=str(other), params=params, max_len=24)
    with pytest.raises(ValueError, match=r"built-in 'word-nfkc-v1' tokenizer"):
        build_encoder("hf_text", width=64, pretrained=str(models["bert"]), max_len=24,
                      params={"tokenizer": "word-nfkc-v1", "vocab_size": 30, "dataset": "mm_imdb"})
    with pytest.raises(ValueError, match=r"takes at most 64 positions; .* --max-len 64"):
        build_encoder("hf_text", width=64, pretrained=str(models["bert"]), params=params, max_len=128)


def test_freeze_and_lr_scale_make_the_optimizer_groups_and_bf16_autocast_runs(models: dict[str, Path],
                                                                               shards: Path) -> None:
    config = load_config(CONFIG, [f"data.dataset_dir={shards}", f"model.pretrained.text={models['bert']}",
                                  f"model.pretrained.visual={models['vit']}", "model.freeze.text=true",
                                  "model.lr_scale.visual=0.1"])
    info = read_dataset_info(shards)
    model = model_for_dataset(config.model, info)
    groups = param_groups(model, config.model, lr=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("encoders.visual", pytest.approx(1e-4)), ("heads", 1e-3)]
    assert not any(p.requires_grad for p in model.encoders["text"].parameters())
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.encoders["text"].training and model.encoders["visual"].training
    text_before = {k: v.clone() for k, v in model.encoders["text"].state_dict().items()}
    visual_before = model.encoders["visual"].model.embeddings.patch_embeddings.projection.weight.clone()
    optimizer = torch.optim.AdamW(groups)
    batch = next(iter(make_loader(shards, "train", 4, train=True, crop=32, num_workers=0)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        loss = F.binary_cross_entropy_with_logits(out["logits"], batch["label"])
    assert out["logits"].dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    for key, value in model.encoders["text"].state_dict().items():
        assert torch.equal(value, text_before[key]), key
    assert not torch.equal(model.encoders["visual"].model.embeddings.patch_embeddings.projection.weight, visual_before)


def _recipe_args(shards: Path, models: dict[str, Path], storage: Path, *more: str) -> list[str]:
    settings = [f"data.dataset_dir={shards}", f"ray.storage_path={storage}", f"model.pretrained.text={models['bert']}",
                f"model.pretrained.visual={models['vit']}", "data.batch_size=4", "data.num_workers=1",
                "data.crop_size=32", "data.backend=torch", "train.epochs=1", "mma.epochs=1", "ray.use_gpu=false",
                "ray.cpus_per_worker=1", "ray.max_failures=0", "eval.rates=[0.5]", *more]
    return ["--config", str(CONFIG), *(arg for s in settings for arg in ("--set", s))]


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_with_hf_text_and_hf_vision(models: dict[str, Path], shards: Path,
                                                                tmp_path: Path) -> None:
    import ray

    storage = tmp_path / "runs"
    try:
        assert launch_main([*_recipe_args(shards, models, storage), "--stages", "unimodal,mma,eval"]) == 0
    finally:
        ray.shutdown()
    results = json.loads((storage / "mm_imdb_pretrained" / "results" / "results.json").read_text())
    assert {"missing:text", "missing:visual", "rate:text=0.5", "rate:visual=0.5"} <= set(results["scenarios"])
    for method in ("UME", "UME-MMA"):
        rows = results["methods"][method]
        for scenario in ("full", "missing:text", "missing:visual"):
            assert set(rows[scenario]) == {"f1_macro", "f1_micro"}
            assert all(0.0 <= v <= 1.0 for v in rows[scenario].values())
    assert results["present"]["missing:text"]["text"] == 0 and results["present"]["missing:visual"]["visual"] == 0


def _broken(kind: str, models: dict[str, Path], tmp_path: Path) -> tuple[list[str], str]:
    """Overrides making one error, and what its line must say."""
    if kind == "no_config":
        empty = tmp_path / "empty_model"
        empty.mkdir()
        return [f"model.pretrained.visual={empty}"], f"model.pretrained.visual = {empty}: no config.json in {empty}"
    if kind == "tokenizer":
        other = save_bert(tmp_path / "other_bert", words=WORDS[::-1])
        return [f"model.pretrained.text={other}"], "tokenised with another tokenizer.json"
    shutil.copytree(models["bert"], tmp_path / "bert_as_vision")
    return [f"model.pretrained.visual={tmp_path / 'bert_as_vision'}"], "takes no pixel_values, so it is no hf_vision"


@pytest.mark.parametrize("kind", ["no_config", "tokenizer", "not_a_vision_model"])
def test_a_wrong_folder_tokenizer_or_model_is_one_line_and_exit_2(kind: str, models: dict[str, Path], shards: Path,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    more, message = _broken(kind, models, tmp_path)
    capsys.readouterr()  # what saving the broken model printed
    assert launch_main([*_recipe_args(shards, models, tmp_path / "runs", *more), "--stages", "unimodal"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
