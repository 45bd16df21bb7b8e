"""The Rust engine against a float64 PyTorch reference, on real safetensors files."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dimcut import DimcutError, _core
from dimcut.engine import (
    TensorOp,
    _engine_arrays,
    inspect_checkpoint,
    rewrite_checkpoint,
    rewrite_tensors,
)
from helpers import tree_hash
from tiny_models import save_tiny_model, tiny_logits

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Error bound of one output rounding (half an ulp, doubled for f32 arithmetic noise).
RELATIVE_TOLERANCE = {"F32": 1e-5, "F16": 2**-10, "BF16": 2**-7, "F64": 1e-5}
# Shapes deliberately not multiples of any tile size; a tiny budget forces many tiles.
ROWS, COLS, KEEP_IN, KEEP_OUT = 37, 29, 21, 30
TINY_BUDGET = 3000


# --- helpers -------------------------------------------------------------------------------


def orthogonal(n: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q.numpy()


def random_tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    return {
        "w": randn(ROWS, COLS),
        "bias": randn(ROWS),
        "norm": (1 + 0.1 * randn(COLS).float()).to(dtype),
        "embed": randn(53, COLS),
    }


def save_single(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text('{"model_type": "test"}')
    return directory


def save_sharded(directory: Path, tensors: dict[str, torch.Tensor], per_shard: int = 2) -> Path:
    """One shard per `per_shard` tensors, with a Hugging Face index."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensors[name] for name in group}, str(directory / file_name))
        weight_map.update({name: file_name for name in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text('{"model_type": "test"}')
    return directory


def load_output(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def reference(op: TensorOp, tensors: dict[str, torch.Tensor], arrays: dict) -> torch.Tensor:
    """The op in float64 PyTorch, rounded to the output dtype."""
    if op.literal is not None:
        value = torch.from_numpy(arrays[op.literal])
        return value.to(TORCH_DTYPES.get(op.dtype, value.dtype)) if op.dtype else value
    if op.shortcut is not None:
        a, b, keep_a, keep_b = op.shortcut
        qa, qb = torch.from_numpy(arrays[a]).double(), torch.from_numpy(arrays[b]).double()
        return (qa.T @ qb)[:keep_a, :keep_b].to(TORCH_DTYPES.get(op.dtype, torch.float32))
    source = tensors[op.source]
    w = source.double()
    vector = w.ndim == 1
    if vector:
        w = w[:, None] if op.out_rotation or op.out_keep else w[None, :]
    if op.col_scale:
        w = w * tensors[op.col_scale].double()
    if op.in_rotation:
        w = w @ torch.from_numpy(arrays[op.in_rotation]).double()
    if op.in_keep is not None:
        w = w[:, : op.in_keep]
    if op.out_rotation:
        w = torch.from_numpy(arrays[op.out_rotation]).double().T @ w
    if op.out_keep is not None:
        w = w[: op.out_keep]
    if vector:
        w = w.flatten()
    return w.to(TORCH_DTYPES.get(op.dtype, source.dtype) if op.dtype != "F64" else torch.float64)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype_name: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    actual, expected = actual.double(), expected.double()
    # Rounding can land one output ulp away when f32 arithmetic sits right at a tie.
    bound = 2 * RELATIVE_TOLERANCE[dtype_name] * expected.abs() + 1e-5
    assert torch.all((actual - expected).abs() <= bound), (actual - expected).abs().max()


def all_kinds_of_ops(dtype_name: str) -> list[TensorOp]:
    return [
        TensorOp("copy", source="w"),
        TensorOp("scaled", source="w", col_scale="norm"),
        TensorOp("in_rotated", source="w", in_rotation="q_in"),
        TensorOp("in_sliced", source="w", col_scale="norm", in_rotation="q_in", in_keep=KEEP_IN),
        TensorOp("out_rotated", source="w", out_rotation="q_out"),
        TensorOp("out_sliced", source="w", out_rotation="q_out", out_keep=KEEP_OUT),
        TensorOp("bias_rotated", source="bias", out_rotation="q_out"),
        TensorOp("bias_sliced", source="bias", out_rotation="q_out", out_keep=KEEP_OUT),
        TensorOp("kept_columns", source="w", in_keep=KEEP_IN),
        TensorOp("kept_rows", source="w", out_keep=KEEP_OUT),
        TensorOp(
            "both_sides", source="w", in_rotation="q_in", in_keep=KEEP_IN, out_rotation="q_out"
        ),
        TensorOp("embed", source="embed", in_rotation="q_in", in_keep=KEEP_IN),
        TensorOp("shortcut", shortcut=("q_out", "q_out_b", KEEP_OUT, KEEP_IN)),
        TensorOp("shortcut_bf16", shortcut=("q_in", "q_in", KEEP_IN, KEEP_IN), dtype="BF16"),
        TensorOp("literal", literal="ones"),
        TensorOp("literal_as_source_dtype", literal="ones", dtype=dtype_name),
        TensorOp("to_f32", source="w", dtype="F32"),
        TensorOp("to_bf16", source="w", dtype="BF16"),
        TensorOp("rotated_to_f32", source="w", in_rotation="q_in", dtype="F32"),
    ]


def rotation_arrays() -> dict[str, np.ndarray]:
    return {
        "q_in": orthogonal(COLS, 1),
        "q_out": orthogonal(ROWS, 2).astype(np.float32),
        "q_out_b": orthogonal(ROWS, 3),
        "ones": np.ones(COLS, dtype=np.float32),
    }


# --- every op kind against the reference ---------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("dtype_name", ["F32", "F16", "BF16"])
def test_every_op_kind_matches_reference(tmp_path: Path, dtype_name: str, layout: str) -> None:
    tensors = random_tensors(TORCH_DTYPES[dtype_name])
    save = save_single if layout == "single" else save_sharded
    src = save(tmp_path / "src", tensors)
    arrays = rotation_arrays()
    ops = all_kinds_of_ops(dtype_name)
    before = tree_hash(src)

    stats = rewrite_checkpoint(src, tmp_path / "out", ops, arrays, memory_budget=TINY_BUDGET)

    out = load_output(tmp_path / "out")
    assert set(out) == {op.name for op in ops}
    for op in ops:
        expected = reference(op, tensors, arrays)
        name = op.dtype or {torch.float32: "F32", torch.float64: "F64"}.get(
            expected.dtype, dtype_name
        )
        assert_matches(out[op.name], expected, name)
    # Verbatim copies are byte-identical.
    assert out["copy"].view(torch.uint8).equal(tensors["w"].view(torch.uint8))
    assert stats["tensors"] == len(ops) and stats["shards"] == 1
    assert stats["bytes_written"] == sum(t.numel() * t.element_size() for t in out.values())
    assert stats["flops"] > 0 and stats["seconds"] > 0
    assert tree_hash(src) == before
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "test"}'


def test_sharded_and_single_inputs_give_identical_outputs(tmp_path: Path) -> None:
    tensors = random_tensors(torch.bfloat16)
    arrays = rotation_arrays()
    ops = all_kinds_of_ops("BF16")
    save_single(tmp_path / "single", tensors)
    save_sharded(tmp_path / "sharded", tensors, per_shard=1)
    rewrite_checkpoint(tmp_path / "single", tmp_path / "a", ops, arrays, memory_budget=TINY_BUDGET)
    rewrite_checkpoint(tmp_path / "sharded", tmp_path / "b", ops, arrays, memory_budget=10**9)
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")


def test_rewrite_tensors_equals_written_checkpoint(tmp_path: Path) -> None:
    tensors = random_tensors(torch.bfloat16)
    src = save_single(tmp_path / "src", tensors)
    arrays = rotation_arrays()
    ops = all_kinds_of_ops("BF16")
    rewrite_checkpoint(src, tmp_path / "out", ops, arrays)
    written = load_output(tmp_path / "out")

    in_memory = rewrite_tensors(src, ops, arrays, memory_budget=TINY_BUDGET)
    in_memory_f64 = rewrite_tensors(src, [op.to_dict() for op in ops], arrays, precision="f64")
    for op in ops:
        assert in_memory[op.name].dtype == np.float32
        assert in_memory_f64[op.name].dtype == np.float64
        np.testing.assert_array_equal(in_memory[op.name], written[op.name].float().numpy())
        np.testing.assert_allclose(
            in_memory_f64[op.name], in_memory[op.name], rtol=2**-7, atol=1e-6
        )


def test_non_float_tensors_copy_verbatim_but_cannot_be_transformed(tmp_path: Path) -> None:
    ids = torch.arange(40, dtype=torch.int64).reshape(5, 8)
    src = save_single(tmp_path / "src", {"ids": ids, "w": torch.randn(5, 8)})
    rewrite_checkpoint(src, tmp_path / "out", [TensorOp("ids", source="ids")], {})
    assert load_output(tmp_path / "out")["ids"].equal(ids)
    with pytest.raises(ValueError, match="returned as floats"):
        rewrite_tensors(src, [TensorOp("ids", source="ids")], {})


def test_a_rust_panic_is_a_python_exception():
    with pytest.raises(DimcutError, match="internal engine error: deliberate test panic"):
        _core._panic_for_test()


# --- precision -----------------------------------------------------------------------------


def test_f64_precision_is_closer_to_the_float64_reference(tmp_path: Path) -> None:
    n = 512
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(n, n, generator=generator, dtype=torch.float64)
    src = save_single(tmp_path / "src", {"w": w})
    q = orthogonal(n, 8)
    exact = (w @ torch.from_numpy(q)).numpy()
    ops = [TensorOp("w", source="w", in_rotation="q", out_rotation="q2")]
    arrays = {"q": q, "q2": np.eye(n)}
    errors = {}
    for precision in ("f32", "f64"):
        result = rewrite_tensors(src, ops, arrays, precision=precision, memory_budget=1 << 20)["w"]
        errors[precision] = float(np.abs(result - exact).max() / np.abs(exact).max())
    print(f"max relative error vs float64 reference: {errors}")
    assert errors["f64"] < 1e-13
    assert errors["f32"] < 1e-5
    assert errors["f64"] < errors["f32"] / 1000


# --- real models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = save_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    assert (directory / "model.safetensors.index.json").exists()
    return directory


def llama_logits(directory: Path) -> torch.Tensor:
    return tiny_logits(directory, torch.arange(20).reshape(2, 10))


def test_identity_plan_gives_identical_logits(tiny_llama: Path, tmp_path: Path) -> None:
    ops = [TensorOp(name, source=name) for name in inspect_checkpoint(tiny_llama)]
    before = tree_hash(tiny_llama)
    rewrite_checkpoint(tiny_llama, tmp_path / "out", ops, {}, max_shard_size=50_000)
    assert torch.equal(llama_logits(tmp_path / "out"), llama_logits(tiny_llama))
    assert tree_hash(tiny_llama) == before


def test_rotation_at_zero_sparsity_preserves_logits(tiny_llama: Path, tmp_path: Path) -> None:
    """Computational invariance: fold norms, rotate the residual stream by one orthogonal Q."""
    names = inspect_checkpoint(tiny_llama)
    hidden = names["model.embed_tokens.weight"][1][1]
    ops = []
    for name in names:
        op = TensorOp(name, source=name)
        layer = name.rsplit(".", 2)[0]
        if name.endswith("norm.weight"):
            op = TensorOp(name, literal="ones")
        elif name == "model.embed_tokens.weight":
            op = TensorOp(name, source=name, in_rotation="q")
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            norm = layer.rsplit(".", 1)[0] + ".input_layernorm.weight"
            op = TensorOp(name, source=name, col_scale=norm, in_rotation="q")
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            norm = layer.rsplit(".", 1)[0] + ".post_attention_layernorm.weight"
            op = TensorOp(name, source=name, col_scale=norm, in_rotation="q")
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            op = TensorOp(name, source=name, out_rotation="q")
        elif name == "lm_head.weight":
            op = TensorOp(name, source=name, col_scale="model.norm.weight", in_rotation="q")
        ops.append(op)
    arrays = {"q": orthogonal(hidden, 5), "ones": np.ones(hidden, dtype=np.float32)}
    rewrite_checkpoint(tiny_llama, tmp_path / "out", ops, arrays, memory_budget=4096)
    rotated, original = llama_logits(tmp_path / "out"), llama_logits(tiny_llama)
    print(f"max |logit difference| after rotation: {(rotated - original).abs().max():.2e}")
    torch.testing.assert_close(rotated, original, atol=1e-4, rtol=1e-4)


# --- output layout -------------------------------------------------------------------------


def test_small_shards_get_an_index_with_the_right_total_size(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(10, 10 + i) for i in range(7)}
    src = save_single(tmp_path / "src", tensors)
    ops = [TensorOp(name, source=name) for name in tensors]
    stats = rewrite_checkpoint(src, tmp_path / "out", ops, {}, max_shard_size=1000)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) == stats["shards"] > 2
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(
        files
    )
    out = load_output(tmp_path / "out")
    for name, tensor in tensors.items():
        assert out[name].equal(tensor)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_side_files_are_copied_and_extra_files_override(tmp_path: Path) -> None:
    src = save_single(tmp_path / "src", {"w": torch.randn(3, 3)})
    (src / "tokenizer.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"stale weights")
    rewrite_checkpoint(
        src,
        tmp_path / "out",
        [TensorOp("w", source="w")],
        {},
        extra_files={"config.json": '{"new": true}', "notes.txt": b"hi"},
    )
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "config.json",
        "dimcut-manifest.json",
        "model.safetensors",
        "notes.txt",
        "tokenizer.json",
    ]
    assert (tmp_path / "out" / "config.json").read_text() == '{"new": true}'


def test_inspect_checkpoint_and_progress(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tensors = random_tensors(torch.bfloat16)
    src = save_sharded(tmp_path / "src", tensors)
    info = inspect_checkpoint(src)
    assert info["w"] == ("BF16", [ROWS, COLS], "model-00001-of-00002.safetensors")
    assert info["embed"][2] == "model-00002-of-00002.safetensors"
    calls: list[tuple[int, int]] = []
    ops = [TensorOp(name, source=name) for name in tensors]
    rewrite_checkpoint(src, tmp_path / "a", ops, progress=lambda d, t: calls.append((d, t)))
    total = sum(t.numel() * 2 for t in tensors.values())
    assert calls[-1] == (total, total) and all(d <= t for d, t in calls)
    rewrite_checkpoint(src, tmp_path / "b", ops, progress=True)
    assert "100%" in capsys.readouterr().err


# --- bad inputs: clear errors, input untouched, nothing left behind --------------------------


@pytest.fixture
def workspace(tmp_path: Path):
    """A source checkpoint; after the test, the source is unchanged and only it remains."""
    tensors = random_tensors(torch.bfloat16) | {"ids": torch.arange(6)}
    src = save_sharded(tmp_path / "src", tensors)
    before = tree_hash(src)
    yield src, tmp_path / "out"
    assert tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def run(src: Path, out: Path, *ops: TensorOp, **kwargs) -> None:
    arrays = {"q": orthogonal(COLS, 0), "q_rows": orthogonal(ROWS, 0)}
    rewrite_checkpoint(src, out, list(ops) or [TensorOp("w", source="w")], arrays, **kwargs)


def test_truncated_shard(workspace) -> None:
    src, out = workspace
    shard = sorted(src.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DimcutError, match=f"{shard.name}: .*the file is truncated"):
        run(src, out)
    shard.write_bytes(data)  # restore, so the fixture's hash check applies to the rest


def write_raw_shard(path: Path, header: bytes, data: bytes, length: int | None = None) -> None:
    length = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", length) + header + data)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("offsets overrun", r"tensor \"w\" ends at byte 1600 .* the file is truncated"),
        ("header not JSON", "header is not valid JSON"),
        ("header length > file", "header length 10000 is larger than the file"),
        ("huge header length", r"header length \d+ is larger than the 100000000-byte limit"),
    ],
)
def test_corrupt_headers(tmp_path: Path, case: str, message: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path = src / "model.safetensors"
    good = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    if case == "offsets overrun":
        bad = json.dumps({"w": {"dtype": "F32", "shape": [400], "data_offsets": [0, 1600]}})
        write_raw_shard(path, bad.encode(), bytes(16))
    elif case == "header not JSON":
        write_raw_shard(path, b"{not json!" + b" " * 6, bytes(16))
    elif case == "header length > file":
        write_raw_shard(path, good, bytes(16), length=10_000)
    else:
        write_raw_shard(path, good, bytes(16), length=2**62)
    before = tree_hash(src)
    with pytest.raises(DimcutError, match=r"model\.safetensors: " + message):
        rewrite_checkpoint(src, tmp_path / "out", [TensorOp("w", source="w")], {})
    with pytest.raises(DimcutError, match=r"model\.safetensors"):
        inspect_checkpoint(src)
    assert tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_index_naming_a_missing_shard(workspace) -> None:
    src, out = workspace
    index_path = src / "model.safetensors.index.json"
    original = index_path.read_text()
    index = json.loads(original)
    index["weight_map"]["w"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009.safetensors"):
        run(src, out)
    index_path.write_text(original)


def test_plan_naming_an_absent_tensor(workspace) -> None:
    src, out = workspace
    with pytest.raises(
        ValueError, match='op "x": source tensor "missing" is not in the checkpoint'
    ):
        run(src, out, TensorOp("x", source="missing"))


def test_rotation_size_mismatch(workspace) -> None:
    src, out = workspace
    with pytest.raises(
        ValueError, match=r'op "w": in_rotation "q_rows" has shape \[37, 37\].*\[37, 29\]'
    ):
        run(src, out, TensorOp("w", source="w", in_rotation="q_rows"))
    with pytest.raises(ValueError, match=r'out_rotation "q" has shape \[29, 29\]'):
        run(src, out, TensorOp("w", source="w", out_rotation="q"))


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (TensorOp("w", source="w", col_scale="bias"), r'col_scale tensor "bias" has shape \[37\]'),
        (TensorOp("w", source="w", in_keep=30), "keeps 30"),
        (TensorOp("w", source="w", in_rotation="q", in_keep=30), "keeps 30"),
        (TensorOp("w", source="w", in_rotation="nope"), '"nope" was not given'),
        (TensorOp("w", literal="q", source="w"), "exactly one of"),
        (TensorOp("w", source="w", dtype="I8"), "unknown dtype"),
    ],
)
def test_invalid_ops(workspace, op: TensorOp, message: str) -> None:
    src, out = workspace
    with pytest.raises(ValueError, match=message):
        run(src, out, op)


