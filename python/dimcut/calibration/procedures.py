"""The calibration procedures: stream the model over the calibration tokens, one half-layer at a
time, and compute the PCA rotations of the residual stream.

- `slicegpt` format: SliceGPT's sequential procedure (docs/algorithm.md §3): the embedding PCA,
  then per layer a PCA of the residual after attention and of the layer output, each computed on
  the signals of the already-sliced earlier layers.
- `plain` format: one Q from the summed covariances of every residual signal of the dense model.
- `streamed_forward`: the same stream without PCA (the baseline calibration is compared with).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dimcut import _hooks
from dimcut._core import DimcutError
from dimcut.architectures import Architecture, load_architecture
from dimcut.calibration.activations import (
    SPILL_PREFIX,
    ActivationStore,
    remove_dead_temporaries,
)
from dimcut.calibration.bases import CALIBRATED_BASES
from dimcut.calibration.layers import Block, LayerRunner, block_precision, embed
from dimcut.calibration.pca import Covariance, Weighting
from dimcut.calibration.resume import ResumeState
from dimcut.calibration.rotations import (
    TEMPORARY_PREFIX,
    Calibrated,
    RotationStore,
    model_fingerprint,
)
from dimcut.calibration.sensitivity import HEAD_LOGITS, streamed_fisher_sensitivities
from dimcut.calibration.text import sampled_text
from dimcut.plan import (
    PLAIN_ROTATION,
    Format,
    Method,
    RotationNames,
    Widths,
    parse_method,
    plan_rotation_names,
    plan_widths,
)
from dimcut.runtime import (
    DEFAULT_MEMORY_BUDGET,
    Precision,
    activation_budget,
    engine_budget,
    torch_device,
)
from dimcut.tokenizers import load_tokenizer

# The plain format's default, chosen by measurement (README "Better cuts at the same size").
DEFAULT_WEIGHTING = Weighting.RMS
MAX_BATCH_TOKENS = 16384  # tokens per forward: larger batches gain nothing on a CPU


@dataclass
class Timings:
    """Where calibration time goes, in seconds (CUDA work is timed as launched, not finished)."""

    read: float = 0.0  # weights read from the shards and converted to float32 (the engine)
    embed: float = 0.0
    forward: float = 0.0  # the decoder blocks themselves
    project: float = 0.0  # projections onto the kept subspace (slicegpt)
    covariance: float = 0.0
    eigh: float = 0.0
    activations: float = 0.0  # reading and writing the stored activations (disk when spilled)
    backward: float = 0.0  # the sensitivity's backward pass (recomputed forward included)
    total: float = 0.0
    tokens: int = 0

    @contextlib.contextmanager
    def measure(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, phase, getattr(self, phase) + time.perf_counter() - started)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["tokens_per_second"] = self.tokens / self.total if self.total else None
        return out


def batch_tokens(arch: Architecture, memory_budget: int) -> int:
    """Tokens per forward so that a block's float32 working set stays within an eighth of the
    memory budget (an 8B MLP holds ≈ 220 KB per token: gate, up and their product)."""
    per_token = 4 * (3 * arch.intermediate_size + 6 * arch.hidden_size)
    return int(np.clip(memory_budget // 8 // per_token, 64, MAX_BATCH_TOKENS))


@dataclass
class _Stream:
    """Everything one calibration run shares between its layers."""

    model_dir: Path
    arch: Architecture
    runner: LayerRunner
    tensors: dict
    seqlen: int
    tokens: int
    batch: int
    timings: Timings
    resume: ResumeState | None
    bar: object
    token_ids: torch.Tensor  # [sequences, seqlen]

    def batches(self, block: Block):
        """Token ranges: whole sequences for attention, any run of tokens for the MLP."""
        step = self.batch if block is Block.MLP else max(1, self.batch // self.seqlen) * self.seqlen
        for start in range(0, self.tokens, step):
            yield slice(start, min(start + step, self.tokens))

    def run_block(
        self,
        index: int,
        block: Block,
        source: ActivationStore,
        target: ActivationStore,
        covariance: Covariance | None,
        project: Projector | None = None,
        observe=None,
    ) -> None:
        """target ← x + f(x) for every token, x = P·source (`project`, or the identity),
        accumulating the covariance of the result. `observe(rows, result)` sees each batch
        before it is written, while `target` still holds those rows' previous values."""
        timings, device, width = self.timings, self.runner.device, self.arch.hidden_size
        with timings.measure("read"):
            layer = self.runner.block(index, block, self.tensors)
        with torch.inference_mode():
            for rows in self.batches(block):
                with timings.measure("activations"):
                    x = torch.from_numpy(source.read(rows)).to(device)
                if project is not None:
                    with timings.measure("project"):
                        x = project(x)
                if block is Block.ATTENTION:
                    x = x.view(-1, self.seqlen, width)
                with timings.measure("forward"):
                    residual = x + self.runner.run(layer, block, x)
                residual = residual.view(-1, width)
                if covariance is not None:
                    with timings.measure("covariance"):
                        covariance.add(residual)
                if observe is not None:
                    observe(rows, residual)
                with timings.measure("activations"):
                    target.write(rows, residual.float().cpu().numpy())
        del layer

    def dense_layers(self, stores: dict, observe=None, after_layer=None) -> None:
        """The dense forward through every decoder layer, in place in `stores["hidden-0"]`
        (through "mid"): `observe` sees each MLP batch's output (as `run_block`),
        `after_layer(index)` runs once a layer is done."""
        hidden = stores["hidden-0"]
        for index in range(self.arch.num_layers):
            self.run_block(index, Block.ATTENTION, hidden, stores["mid"], None)
            self.run_block(index, Block.MLP, stores["mid"], hidden, None, observe=observe)
            if after_layer is not None:
                after_layer(index)
            self.layer_done(index + 1, hidden)

    def layer_done(self, layers_done: int, target: ActivationStore, **state) -> None:
        """Checkpoint after a layer (when resumable), then advance the bar and the test hook."""
        if self.resume is not None:
            target.flush()
            self.resume.save(layers_done, **state)
        self.bar.update()
        _hooks.reached("calibration", layers_done)


