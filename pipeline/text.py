"""Text at build time: decoding bytes of any encoding, and tokenising into fixed-length int32 ids.

The default tokenizer (`word-nfkc-v1`) works offline on any script: Unicode NFKC, case folding, then
words = runs of letters/digits; Han, Hiragana and Katakana characters are words of their own (those
scripts put no spaces between words). Its vocabulary is the `vocab_size - 2` most frequent words of the
train split (ties by the word), written to `vocab.txt` beside `dataset.json`, one token a line, the
line number being the id: 0 = padding, 1 = unknown. A local Hugging Face tokenizer directory (holding
`tokenizer.json`, read with the `tokenizers` package) may be given instead; it is copied into the
dataset. Either way the ids are truncated or zero-padded to `max_len`, so 0 must mean padding."""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

WORD_TOKENIZER = "word-nfkc-v1"
PAD, UNK = "[PAD]", "[UNK]"
VOCAB_FILE = "vocab.txt"
HF_FILE = "tokenizer.json"
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def decode_text(data: bytes) -> tuple[str, int]:
    """UTF-8 text (a BOM dropped) with each invalid byte sequence replaced by U+FFFD; returns
    (text, number of replacements)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd")


def words(text: str) -> list[str]:
    """The default tokenizer's words: NFKC, case-folded, letter/digit runs, one Han/kana character each."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


@dataclass(frozen=True)
class Tokenizer:
    """Turns text into `max_len` int32 ids (0 = padding); built by `build_vocab` or `load_tokenizer`."""

    kind: str  # WORD_TOKENIZER or "huggingface"
    max_len: int
    vocab: dict[str, int] | None = None
    hf: object | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) if self.vocab is not None else self.hf.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        if self.vocab is not None:
            ids = [self.vocab.get(w, 1) for w in words(text)]
        else:
            ids = self.hf.encode(text).ids
        out = np.zeros(self.max_len, dtype=np.int32)
        ids = ids[:self.max_len]
        out[:len(ids)] = ids
        return out


def build_vocab(texts: Iterable[str], vocab_size: int) -> list[str]:
    """Tokens by id: [PAD], [UNK], then the most frequent words (ties by the word, so deterministic)."""
    counts = Counter(w for text in texts for w in words(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max(0, vocab_size - 2)]
    return [PAD, UNK] + [w for w, _ in ranked]


def prepare_tokenizer(out: Path, train_texts: Iterable[str], max_len: int, vocab_size: int,
                      hf_dir: str = "") -> dict:
    """Write the tokenizer files into the dataset directory; returns what dataset.json records as `text`."""
    from shards.writer import atomic_write_bytes, sha256_file

    if hf_dir:
        source = Path(hf_dir) / HF_FILE
        if not source.is_file():
            raise ValueError(f"--tokenizer {hf_dir}: no {HF_FILE} there; pass a local Hugging Face tokenizer directory")
        atomic_write_bytes(out / HF_FILE, source.read_bytes())
        info = {"tokenizer": "huggingface", "file": HF_FILE, "source": Path(hf_dir).name}
    else:
        tokens = build_vocab(train_texts, vocab_size)
        atomic_write_bytes(out / VOCAB_FILE, ("\n".join(tokens) + "\n").encode())
        info = {"tokenizer": WORD_TOKENIZER, "file": VOCAB_FILE, "pad_id": 0, "unk_id": 1,
                "lowercase": True, "normalization": "NFKC", "vocab_from": "train"}
    tokenizer = load_tokenizer(str(out), info["tokenizer"], max_len)
    digest = sha256_file(out / info["file"])
    return dict(info, vocab_size=tokenizer.vocab_size, max_len=max_len, sha256=digest, dtype="int32",
                raw="text.txt.zst")


@lru_cache(maxsize=4)
def load_tokenizer(dataset_dir: str, kind: str, max_len: int) -> Tokenizer:
    """The tokenizer a dataset was built with (cached per process: every shard task calls this)."""
    root = Path(dataset_dir)
    if kind == WORD_TOKENIZER:
        tokens = (root / VOCAB_FILE).read_text(encoding="utf-8").split("\n")[:-1]
        return Tokenizer(kind, max_len, vocab={t: i for i, t in enumerate(tokens)})
    if kind == "huggingface":
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as exc:
            raise ValueError("a Hugging Face tokenizer needs the `tokenizers` package: pip install tokenizers") from exc
        hf = HFTokenizer.from_file(str(root / HF_FILE))
        hf.no_padding()
        hf.no_truncation()
        return Tokenizer(kind, max_len, hf=hf)
    raise ValueError(f"unknown tokenizer {kind!r} in {root / 'dataset.json'}; rebuild the shards")

