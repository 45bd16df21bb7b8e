"""Calibration: sample text, stream the model layer by layer, and compute PCA rotations.

Only one decoder layer's weights are resident at a time (read from the safetensors shards
through the engine, which also applies the rotations so there is one implementation of that
math). Activations of all calibration tokens live in an `ActivationStore`: RAM below the memory
budget, a disk-backed array above it.

- `slicegpt` format: SliceGPT's sequential procedure (docs/slicegpt.md §3): the embedding PCA,
  then per layer a PCA of the residual after attention and of the layer output, each computed on
  signals of the already-sliced earlier layers.
- `plain` format: one Q from the summed covariances of every residual signal of the dense model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dimcut._core import DimcutError
from dimcut.architectures import EMBEDDING, Architecture, load_architecture
from dimcut.plan import (
    LAYER_PARTS,
    PLAIN_ROTATION,
    RotationNames,
    Widths,
    layer_op_groups,
    unrotated,
)

BUILTIN_SOURCE = "builtin"
BUILTIN_CORPUS = Path(__file__).parent / "data" / "calibration.txt.gz"
BATCH_TOKENS = 16384  # tokens per layer forward: bounds attention and MLP working memory


@dataclass
class Calibrated:
    """Rotations (D×D float64, by plan name), their eigenvalues, and what produced them."""

    rotations: dict[str, np.ndarray]
    eigenvalues: dict[str, np.ndarray]
    record: dict = field(default_factory=dict)

    def retained_variance(self, width: int) -> dict[str, float]:
        """Per rotation, the fraction of the signal's energy kept by the first `width` directions."""
        return {
            name: float(e[:width].sum() / e.sum())
            for name, e in self.eigenvalues.items()
            if e.sum() > 0
        }


# -- calibration text ---------------------------------------------------------------------------


def calibration_documents(source: str | None) -> tuple[list[str], str]:
    """Documents of a calibration source and a canonical name for the record."""
    from dimcut import data_sources

    if source in (None, BUILTIN_SOURCE):
        import gzip

        text = gzip.decompress(BUILTIN_CORPUS.read_bytes()).decode("utf-8")
        return data_sources.split_raw_text(text), BUILTIN_SOURCE
    return data_sources.load_documents(source, split="train"), data_sources.source_key(
        source, "train"
    )


def sample_sequences(
    tokenizer, documents: list[str], nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """SliceGPT's sampling: from a seeded random document, join documents with "\\n\\n" until
    `seqlen` tokens, truncate; repeat `nsamples` times. Wraps around the end of the corpus."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"--nsamples must be ≥ 1 and --seqlen ≥ 2 (got {nsamples}, {seqlen})")
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError("the calibration text is empty")
    rng = random.Random(seed)
    samples = []
    for _ in range(nsamples):
        start = rng.randrange(len(documents))
        count = 1
        while True:
            window = (documents[(start + i) % len(documents)] for i in range(count))
            ids = tokenizer("\n\n".join(window), add_special_tokens=True)["input_ids"]
            if len(ids) >= seqlen:
                break
            if count == len(documents):
                raise ValueError(
                    f"the calibration text has {len(ids)} tokens, shorter than one sequence of "
                    f"--seqlen {seqlen}"
                )
            # Grow geometrically towards the estimated need, so long sequences cost O(n).
            count = min(len(documents), max(count + 1, int(count * 1.2 * seqlen / len(ids)) + 1))
        samples.append(ids[:seqlen])
    return torch.tensor(samples, dtype=torch.long)


# -- activations --------------------------------------------------------------------------------


class ActivationStore:
    """A float32 [N, L, width] array in RAM, or memory-mapped on disk when over budget.

    With `path` (resumable calibration) it always lives in that file, reopened when it exists.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        budget_bytes: int,
        spill_dir: Path,
        path: Path | None = None,
    ):
        nbytes = int(np.prod(shape)) * 4
        if path is not None:
            reopen = path.is_file() and path.stat().st_size == nbytes
            mode = "r+" if reopen else "w+"
            self.array = np.memmap(path, dtype=np.float32, mode=mode, shape=shape)
        elif nbytes <= budget_bytes:
            self.array = np.empty(shape, dtype=np.float32)
        else:
            descriptor, spill = tempfile.mkstemp(dir=spill_dir, suffix=".f32")
            os.close(descriptor)  # np.memmap opens the file itself
            self.array = np.memmap(spill, dtype=np.float32, mode="w+", shape=shape)
        self.on_disk = isinstance(self.array, np.memmap)

    def flush(self) -> None:
        if isinstance(self.array, np.memmap):
            self.array.flush()

    def batches(self, sequences_per_batch: int):
        for start in range(0, self.array.shape[0], sequences_per_batch):
            yield slice(start, start + sequences_per_batch)