def calibrate(
    model_dir: str | Path,
    *,
    fmt: Format | str,
    width: int,
    slice_head: bool = False,
    source: str | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 42,
    device: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dtype: Precision | str = Precision.FLOAT32,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    rotations_dir: str | Path | None = None,
    weighting: Weighting | str = DEFAULT_WEIGHTING,
    schedule: Widths | None = None,
    method: Method | str = Method.PCA,
) -> Calibrated:
    """Compute the rotations of `fmt` for slicing `model_dir` to `width` (slicegpt: or to the
    per-layer widths of `schedule`).

    Rotations are written as they are made into a `RotationStore`: in `resume_dir` when given
    (kept), else in a temporary directory inside `rotations_dir` (removed by
    `Calibrated.close()`). `weighting` applies to the plain format's one rotation, `method`
    (pca, or channels for the plain format: `bases.CALIBRATED_BASES`) makes it. With
    `resume_dir`, the state after every decoder layer is kept and a
    later call with the same arguments continues after the last completed layer; the result is
    bit-identical to an uninterrupted run.
    """
    fmt = Format.parse(fmt)
    model_dir = Path(model_dir)
    arch = load_architecture(model_dir)
    widths = schedule or plan_widths(arch, fmt, width, slice_head)
    identity = {"format": fmt.value, "width": width, "slice_head": widths.head != arch.hidden_size}
    if schedule is not None:
        identity["widths"] = schedule.as_list()
    weighting = Weighting.parse(weighting)
    method = Method.parse(parse_method(method, fmt).value, "method", CALIBRATED_BASES)
    if method is Method.CHANNELS and weighting is not Weighting.RMS:
        raise ValueError(
            f"method channels ranks the channels by their unit-RMS energy (weighting rms): "
            f"weighting {weighting.value} does not apply"
        )
    if fmt is Format.PLAIN:
        identity["weighting"] = weighting.value
    if method is not Method.PCA:  # PCA records stay as they always were
        identity["method"] = method.value
    with _open_stream(
        model_dir,
        arch,
        _Settings(
            source, nsamples, seqlen, seed, device, memory_budget, block_precision(dtype), progress
        ),
        resume_dir,
        identity,
    ) as (stream, record, stores):
        if resume_dir is not None:
            store = RotationStore(Path(resume_dir) / "rotations")
            store.directory.mkdir(exist_ok=True)
        else:
            parent = Path(rotations_dir) if rotations_dir is not None else None
            if parent is not None:
                remove_dead_temporaries(parent, TEMPORARY_PREFIX)
            store = RotationStore.create_temporary(parent)
        try:
            if fmt is Format.PLAIN:
                _calibrate_plain(stream, stores, store, weighting, method)
            else:
                _calibrate_sequential(stream, stores, store, widths)
        except BaseException:
            store.close()
            raise
        calibrated = Calibrated(store, store.eigenvalues(), record)
        calibrated.activations_on_disk = any(s.on_disk for s in stores.values())
    calibrated.timings = stream.timings.as_dict()
    if width:
        kept = widths.of_rotations(plan_rotation_names(fmt, arch.num_layers))
        record["retained_variance"] = calibrated.retained_variance(kept)
    return calibrated