def test_unsupported_dtype(workspace) -> None:
    src, out = workspace
    with pytest.raises(ValueError, match="dtype I64.*only F32, F16, BF16 and F64"):
        run(src, out, TensorOp("ids", source="ids", out_keep=3))


def test_duplicate_output_names(workspace) -> None:
    src, out = workspace
    with pytest.raises(ValueError, match='op "w": the output name appears twice'):
        run(src, out, TensorOp("w", source="w"), TensorOp("w", source="bias"))


def test_output_directory_exists(tmp_path: Path) -> None:
    src = save_single(tmp_path / "src", random_tensors(torch.float32))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    before = tree_hash(src)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        run(src, out)
    assert tree_hash(out) == {"old.txt": hashlib.sha256(b"old").hexdigest()}
    run(src, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "dimcut-manifest.json",
        "model.safetensors",
    ]
    assert tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_output_inside_or_equal_to_source(workspace) -> None:
    src, _ = workspace
    for target in (src, src / "sliced", src / ".." / src.name):
        with pytest.raises(ValueError, match="source directory"):
            run(src, target, overwrite=True)


def test_failing_progress_callback_leaves_nothing(workspace) -> None:
    src, out = workspace

    def explode(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(src, out, progress=explode)


# --- rotations stored as read-only file maps ------------------------------------------------

# Runs one rewrite in a fresh process and prints how much its peak RSS grew during the call.
MAPPED_RUN = """
import json, sys
import numpy as np
from dimcut.engine import TensorOp, rewrite_checkpoint, rewrite_tensors
from dimcut.runtime import peak_rss_bytes

src, out, mode, api, *paths = sys.argv[1:]
mmap_mode = None if mode == "memory" else mode
arrays = {f"q{i}": np.load(path, mmap_mode=mmap_mode) for i, path in enumerate(paths)}
ops = [TensorOp(name=f"w{i}", source="w", in_rotation=f"q{i}") for i in range(len(paths))]
before = peak_rss_bytes()
if api == "checkpoint":
    rewrite_checkpoint(src, out, ops, arrays, threads=2)
else:
    np.savez(out, **rewrite_tensors(src, ops, arrays, threads=2))
print(json.dumps({"growth": peak_rss_bytes() - before}))
"""


@pytest.fixture(scope="module")
def stored_rotations(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A checkpoint whose plan reads six 4096×2048 float64 rotations (64 MiB each) from .npy."""
    root = tmp_path_factory.mktemp("stored_rotations")
    generator = torch.Generator().manual_seed(0)
    src = save_single(root / "src", {"w": torch.randn(16, 4096, generator=generator)})
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(root / f"q{i}.npy")
        np.save(paths[-1], rng.standard_normal((4096, 2048)))
    return src, paths


def run_with_stored_rotations(src: Path, paths: list[Path], out: Path, mode: str, api: str) -> int:
    command = [sys.executable, "-c", MAPPED_RUN, str(src), str(out), mode, api, *map(str, paths)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["growth"]


@pytest.mark.parametrize("api", ["checkpoint", "tensors"])
def test_read_only_mapped_rotations_are_released_after_use(
    stored_rotations: tuple[Path, list[Path]], tmp_path: Path, api: str
) -> None:
    src, paths = stored_rotations
    total = sum(path.stat().st_size for path in paths)
    out = {mode: tmp_path / (mode if api == "checkpoint" else f"{mode}.npz") for mode in "rc"}
    out["memory"] = tmp_path / ("memory" if api == "checkpoint" else "memory.npz")
    growth = {mode: run_with_stored_rotations(src, paths, out[mode], mode, api) for mode in out}
    # Read-only maps: about one rotation (plus its converted copy) is resident at a time.
    assert growth["r"] < total / 3, (growth, total)
    # Copy-on-write maps may hold private pages, so they are never released: every page read
    # stays resident (this is what the read-only run would do without the release).
    assert growth["c"] > 0.9 * total, (growth, total)
    if api == "checkpoint":
        assert tree_hash(out["r"]) == tree_hash(out["c"]) == tree_hash(out["memory"])
    else:
        results = {mode: dict(np.load(path)) for mode, path in out.items()}
        for name, expected in results["memory"].items():
            assert np.array_equal(results["r"][name], expected)
            assert np.array_equal(results["c"][name], expected)


def test_only_unconverted_read_only_maps_count_as_mapped(tmp_path: Path) -> None:
    path = tmp_path / "q.npy"
    np.save(path, np.arange(12.0).reshape(3, 4))
    arrays = {
        "read_only": np.load(path, mmap_mode="r"),
        "copy_on_write": np.load(path, mmap_mode="c"),
        "writable": np.load(path, mmap_mode="r+"),
        "in_memory": np.load(path),
        "strided": np.load(path, mmap_mode="r")[:, ::2],
        "converted": np.load(path, mmap_mode="r").astype(np.float32),
        "cast": np.load(path, mmap_mode="r")[:, :2].view(np.int64),
    }
    converted, mapped = _engine_arrays(arrays)
    assert mapped == ["read_only"]
    assert np.shares_memory(converted["read_only"], arrays["read_only"])