class Covariance:
    """H = Σ x xᵀ over tokens in float64 (uncentred), accumulated as one flattened GEMM."""

    def __init__(self, width: int):
        self.matrix = torch.zeros(width, width, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.matrix += (flat.T @ flat).cpu()

    def principal_axes(self, what: str = "a signal") -> tuple[np.ndarray, np.ndarray]:
        """Eigenvectors sorted by descending eigenvalue (eigh returns ascending)."""
        if not torch.isfinite(self.matrix).all():
            raise DimcutError(
                f"calibration: {what} has NaN or Inf activations; the model's weights or the "
                "calibration text overflow (check the checkpoint for non-finite weights)"
            )
        values, vectors = _eigh(self.matrix)
        return vectors.flip(-1).numpy(), values.flip(-1).clamp_min(0).numpy()


# Below this width a multi-threaded eigh spends its time in thread barriers: on a busy machine
# it measured 50× slower than one thread (SmolLM2's 576-wide covariances: 2.5 s vs 0.05 s).
SINGLE_THREAD_EIGH_WIDTH = 2048


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if matrix.shape[0] > SINGLE_THREAD_EIGH_WIDTH or matrix.is_cuda:
        return torch.linalg.eigh(matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix)
    finally:
        torch.set_num_threads(threads)


# -- streaming the model ------------------------------------------------------------------------


class LayerRunner:
    """Builds one stock decoder layer of the family at a time and runs its parts on a device."""

    def __init__(self, model_dir: Path, arch: Architecture, device: torch.device, seqlen: int):
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        self.model_dir = model_dir
        self.arch = arch
        self.device = device
        self.config = AutoConfig.for_model(**arch.config)
        self.config._attn_implementation = "sdpa"
        base_class = getattr(transformers, MODEL_MAPPING_NAMES[arch.model_type])
        with torch.device("meta"):
            skeleton = base_class(self.config)
        self.layer_class = type(skeleton.layers[0])
        rotary = type(skeleton.rotary_emb)(config=self.config).to(device)
        positions = torch.arange(seqlen, device=device)[None]
        probe = torch.zeros(1, seqlen, 1, device=device)
        self.position_embeddings = rotary(probe, positions)

    def layer(self, index: int, weights: dict[str, np.ndarray], widths: tuple[int, int, int]):
        from dimcut.modeling_dimcut import layer_linear_shapes, slice_decoder_layer

        with torch.device("meta"):
            layer = self.layer_class(self.config, index)
        slice_decoder_layer(
            layer,
            layer_linear_shapes(layer, *widths),
            self.arch.hidden_size,
            self.arch.rms_norm_eps,
            {"attn": None, "mlp": None},
        )
        prefix = f"model.layers.{index}."
        state = {k.removeprefix(prefix): torch.from_numpy(v) for k, v in weights.items()}
        # Parts a calibration stage does not run are left allocated but unset.
        layer = layer.to_empty(device=self.device)
        unexpected = layer.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise DimcutError(f"layer {index}: unexpected tensors {unexpected}")
        return layer.eval()

    def attention(self, layer, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.position_embeddings
        batch = x.shape[0]
        out, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(x),
            position_embeddings=(cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)),
            attention_mask=None,  # full-length sequences: SDPA applies the causal mask
        )
        return out

    def mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.mlp(layer.post_attention_layernorm(x))


def _layer_weights(model_dir: Path, ops: list[dict], arrays: dict) -> dict[str, np.ndarray]:
    from dimcut.engine import rewrite_tensors

    weights = rewrite_tensors(model_dir, [{**op, "dtype": "F32"} for op in ops], arrays)
    for op in ops:
        if not np.isfinite(weights[op["name"]]).all():
            source = op.get("source") or op["name"]
            raise DimcutError(
                f"{model_dir}: tensor {source!r} (or the norm scaling it) contains NaN or Inf; "
                "dimcut refuses non-finite weights"
            )
    return weights


