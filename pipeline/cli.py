"""The `pipeline` command: make the demo corpus, build shards, verify and inspect them."""
from __future__ import annotations

import argparse
import inspect
import logging
import sys
from pathlib import Path

from pipeline.adapters import SPLITS, SourceError, adapters
from shards.format import FormatError

log = logging.getLogger("pipeline")


class UsageError(Exception):
    """A problem the user fixes by changing the command line; printed without a traceback, exit 2."""


def _cmd_make_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import make_demo

    if args.dataset != "av_digits":
        raise UsageError(f"unknown demo corpus {args.dataset!r}; the only demo is av_digits")
    try:
        summary = make_demo(Path(args.out), n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                            seed=args.seed, workers=args.workers, progress=not args.quiet)
    except ValueError as exc:  # --out holds a corpus made with other parameters
        raise UsageError(str(exc)) from exc
    log.info("demo corpus written to %s: %s", args.out, summary)
    return 0


def _cmd_build_shards(args: argparse.Namespace) -> int:
    from pipeline.build import BuildOptions, build_shards

    src = Path(args.src)
    if not src.is_dir():
        raise UsageError(f"--src {src} does not exist or is not a directory; pass the raw corpus root")
    opts = BuildOptions(frames=args.frames, fps=args.fps, size=args.size, jpeg_quality=args.jpeg_quality,
                        sample_rate=args.sample_rate, audio_codec=args.audio_codec, shard_size=args.shard_size,
                        n_mels=args.n_mels, n_fft=args.n_fft, win_length=args.win_length,
                        hop_length=args.hop_length, max_len=args.max_len, vocab_size=args.vocab_size,
                        order_seed=args.order_seed, audio_features=args.audio_features,
                        audio_seconds=args.audio_seconds,
                        tokenizer=str(Path(args.tokenizer).resolve()) if args.tokenizer else "")
    info = build_shards(args.dataset, src, Path(args.out), opts, workers=args.workers,
                        use_ray=args.ray is not None, ray_address=args.ray or None,
                        progress=not args.quiet, adapter_options=_adapter_options(args))
    for split, counts in info.splits.items():
        missing = ", ".join(f"{counts['samples'] - counts['has_' + m]} without {m}" for m in info.modalities)
        print(f"{split}: {counts['samples']} samples, {counts['rejected']} rejected, {missing}")
    return 0


def _adapter_options(args: argparse.Namespace) -> dict:
    """The dataset-specific options given on the command line (None where not given)."""
    split_lists = None
    if args.split_list:
        split_lists = {}
        for item in args.split_list:
            split, sep, path = item.partition("=")
            if not sep or split not in SPLITS or not path:
                raise UsageError(f"--split-list {item!r}: use SPLIT=FILE with SPLIT one of {', '.join(SPLITS)}, "
                                 f"e.g. --split-list train=my_train.txt")
            split_lists[split] = Path(path)
    given = {"classes_file": (Path(args.classes) if args.classes else None, "--classes"),
             "split_lists": (split_lists, "--split-list"), "duplicates": (args.duplicates, "--duplicates"),
             "split_json": (Path(args.split_json) if args.split_json else None, "--split-json"),
             "class_index": (Path(args.class_index) if args.class_index else None, "--class-index"),
             "manifest_file": (Path(args.manifest) if args.manifest else None, "--manifest")}
    known = adapters()
    accepted = inspect.signature(known[args.dataset]).parameters if args.dataset in known else {}
    for name, (value, flag) in given.items():
        if value is not None and name not in accepted:
            raise UsageError(f"{flag} does not apply to {args.dataset}")
    return {name: value for name, (value, _) in given.items() if value is not None}


