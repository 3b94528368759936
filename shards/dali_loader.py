"""The DALI loader: one `@pipeline_def` for every dataset's modalities, with missing-modality masks fused in.

Per sample, the loader decides on the host which modalities are present (natural missingness from the
members the index lists, then the training augmentation or the evaluation scenario: `shards.masks`, the
same functions as the torch loader's) and the pipeline only decodes those: a dropped modality takes the
`else` branch, which yields zeros, and its bytes are not even read. With a GPU, JPEGs are decoded by nvJPEG
(`mixed`, with libjpeg-turbo's chroma upsampling so that GPU and CPU frames agree) and the spectrogram, mel
filter bank and decibels run on the GPU; without one (`device_id=None`) everything runs on the CPU. Stored
spectrograms (FLOAT), stored log-mel (FLOAT16) and token ids (INT32) arrive as typed members whose first
128 bytes (the .npy header) are sliced off. The pipeline function calls one helper per modality
(`clip_frames`, `waveform_log_mel`, `stored_spectrogram`, `token_ids`), each with its `if use:` / `else:`
branch.

Reading. The pipeline's input is an external source (`SampleFeed`) that reads each sample's members by the
offsets in the `.idx` files (`shards.members.ShardFiles`, one descriptor per tar, `os.pread`), batch by
batch in the order the loader sets for the epoch, and raises StopIteration at the epoch's end. In training
that order is the worker's strided slice of one permutation of the whole split fixed by (seed, epoch)
(`WorkerPart.positions`); in evaluation the worker's contiguous part. So the pipeline is built once per
loader and serves every epoch (a build costs 1 to 6 s on a 16-core GPU host), an epoch reads exactly its
batches (nothing is decoded past its end), a fresh loader at epoch e reproduces epoch e, and a resume at
any global position, on any number of workers, goes on with the samples not yet seen, each once. DALI's
own reader (`fn.readers.webdataset`) cannot do the last two: its shards are contiguous per worker, its
shuffle is a buffer of a few shards, and its checkpoint needs the identical pipeline.

Frames. In training the crop window and the flip of each sample come from the host (`shards.features.
training_window`, seeded by key, seed and epoch: the torch loader's window for the same sample), on the
recorded frame size; `fn.decoders.image_slice` decodes only that window of every frame (libjpeg-turbo /
nvJPEG ROI decoding), and the windows, all of one size, are stacked and resized to the crop by one operator.
Evaluation decodes whole frames and resizes their short side: the centre crop of an antialiased resize
needs pixels outside the crop window, and its output stays the one the parity test pins against the torch
loader. The frame-size check reads the JPEG headers (`fn.peek_image_shape`). `num_threads` = the workers
asked for, capped at the cores, and `prefetch_queue_depth` 2 (1 cost the same CPU per sample on 2 cores, 3
more). CPU outputs become torch tensors without a copy (DLPack views of the dynamic executor's buffers,
which it never reuses); the CPU spectrogram is computed time-major (`layout="tf"`, then one transpose),
about 0.3 CPU-ms less per 10 s clip than frequency-major."""
from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.backend import TensorListCPU
from PIL import Image

from shards.batches import EpochLoader, LoaderOptions, WorkerPart, assemble_batch, present_flags
from shards.features import DB_OFFSET, DB_SCALE, ModalityParams, crop_rng, modality_params, training_window
from shards.format import MODALITIES, NPY_HEADER_BYTES, DatasetInfo, frame_member
from shards.masks import DropSpec
from shards.members import ShardFiles, check_member
from shards.sample_refs import FrameSizeError, SampleRef

PREFETCH_DEPTH = 2  # batches DALI prepares ahead (prefetch_queue_depth): 1 and 2 cost the same CPU, 3 more (2 cores)
STORED_DTYPES = {"float32": (types.FLOAT, np.float32), "float16": (types.FLOAT16, np.float16)}  # spectrogram / log-mel


class DecodeFailure(RuntimeError):
    """A shard member that no longer decodes, or decodes to another frame size than the build recorded;
    names the shard file, the sample key and the member."""