def _embed(model_dir: Path, tokens: torch.Tensor, tensors: dict) -> torch.Tensor:
    from safetensors import safe_open

    _dtype, _shape, file = tensors[EMBEDDING]
    with safe_open(str(model_dir / file), framework="pt") as handle:
        table = handle.get_slice(EMBEDDING)
        unique, inverse = torch.unique(tokens, return_inverse=True)
        rows = torch.stack([table[int(i) : int(i) + 1][0] for i in unique]).float()
    if not torch.isfinite(rows).all():
        raise DimcutError(
            f"{model_dir / file}: tensor {EMBEDDING!r} has NaN or Inf in the rows of the "
            "calibration tokens; dimcut refuses non-finite weights"
        )
    return rows[inverse]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine (use cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def calibrate(
    model_dir: str | Path,
    *,
    fmt: str,
    width: int,
    slice_head: bool = False,
    source: str | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 42,
    device: str = "auto",
    memory_budget: int = 2 * 2**30,
    progress: bool = True,
    resume_dir: str | Path | None = None,
) -> Calibrated:
    """Compute the rotations of `fmt` for slicing `model_dir` to `width`.

    With `resume_dir`, the state after every decoder layer (rotations so far and the current
    activations) is kept there, and a later call with the same arguments continues after the
    last completed layer; the result is bit-identical to an uninterrupted run.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from dimcut.engine import inspect_checkpoint
    from dimcut.slicing import plan_widths

    model_dir = Path(model_dir)
    arch = load_architecture(model_dir)
    torch_device = resolve_device(device)
    tensors = inspect_checkpoint(model_dir)
    documents, source_name = calibration_documents(source)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = sample_sequences(tokenizer, documents, nsamples, seqlen, seed)
    shape = (nsamples, seqlen, arch.hidden_size)
    record = {
        "source": source_name,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "token_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        "format": fmt,
        "width": width,
        "hidden_size": arch.hidden_size,
        "num_layers": arch.num_layers,
        "model_fingerprint": model_fingerprint(model_dir, tensors),
        "activations_on_disk": int(np.prod(shape)) * 4 > memory_budget // 2,
    }
    resume = ResumeState(Path(resume_dir), record) if resume_dir is not None else None
    if resume is not None and resume.layers_done:
        current = resume.directory / f"hidden-{resume.layers_done % 2}.f32"
        if not current.is_file() or current.stat().st_size != int(np.prod(shape)) * 4:
            raise DimcutError(
                f"{resume.directory}: the activations of layer {resume.layers_done} are missing "
                "or damaged; delete the directory to start over"
            )
    runner = LayerRunner(model_dir, arch, torch_device, seqlen)
    per_batch = max(1, BATCH_TOKENS // seqlen)
    done = resume.layers_done if resume else 0
    bar = tqdm(
        total=arch.num_layers, initial=done, desc="calibrating", unit="layer", disable=not progress
    )
    _remove_dead_spills()
    with tempfile.TemporaryDirectory(prefix=f"{SPILL_PREFIX}{os.getpid()}-") as spill:
        spill_dir = Path(spill)

        def store(name: str) -> ActivationStore:
            path = resume.directory / f"{name}.f32" if resume else None
            return ActivationStore(shape, memory_budget // 2, spill_dir, path)

        # Layer k reads hidden[k % 2] and writes hidden[(k + 1) % 2]: with a resume directory
        # these are two files, so the state a checkpoint points to is never overwritten by the
        # next layer; without, one array updated in place.
        first = store("hidden-0")
        hidden = (first, store("hidden-1")) if resume else (first, first)
        if done == 0:
            for part in first.batches(per_batch):
                first.array[part] = _embed(model_dir, tokens[part], tensors).numpy()
        mid = store("mid") if fmt != "plain" else None
        context = _Context(arch, runner, tensors, per_batch, bar, resume)
        if fmt == "plain":
            rotations, eigenvalues = _calibrate_plain(context, hidden)
        else:
            widths = plan_widths(arch, fmt, width, slice_head)
            rotations, eigenvalues = _calibrate_sequential(context, hidden, mid, widths)
        del first, hidden, mid
    if width:
        record["retained_variance"] = Calibrated(rotations, eigenvalues).retained_variance(width)
    bar.close()
    return Calibrated(rotations, eigenvalues, record)


SPILL_PREFIX = "dimcut-activations-"


def _remove_dead_spills() -> None:
    """Remove activation spill directories of calibrations that were killed (SIGKILL cannot be
    caught): `dimcut-activations-<pid>-*` in the temp directory whose process is gone."""
    import shutil

    root = Path(tempfile.gettempdir())
    for spill in root.glob(f"{SPILL_PREFIX}*-*"):
        pid = spill.name.removeprefix(SPILL_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(spill, ignore_errors=True)
        except OSError:
            pass  # alive, or not ours to judge


@dataclass
class _Context:
    arch: Architecture
    runner: LayerRunner
    tensors: dict
    per_batch: int
    bar: object
    resume: ResumeState | None

    def layer_done(self, layers_done: int, saved: dict[str, np.ndarray], store) -> None:
        """Checkpoint after a layer (when resumable), then advance the bar and the test hook."""
        if self.resume is not None:
            store.flush()
            self.resume.save(layers_done, saved)
        self.bar.update()
        from dimcut import _hooks

        _hooks.reached("calibration", layers_done)


RESUME_SUFFIX = ".dimcut-resume"
RESUME_STATE = "state.npz"


def resume_dir_for(out_dir: str | Path) -> Path:
    """Where `dimcut slice --resume` keeps calibration state for `out_dir`."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + RESUME_SUFFIX)


class ResumeState:
    """Per-layer checkpoints of a calibration: `state.npz` (record, layers done, arrays so far),
    replaced atomically after each layer, beside the activation files it refers to."""

    def __init__(self, directory: Path, record: dict):
        self.directory = directory
        self.record = record
        self.layers_done = 0
        self.arrays: dict[str, np.ndarray] = {}
        directory.mkdir(parents=True, exist_ok=True)
        state = directory / RESUME_STATE
        if not state.is_file():
            return
        try:
            with np.load(state, allow_pickle=False) as data:
                saved = json.loads(bytes(data["record"]).decode())
                layers_done = int(data["layers_done"])
                arrays = {k.split("/", 1)[1]: data[k] for k in data.files if "/" in k}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # damaged
            raise DimcutError(
                f"{state}: unreadable resume state ({exc}); delete {directory} to start over"
            ) from None
        differing = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
        if differing:
            raise DimcutError(
                f"{directory}: the saved calibration differs from this run in "
                f"{', '.join(differing)}; delete it to start over, or rerun with the same "
                "model and options"
            )
        self.layers_done = layers_done
        self.arrays = arrays

    def save(self, layers_done: int, arrays: dict[str, np.ndarray]) -> None:
        state = self.directory / RESUME_STATE
        tmp = state.with_name(state.name + ".tmp")
        payload = {f"a/{k}": v for k, v in arrays.items()}
        payload["record"] = np.frombuffer(json.dumps(self.record).encode(), dtype=np.uint8)
        payload["layers_done"] = np.array(layers_done)
        with open(tmp, "wb") as handle:
            np.savez(handle, **payload)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(state)
        self.layers_done = layers_done


def model_fingerprint(model_dir: Path, tensors: dict) -> str:
    """SHA-256 of what identifies a checkpoint cheaply: its config sizes, every tensor's name,
    dtype and shape, and the values of its 1-D tensors (norm weights differ between fine-tunes)."""
    from safetensors import safe_open

    arch = load_architecture(model_dir)
    digest = hashlib.sha256()
    sizes = (arch.model_type, arch.hidden_size, arch.num_layers, arch.intermediate_size)
    digest.update(json.dumps(sizes).encode())
    digest.update(json.dumps(sorted((k, v[0], v[1]) for k, v in tensors.items())).encode())
    by_file: dict[str, list[str]] = {}
    for name, (_dtype, shape, file) in sorted(tensors.items()):
        if len(shape) == 1:
            by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(model_dir / file), framework="pt") as handle:
            for name in names:
                raw = handle.get_tensor(name).contiguous().view(torch.uint8)  # any dtype
                digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def _to_device(store: ActivationStore, part: slice, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(store.array[part])).to(device)


