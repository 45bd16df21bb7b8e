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
    """A float32 [N, L, width] array in RAM, or memory-mapped on disk when over budget."""

    def __init__(self, shape: tuple[int, int, int], budget_bytes: int, spill_dir: Path):
        nbytes = int(np.prod(shape)) * 4
        if nbytes <= budget_bytes:
            self.array = np.empty(shape, dtype=np.float32)
        else:
            descriptor, path = tempfile.mkstemp(dir=spill_dir, suffix=".f32")
            os.close(descriptor)  # np.memmap opens the file itself
            self.array = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
        self.on_disk = isinstance(self.array, np.memmap)

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

    def principal_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvectors sorted by descending eigenvalue (eigh returns ascending)."""
        values, vectors = torch.linalg.eigh(self.matrix)
        return vectors.flip(-1).numpy(), values.flip(-1).clamp_min(0).numpy()


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

    return rewrite_tensors(model_dir, [{**op, "dtype": "F32"} for op in ops], arrays)


def _embed(model_dir: Path, tokens: torch.Tensor, tensors: dict) -> torch.Tensor:
    from safetensors import safe_open

    _dtype, _shape, file = tensors[EMBEDDING]
    with safe_open(str(model_dir / file), framework="pt") as handle:
        table = handle.get_slice(EMBEDDING)
        unique, inverse = torch.unique(tokens, return_inverse=True)
        rows = torch.stack([table[int(i) : int(i) + 1][0] for i in unique]).float()
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
) -> Calibrated:
    """Compute the rotations of `fmt` for slicing `model_dir` to `width`."""
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
    }
    runner = LayerRunner(model_dir, arch, torch_device, seqlen)
    per_batch = max(1, BATCH_TOKENS // seqlen)
    bar = tqdm(total=arch.num_layers, desc="calibrating", unit="layer", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="dimcut-activations-") as spill:
        spill_dir = Path(spill)
        shape = (nsamples, seqlen, arch.hidden_size)
        hidden = ActivationStore(shape, memory_budget // 2, spill_dir)
        for part in hidden.batches(per_batch):
            hidden.array[part] = _embed(model_dir, tokens[part], tensors).numpy()
        mid = ActivationStore(shape, memory_budget // 2, spill_dir) if fmt != "plain" else None
        if fmt == "plain":
            rotations, eigenvalues = _calibrate_plain(arch, runner, tensors, hidden, per_batch, bar)
        else:
            widths = plan_widths(arch, fmt, width, slice_head)
            rotations, eigenvalues = _calibrate_sequential(
                arch, runner, tensors, hidden, mid, widths, per_batch, bar
            )
        record["activations_on_disk"] = hidden.on_disk
    if width:
        record["retained_variance"] = Calibrated(rotations, eigenvalues).retained_variance(width)
    bar.close()
    return Calibrated(rotations, eigenvalues, record)


def _to_device(store: ActivationStore, part: slice, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(store.array[part])).to(device)


def _calibrate_plain(arch, runner, tensors, hidden, per_batch, bar):
    """Dense forward; one covariance summed over the embedding output and every residual."""
    covariance = Covariance(arch.hidden_size)
    for part in hidden.batches(per_batch):
        covariance.add(_to_device(hidden, part, "cpu"))
    full = (arch.hidden_size,) * 3
    names = RotationNames.shared(PLAIN_ROTATION, arch.num_layers)
    widths = Widths.constant(arch.hidden_size, arch.num_layers)
    for index in range(arch.num_layers):
        groups = layer_op_groups(arch, index, "plain", names, widths, tensors, "F32")
        ops = [unrotated(op) for part in LAYER_PARTS[:4] for op in groups[part]]
        layer = runner.layer(index, _layer_weights(runner.model_dir, ops, {}), full)
        with torch.no_grad():
            for part in hidden.batches(per_batch):
                x = _to_device(hidden, part, runner.device)
                h = x + runner.attention(layer, x)
                covariance.add(h)
                out = h + runner.mlp(layer, h)
                covariance.add(out)
                hidden.array[part] = out.float().cpu().numpy()
        del layer
        bar.update()
    q, values = covariance.principal_axes()
    return {PLAIN_ROTATION: q}, {PLAIN_ROTATION: values}


def _calibrate_sequential(arch, runner, tensors, hidden, mid, widths: Widths, per_batch, bar):
    """SliceGPT §3: each PCA sees the signals of the already-sliced earlier layers.

    The stores hold full-width signals in the original basis. A stage reads them as the sliced
    model carries them, x = (s Q)[:, :width], runs its half-layer, and writes the full-width
    residual x Q[:, :width]ᵀ + f(x) while accumulating that residual's covariance: one pass over
    the activations per stage.
    """
    names = RotationNames.per_layer(arch.num_layers)
    rotations: dict[str, np.ndarray] = {}
    eigenvalues: dict[str, np.ndarray] = {}
    full = arch.hidden_size

    def keep(name: str, covariance: Covariance) -> None:
        rotations[name], eigenvalues[name] = covariance.principal_axes()

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

    embedding = Covariance(full)
    for part in hidden.batches(per_batch):
        embedding.add(_to_device(hidden, part, "cpu"))
    keep(names.embedding, embedding)
    for index in range(arch.num_layers):
        groups = layer_op_groups(arch, index, "slicegpt", names, widths, tensors, "F32")
        # Attention: q/k/v rotated by the incoming Q; o_proj still writes the full width D.
        ops = groups["attention_readers"] + [unrotated(op) for op in groups["attention_writer"]]
        stage = (widths.layer_input(index), full, full)
        keep(
            names.mid[index],
            run_stage(index, ops, names.layer_input(index), stage, hidden, mid, "attention"),
        )
        # MLP: gate/up rotated by Q_mid; down_proj still writes the full width D.
        ops = groups["mlp_readers"] + [unrotated(op) for op in groups["mlp_writer"]]
        stage = (full, widths.mid[index], full)
        keep(names.out[index], run_stage(index, ops, names.mid[index], stage, mid, hidden, "mlp"))
        kept = [
            eigenvalues[name][:width].sum() / eigenvalues[name].sum()
            for name, width in (
                (names.mid[index], widths.mid[index]),
                (names.out[index], widths.out[index]),
            )
        ]
        bar.set_postfix_str(f"variance kept {kept[0]:.4f} / {kept[1]:.4f}")
        bar.update()
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
    path: str | Path, arch: Architecture, fmt: str, width: int | None = None
) -> Calibrated:
    """Read rotations saved by `save_rotations`, refusing ones made for another model or format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--rotations {path}: no such file")
    with np.load(path, allow_pickle=False) as data:
        record = json.loads(bytes(data["record"]).decode())
        rotations = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("rotation/")}
        eigenvalues = {
            k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("eigenvalues/")
        }
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
    return Calibrated(rotations, eigenvalues, {**record, "rotations_file": str(path)})