@dataclass(frozen=True)
class FeedLayout:
    """What the external source yields per sample, in order: the members `exts` (with their DALI and numpy
    types), the use flags [M] and, for training frames, the crop window's anchor (y, x), shape (h, w) and
    the flip."""

    exts: list[str]
    ext_modalities: list[str]  # the modality each member belongs to
    dali_types: list[types.DALIDataType]
    np_types: list[type]
    window: bool  # training frames: anchor, shape, mirror follow the flags

    @classmethod
    def of(cls, params: ModalityParams, train: bool) -> FeedLayout:
        exts, owners, dali_types, np_types = [], [], [], []
        if params.visual is not None:
            exts += [frame_member(i) for i in range(params.visual.frames)]
            owners += ["visual"] * params.visual.frames
            dali_types += [types.UINT8] * params.visual.frames
            np_types += [np.uint8] * params.visual.frames
        if params.audio is not None or params.spectrogram is not None:
            exts.append(params.audio_member)
            owners.append("audio")
            dali, numpy = (types.UINT8, np.uint8) if params.spectrogram is None else STORED_DTYPES[params.spectrogram.dtype]
            dali_types.append(dali)
            np_types.append(numpy)
        if params.text is not None:
            exts.append(params.text.member)
            owners.append("text")
            dali_types.append(types.INT32)
            np_types.append(np.int32)
        return cls(exts, owners, dali_types, np_types, train and params.visual is not None)

    def source_types(self) -> list[types.DALIDataType]:
        return [*self.dali_types, types.BOOL, *([types.FLOAT, types.FLOAT, types.INT32] if self.window else [])]

    def source_ndims(self) -> list[int]:
        return [1] * len(self.exts) + [1] + ([1, 1, 0] if self.window else [])


@pipeline_def(enable_conditionals=True)
def multimodal_pipeline(feed: SampleFeed, layout: FeedLayout, modalities: list[str], params: ModalityParams,
                        gpu: bool, train: bool):
    """Per sample, in this order, each output only for a modality of the dataset: frames [T, 3, H, W];
    audio [1, n_mels, n_frames] (log-mel of the waveform, or a stored spectrogram or log-mel); token ids [L];
    last, for a dataset with frames, the frames' shapes [T, 3] (H, W, C from the JPEG headers; zeros when not
    decoded), checked against the recorded sizes after each run."""
    visual, audio, spec, text = params.visual, params.audio, params.spectrogram, params.text
    columns = list(fn.external_source(source=feed, num_outputs=len(layout.source_types()), batch=True,
                                      cycle="raise", dtype=layout.source_types(), ndim=layout.source_ndims()))
    members = columns[:len(layout.exts)]
    flags = columns[len(layout.exts)]
    window = columns[len(layout.exts) + 1:] if layout.window else None
    use = {m: flags[i] for i, m in enumerate(modalities)}
    jpegs = [members.pop(0) for _ in range(visual.frames)] if visual is not None else []
    sound = members.pop(0) if audio is not None or spec is not None else None
    ids = members.pop(0) if text is not None else None

    outputs = []
    if visual is not None:
        frames, frame_shapes = clip_frames(jpegs, use["visual"], params, gpu, window)
        outputs.append(frames)
    if audio is not None:
        outputs.append(waveform_log_mel(sound, use["audio"], params, gpu))
    elif spec is not None:
        outputs.append(stored_spectrogram(sound, use["audio"], params, gpu))
    if text is not None:
        outputs.append(token_ids(ids, use["text"], params))
    return (*outputs, *([frame_shapes] if visual is not None else []))


def clip_frames(jpegs: list, use, params: ModalityParams, gpu: bool, window: list | None) -> tuple:
    """Frames [T, 3, crop, crop] (normalised) and their JPEG header shapes [T, 3]. Training (`window`: anchor,
    shape and flip from the host) decodes only that window of every frame and resizes it to the crop;
    evaluation decodes whole frames, resizes the short side to the crop and centre-crops."""
    visual = params.visual
    if use:
        shapes = [fn.peek_image_shape(j) for j in jpegs]
        frame_shapes = fn.stack(*shapes)
        device = "mixed" if gpu else "cpu"
        # nvJPEG upsamples chroma by replication unless asked to interpolate as libjpeg-turbo does: without this
        # the GPU frames differ from the CPU ones by up to 3 normalised units at colour edges (measured on an
        # H200), a shift between a model trained on one device and evaluated on the other
        upsampling = {"jpeg_fancy_upsampling": True} if gpu else {}
        if window is not None:
            anchor, shape, mirror = window
            decoded = [fn.decoders.image_slice(j, anchor, shape, axis_names="HW", normalized_anchor=False,
                                               normalized_shape=False, device=device, output_type=types.RGB,
                                               **upsampling) for j in jpegs]
            # the windows share one size: stacked, they are resized by one operator (fewer operators than one
            # resize per frame, and 3-4% less CPU for the frames in a steady run)
            clip = fn.resize(fn.stack(*decoded, axis_name="F"), size=[visual.crop, visual.crop], antialias=True)
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


