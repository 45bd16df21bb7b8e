"""The slicing plan: norm fusion, rotations and widths turned into engine ops.

Each output tensor is described by one op (docs/plan-format.md). Rotations are referred to by
name; the arrays themselves travel beside the ops. The rules (docs/algorithm.md §1, §2, §4):
- linears fed by a norm get the norm's scale folded into their input columns, then `W ← W·Q`
  with the incoming rotation, keeping the first `width` columns;
- linears writing into the residual get `W ← Qᵀ·W` (and their bias too), keeping `width` rows;
- the embedding is rotated like a reader (`E ← E·Q`), the head like a norm-fed reader;
- `slicegpt` adds shortcut matrices `(Q_aᵀ Q_b)[:k_a, :k_b]` and drops the norm weights;
- `plain` uses one Q everywhere and keeps stock norms with weight √(D/d), which is folded into
  the readers' rotation instead so that the norm weight is an exact 1.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from dimcut._core import DimcutError
from dimcut.architectures import EMBEDDING, FINAL_NORM, LM_HEAD, Architecture
from dimcut.engine import TensorOp
from dimcut.runtime import Choice


@enum.unique
class Format(Choice):
    """The two output formats (README "What gets written")."""

    SLICEGPT = "slicegpt"  # per-layer rotations + shortcut matrices, faithful to the paper
    PLAIN = "plain"  # one rotation, no shortcuts: a stock architecture of width d


@enum.unique
class Method(Choice):
    """How a cut is made (`--method`, docs/commands/slice.md): the basis whose leading
    directions a width cut keeps, or the depth cut it is contrasted with."""

    PCA = "pca"  # principal axes of the residual stream (SliceGPT)
    CHANNELS = "channels"  # the residual channels of largest unit-RMS energy: no rotation
    RANDOM = "random"  # a seeded random orthogonal basis: the control
    LAYERS = "layers"  # the decoder layers of lowest block influence removed (ShortGPT)


# The formats each method writes. One basis for every layer, and a stock checkpoint with fewer
# layers, are the plain format's kind of output; only PCA has per-layer rotations.
METHOD_FORMATS = {
    Method.PCA: (Format.SLICEGPT, Format.PLAIN),
    Method.CHANNELS: (Format.PLAIN,),
    Method.RANDOM: (Format.PLAIN,),
    Method.LAYERS: (Format.PLAIN,),
}


def parse_method(method: Method | str, fmt: Format | str) -> Method:
    """`method` as a member, refusing a format it does not write."""
    method, fmt = Method.parse(method, "method"), Format.parse(fmt, "format")
    if fmt not in METHOD_FORMATS[method]:
        allowed = " or ".join(f.value for f in METHOD_FORMATS[method])
        raise ValueError(
            f"method {method.value}: works with format {allowed} only (--method "
            f"{method.value} --format {allowed}: one basis for every layer, a stock "
            f"checkpoint), not format {fmt.value}"
        )
    return method


# Tensors that stock checkpoints sometimes carry but models recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Widths:
    """Width of the residual stream at each point: embedding output, after attention, after MLP."""

    embedding: int
    mid: tuple[int, ...]
    out: tuple[int, ...]

    @classmethod
    def constant(cls, width: int, num_layers: int, head_width: int | None = None) -> Widths:
        out = [width] * num_layers
        if head_width is not None:
            out[-1] = head_width
        return cls(width, (width,) * num_layers, tuple(out))

    @classmethod
    def from_list(cls, values: list, num_layers: int, hidden_size: int) -> Widths:
        """A schedule written as one list in residual order: the embedding output, then each
        layer's widths after attention and after the MLP (the last one is the head's input)."""
        if not isinstance(values, list) or len(values) != 2 * num_layers + 1:
            raise ValueError(
                f"a widths schedule is a list of 2·layers + 1 = {2 * num_layers + 1} integers "
                "(embedding, then after attention and after the MLP of each layer)"
            )
        bad = [v for v in values if not isinstance(v, int) or not 0 < v <= hidden_size]
        if bad:
            raise ValueError(f"widths must be integers in [1, {hidden_size}], got {bad[:3]}")
        return cls(values[0], tuple(values[1::2]), tuple(values[2::2]))

    def of_rotations(self, names: RotationNames) -> dict[str, int]:
        """The width each named rotation is cut to (a shared rotation: the first point's)."""
        points = zip(
            (names.embedding, *names.mid, *names.out), (self.embedding, *self.mid, *self.out)
        )
        kept: dict[str, int] = {}
        for name, width in points:
            kept.setdefault(name, width)
        return kept

    def as_list(self) -> list[int]:
        return [self.embedding, *(w for pair in zip(self.mid, self.out) for w in pair)]

    def layer_input(self, index: int) -> int:
        return self.embedding if index == 0 else self.out[index - 1]

    @property
    def head(self) -> int:
        return self.out[-1]


def retained_widths(
    spectra: Mapping[str, np.ndarray],
    arch: Architecture,
    retained: float,
    round_to: int,
    slice_head: bool,
) -> Widths:
    """Each residual point as wide as its signal needs to keep the fraction `retained` of its
    energy (rounded up to a multiple of `round_to`); the head keeps D unless sliced."""
    names = RotationNames.per_layer(arch.num_layers)
    full = arch.hidden_size

    def width(name: str) -> int:
        energy = np.cumsum(spectra[name])
        need = int(np.searchsorted(energy, retained * energy[-1] * (1 - 1e-12))) + 1
        return int(min(full, max(round_to, math.ceil(need / round_to) * round_to)))

    out = [width(name) for name in names.out]
    if not slice_head:
        out[-1] = full
    return Widths(width(names.embedding), tuple(width(n) for n in names.mid), tuple(out))


# Sensitivity schedules keep every point at least this fraction of the uniform width: points
# estimated insensitive were otherwise cut to a few directions, which the sequential calibration
# does not recover from (measured on SmolLM2: 8-wide points, perplexity ×100).
SENSITIVITY_FLOOR = 0.8
SENSITIVITY_SMOOTHING = 2  # neighbours averaged on each side: one point's estimate is noisy


def direction_losses(
    spectra: Mapping[str, np.ndarray],
    sensitivity: Mapping[str, float],
    arch: Architecture,
    width: int,
) -> dict[str, np.ndarray]:
    """Estimated loss of deleting each direction of each residual point: the point's
    sensitivity to a uniform cut to `width` (averaged with its neighbours in residual order)
    spread over the directions that cut deletes, in proportion to their energy."""
    names = RotationNames.per_layer(arch.num_layers)
    order = [names.embedding, *(n for pair in zip(names.mid, names.out) for n in pair)]
    losses = {}
    for index, name in enumerate(order):
        around = order[max(0, index - SENSITIVITY_SMOOTHING) : index + SENSITIVITY_SMOOTHING + 1]
        smoothed = sum(max(sensitivity[n], 0.0) for n in around) / len(around)
        energy = np.asarray(spectra[name], dtype=np.float64)
        energy = energy / max(energy.sum(), 1e-300)
        deleted = max(float(energy[width:].sum()), 1e-12)
        losses[name] = max(smoothed, 1e-12) / deleted * energy
    return losses


def sensitivity_candidates(
    spectra: Mapping[str, np.ndarray],
    sensitivity: Mapping[str, float],
    arch: Architecture,
    width: int,
    round_to: int,
    slice_head: bool,
) -> Callable[[float], Widths]:
    """Schedules from `direction_losses`, wider as x in [0, 1] grows (the threshold falls from
    the largest direction loss over 12 decades), never below `SENSITIVITY_FLOOR` of `width`."""
    losses = direction_losses(spectra, sensitivity, arch, width)
    top = max(float(loss.max()) for loss in losses.values())
    floor = max(round_to, int(SENSITIVITY_FLOOR * width) // round_to * round_to)
    return lambda x: loss_widths(losses, arch, top * 1e-12**x, floor, round_to, slice_head)


def loss_widths(
    losses: Mapping[str, np.ndarray],
    arch: Architecture,
    threshold: float,
    floor: int,
    round_to: int,
    slice_head: bool,
) -> Widths:
    """Each residual point keeps the directions whose deletion would cost more than
    `threshold` (rounded up to a multiple of `round_to`, at least `floor`)."""
    names = RotationNames.per_layer(arch.num_layers)
    full = arch.hidden_size

    def width(name: str) -> int:
        need = int((losses[name] > threshold).sum())
        return int(min(full, max(floor, math.ceil(need / round_to) * round_to)))

    out = [width(name) for name in names.out]
    if not slice_head:
        out[-1] = full
    return Widths(width(names.embedding), tuple(width(n) for n in names.mid), tuple(out))


@dataclass(frozen=True)
class RotationNames:
    """Array names of the rotation entering each residual point (same layout as Widths)."""

    embedding: str
    mid: tuple[str, ...]
    out: tuple[str, ...]

    @classmethod
    def per_layer(cls, num_layers: int) -> RotationNames:
        return cls(
            "Q.embedding",
            tuple(f"Q.{i}.mid" for i in range(num_layers)),
            tuple(f"Q.{i}.out" for i in range(num_layers)),
        )

    @classmethod
    def shared(cls, name: str, num_layers: int) -> RotationNames:
        return cls(name, (name,) * num_layers, (name,) * num_layers)

    def layer_input(self, index: int) -> str:
        return self.embedding if index == 0 else self.out[index - 1]


# In the plain format the readers of a norm use Q·√(D/d) (see module docstring).
PLAIN_ROTATION = "Q"
PLAIN_READER_ROTATION = "Q.norm_readers"
PLAIN_NORM_ONES = "ones"


def plan_rotation_names(fmt: Format, num_layers: int) -> RotationNames:
    """The rotations a format's plan reads: one per residual point, or one shared."""
    if Format.parse(fmt) is Format.PLAIN:
        return RotationNames.shared(PLAIN_ROTATION, num_layers)
    return RotationNames.per_layer(num_layers)


def plan_widths(arch: Architecture, fmt: Format, width: int, slice_head: bool) -> Widths:
    """Uniform width d at every residual point; the head keeps D unless sliced."""
    # The plain format is one stock model of width d, so its head is always sliced.
    head = None if (slice_head or Format.parse(fmt) is Format.PLAIN) else arch.hidden_size
    return Widths.constant(width, arch.num_layers, head_width=head)


def rotation_arrays(
    fmt: Format, rotations: Mapping[str, np.ndarray], widths: Widths, arch: Architecture
) -> tuple[RotationNames, dict[str, np.ndarray]]:
    """The named arrays the plan's ops read. Per-layer rotations are passed through untouched
    (memory maps stay memory maps); the plain format adds its scaled reader rotation."""
    names = plan_rotation_names(fmt, arch.num_layers)
    if Format.parse(fmt) is Format.PLAIN:
        q = np.ascontiguousarray(rotations[PLAIN_ROTATION][:, : widths.embedding])
        scale = math.sqrt(arch.hidden_size / widths.embedding)
        arrays = {
            PLAIN_ROTATION: q,
            PLAIN_READER_ROTATION: q * scale,
            PLAIN_NORM_ONES: np.ones(widths.embedding),
        }
        return names, arrays
    needed = dict.fromkeys((names.embedding, *names.mid, *names.out))
    missing = [name for name in needed if name not in rotations]
    if missing:
        raise ValueError(
            f"rotations lack {', '.join(missing[:3])} for a {arch.num_layers}-layer model"
        )
    return names, {name: rotations[name] for name in needed}


def _op(name: str, **fields) -> TensorOp:
    return TensorOp(name=name, source=name, **fields)


def _reader_ops(weights, scale, rotation, width, tensors) -> list[TensorOp]:
    """Ops for linears that read the residual through a norm (q/k/v, gate/up, head)."""
    ops = []
    for weight in weights:
        ops.append(_op(weight, col_scale=scale, in_rotation=rotation, in_keep=width))
        bias = weight.removesuffix(".weight") + ".bias"
        if bias in tensors:
            ops.append(_op(bias))  # an output-side bias is untouched by an input rotation
    return ops


def _writer_ops(weight, rotation, width, tensors) -> list[TensorOp]:
    """Ops for a linear writing into the residual (o_proj, down_proj): rows rotated, bias too."""
    ops = [_op(weight, out_rotation=rotation, out_keep=width)]
    bias = weight.removesuffix(".weight") + ".bias"
    if bias in tensors:
        ops.append(_op(bias, out_rotation=rotation, out_keep=width))
    return ops


def layer_ops(
    arch: Architecture,
    index: int,
    fmt: Format,
    rotations: RotationNames,
    widths: Widths,
    tensors: dict,
    dtype: str,
) -> list[TensorOp]:
    """Ops of decoder layer `index` (docs/algorithm.md §1, §2, §4)."""
    family = arch.family
    plain = fmt is Format.PLAIN
    width_in, width_mid, width_out = widths.layer_input(index), widths.mid[index], widths.out[index]
    q_in, q_mid, q_out = rotations.layer_input(index), rotations.mid[index], rotations.out[index]
    ops = [
        *_reader_ops(
            arch.attention_input_weights(index),
            arch.norm_weight(index, "attention"),
            PLAIN_READER_ROTATION if plain else q_in,
            width_in,
            tensors,
        ),
        *_writer_ops(
            arch.layer(index, family.attention_output) + ".weight", q_mid, width_mid, tensors
        ),
        *_reader_ops(
            arch.mlp_input_weights(index),
            arch.norm_weight(index, "mlp"),
            PLAIN_READER_ROTATION if plain else q_mid,
            width_mid,
            tensors,
        ),
        *_writer_ops(arch.layer(index, family.mlp_output) + ".weight", q_out, width_out, tensors),
    ]
    if plain:
        return ops + [
            _literal(arch.norm_weight(index, which), PLAIN_NORM_ONES, dtype)
            for which in ("attention", "mlp")
        ]
    prefix = f"model.layers.{index}."
    return ops + [
        _shortcut(prefix + "attn_shortcut", q_in, q_mid, width_in, width_mid, dtype),
        _shortcut(prefix + "mlp_shortcut", q_mid, q_out, width_mid, width_out, dtype),
    ]


def _literal(name: str, array: str, dtype: str) -> TensorOp:
    return TensorOp(name=name, literal=array, dtype=dtype)


def _shortcut(name, rotation_a, rotation_b, keep_a, keep_b, dtype) -> TensorOp:
    return TensorOp(name=name, shortcut=(rotation_a, rotation_b, keep_a, keep_b), dtype=dtype)


def model_ops(
    arch: Architecture,
    fmt: Format | str,
    rotations: RotationNames,
    widths: Widths,
    tensors: dict,
) -> list[TensorOp]:
    """Ops for the whole checkpoint; refuses tensors the architecture does not explain."""
    fmt = Format.parse(fmt)
    if EMBEDDING not in tensors:
        raise DimcutError(f"the checkpoint has no {EMBEDDING}; is it a {arch.model_type} model?")
    dtype = tensors[EMBEDDING][0]
    plain = fmt is Format.PLAIN
    ops = [_op(EMBEDDING, in_rotation=rotations.embedding, in_keep=widths.embedding)]
    for index in range(arch.num_layers):
        ops += layer_ops(arch, index, fmt, rotations, widths, tensors, dtype)
    head_source = LM_HEAD if LM_HEAD in tensors else EMBEDDING  # tied embeddings get untied
    ops.append(
        TensorOp(
            name=LM_HEAD,
            source=head_source,
            col_scale=FINAL_NORM,
            in_rotation=PLAIN_READER_ROTATION if plain else rotations.out[-1],
            in_keep=widths.head,
        )
    )
    if plain:
        ops.append(_literal(FINAL_NORM, PLAIN_NORM_ONES, dtype))
    _check_coverage(arch, ops, tensors)
    return ops


def _check_coverage(arch: Architecture, ops: list[TensorOp], tensors: dict) -> None:
    used = {op.source for op in ops} | {op.col_scale for op in ops}
    missing = sorted(n for n in used if n is not None and n not in tensors)
    if missing:
        raise DimcutError(
            f"the checkpoint lacks tensors a {arch.model_type} model with {arch.num_layers} "
            f"layers needs: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}"
        )
    unexplained = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if unexplained:
        raise DimcutError(
            f"the checkpoint has tensors dimcut does not know how to slice for model_type "
            f"{arch.model_type!r}: {', '.join(unexplained[:5])}"
            f"{' …' if len(unexplained) > 5 else ''}"
        )
