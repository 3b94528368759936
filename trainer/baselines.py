"""Classical baselines, one per modality, for the results table: how far a linear model gets on each input.

Text: TF-IDF over the stored token ids (0 = padding) + logistic regression. Frames: the clip averaged over
time and pooled to 12x12 RGB, standardised, + logistic regression. Spectrograms / log-mels: pooled to a
16x16 (frequency x time) grid, standardised, + logistic regression. Multi-label datasets (MM-IMDB) fit one
logistic regression per label (one-vs-rest). Each is fitted on the train split's samples that have the
modality, read through the same loader (evaluation mode: centre crop, natural missingness) as the models;
`trainer.evaluate` scores them on the test split like the uni-modal models. A trained branch that scores
below its baseline on full test data is under-trained: `trainer.evaluate.method_claims` says so."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from math import ceil
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.dummy import DummyClassifier
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from shards.format import read_dataset_info
from shards.loader import make_loader
from trainer.config import Config

log = logging.getLogger(__name__)

TRAIN_CAP = 10_000  # train samples read for the baselines at most (a random part: shards are in hashed order)
FRAME_GRID = 12  # frames: mean over time, then 12x12 RGB
SPEC_GRID = 16  # spectrograms / log-mels: 16x16 (frequency x time)
DESCRIPTIONS = {"text": "tf-idf + logistic regression",
                "visual": f"{FRAME_GRID}x{FRAME_GRID} RGB pixels + logistic regression",
                "audio": f"{SPEC_GRID}x{SPEC_GRID} pooled spectrogram + logistic regression"}


def baseline_name(modality: str) -> str:
    """The row name in results.md, e.g. "baseline: text (tf-idf + logistic regression)"."""
    return f"baseline: {modality} ({DESCRIPTIONS[modality]})"


def summarize(modality: str, x: torch.Tensor) -> np.ndarray:
    """A batch of one modality's loader tensors -> the baseline's raw input: token ids (int32 [B, L]) for
    text, pooled pixels (float32 [B, 3*12*12]) for frames, a pooled grid (float32 [B, 16*16]) for spectra."""
    if modality == "text":
        return x.to(torch.int32).numpy()
    x = x.float()
    if modality == "visual":
        x = x.mean(dim=1) if x.dim() == 5 else x  # [B, T, 3, H, W] -> [B, 3, H, W]
        grid = FRAME_GRID
    else:
        grid = SPEC_GRID  # [B, 1, F, T]
    return F.adaptive_avg_pool2d(x, grid).flatten(1).numpy()


@dataclass
class Baseline:
    """A fitted baseline of one modality: its classifier, and how many train samples it saw."""

    modality: str
    classifier: Any
    train_samples: int
    vocab_size: int = 0  # text: the width of the count matrix

    def _design(self, inputs: np.ndarray) -> np.ndarray | sp.csr_matrix:
        if self.modality != "text":
            return inputs
        rows = np.repeat(np.arange(len(inputs)), inputs.shape[1])
        ids = inputs.reshape(-1).astype(np.int64)
        real = ids > 0  # 0 is padding
        return sp.csr_matrix((np.ones(int(real.sum()), np.float32), (rows[real], ids[real])),
                             shape=(len(inputs), self.vocab_size))

    def fit(self, inputs: np.ndarray, labels: np.ndarray) -> Baseline:
        with warnings.catch_warnings():  # a label no train sample has: one-vs-rest predicts it constantly
            warnings.filterwarnings("ignore", message="Label not .* is present in all training examples")
            self.classifier.fit(self._design(inputs), labels)
        return self

    def logits(self, inputs: np.ndarray, num_classes: int, multilabel: bool) -> torch.Tensor:
        """[N, num_classes] scores in the models' convention: argmax is the class (single-label), > 0 a
        label (multi-label)."""
        x = self._design(inputs)
        if multilabel:
            return torch.from_numpy(np.asarray(self.classifier.decision_function(x), np.float32))
        out = np.full((len(inputs), num_classes), -1e4, np.float32)  # classes never seen in training
        out[:, self.classifier.classes_] = np.maximum(self.classifier.predict_log_proba(x), -1e3)
        return torch.from_numpy(out)


def _classifier(modality: str, labels: np.ndarray, multilabel: bool) -> Any:
    linear = LogisticRegression(max_iter=1000)
    if multilabel:
        linear = OneVsRestClassifier(linear)  # a label no train sample has becomes a constant predictor
    elif len(np.unique(labels)) < 2:
        return DummyClassifier(strategy="prior")  # a single class in the train split: nothing to separate
    if modality == "text":
        return make_pipeline(TfidfTransformer(sublinear_tf=True), linear)
    return make_pipeline(StandardScaler(), linear)


@torch.no_grad()
def read_inputs(loader, modalities: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One pass over a loader: the baselines' inputs per modality, the labels and the present mask."""
    inputs: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    labels, present = [], []
    for batch in tqdm(loader, desc="baseline inputs", unit="batch", leave=False):
        for m in modalities:
            inputs[m].append(summarize(m, batch[m]))
        labels.append(batch["label"].numpy())
        present.append(batch["present"].numpy())
    return {m: np.concatenate(v) for m, v in inputs.items()}, np.concatenate(labels), np.concatenate(present)


def fit_baselines(config: Config, split: str = "train", cap: int = TRAIN_CAP) -> dict[str, Baseline]:
    """Per modality, a baseline fitted on `split`'s samples that have it (at most about `cap` samples: the
    first of ceil(n / cap) parts of the split, a random subset as the build orders shards by a key hash)."""
    info = read_dataset_info(config.data.dataset_dir)
    total = int(info.splits[split]["samples"])
    parts = max(1, ceil(total / cap))
    if parts > 1:
        log.info("baselines: reading %d of %d %s samples (cap %d)", total // parts, total, split, cap)
    loader = make_loader(config.data.dataset_dir, split, config.data.batch_size, backend=config.data.backend,
                         crop=config.data.crop_size, num_workers=config.data.num_workers, seed=config.eval.seed,
                         shard_id=0, num_shards=parts)
    inputs, labels, present = read_inputs(loader, info.modalities)
    if info.multilabel:
        labels = (labels > 0.5).astype(np.int64)
    baselines = {}
    for i, m in enumerate(info.modalities):
        has = present[:, i]
        if not has.any():
            log.warning("baselines: no %s sample in %s has %s; no %s baseline", split, config.data.dataset_dir, m, m)
            continue
        vocab = info.text.vocab_size if m == "text" else 0
        baseline = Baseline(m, _classifier(m, labels[has], info.multilabel), int(has.sum()), vocab)
        baselines[m] = baseline.fit(inputs[m][has], labels[has])
    return baselines