def streamed_forward(
    model_dir: str | Path,
    *,
    source: str | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 42,
    device: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dtype: Precision | str = Precision.FLOAT32,
    progress: bool = True,
) -> Timings:
    """A dense forward of the calibration tokens streamed exactly as calibration streams them,
    without PCA: what calibration's extra cost is measured against (`dimcut bench`)."""
    model_dir = Path(model_dir)
    arch = load_architecture(model_dir)
    with _open_stream(
        model_dir,
        arch,
        _Settings(
            source, nsamples, seqlen, seed, device, memory_budget, block_precision(dtype), progress
        ),
        None,
        {"format": "forward"},
    ) as (stream, _record, stores):
        stream.dense_layers(stores)
    return stream.timings


def block_influence(
    model_dir: str | Path,
    *,
    source: str | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 42,
    device: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dtype: Precision | str = Precision.FLOAT32,
    progress: bool = True,
) -> tuple[list[float], dict, Timings]:
    """ShortGPT's block influence of every decoder layer of the dense model, BI_i = 1 − the
    mean over the calibration tokens of cos(x_in, x_out), x_in and x_out the residual stream
    before and after layer i (summed in float64); with the calibration record and timings.
    Streamed as calibration streams the model: the layer input is still in the store when the
    MLP's result is about to overwrite it."""
    model_dir = Path(model_dir)
    arch = load_architecture(model_dir)
    settings = _Settings(
        source, nsamples, seqlen, seed, device, memory_budget, block_precision(dtype), progress
    )
    identity = {"format": Format.PLAIN.value, "method": Method.LAYERS.value}
    influence = []
    with _open_stream(model_dir, arch, settings, None, identity) as (stream, record, stores):
        hidden = stores["hidden-0"]
        cosines = torch.zeros((), dtype=torch.float64)  # the current layer's sum

        def observe(rows: slice, output: torch.Tensor) -> None:
            before = torch.from_numpy(hidden.read(rows)).to(output.device, torch.float64)
            cosine = torch.nn.functional.cosine_similarity(before, output.double(), dim=-1)
            cosines.add_(cosine.sum().cpu())

        def layer_influence(_index: int) -> None:
            influence.append(1.0 - float(cosines) / stream.tokens)
            cosines.zero_()

        stream.dense_layers(stores, observe, layer_influence)
    return influence, record, stream.timings