def _calibrate_plain(ctx: _Context, hidden):
    """Dense forward; one covariance summed over the embedding output and every residual."""
    arch, runner, per_batch = ctx.arch, ctx.runner, ctx.per_batch
    covariance = Covariance(arch.hidden_size)
    done = ctx.resume.layers_done if ctx.resume else 0
    if done:
        covariance.matrix = torch.from_numpy(ctx.resume.arrays["covariance"].copy())
    else:
        for part in hidden[0].batches(per_batch):
            covariance.add(_to_device(hidden[0], part, "cpu"))
    full = (arch.hidden_size,) * 3
    names = RotationNames.shared(PLAIN_ROTATION, arch.num_layers)
    widths = Widths.constant(arch.hidden_size, arch.num_layers)
    for index in range(done, arch.num_layers):
        source, target = hidden[index % 2], hidden[(index + 1) % 2]
        groups = layer_op_groups(arch, index, "plain", names, widths, ctx.tensors, "F32")
        ops = [unrotated(op) for part in LAYER_PARTS[:4] for op in groups[part]]
        layer = runner.layer(index, _layer_weights(runner.model_dir, ops, {}), full)
        with torch.no_grad():
            for part in source.batches(per_batch):
                x = _to_device(source, part, runner.device)
                h = x + runner.attention(layer, x)
                covariance.add(h)
                out = h + runner.mlp(layer, h)
                covariance.add(out)
                target.array[part] = out.float().cpu().numpy()
        del layer
        ctx.layer_done(index + 1, {"covariance": covariance.matrix.numpy()}, target)
    q, values = covariance.principal_axes("the residual stream")
    return {PLAIN_ROTATION: q}, {PLAIN_ROTATION: values}