class SampleFeed:
    """The pipeline's external source: the batches of one pass (`load`), each sample's members read by
    offset, an empty member for a modality it does not use, its use flags and, for training frames, its
    crop window and flip. Every batch handed to DALI is queued (`in_flight`) with its samples, labels and
    flags until the loader takes its outputs, in the same order."""

    def __init__(self, info: DatasetInfo, refs: list[SampleRef], params: ModalityParams, layout: FeedLayout,
                 train: bool, augment: DropSpec | None, eval_keep: np.ndarray | None, seed: int,
                 options: LoaderOptions) -> None:
        self.info, self.refs, self.params, self.layout = info, refs, params, layout
        self.train, self.augment, self.eval_keep, self.seed, self.options = train, augment, eval_keep, seed, options
        self.modalities = list(info.modalities)
        self.label_dtype = np.float32 if info.multilabel else np.int64
        self.files = ShardFiles()
        self.pending: deque[np.ndarray] = deque()  # split indices of the batches still to hand to DALI
        self.in_flight: deque[tuple[list[SampleRef], np.ndarray, np.ndarray]] = deque()  # (refs, use, labels)
        self.epoch = 0

    def load(self, indices: np.ndarray, batch_size: int, epoch: int) -> None:
        """The next pass: these split indices, in this order, in batches (the last one may be short)."""
        self.pending = deque(indices[i:i + batch_size] for i in range(0, len(indices), batch_size))
        self.in_flight.clear()
        self.epoch = epoch

    def __iter__(self) -> SampleFeed:
        return self

    def __next__(self) -> list[list[np.ndarray]]:
        if not self.pending:
            raise StopIteration
        indices = self.pending.popleft()
        batch = [self.refs[i] for i in indices.tolist()]
        use = present_flags(self.refs, indices, self.params, self.modalities, train=self.train,
                            augment=self.augment, eval_keep=self.eval_keep, seed=self.seed, epoch=self.epoch)
        columns: list[list[np.ndarray]] = [[] for _ in self.layout.source_types()]
        labels = []
        for ref, flags in zip(batch, use):
            used = dict(zip(self.modalities, flags.tolist()))
            try:  # a tar cut short, or (without a recorded frame size) a first frame whose header does not parse
                for c, (ext, owner, dtype) in enumerate(zip(self.layout.exts, self.layout.ext_modalities,
                                                            self.layout.np_types)):
                    data = self.files.read(ref, ext) if used[owner] else b""
                    columns[c].append(np.frombuffer(data, dtype=dtype))
                if self.layout.window:
                    window = self._window(ref, used["visual"], columns[0][-1])
                labels.append(np.frombuffer(self.files.read(ref, "label.npy"), self.label_dtype,
                                            offset=NPY_HEADER_BYTES))
            except (OSError, ValueError) as err:
                raise DecodeFailure(f"shard {ref.tar}: sample {ref.key} cannot be read ({err}); run `pipeline "
                                    f"verify` and rebuild that shard") from err
            columns[len(self.layout.exts)].append(flags)
            if self.layout.window:
                for c, value in enumerate(window, start=len(self.layout.exts) + 1):
                    columns[c].append(value)
        self.in_flight.append((batch, use, np.stack(labels)))
        return columns

    def _window(self, ref: SampleRef, used: bool, first_jpeg: np.ndarray) -> tuple[np.ndarray, ...]:
        """The training crop of `ref`'s frames: anchor (y, x) and shape (h, w) in pixels, and the flip."""
        if not used:
            return np.zeros(2, np.float32), np.ones(2, np.float32), np.array(0, np.int32)
        if ref.frame_size is not None:
            h, w = ref.frame_size
        else:
            w, h = Image.open(io.BytesIO(first_jpeg.tobytes())).size  # the JPEG header only
        (x0, y0, x1, y1), mirror = training_window(w, h, crop_rng(ref.key, self.seed, self.epoch),
                                                   self.options.min_crop_area, self.options.flip)
        return (np.array([y0, x0], np.float32), np.array([y1 - y0, x1 - x0], np.float32),
                np.array(int(mirror), np.int32))