def _cmd_verify(args: argparse.Namespace) -> int:
    from shards.verify import verify_dataset

    problems = verify_dataset(Path(args.dataset_dir), decode=not args.no_decode, progress=not args.quiet)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"{len(problems)} problem(s) in {args.dataset_dir}; rebuild the named shards "
              f"(delete them and their .build part files, then rerun build-shards)")
        return 1
    print(f"OK {args.dataset_dir}: checksums, index, manifest and every member agree")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from shards.verify import inspect_dataset

    print(inspect_dataset(Path(args.dataset_dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Turn raw multi-modal corpora into sharded WebDataset tar datasets for UME-MMA training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("make-demo", help="write the av_digits demo corpus (offline, deterministic)",
                          description="Write the av_digits demo corpus: MNIST digits in H.264 clips with the "
                                      "spoken digit (espeak-ng, unseen voices in test) as AAC audio.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("dataset", help="demo corpus name (av_digits)")
    demo.add_argument("--out", required=True, help="directory to write the raw corpus to")
    demo.add_argument("--n-train", type=int, default=3000)
    demo.add_argument("--n-val", type=int, default=500)
    demo.add_argument("--n-test", type=int, default=1000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    demo.set_defaults(func=_cmd_make_demo)

    build = sub.add_parser("build-shards", help="decode a raw corpus into tar shards + manifest",
                           description="Decode a raw corpus (its public release's layout) into WebDataset tar "
                                       "shards with DALI indexes, manifest.parquet, rejects.parquet and "
                                       "dataset.json under OUT/<dataset>. Rerunning resumes an interrupted build.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("dataset", help=f"dataset adapter: {', '.join(sorted(adapters()))} (more from packages "
                                       f"that declare the ume_mma.adapters entry point)")
    build.add_argument("--src", required=True, help="root of the raw corpus")
    build.add_argument("--out", required=True, help="output root; shards go to OUT/<dataset>")
    build.add_argument("--frames", type=int, default=3, help="frames kept per clip")
    build.add_argument("--fps", type=float, default=1.0, help="rate of the kept frames (spread evenly if the clip is shorter)")
    build.add_argument("--size", type=int, default=256, help="short side of stored frames in pixels (never upscaled)")
    build.add_argument("--jpeg-quality", type=int, default=90)
    build.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate (mono)")
    build.add_argument("--audio-codec", choices=["wav", "flac"], default="wav")
    build.add_argument("--audio-features", choices=["waveform", "logmel"], default="waveform",
                       help="store the waveform (the loaders compute the log-mel: on a GPU, or for audio "
                            "augmentation) or the log-mel itself as float16 (least CPU per sample in the loaders)")
    build.add_argument("--audio-seconds", type=float, default=0.0,
                       help="logmel: the length every clip's audio is cut or zero-padded to")
    build.add_argument("--shard-size", type=int, default=256, help="samples per tar shard")
    build.add_argument("--n-mels", type=int, default=128, help="mel bins the loaders compute (recorded in dataset.json)")
    build.add_argument("--n-fft", type=int, default=512)
    build.add_argument("--win-length", type=int, default=400)
    build.add_argument("--hop-length", type=int, default=160)
    build.add_argument("--max-len", type=int, default=128, help="text: token ids kept per sample (zero-padded)")
    build.add_argument("--vocab-size", type=int, default=30000,
                       help="text: vocabulary of the default tokenizer (most frequent train words + [PAD], [UNK])")
    build.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="text: a local Hugging Face tokenizer directory (tokenizer.json) instead of the default")
    build.add_argument("--order-seed", type=int, default=0,
                       help="seed of the key hash that orders each split before it is cut into shards")
    build.add_argument("--workers", type=int, default=None, help="local worker processes (default: all cores)")
    build.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run shard tasks on a Ray cluster (address, or empty for RAY_ADDRESS/local); "
                            "--out must be storage every node sees")
    build.add_argument("--manifest", default=None, metavar="FILE",
                       help="manifest: the manifest (.csv, .jsonl or .parquet; default: manifest.* in --src)")
    build.add_argument("--classes", default=None, help="kinetics_sound: file with the class names to keep")
    build.add_argument("--split-list", action="append", default=None, metavar="SPLIT=FILE",
                       help="kinetics_sound, crema_d: take the samples of SPLIT from a lineage split list "
                            "(OGM-GE's my_train.txt / my_test.txt, data/CREMAD/train.csv / test.csv); repeat per split")
    build.add_argument("--split-json", default=None, metavar="FILE",
                       help="food101: missing_aware_prompts' split.json (image names per train/val/test); "
                            "default: split.json at the root of --src if there, else a hash split of train")
    build.add_argument("--class-index", default=None, metavar="FILE",
                       help="food101: missing_aware_prompts' class_idx.json (class -> label index); default: "
                            "class_idx.json at the root of --src if there, else sorted class folders")
    build.add_argument("--duplicates", choices=["drop", "first"], default=None,
                       help="ave: what to do with video ids that Annotations.txt labels more than once "
                            "(default drop: every row of an ambiguous id is rejected)")
    build.set_defaults(func=_cmd_build_shards)

    verify = sub.add_parser("verify", help="check checksums, index, manifest and that every member decodes",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    verify.add_argument("dataset_dir", help="OUT/<dataset>")
    verify.add_argument("--no-decode", action="store_true", help="skip decoding members (checksums and index only)")
    verify.set_defaults(func=_cmd_verify)

    inspect = sub.add_parser("inspect", help="counts per split and class, missing-modality rates, sizes")
    inspect.add_argument("dataset_dir", help="OUT/<dataset>")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, SourceError, FormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C; a build says what it finished (BuildInterrupted)
        print(str(exc) or f"interrupted during `pipeline {args.command}`; nothing is half-written (writes are "
              f"atomic), rerun the same command to resume", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if "apt-get install" in str(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