def streamed_logits(
    model_dir: str | Path,
    tokens: torch.Tensor,
    consume,
    *,
    device: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dtype: Precision | str = Precision.FLOAT32,
    progress: bool = True,
) -> Timings:
    """The dense model's logits at every position of `tokens` ([sequences, seqlen]), computed as
    calibration streams the model (one half-layer resident, the residual stream float32 in the
    activation stores) and handed over a block of flat token rows at a time as
    `consume(rows, logits)`: the model is never whole in memory."""
    model_dir = Path(model_dir)
    arch = load_architecture(model_dir)
    count, seqlen = tokens.shape
    settings = _Settings(
        None, count, seqlen, 0, device, memory_budget, block_precision(dtype), progress
    )
    with _open_stream(
        model_dir,
        arch,
        settings,
        None,
        {"format": "teacher"},
        bar_steps=arch.num_layers + 1,  # and the head
        given_tokens=tokens,
    ) as (stream, _record, stores):
        stream.dense_layers(stores)
        with stream.timings.measure("read"):
            norm, head = stream.runner.final_norm_and_head(stream.tensors)
        step = max(1, HEAD_LOGITS // head.shape[0])
        with torch.inference_mode():
            for start in range(0, tokens.numel(), step):
                rows = slice(start, min(start + step, tokens.numel()))
                with stream.timings.measure("activations"):
                    x = torch.from_numpy(stores["hidden-0"].read(rows)).to(head.device)
                with stream.timings.measure("forward"):
                    logits = torch.nn.functional.linear(norm(x.to(head.dtype)), head)
                consume(rows, logits)
        stream.bar.update()
    return stream.timings


@dataclass(frozen=True)
class _Settings:
    """What to stream: the calibration text and where and how to compute."""

    source: str | None
    nsamples: int
    seqlen: int
    seed: int
    device: str
    memory_budget: int
    dtype: Precision
    progress: bool


@contextlib.contextmanager
def _open_stream(
    model_dir: Path,
    arch: Architecture,
    settings: _Settings,
    resume_dir,
    identity: dict,
    *,
    every_layer_input: bool = False,
    bar_steps: int | None = None,
    given_tokens: torch.Tensor | None = None,
):
    """Sample (or take `given_tokens`, [sequences, seqlen]) and embed the tokens, open the
    activation stores; yields (stream, record, stores).

    The stores are "hidden-0" (the embedding output) and "mid", "hidden-1" beside them when
    resumable, and "hidden-1" … "hidden-L" with `every_layer_input` (the sensitivity's
    backward reads every layer's input again). The progress bar counts layers, or
    `bar_steps`."""
    from tqdm.auto import tqdm

    from dimcut.engine import inspect_checkpoint

    seqlen, memory_budget = settings.seqlen, settings.memory_budget
    started = time.perf_counter()
    timings = Timings()
    tensors = inspect_checkpoint(model_dir)
    if given_tokens is None:
        tokenizer = load_tokenizer(model_dir)
        tokens, record = sampled_text(
            settings.source, tokenizer, settings.nsamples, seqlen, settings.seed
        )
    else:
        tokens, record = given_tokens, {}
    timings.tokens = tokens.numel()
    if settings.dtype is not Precision.FLOAT32:  # float32 records stay as they always were
        identity = {**identity, "block_dtype": settings.dtype.value}
    record = {
        **record,
        **identity,
        "hidden_size": arch.hidden_size,
        "num_layers": arch.num_layers,
        "model_fingerprint": model_fingerprint(model_dir, tensors),
    }
    resume = ResumeState(Path(resume_dir), dict(record)) if resume_dir is not None else None
    done = resume.layers_done if resume else 0
    runner = LayerRunner(
        model_dir,
        arch,
        torch_device(settings.device),
        seqlen,
        engine_budget(memory_budget),
        settings.dtype,
    )
    bar = tqdm(
        total=bar_steps or arch.num_layers,
        initial=done,
        desc=identity["format"] if bar_steps else "calibrating",
        unit="layer",
        disable=not settings.progress,
    )
    remove_dead_temporaries(Path(tempfile.gettempdir()), SPILL_PREFIX)
    names = ("hidden-0", "hidden-1", "mid") if resume else ("hidden-0", "mid")
    if every_layer_input:
        names = (*(f"hidden-{i}" for i in range(arch.num_layers + 1)), "mid")
    if done:
        _check_resumable(resume, tokens.numel() * arch.hidden_size * 4)
    budget = activation_budget(memory_budget) // len(names)
    stores: dict[str, ActivationStore] = {}
    try:
        with tempfile.TemporaryDirectory(prefix=f"{SPILL_PREFIX}{os.getpid()}-") as spill:
            for name in names:
                path = resume.activation_file(name) if resume else None
                stores[name] = ActivationStore(
                    tokens.numel(), arch.hidden_size, budget, Path(spill), path
                )
            stream = _Stream(
                model_dir,
                arch,
                runner,
                tensors,
                seqlen,
                tokens.numel(),
                batch_tokens(arch, memory_budget),
                timings,
                resume,
                bar,
                tokens,
            )
            if done == 0:
                with timings.measure("embed"):
                    flat = tokens.view(-1)
                    for rows in stream.batches(Block.MLP):
                        stores["hidden-0"].write(
                            rows, embed(model_dir, flat[rows], tensors).numpy()
                        )
            yield stream, record, stores
    finally:
        for store in stores.values():
            store.close()
        bar.close()
        timings.total = time.perf_counter() - started


def _check_resumable(resume: ResumeState, nbytes: int) -> None:
    current = resume.activation_file(f"hidden-{resume.layers_done % 2}")
    if not current.is_file() or current.stat().st_size != nbytes:
        raise DimcutError(
            f"{resume.directory}: the activations of layer {resume.layers_done} are missing "
            "or damaged; delete the directory to start over"
        )


def _hidden(stores: dict[str, ActivationStore], index: int) -> tuple[ActivationStore, ...]:
    """(source, target) of layer `index`: alternating files when resumable, else one store."""
    if "hidden-1" in stores:
        return stores[f"hidden-{index % 2}"], stores[f"hidden-{(index + 1) % 2}"]
    return stores["hidden-0"], stores["hidden-0"]


def _dense_signals(stream: _Stream, stores: dict, make, layer_state=dict):
    """The dense model's residual signals in order — the embedding output (unless resuming),
    then each layer's attention and MLP outputs — as (rotation name, covariance) pairs. After
    each layer the stream is checkpointed with `layer_state()`."""
    arch = stream.arch
    names = RotationNames.per_layer(arch.num_layers)
    done = stream.resume.layers_done if stream.resume else 0
    if done == 0:
        embedding = make()
        _accumulate(stream, stores["hidden-0"], embedding)
        yield names.embedding, embedding
    for index in range(done, arch.num_layers):
        source, target = _hidden(stores, index)
        for block, read, write, name in (
            (Block.ATTENTION, source, stores["mid"], names.mid[index]),
            (Block.MLP, stores["mid"], target, names.out[index]),
        ):
            covariance = make()
            stream.run_block(index, block, read, write, covariance)
            yield name, covariance
        stream.layer_done(index + 1, target, **layer_state())


def _calibrate_plain(
    stream: _Stream, stores: dict, store: RotationStore, weighting: Weighting, method: Method
) -> None:
    """Dense forward; one covariance summed over the embedding output and every residual,
    each signal weighted as `weighting` says; the basis made from it as `method` says."""
    arch, timings, device = stream.arch, stream.timings, stream.runner.device
    total = Covariance(arch.hidden_size, device)

    def signal() -> Covariance:
        return Covariance(arch.hidden_size, device, unit_rms=weighting is Weighting.RMS)

    if stream.resume and stream.resume.layers_done:
        total.matrix = torch.from_numpy(stream.resume.covariance()).to(total.matrix)
    for _name, covariance in _dense_signals(
        stream, stores, signal, lambda: {"covariance": total.matrix.cpu().numpy()}
    ):
        total.add_signal(covariance, weighting)
    with timings.measure("eigh"):
        q, values = CALIBRATED_BASES[method](total)
    store.put(PLAIN_ROTATION, q, values, arch.hidden_size)


def signal_spectra(
    model_dir: str | Path,
    *,
    source: str | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 42,
    device: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dtype: Precision | str = Precision.FLOAT32,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """The eigenvalues (descending) of every residual signal's covariance in the dense model,
    by rotation name: what a per-layer width schedule is allocated from. Each token is scaled
    to unit RMS first, as the norm-fed readers see it: raw energies are dominated by a few
    massive-activation directions (measured on SmolLM2: an equal-raw-energy schedule cut the
    middle layers to 112 of 576 and was 1.5× worse than uniform)."""
    model_dir = Path(model_dir)
    arch = load_architecture(model_dir)
    settings = _Settings(
        source, nsamples, seqlen, seed, device, memory_budget, block_precision(dtype), progress
    )
    spectra = {}
    for name, covariance, _device in _unit_rms_signals(model_dir, arch, settings, "spectra"):
        spectra[name] = covariance.spectrum()
    return spectra


def _unit_rms_signals(model_dir: Path, arch: Architecture, settings: _Settings, what: str):
    """(rotation name, unit-RMS covariance, device) of every residual signal of the dense model."""
    with _open_stream(model_dir, arch, settings, None, {"format": what}) as opened:
        stream, _record, stores = opened
        make = functools.partial(Covariance, arch.hidden_size, stream.runner.device, unit_rms=True)
        for name, covariance in _dense_signals(stream, stores, make):
            with stream.timings.measure("eigh"):
                yield name, covariance, stream.runner.device


# Sequences of the calibration sample the sensitivity's backward pass runs over (measured on
# SmolLM2: 8 × 512 tokens give the schedule of the 61 point-by-point evaluations).
SENSITIVITY_SAMPLES = 8


@dataclass(frozen=True)
class SignalSensitivities:
    spectra: dict[str, np.ndarray]  # unit-RMS eigenvalues, descending (as `signal_spectra`)
    sensitivity: dict[str, float]  # estimated loss increase per token of cutting to `width`
    timings: dict  # the sensitivity pass's (`Timings.as_dict`)


def signal_sensitivities(
    model_dir: str | Path,
    width: int,
    *,
    source: str | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 42,
    device: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dtype: Precision | str = Precision.FLOAT32,
    progress: bool = True,
) -> SignalSensitivities:
    """Every residual signal's spectrum (as `signal_spectra`) and the loss sensitivity of
    cutting it to `width` alone (`sensitivity.streamed_fisher_sensitivities` on the first
    `SENSITIVITY_SAMPLES` calibration sequences, streamed one layer at a time)."""
    model_dir = Path(model_dir)
    arch = load_architecture(model_dir)
    dtype = block_precision(dtype)
    settings = _Settings(source, nsamples, seqlen, seed, device, memory_budget, dtype, progress)
    spectra = {}
    kept = RotationStore.create_temporary()  # each point's kept axes, on disk until needed
    try:
        signals = _unit_rms_signals(model_dir, arch, settings, "sensitivity")
        for name, covariance, _device in signals:
            axes, spectra[name] = covariance.principal_axes(name)
            kept.put(name, axes, spectra[name], width)
        fewer = replace(settings, nsamples=min(nsamples, SENSITIVITY_SAMPLES))
        sensitivity, timings = _fisher_sensitivities(model_dir, arch, fewer, kept)
    finally:
        kept.close()
    return SignalSensitivities(spectra, sensitivity, timings.as_dict())


def fisher_sensitivities(
    model_dir: str | Path,
    kept: dict[str, np.ndarray],
    *,
    source: str | None = None,
    nsamples: int = SENSITIVITY_SAMPLES,
    seqlen: int = 2048,
    seed: int = 42,
    device: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dtype: Precision | str = Precision.FLOAT32,
    progress: bool = True,
) -> tuple[dict[str, float], Timings]:
    """Per residual point (rotation name → its kept axes, D × d), the mean over the predicted
    calibration tokens of ½ (g · δ)², g the loss gradient there and δ the part of the residual
    outside the kept axes; streamed one layer at a time (`sensitivity`)."""
    model_dir = Path(model_dir)
    settings = _Settings(
        source, nsamples, seqlen, seed, device, memory_budget, block_precision(dtype), progress
    )
    return _fisher_sensitivities(model_dir, load_architecture(model_dir), settings, kept)


def _fisher_sensitivities(
    model_dir: Path, arch: Architecture, settings: _Settings, kept: Mapping[str, np.ndarray]
) -> tuple[dict[str, float], Timings]:
    with _open_stream(
        model_dir,
        arch,
        settings,
        None,
        {"format": "sensitivity"},
        every_layer_input=True,
        bar_steps=2 * arch.num_layers + 1,  # the forward, the head, the backward
    ) as (stream, _record, stores):
        inputs = [stores[f"hidden-{i}"] for i in range(arch.num_layers + 1)]
        sensitivity = streamed_fisher_sensitivities(
            stream, inputs, stores["mid"], stream.token_ids, kept
        )
    return sensitivity, stream.timings


def _accumulate(stream: _Stream, store: ActivationStore, covariance: Covariance) -> None:
    for rows in stream.batches(Block.MLP):
        with stream.timings.measure("covariance"):
            covariance.add(torch.from_numpy(store.read(rows)))


def _calibrate_sequential(stream: _Stream, stores: dict, store: RotationStore, widths: Widths):
    """SliceGPT (docs/algorithm.md §3): each PCA sees signals of the already-sliced earlier layers.

    The stores hold full-width signals in the original basis. A block reads them as the sliced
    model carries them, projected onto the kept directions of the incoming rotation, and writes
    the full-width residual while accumulating its covariance: one pass per block.
    """
    arch, timings, device = stream.arch, stream.timings, stream.runner.device
    names = RotationNames.per_layer(arch.num_layers)
    done = stream.resume.layers_done if stream.resume else 0
    full = arch.hidden_size

    def pca(name: str, covariance: Covariance, keep: int) -> tuple[np.ndarray, float]:
        """Store the rotation; return the whole Q and the fraction of energy kept."""
        with timings.measure("eigh"):
            q, values = covariance.principal_axes(f"signal {name}")
        store.put(name, q, values, keep)
        return q, float(values[:keep].sum() / values.sum()) if values.sum() > 0 else 1.0

    if done == 0:
        embedding = Covariance(full, device)
        _accumulate(stream, stores["hidden-0"], embedding)
        q, _ = pca(names.embedding, embedding, widths.embedding)
    else:
        q = stream.resume.rotation()  # whole, so the projection is computed as it was
    for index in range(done, arch.num_layers):
        source, target = _hidden(stores, index)
        covariance = Covariance(full, device)
        project = _projector(q, widths.layer_input(index), device)
        stream.run_block(index, Block.ATTENTION, source, stores["mid"], covariance, project)
        q, kept_mid = pca(names.mid[index], covariance, widths.mid[index])
        covariance = Covariance(full, device)
        project = _projector(q, widths.mid[index], device)
        stream.run_block(index, Block.MLP, stores["mid"], target, covariance, project)
        q, kept_out = pca(names.out[index], covariance, widths.out[index])
        stream.bar.set_postfix_str(f"variance kept {kept_mid:.4f} / {kept_out:.4f}")
        stream.layer_done(index + 1, target, rotation=q)


class Projector:
    """x ↦ P·x with P = Q_k Q_kᵀ, the projection onto a rotation's first k directions.

    With the whole Q at hand and fewer cut directions than kept ones, P·x = x − Q_⊥ Q_⊥ᵀ x with
    Q_⊥ = Q[:, k:] costs 4·D·(D − k) flops per token instead of 4·D·k (3× less at s = 0.25).
    """

    def __init__(self, q: np.ndarray, keep: int, device: torch.device):
        self.complement = q.shape[1] > keep and q.shape[0] - keep < keep
        columns = q[:, keep:] if self.complement else q[:, :keep]
        self.basis = torch.tensor(np.asarray(columns), dtype=torch.float32, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.complement:
            return x - (x @ self.basis) @ self.basis.T
        return (x @ self.basis) @ self.basis.T


def _projector(q: np.ndarray, keep: int, device: torch.device) -> Projector | None:
    """The projection onto Q's first `keep` directions, or None when nothing is cut."""
    return None if keep == q.shape[0] else Projector(q, keep, device)
