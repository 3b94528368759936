"""The DALI loader: one `@pipeline_def` for every dataset's modalities, with missing-modality masks fused in.

Per sample, the pipeline decides which modalities are present (natural missingness from empty members,
then the training augmentation or the evaluation scenario) and only decodes those: a dropped modality
takes the `else` branch, which yields zeros without touching its bytes. With a GPU, JPEGs are decoded by
nvJPEG (`mixed`) and the spectrogram, mel filter bank and decibels run on the GPU; without one
(`device_id=None`) everything runs on the CPU. Stored spectrograms (FLOAT), stored log-mel (FLOAT16) and
token ids (INT32) are read as typed members whose first 128 bytes (the .npy header) are sliced off, as the
label is. The pipeline function calls one helper per modality (`clip_frames`, `waveform_log_mel`,
`stored_spectrogram`, `token_ids`), each with its `if use:` / `else:` branch.

Frames. In training one random window per clip (`fn.random_crop_generator` on the first frame's header
shape) is decoded from every frame with `fn.decoders.image_slice` (libjpeg-turbo / nvJPEG ROI decoding); the
windows, all of one size, are stacked and resized to the crop by one operator, so neither the pixels outside
the window nor whole frames are ever decoded or copied. Evaluation decodes whole frames and resizes their
short side: the centre crop of an antialiased resize needs pixels outside the crop window, and its output
stays the one the parity test pins against the torch loader. The frame-size check reads the JPEG headers
(`fn.peek_image_shape`). On 2 cores, `num_threads` = the workers asked for, capped at the cores (3 threads
were no faster than 2), and `prefetch_queue_depth` 2 (1 cost the same CPU per sample, 3 more).

Cost per sample (measured on 2 cores with perf and `benchmarks/loader.py`; in a steady run the antialiased
resize of the windows is a quarter of the CPU time, the log-mel a fifth, the JPEG decoding a twentieth).
The pipeline of an epoch schedules no iteration past the epoch's last batch (`Pipeline.run` prefetches one
more, which a pipeline rebuilt per epoch would decode for nothing: a third of a 3-batch epoch); without
random drops the present flags are the members' sizes, with no operator for draws that cannot drop
anything; CPU outputs become torch tensors without a copy (DLPack views of the dynamic executor's buffers,
which it never reuses); the CPU spectrogram is computed time-major (`layout="tf"`, then one transpose),
about 0.3 CPU-ms less per 10 s clip than frequency-major.

Shuffling. DALI's `fn.readers.webdataset` reads its `paths` in the order given, each tar sequentially;
`num_shards`/`shard_id` cut that concatenated sample list into contiguous parts, one per pipeline (the rule
of `shards.sample_refs.shard_range`); `stick_to_shard` keeps a pipeline on its own part instead of moving on
to the next part each epoch; `pad_last_batch` repeats a part's last sample so that every pipeline returns
the same number of batches. With `random_shuffle` it fills a buffer of `initial_fill` samples read in order
and draws each output at random from it, refilling it as it goes: it "shuffles the data only locally", so
samples read far apart rarely share a batch. Sources: DALI 2.4's docs of `nvidia.dali.fn.readers.webdataset`
and "Sharding and Shuffling" (docs.nvidia.com/deeplearning/dali/archives/dali_2_4_0/user-guide/, pages
operations/nvidia.dali.fn.readers.webdataset.html and advanced_topics_sharding.html), and the maintainers'
answers in NVIDIA/DALI#5429 and #5441. The build already orders each split by a seeded hash of the key, so
every shard mixes classes; on top of that a training epoch reads the tars in an order fixed by (seed,
epoch) (`epoch_tars`) and the buffer holds about two shards' samples (`shuffle_buffer`). DALI's own
`shuffle_after_epoch` is not used: it cannot be combined with `stick_to_shard`, and it reshuffles only
after an epoch of one pipeline, while this loader builds a pipeline per epoch so that a fresh loader (or a
resume) at epoch e reproduces epoch e."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.backend import TensorListCPU
from nvidia.dali.pipeline import do_not_convert

from shards.batches import EpochLoader, LoaderOptions, WorkerPart, assemble_batch
from shards.features import DB_OFFSET, DB_SCALE, ModalityParams, modality_params
from shards.format import MODALITIES, NPY_HEADER_BYTES, DatasetInfo, frame_member
from shards.masks import DropSpec, key_uniform
from shards.members import check_member
from shards.sample_refs import FrameSizeError, SampleRef

READER = "reader"
FILL_SHARDS = 2  # the shuffle buffer holds this many shards' samples (the largest shard of the split) ...
FILL_MAX_BYTES = 256 * 2**20  # ... but no more than this many bytes of stored samples (by the mean sample size)
PREFETCH_DEPTH = 2  # batches DALI prepares ahead (prefetch_queue_depth): 1 and 2 cost the same CPU, 3 more (2 cores)
STORED_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}  # stored spectrogram / log-mel members


class DecodeFailure(RuntimeError):
    """A shard member that no longer decodes, or decodes to another frame size than the build recorded;
    names the shard file, the sample key and the member."""


@pipeline_def(enable_conditionals=True)
def multimodal_pipeline(tars: list[str], idxs: list[str], modalities: list[str], params: ModalityParams,
                        gpu: bool, train: bool, shard_id: int, num_shards: int, initial_fill: int, rng_seed: int,
                        augment: DropSpec | None, eval_keep: np.ndarray | None, label_dtype: types.DALIDataType,
                        min_crop_area: float, flip: bool):
    """Per sample, in this order, each output only for a modality of the dataset: frames [T, 3, H, W];
    audio [1, n_mels, n_frames] (log-mel of the waveform, or a stored spectrogram or log-mel); token ids [L];
    then the label payload and the present flags; last, for a dataset with frames, the frames' shapes [T, 3]
    (H, W, C from the JPEG headers; zeros when not decoded), checked against the recorded sizes after each run."""
    visual, audio, spec, text = params.visual, params.audio, params.spectrogram, params.text
    exts, dtypes = [], []
    if visual is not None:
        exts += [frame_member(i) for i in range(visual.frames)]
        dtypes += [types.UINT8] * visual.frames
    if audio is not None or spec is not None:
        exts.append(params.audio_member)
        dtypes.append(types.UINT8 if spec is None else STORED_DTYPES[spec.dtype])
    if text is not None:
        exts.append(text.member)
        dtypes.append(types.INT32)
    members = fn.readers.webdataset(
        paths=tars, index_paths=idxs, ext=exts + ["label.npy"], missing_component_behavior="empty",
        dtypes=dtypes + [label_dtype], random_shuffle=train, initial_fill=initial_fill, seed=rng_seed,
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, stick_to_shard=True, name=READER)
    members, label = list(members[:-1]), members[-1]
    jpegs = [members.pop(0) for _ in range(visual.frames)] if visual is not None else []
    sound = members.pop(0) if audio is not None or spec is not None else None
    ids = members.pop(0) if text is not None else None

    use = _use_flags({"visual": jpegs[0] if jpegs else None, "audio": sound, "text": ids},
                     _keep_flags(modalities, train, augment, eval_keep, rng_seed), train)
    use_visual, use_audio, use_text = use["visual"], use["audio"], use["text"]

    outputs = []
    if visual is not None:
        frames, frame_shapes = clip_frames(jpegs, use_visual, params, gpu, train, min_crop_area, flip, rng_seed)
        outputs.append(frames)
    if audio is not None:
        outputs.append(waveform_log_mel(sound, use_audio, params, gpu))
    elif spec is not None:
        outputs.append(stored_spectrogram(sound, use_audio, params, gpu))
    if text is not None:
        outputs.append(token_ids(ids, use_text, params))

    present = fn.stack(*[use[m] for m in modalities])  # bool [M]
    return (*outputs, label, present, *([frame_shapes] if visual is not None else []))


def clip_frames(jpegs: list, use, params: ModalityParams, gpu: bool, train: bool, min_crop_area: float, flip: bool,
                seed: int) -> tuple:
    """Frames [T, 3, crop, crop] (normalised) and their JPEG header shapes [T, 3]. Training decodes only one
    random window (`min_crop_area`..100% of the area, aspect 3/4..4/3), the same for every frame, and resizes
    it to the crop; evaluation decodes whole frames, resizes the short side to the crop and centre-crops."""
    visual = params.visual
    if use:
        shapes = [fn.peek_image_shape(j) for j in jpegs]
        frame_shapes = fn.stack(*shapes)
        device = "mixed" if gpu else "cpu"
        # nvJPEG upsamples chroma by replication unless asked to interpolate as libjpeg-turbo does: without this
        # the GPU frames differ from the CPU ones by up to 3 normalised units at colour edges (measured on an
        # H200), a shift between a model trained on one device and evaluated on the other
        upsampling = {"jpeg_fancy_upsampling": True} if gpu else {}
        if train:
            anchor, window = fn.random_crop_generator(shapes[0], random_area=[min_crop_area, 1.0],
                                                      random_aspect_ratio=[3 / 4, 4 / 3], seed=seed + 1)
            decoded = [fn.decoders.image_slice(j, anchor, window, axis_names="HW", normalized_anchor=False,
                                               normalized_shape=False, device=device, output_type=types.RGB, **upsampling)
                       for j in jpegs]
            # the windows share one size: stacked, they are resized by one operator (fewer operators than one
            # resize per frame, and 3-4% less CPU for the frames in a steady run)
            clip = fn.resize(fn.stack(*decoded, axis_name="F"), size=[visual.crop, visual.crop], antialias=True)
            mirror = fn.random.coin_flip(probability=0.5, seed=seed + 2) if flip else 0
        else:
            decoded = [fn.decoders.image(j, device=device, output_type=types.RGB, **upsampling) for j in jpegs]
            clip = fn.resize(fn.stack(*decoded, axis_name="F"), resize_shorter=visual.crop, antialias=True)
            mirror = 0
        frames = fn.crop_mirror_normalize(
            clip, crop=[visual.crop, visual.crop], mirror=mirror, dtype=types.FLOAT, output_layout="FCHW",
            mean=[255.0 * m for m in visual.mean], std=[255.0 * s for s in visual.std])
    else:
        frames = _zeros(params.shape("visual"), types.FLOAT, gpu, layout="FCHW")  # conditionals merge equal layouts
        frame_shapes = fn.constant(idata=0, shape=[visual.frames, 3], dtype=types.INT64)
    return frames, frame_shapes


def waveform_log_mel(sound, use, params: ModalityParams, gpu: bool):
    """The normalised log-mel [1, n_mels, n_frames] of a WAV/FLAC member (`shards.features.log_mel` on the CPU)."""
    audio = params.audio
    if use:
        signal = fn.decoders.audio(sound, dtype=types.FLOAT, downmix=True, sample_rate=audio.sample_rate)[0]
        # start and shape as arguments, not inputs: positional ones would add two constant operators (and, in
        # this branch, two splits of them) to every iteration
        signal = fn.slice(signal, start=[0], shape=[audio.n_samples], axes=[0], out_of_bounds_policy="pad",
                          fill_values=0.0)
        signal = signal.gpu() if gpu else signal
        # time-major on the CPU: the FFT writes each window's spectrum contiguously (about 0.3 CPU-ms per 10 s
        # clip less than frequency-major, transposing the log-mel included)
        layout = "ft" if gpu else "tf"
        power = fn.spectrogram(signal, nfft=audio.n_fft, window_length=audio.win_length, layout=layout,
                               window_step=audio.hop_length, center_windows=True, reflect_padding=True, power=2)
        mel = fn.mel_filter_bank(power, sample_rate=audio.sample_rate, nfilter=audio.n_mels,
                                 freq_high=audio.sample_rate / 2.0, normalize=True, mel_formula="slaney")
        # (10 log10(mel) + DB_OFFSET) / DB_SCALE, floored at (DB_OFFSET - db_cutoff) / DB_SCALE, in one operator
        logmel = fn.to_decibels(mel, multiplier=10.0 / DB_SCALE, reference=10.0 ** (-DB_OFFSET / 10.0),
                                cutoff_db=(DB_OFFSET - audio.db_cutoff) / DB_SCALE)
        logmel = fn.expand_dims(logmel if gpu else fn.transpose(logmel, perm=[1, 0]), axes=[0])
    else:
        logmel = _zeros(params.shape("audio"), types.FLOAT, gpu)
    return logmel


def stored_spectrogram(sound, use, params: ModalityParams, gpu: bool):
    """A stored spectrogram (float32, times its scale) or log-mel (float16) as float32 [1, H, W]: the .npy
    header's elements dropped, the payload viewed with its shape."""
    spec = params.spectrogram
    if use:
        values = fn.reshape(sound[NPY_HEADER_BYTES // np.dtype(spec.dtype).itemsize:], shape=[1, *spec.shape])
        if spec.dtype != "float32":
            values = fn.cast(values, dtype=types.FLOAT)
        if spec.scale != 1.0:
            values = values * spec.scale
        values = values.gpu() if gpu else values
    else:
        values = _zeros(params.shape("audio"), types.FLOAT, gpu)
    return values


def token_ids(ids, use, params: ModalityParams):
    """The int32 token ids [max_len] (zeros when absent); the loader casts them to int64."""
    if use:
        tokens = ids[NPY_HEADER_BYTES // 4:]
    else:
        tokens = fn.constant(idata=0, shape=list(params.shape("text")), dtype=types.INT32)
    return tokens


def _zeros(shape: tuple[int, ...], dtype: types.DALIDataType, gpu: bool, layout: str | None = None):
    """An absent modality's zeros, on the device its present branch ends on."""
    zeros = fn.constant(fdata=0.0, shape=list(shape), dtype=dtype, **({"layout": layout} if layout else {}))
    return zeros.gpu() if gpu else zeros


@do_not_convert
def _use_flags(members: dict, keep: dict, train: bool) -> dict:
    """Per sample and modality, whether it is decoded: its member is not empty (natural missingness) and the
    keep flag says so; in training a sample whose draws would drop everything it has keeps all of it.
    Each member's size is read once, and without any random draw (keep flags all True) the flags are
    just the sizes: no operator is added for what cannot change them."""
    has = {m: member.shape()[0] > 0 for m, member in members.items() if member is not None}
    use = {m: has[m] if keep[m] is True else has[m] & keep[m] for m in has}
    if train and any(keep[m] is not True for m in has):  # never drop everything a sample has
        kept = list(use.values())
        anything = kept[0]
        for flag in kept[1:]:
            anything = anything | flag
        nothing = anything == False  # noqa: E712 (DALI node comparison)
        use = {m: flag | (nothing & has[m]) if keep[m] is not True else flag for m, flag in use.items()}
    return {m: use.get(m, False) for m in MODALITIES}


def _keep_flags(modalities: list[str], train: bool, augment: DropSpec | None, eval_keep: np.ndarray | None,
                seed: int) -> dict:
    """Per-sample keep flags by modality: random draws in training, the scenario's mask (fed in order) in
    evaluation, True (Python) when nothing is dropped."""
    if eval_keep is not None:
        keep = fn.external_source(source=_cycle_batches(eval_keep), dtype=types.BOOL, ndim=1, batch=True)
        flags = [keep[i] for i in range(len(modalities))]
    elif train and augment is not None and augment.active:
        if augment.scheme == "drop_one":
            choice = fn.random.choice(len(modalities) + 1, p=augment.choice_probs(modalities), seed=seed + 3)
            flags = [choice != i + 1 for i in range(len(modalities))]
        else:
            flags = [fn.random.coin_flip(probability=1.0 - augment.probs.get(m, 0.0), seed=seed + 4 + i, dtype=types.BOOL)
                     for i, m in enumerate(modalities)]
    else:
        flags = [True] * len(modalities)
    by_name = dict(zip(modalities, flags))
    return {m: by_name.get(m, True) for m in MODALITIES}


@do_not_convert
def _cycle_batches(rows: np.ndarray):
    """The evaluation keep-mask in reader order, batch by batch, padded like the reader's last batch."""
    batch_size = Pipeline.current().max_batch_size
    rows = rows.astype(bool)

    def source():
        while True:
            for start in range(0, len(rows), batch_size):
                part = list(rows[start:start + batch_size])
                yield part + [part[-1]] * (batch_size - len(part))

    return source


def epoch_tars(tars: list[str], seed: int, epoch: int) -> list[str]:
    """The order in which a training epoch reads the split's tars: sorted by a hash of each tar's path
    inside the dataset (`<split>/NNNNNN.tar`) with (seed, epoch), so it is the same on every worker
    (wherever the dataset is mounted) and on a resume, and differs from epoch to epoch."""
    salt = f"tar-order:{epoch}"
    return sorted(tars, key=lambda tar: (key_uniform("/".join(Path(tar).parts[-2:]), seed, salt), tar))


def shuffle_buffer(info: DatasetInfo, tars: list[str], batch_size: int, part: int) -> int:
    """`initial_fill` for the reader: FILL_SHARDS times the largest shard of these tars as recorded in
    dataset.json, at most FILL_MAX_BYTES of stored samples (at the shards' mean bytes per sample), at least
    one batch, and no more than the worker's part (a buffer that holds the whole part permutes it fully)."""
    recorded = {shard.path: shard for shard in info.shards}
    shards = [recorded[rel] for rel in ("/".join(Path(tar).parts[-2:]) for tar in tars) if rel in recorded]
    samples = sum(s.samples for s in shards)
    if not samples:
        return max(1, min(batch_size, part))
    by_bytes = int(FILL_MAX_BYTES / (sum(s.bytes for s in shards) / samples))
    fill = max(batch_size, min(FILL_SHARDS * max(s.samples for s in shards), by_bytes))
    return max(1, min(fill, part))


class DaliLoader(EpochLoader):
    """Iterates batches of one worker's part of a split, as dicts of torch tensors (see DESIGN.md)."""

    def __init__(self, info: DatasetInfo, refs: list[SampleRef], batch_size: int, *, train: bool,
                 augment: DropSpec | None, eval_keep: np.ndarray | None, part: WorkerPart,
                 options: LoaderOptions) -> None:
        super().__init__(len(refs), batch_size, train, part, options)
        self.info = info
        self.gpu = options.gpu
        self.modalities = list(info.modalities)
        self._by_tar: dict[str, list[SampleRef]] = {}
        for ref in refs:
            self._by_tar.setdefault(ref.tar, []).append(ref)
        self._tars = list(self._by_tar)  # dataset.json order
        self._range = part.of(len(refs))
        self._part: list[SampleRef] = []  # this worker's samples in the epoch's reader order (set per pipeline)
        self._sized: dict[str, SampleRef] = {}  # key -> ref of the part's samples with a recorded frame size
        self._params = modality_params(info, options.crop)
        self._outputs = [m for m in MODALITIES if m in self.modalities]
        self.initial_fill = shuffle_buffer(info, self._tars, batch_size, len(self._range))
        if eval_keep is None and not train:
            eval_keep = np.ones((len(refs), len(self.modalities)), dtype=bool)
        self._kwargs = dict(
            modalities=self.modalities, params=self._params, gpu=self.gpu, train=train, shard_id=part.shard_id,
            num_shards=part.num_shards, initial_fill=self.initial_fill, augment=augment,
            eval_keep=None if eval_keep is None else eval_keep[self._range.start:self._range.stop],
            label_dtype=types.FLOAT if info.multilabel else types.INT64, min_crop_area=options.min_crop_area,
            flip=options.flip)
        self._num_threads = max(1, min(options.workers, len(os.sched_getaffinity(0))))  # more than cores: no faster
        self._device_id = (options.device_id or 0) if self.gpu else None
        self._pipe = None
        self._pipe_epoch = -1
        self._checkpoint: str | None = None
        self._planned = self._scheduled = self._consumed = 0  # iterations of the current pass of the pipeline
        self._primed = False  # the pipeline's first schedule_run (which prefetches) has been made

    def _build(self) -> None:
        """A pipeline for the current epoch: its shuffle and masks depend on (seed, epoch, shard) only, so
        an epoch is a fresh pass over the shard and a new loader at epoch e reproduces epoch e."""
        self._part = self.epoch_samples()
        self._sized = {ref.key: ref for ref in self._part if ref.frame_size}
        replay = self.batches_done if self._checkpoint is None else 0  # no reader checkpoint: replay
        self._planned = replay + max(0, len(self) - self.batches_done)
        self._scheduled = self._consumed = 0
        self._pipe = self.make_pipeline()
        self._pipe.build()
        self._primed = False
        self._pipe_epoch = self.epoch
        for _ in range(replay):
            self._run()
        self._checkpoint = None

    def _run(self) -> list:
        """The outputs of the pipeline's next iteration. Iterations are scheduled ahead (`prefetch_queue_depth`)
        but never past the epoch's last batch: the pipeline is rebuilt for every epoch, so an iteration
        prefetched beyond it (what `Pipeline.run` does) would read and decode a batch for nothing."""
        pipe = self._pipe
        if not self._primed:
            pipe.schedule_run()  # the first call prefetches `prefetch_queue_depth` iterations
            self._scheduled, self._primed = pipe.prefetch_queue_depth, True
        elif self._scheduled == 0:  # a pipeline kept from the last pass: each call schedules one iteration
            for _ in range(min(pipe.prefetch_queue_depth, self._planned)):
                pipe.schedule_run()
                self._scheduled += 1
        elif self._consumed >= self._scheduled:  # asked for more than planned
            pipe.schedule_run()
            self._scheduled += 1
        outs = list(pipe.outputs())
        self._consumed += 1
        if self._scheduled < self._planned:
            pipe.schedule_run()
            self._scheduled += 1
        return outs

    def reader_tars(self) -> list[str]:
        """The tars in the order the current epoch's reader gets them: permuted per (seed, epoch) in training
        (the same list on every worker, so `shard_id`/`num_shards` still partition the split), dataset.json
        order in evaluation."""
        return epoch_tars(self._tars, self.part.seed, self.epoch) if self.train else list(self._tars)

    def epoch_samples(self) -> list[SampleRef]:
        """This worker's samples for the current epoch, in the order its reader reads them (before the
        buffer shuffle): its `shard_range` of the samples of `reader_tars()` in turn."""
        ordered = [ref for tar in self.reader_tars() for ref in self._by_tar[tar]]
        return [ordered[i] for i in self.part.of(len(ordered))]

    def make_pipeline(self) -> Pipeline:
        """The (unbuilt) pipeline of the current epoch. Defining its graph needs no device, so a machine
        without a GPU can check the GPU graph (`make_pipeline()._build_graph()`): devices and layouts."""
        rng_seed = (self.part.seed * 1_000_003 + self.epoch * 7_919 + self.part.shard_id) % 2**31
        tars = self.reader_tars()
        return multimodal_pipeline(
            **self._kwargs, tars=tars, idxs=[str(Path(t).with_suffix(".idx")) for t in tars], rng_seed=rng_seed,
            batch_size=self.batch_size, num_threads=self._num_threads, device_id=self._device_id, seed=rng_seed,
            enable_checkpointing=self.train, checkpoint=self._checkpoint,
            prefetch_queue_depth=min(PREFETCH_DEPTH, self._planned) if self._planned else PREFETCH_DEPTH,
            exec_dynamic=True)

    def state_dict(self) -> dict:
        """Epoch, batches consumed and the DALI checkpoint (reader position and random state)."""
        state = super().state_dict()
        if self._pipe is not None and self.train:
            state["dali_checkpoint"] = self._pipe.checkpoint()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._checkpoint = state.get("dali_checkpoint")
        self._pipe = None

    def _epoch_batches(self) -> Iterator[dict]:
        if self._pipe is None or self._pipe_epoch != self.epoch:
            self._build()
        n = len(self._range)
        while True:
            start = self.batches_done * self.batch_size
            count = min(self.batch_size, n - start)
            try:
                outs = self._run()
            except RuntimeError as exc:
                raise DecodeFailure(self._locate_failure(exc)) from exc
            frame_shapes = outs.pop() if "visual" in self._outputs else None
            *tensors, label, present = outs
            keys = [_key_of(source) for source in _source_infos(label)][:count]
            if frame_shapes is not None and self._sized:
                self._check_frame_sizes(frame_shapes, keys)
            if not self.train:
                expected = [self._part[start + i].key for i in range(count)]
                if keys != expected:
                    raise RuntimeError(f"DALI reader order differs from the index order at batch {self.batches_done}: "
                                       f"{keys[:3]} vs {expected[:3]}")
            labels = _as_numpy(label)[:count]
            labels = labels[:, NPY_HEADER_BYTES // labels.dtype.itemsize:]  # the payload after the .npy header
            yield assemble_batch({m: _to_torch(t)[:count] for m, t in zip(self._outputs, tensors)},
                                 _as_numpy(present)[:count], labels if self.info.multilabel else labels[:, 0],
                                 keys, self.info.multilabel)

    def _epoch_done(self) -> None:
        """Training builds the next epoch's pipeline (its order and draws depend on the epoch). Evaluation keeps
        its pipeline for the next pass, which reads the same part in the same order: the padded last batch
        ends the reader's pass over its shard exactly, and the scenario's masks cycle with it; so a validation
        loader builds once per run (a build costs 1 to 6 s on a 16-core GPU host)."""
        if self.train or self._consumed != self._scheduled or self._pipe is None:
            self._pipe = None
            return
        self._pipe_epoch = self.epoch + 1
        self._planned, self._scheduled, self._consumed = len(self), 0, 0

    def _check_frame_sizes(self, shapes, keys: list[str]) -> None:
        """Raise DecodeFailure naming the first frame of the batch whose decoded (height, width) is not the one
        recorded for its sample (frames not decoded have shape zeros and are not checked)."""
        got = _as_numpy(shapes)[:len(keys), :, :2]
        recorded = np.array([self._sized[k].frame_size if k in self._sized else (0, 0) for k in keys], np.int64)
        bad = (got != recorded[:, None]).any(axis=2) & (got[:, :, 0] > 0) & (recorded[:, None, 0] > 0)
        if bad.any():
            i, t = np.argwhere(bad)[0]
            ref = self._sized[keys[i]]
            raise DecodeFailure(f"shard {ref.tar}: sample {ref.key} "
                                f"{FrameSizeError(frame_member(t), tuple(got[i, t].tolist()), ref.frame_size)}; "
                                f"run `pipeline verify` and rebuild that shard")

    def _locate_failure(self, exc: Exception) -> str:
        """Name the shard, key and member that does not decode, or decodes to another frame size than recorded
        (DALI stops the whole pipeline, e.g. when one sample's frames cannot be stacked)."""
        for ref in self._part:
            with open(ref.tar, "rb") as f:
                for ext, (offset, size) in ref.members.items():
                    f.seek(offset)
                    data = f.read(size)
                    try:
                        got = check_member(ext, data)
                    except Exception as err:  # the first member that fails is the culprit
                        return (f"shard {ref.tar}: sample {ref.key} member .{ext} does not decode ({err}); "
                                f"run `pipeline verify` and rebuild that shard")
                    if got is not None and ref.frame_size is not None and got != ref.frame_size:
                        return (f"shard {ref.tar}: sample {ref.key} {FrameSizeError(ext, got, ref.frame_size)}; "
                                f"run `pipeline verify` and rebuild that shard")
        return f"DALI pipeline failed and no member fails to decode on its own: {str(exc).splitlines()[0]}"


def _as_numpy(tensor_list) -> np.ndarray:
    """A dense batch as a numpy array on the host: one copy of the batch's contiguous buffer (DALI reuses its
    output buffers), which costs a third of `TensorList.as_array()`."""
    host = tensor_list if isinstance(tensor_list, TensorListCPU) else tensor_list.as_cpu()
    return np.array(host.as_tensor())


def _to_torch(tensor_list) -> torch.Tensor:
    """A batch as a torch tensor. CPU outputs are not copied: the tensor is a DLPack view of DALI's output
    buffer, which the dynamic executor (`exec_dynamic=True`) hands over to its holder and never reuses, as
    DALI's own PyTorch iterator does with that executor (a copy of the frames cost 0.5 CPU-ms per sample).
    GPU outputs stay on the GPU: copied device to device into a fresh torch tensor on torch's current
    stream (`feed_ndarray`)."""
    if isinstance(tensor_list, TensorListCPU):
        return torch.from_dlpack(tensor_list.as_tensor())
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    device = torch.device("cuda", dense.device_id())
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    return feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device=device))


def _source_infos(tensor_list) -> list[str]:
    return [tensor_list[i].source_info() for i in range(len(tensor_list))]


def _key_of(source_info: str) -> str:
    """`/path/shard.tar:offset:key.ext` -> key."""
    name = source_info.rsplit(":", 1)[-1]
    return name.split(".", 1)[0]