def _calibrate_sequential(ctx: _Context, hidden, mid, widths: Widths):
    """SliceGPT §3: each PCA sees the signals of the already-sliced earlier layers.

    The stores hold full-width signals in the original basis. A stage reads them as the sliced
    model carries them, x = (s Q)[:, :width], runs its half-layer, and writes the full-width
    residual x Q[:, :width]ᵀ + f(x) while accumulating that residual's covariance: one pass over
    the activations per stage.
    """
    arch, runner, tensors, per_batch = ctx.arch, ctx.runner, ctx.tensors, ctx.per_batch
    names = RotationNames.per_layer(arch.num_layers)
    rotations: dict[str, np.ndarray] = {}
    eigenvalues: dict[str, np.ndarray] = {}
    full = arch.hidden_size
    done = ctx.resume.layers_done if ctx.resume else 0
    for key, value in (ctx.resume.arrays if done else {}).items():
        kind, name = key.split(":", 1)
        (rotations if kind == "q" else eigenvalues)[name] = value

    def keep(name: str, covariance: Covariance) -> None:
        rotations[name], eigenvalues[name] = covariance.principal_axes(f"signal {name}")

    def run_stage(index, ops, rotation_name, stage_widths, source, target, block) -> Covariance:
        """Run one half-layer on the sliced inputs of `source`; write its full-width residual."""
        q = rotations[rotation_name]
        width = stage_widths[0] if block == "attention" else stage_widths[1]
        weights = _layer_weights(runner.model_dir, ops, {rotation_name: q})
        layer = runner.layer(index, weights, stage_widths)
        basis = torch.from_numpy(np.ascontiguousarray(q[:, :width])).float().to(runner.device)
        compute = runner.attention if block == "attention" else runner.mlp
        covariance = Covariance(full)
        with torch.no_grad():
            for part in source.batches(per_batch):
                x = _to_device(source, part, runner.device) @ basis
                residual = x @ basis.T + compute(layer, x)
                covariance.add(residual)
                target.array[part] = residual.float().cpu().numpy()
        return covariance

    if done == 0:
        embedding = Covariance(full)
        for part in hidden[0].batches(per_batch):
            embedding.add(_to_device(hidden[0], part, "cpu"))
        keep(names.embedding, embedding)
    for index in range(done, arch.num_layers):
        source, target = hidden[index % 2], hidden[(index + 1) % 2]
        groups = layer_op_groups(arch, index, "slicegpt", names, widths, tensors, "F32")
        # Attention: q/k/v rotated by the incoming Q; o_proj still writes the full width D.
        ops = groups["attention_readers"] + [unrotated(op) for op in groups["attention_writer"]]
        stage = (widths.layer_input(index), full, full)
        keep(
            names.mid[index],
            run_stage(index, ops, names.layer_input(index), stage, source, mid, "attention"),
        )
        # MLP: gate/up rotated by Q_mid; down_proj still writes the full width D.
        ops = groups["mlp_readers"] + [unrotated(op) for op in groups["mlp_writer"]]
        stage = (full, widths.mid[index], full)
        keep(names.out[index], run_stage(index, ops, names.mid[index], stage, mid, target, "mlp"))
        kept = [
            eigenvalues[name][:width].sum() / eigenvalues[name].sum()
            for name, width in (
                (names.mid[index], widths.mid[index]),
                (names.out[index], widths.out[index]),
            )
        ]
        ctx.bar.set_postfix_str(f"variance kept {kept[0]:.4f} / {kept[1]:.4f}")
        saved = {f"q:{k}": v for k, v in rotations.items()}
        saved.update({f"e:{k}": v for k, v in eigenvalues.items()})
        ctx.layer_done(index + 1, saved, target)
    return rotations, eigenvalues