class DaliLoader(EpochLoader):
    """Iterates batches of one worker's part of a split, as dicts of torch tensors (see DESIGN.md)."""

    def __init__(self, info: DatasetInfo, refs: list[SampleRef], batch_size: int, *, train: bool,
                 augment: DropSpec | None, eval_keep: np.ndarray | None, part: WorkerPart,
                 options: LoaderOptions) -> None:
        super().__init__(len(refs), batch_size, train, part, options)
        self.info = info
        self.gpu = options.gpu
        self.modalities = list(info.modalities)
        self._params = modality_params(info, options.crop)
        self._layout = FeedLayout.of(self._params, train)
        self._outputs = [m for m in MODALITIES if m in self.modalities]
        self.feed = SampleFeed(info, refs, self._params, self._layout, train, augment, eval_keep, part.seed, options)
        self._num_threads = max(1, min(options.workers, len(os.sched_getaffinity(0))))  # more than cores: no faster
        self._device_id = (options.device_id or 0) if self.gpu else None
        self._pipe: Pipeline | None = None
        self._ended = False  # the pipe's last pass ran to its StopIteration: it serves the next after a reset

    def make_pipeline(self) -> Pipeline:
        """The (unbuilt) pipeline of this loader. Defining its graph needs no device, so a machine without a GPU
        can check the GPU graph (`make_pipeline()._build_graph()`): devices and layouts."""
        return multimodal_pipeline(
            feed=self.feed, layout=self._layout, modalities=self.modalities, params=self._params, gpu=self.gpu,
            train=self.train, batch_size=self.batch_size, num_threads=self._num_threads, device_id=self._device_id,
            seed=self.part.seed % 2**31, prefetch_queue_depth=PREFETCH_DEPTH, exec_dynamic=True)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if not self._ended:
            self._pipe = None

    def _epoch_batches(self) -> Iterator[dict]:
        self.feed.load(self.indices()[self.batches_done * self.batch_size:], self.batch_size, self.epoch)
        if self._pipe is not None and self._ended:
            self._pipe.reset()  # the last pass ended at its StopIteration: the source starts the loaded one
        else:
            self._pipe = self.make_pipeline()
            self._pipe.build()
        self._ended = False
        while True:
            try:
                outs = list(self._pipe.run())
            except StopIteration:
                self._ended = True
                return
            except DecodeFailure:  # the source could not read a sample: it names it
                self._pipe = None
                raise
            except RuntimeError as exc:
                self._pipe = None
                raise DecodeFailure(self._locate_failure(exc)) from exc
            refs, use, labels = self.feed.in_flight.popleft()
            frame_shapes = outs.pop() if "visual" in self._outputs else None
            if frame_shapes is not None:
                self._check_frame_sizes(frame_shapes, refs)
            batch = assemble_batch({m: _to_torch(t) for m, t in zip(self._outputs, outs)}, use,
                                   labels if self.info.multilabel else labels[:, 0], [r.key for r in refs],
                                   self.info.multilabel)
            if not self.feed.pending and not self.feed.in_flight:  # the pass's last batch: let DALI see its end
                try:
                    self._pipe.run()
                    raise RuntimeError("the DALI pipeline returned a batch past the end of the pass")
                except StopIteration:
                    self._ended = True
            yield batch

    def _check_frame_sizes(self, shapes, refs: list[SampleRef]) -> None:
        """Raise DecodeFailure naming the first frame of the batch whose decoded (height, width) is not the one
        recorded for its sample (frames not decoded have shape zeros and are not checked)."""
        got = _as_numpy(shapes)[:, :, :2]
        recorded = np.array([ref.frame_size or (0, 0) for ref in refs], np.int64)
        bad = (got != recorded[:, None]).any(axis=2) & (got[:, :, 0] > 0) & (recorded[:, None, 0] > 0)
        if bad.any():
            i, t = np.argwhere(bad)[0]
            ref = refs[i]
            raise DecodeFailure(f"shard {ref.tar}: sample {ref.key} "
                                f"{FrameSizeError(frame_member(t), tuple(got[i, t].tolist()), ref.frame_size)}; "
                                f"run `pipeline verify` and rebuild that shard")

    def _locate_failure(self, exc: Exception) -> str:
        """Name the shard, key and member that does not decode, or decodes to another frame size than recorded
        (DALI stops the whole pipeline, e.g. when one sample's frames cannot be stacked): the culprit is in one
        of the batches handed to DALI and not yet returned."""
        for refs, _, _ in self.feed.in_flight:
            for ref in refs:
                for ext in ref.members:
                    try:
                        got = check_member(ext, self.feed.files.read(ref, ext))
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
