"""Missing-modality masks: evaluation scenarios (deterministic by key) and training augmentation specs.

A scenario is `full`, `missing:<m>` (m absent for every sample) or `rate:<m>=<eta>` (a fraction eta of
samples lose m, chosen by a hash of the key and the seed, so every backend, run and world size scores
the same subset). Training augmentation follows METHOD.md: `drop_one` keeps all modalities or drops
exactly one, `independent` drops each modality with its own probability; never all are dropped."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


class ScenarioError(ValueError):
    """A scenario or augmentation spec that does not fit the dataset's modalities."""


@dataclass(frozen=True)
class Scenario:
    kind: str  # "full" | "missing" | "rate"
    modality: str | None = None
    rate: float = 0.0

    @property
    def name(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind == "missing":
            return f"missing:{self.modality}"
        return f"rate:{self.modality}={self.rate:g}"


def parse_scenario(text: str, modalities: list[str]) -> Scenario:
    """Parse `full`, `missing:<m>` or `rate:<m>=<eta>`; unknown modalities are named with the valid ones."""
    text = text.strip()
    if text == "full":
        return Scenario("full")
    kind, _, rest = text.partition(":")
    if kind == "missing":
        modality, rate = rest, 1.0
    elif kind == "rate":
        modality, _, value = rest.partition("=")
        try:
            rate = float(value)
        except ValueError:
            raise ScenarioError(f"scenario {text!r}: rate must be a number in [0, 1], e.g. rate:audio=0.3") from None
        if not 0.0 <= rate <= 1.0:
            raise ScenarioError(f"scenario {text!r}: rate must be in [0, 1]")
    else:
        raise ScenarioError(f"scenario {text!r}: use full, missing:<modality> or rate:<modality>=<eta>")
    if modality not in modalities:
        raise ScenarioError(f"scenario {text!r} names modality {modality!r}; this dataset has {', '.join(modalities)}")
    return Scenario(kind, modality, rate)


def key_uniform(key: str, seed: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (key, seed, salt): the same on every machine and backend."""
    digest = hashlib.blake2b(f"{seed}\x00{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def scenario_keep(keys: list[str], modalities: list[str], scenario: Scenario, seed: int) -> np.ndarray:
    """bool [B, M]: which modalities the scenario keeps for each key (before natural missingness)."""
    keep = np.ones((len(keys), len(modalities)), dtype=bool)
    if scenario.kind == "full":
        return keep
    m = modalities.index(scenario.modality)
    if scenario.kind == "missing":
        keep[:, m] = False
    else:
        keep[:, m] = [key_uniform(k, seed, f"rate:{scenario.modality}") >= scenario.rate for k in keys]
    return keep


@dataclass(frozen=True)
class DropSpec:
    """Training augmentation. `drop_one`: probs maps "full" and each modality to the probability of
    keeping all / dropping exactly that modality. `independent`: probs maps each modality to its drop
    probability."""

    scheme: str = "drop_one"
    probs: dict[str, float] = field(default_factory=dict)

    def check(self, modalities: list[str]) -> None:
        unknown = set(self.probs) - set(modalities) - ({"full"} if self.scheme == "drop_one" else set())
        if unknown:
            raise ScenarioError(f"augmentation names unknown modalities {sorted(unknown)}; dataset has {modalities}")
        if self.scheme == "drop_one":
            total = sum(self.probs.values())
            if abs(total - 1.0) > 1e-6:
                raise ScenarioError(f"drop_one probabilities must sum to 1, got {total:g} ({self.probs})")
        elif self.scheme != "independent":
            raise ScenarioError(f"augmentation scheme {self.scheme!r}: use drop_one or independent")
        if any(not 0.0 <= p <= 1.0 for p in self.probs.values()):
            raise ScenarioError(f"augmentation probabilities must be in [0, 1]: {self.probs}")

    @property
    def active(self) -> bool:
        if self.scheme == "drop_one":
            return self.probs.get("full", 1.0) < 1.0
        return any(p > 0 for p in self.probs.values())

    def choice_probs(self, modalities: list[str]) -> list[float]:
        """drop_one: [p(full), p(drop m0), p(drop m1), ...]."""
        return [self.probs.get("full", 0.0)] + [self.probs.get(m, 0.0) for m in modalities]


def drop_one_uniform(modalities: list[str]) -> DropSpec:
    """METHOD.md default: full or drop exactly one modality, each with equal probability."""
    p = 1.0 / (len(modalities) + 1)
    return DropSpec("drop_one", {"full": p, **{m: p for m in modalities}})


def augment_keep(keys: list[str], modalities: list[str], spec: DropSpec, seed: int, epoch: int) -> np.ndarray:
    """bool [B, M] training keep-mask, reproducible per (key, seed, epoch) whatever the sample order."""
    keep = np.ones((len(keys), len(modalities)), dtype=bool)
    for i, key in enumerate(keys):
        if spec.scheme == "drop_one":
            u = key_uniform(key, seed, f"aug:{epoch}")
            edges = np.cumsum(spec.choice_probs(modalities))
            choice = int(np.searchsorted(edges, u, side="right"))
            if 1 <= choice <= len(modalities):
                keep[i, choice - 1] = False
        else:
            for j, m in enumerate(modalities):
                keep[i, j] = key_uniform(key, seed, f"aug:{epoch}:{m}") >= spec.probs.get(m, 0.0)
    return keep


def resolve_present(has: np.ndarray, keep: np.ndarray, never_all: bool) -> np.ndarray:
    """present = has & keep; with `never_all`, a sample left with nothing keeps what it naturally has."""
    present = has & keep
    if never_all:
        empty = ~present.any(axis=1)
        present[empty] = has[empty]
    return present