# -- saved rotations ----------------------------------------------------------------------------


def save_rotations(path: str | Path, calibrated: Calibrated) -> None:
    arrays = {f"rotation/{k}": v for k, v in calibrated.rotations.items()}
    arrays.update({f"eigenvalues/{k}": v for k, v in calibrated.eigenvalues.items()})
    arrays["record"] = np.frombuffer(json.dumps(calibrated.record).encode(), dtype=np.uint8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_rotations(
    path: str | Path,
    arch: Architecture,
    fmt: str,
    width: int | None = None,
    *,
    model_dir: str | Path | None = None,
) -> Calibrated:
    """Read rotations saved by `save_rotations`, refusing ones made for another model or format
    (with `model_dir`, also another checkpoint of the same shape: see `model_fingerprint`), and
    arrays that are not finite orthogonal D×D matrices."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--rotations {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            record = json.loads(bytes(data["record"]).decode())
            rotations = {
                k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("rotation/")
            }
            eigenvalues = {
                k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("eigenvalues/")
            }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DimcutError(f"--rotations {path}: not a dimcut rotations file ({exc})") from None
    if not isinstance(record, dict):
        raise DimcutError(f"--rotations {path}: not a dimcut rotations file (bad record)")
    if (record.get("hidden_size"), record.get("num_layers")) != (arch.hidden_size, arch.num_layers):
        raise DimcutError(
            f"--rotations {path}: made for hidden size {record.get('hidden_size')} and "
            f"{record.get('num_layers')} layers, but the model has {arch.hidden_size} and "
            f"{arch.num_layers}"
        )
    if record.get("format") != fmt:
        raise DimcutError(
            f"--rotations {path}: made for format {record.get('format')!r}, not {fmt!r}"
        )
    if fmt == "slicegpt" and width is not None and record.get("width") != width:
        raise DimcutError(
            f"--rotations {path}: slicegpt rotations depend on the width; these were computed "
            f"for d={record.get('width')}, not d={width}"
        )
    if model_dir is not None and record.get("model_fingerprint"):
        from dimcut.engine import inspect_checkpoint

        model_dir = Path(model_dir)
        mine = model_fingerprint(model_dir, inspect_checkpoint(model_dir))
        if mine != record["model_fingerprint"]:
            raise DimcutError(
                f"--rotations {path}: computed for a different model (fingerprint "
                f"{record['model_fingerprint'][:12]}…, but {model_dir} has {mine[:12]}…): same "
                "sizes, different weights"
            )
    rng = np.random.default_rng(0)
    probe = rng.standard_normal(arch.hidden_size)
    for name, q in rotations.items():
        if q.shape != (arch.hidden_size, arch.hidden_size) or q.dtype.kind != "f":
            raise DimcutError(
                f"--rotations {path}: rotation {name!r} is {q.dtype} {list(q.shape)}, expected "
                f"a float [{arch.hidden_size}, {arch.hidden_size}] matrix"
            )
        if not np.isfinite(q).all():
            raise DimcutError(f"--rotations {path}: rotation {name!r} contains NaN or Inf")
        if abs(np.linalg.norm(q @ probe) / np.linalg.norm(probe) - 1) > 1e-3:
            raise DimcutError(f"--rotations {path}: rotation {name!r} is not orthogonal")
    return Calibrated(rotations, eigenvalues, {**record, "rotations_file": str(path)})
