"""`dimcut export`: a plain-format or dense checkpoint as a GGUF file that llama.cpp runs.

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, run as a subprocess: the plain
format is a stock architecture (config `hidden_size = d`, explicit `head_dim`, untied head), so
llama.cpp's converter takes it as it takes any Hugging Face checkpoint and dimcut keeps no tensor
mapping of its own.

Where the converter comes from. The `llama-cpp-python` wheel holds only the `llama_cpp`
bindings; the converter (`convert_hf_to_gguf.py`, its `conversion/` package and the matching
`gguf-py`) is in the source distribution, under `vendor/llama.cpp/`. dimcut looks, in order, at

1. `converter=` (`--converter PATH`): a llama.cpp source tree, or its `convert_hf_to_gguf.py`;
2. `$DIMCUT_LLAMA_CPP`, the same;
3. `<dimcut cache>/llama.cpp-<version>/`, unpacked on first use from the `llama-cpp-python`
   sdist that pip downloads (`pip download --no-deps --no-binary llama-cpp-python`, 77 MB, about
   a minute; nothing is compiled). `<version>` is the installed `llama-cpp-python`'s, so the
   converter writes what the installed runtime reads; without one it is `LLAMA_CPP_PYTHON`.

`pip install 'dimcut[gguf]'` installs the runtime (`llama-cpp-python`, compiled by pip) that loads
the result; the export itself needs only the sdist. The converter imports its vendored `gguf-py`
first (it puts it on `sys.path` itself; dimcut also sets PYTHONPATH and clears NO_LOCAL_GGUF), so
the PyPI `gguf` that may be installed is not used.

What llama.cpp needs of a sliced model (checked before converting): its Llama graph (Llama,
Mistral) reads the head width from `head_dim`, so any width d works. Its Qwen2 and Phi-3 graphs
size the attention projections as `hidden_size × hidden_size` instead, so a plain Qwen2 whose d
differs from `num_attention_heads × head_dim` is converted as its Llama equivalent (the same
tensors with `attention_bias`; the converter is given a relabelled config.json beside links to
the files), and such a Phi-3 (fused projections, no Llama equivalent) is refused. Q8_0 quantizes
blocks of 32 along each weight's input rows: tensors whose input width (d for the embedding,
q/k/v, gate/up and head) is not a multiple of 32 are kept in F16 by the converter
(`f16_fallback_tensors` says which).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dimcut import zoo
from dimcut.plan import Format
from dimcut.runtime import Choice
from dimcut.tokenizers import missing_tokenizer_files

LLAMA_CPP_PYTHON = "0.3.36"  # the converter version tested (and pinned by dimcut[gguf])
CONVERTER_ENV = "DIMCUT_LLAMA_CPP"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs of a llama.cpp tree (the rest of the 77 MB sdist is C++).
CONVERTER_PARTS = (CONVERTER_SCRIPT, "conversion", "gguf-py", "LICENSE")
SDIST_VENDOR_DIR = "vendor/llama.cpp"

# llama.cpp graphs that size attention as hidden_size × hidden_size (no separate head width),
# and the config changes that make such a model its Llama equivalent (same tensor names; llama.cpp's
# Llama graph reads head_dim and takes q/k/v biases), None when there is none (Phi-3's fused
# qkv_proj and gate_up_proj have no Llama counterpart).
ATTENTION_WIDTH_IS_HIDDEN_SIZE: dict[str, dict | None] = {
    "qwen2": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True},
    "phi3": None,
}
QUANT_BLOCK = {"q8_0": 32}  # elements per block along a weight's input rows
ERROR_TAIL_LINES = 12  # converter output lines quoted when it fails


@enum.unique
class OutType(Choice):
    """Tensor types of the GGUF file (the converter's `--outtype`); norms stay F32."""

    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"


class ConversionError(RuntimeError):
    """llama.cpp's converter could not be fetched, or failed; the message quotes the end of
    pip's or the converter's output."""


@dataclass(frozen=True)
class Converter:
    """A llama.cpp source tree holding `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`."""

    root: Path

    @property
    def script(self) -> Path:
        return self.root / CONVERTER_SCRIPT

    def command(self, model_dir: Path, outfile: Path, outtype: OutType) -> list[str]:
        return [
            sys.executable,
            str(self.script),
            str(model_dir),
            "--outfile",
            str(outfile),
            "--outtype",
            outtype.value,
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        paths = [str(self.root / "gguf-py"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["HF_HUB_OFFLINE"] = "1"  # a local directory: nothing to fetch from the hub
        return env


@dataclass(frozen=True)
class ExportResult:
    gguf_file: Path
    outtype: OutType
    converter: Path
    bytes: int
    hidden_size: int
    architecture: str  # as converted: a sliced Qwen2 is converted as its Llama equivalent
    f16_fallback_tensors: tuple[str, ...]  # tensors a quantized outtype had to keep in F16

    def summary(self) -> str:
        what = f"{self.outtype.value}, {self.bytes / 2**20:.1f} MiB, hidden size {self.hidden_size}"
        lines = [f"wrote {self.gguf_file} ({what}, as {self.architecture}) with {self.converter}"]
        if self.f16_fallback_tensors:
            block = QUANT_BLOCK[self.outtype.value]
            lines.append(
                f"note: {len(self.f16_fallback_tensors)} tensors stayed F16: their input width is "
                f"not a multiple of {self.outtype.value}'s block of {block} (hidden size "
                f"{self.hidden_size}); the GGUF is valid but larger"
            )
        return "\n".join(lines)


def installed_llama_cpp_version() -> str | None:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def find_converter(
    converter: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Converter:
    """The llama.cpp converter to run: `converter`, else `$DIMCUT_LLAMA_CPP`, else the cached
    (fetched on first use) sdist tree of the installed or pinned llama-cpp-python."""
    for source, value in (("converter", converter), (CONVERTER_ENV, os.environ.get(CONVERTER_ENV))):
        if value:
            return _converter_at(Path(value), source)
    wanted = installed_llama_cpp_version() or LLAMA_CPP_PYTHON
    cache = Path(cache_dir) if cache_dir is not None else zoo.default_cache_dir()
    return Converter(fetch_converter(wanted, cache, progress=progress))


def _converter_at(path: Path, source: str) -> Converter:
    root = path.parent if path.name == CONVERTER_SCRIPT else path
    if (root / CONVERTER_SCRIPT).is_file() and (root / "conversion").is_dir():
        return Converter(root)
    if (root / SDIST_VENDOR_DIR / CONVERTER_SCRIPT).is_file():  # an unpacked llama-cpp-python sdist
        return Converter(root / SDIST_VENDOR_DIR)
    raise FileNotFoundError(
        f"{source} {path}: no llama.cpp converter there (expected {CONVERTER_SCRIPT} with its "
        "conversion/ and gguf-py/ beside it: a llama.cpp source tree)"
    )


def fetch_converter(llama_cpp_version: str, cache_dir: Path, *, progress: bool = True) -> Path:
    """`<cache_dir>/llama.cpp-<version>`: the converter's files unpacked from the
    llama-cpp-python sdist that pip downloads, built beside and renamed into place."""
    target = cache_dir / f"llama.cpp-{llama_cpp_version}"
    if (target / CONVERTER_SCRIPT).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    requirement = f"llama-cpp-python=={llama_cpp_version}"
    if progress:
        print(
            f"fetching llama.cpp's converter: the {requirement} sdist (77 MB) with pip, "
            f"unpacked into {target}",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=cache_dir) as scratch:
        scratch = Path(scratch)
        # --no-binary for this package only: its build dependencies stay wheels (nothing is
        # compiled; pip only reads the sdist's metadata).
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary"]
        download = subprocess.run(
            [*pip, "llama-cpp-python", requirement, "-d", str(scratch)],
            check=False,
            capture_output=True,
            text=True,
        )
        archives = sorted(scratch.glob("llama_cpp_python-*.tar.gz"))
        if download.returncode != 0 or not archives:
            raise ConversionError(
                f"pip could not download the {requirement} sdist (which holds llama.cpp's "
                f"converter); point converter / ${CONVERTER_ENV} at a llama.cpp source tree "
                "instead. pip said:\n" + _tail(download.stdout + download.stderr)
            )
        staging = scratch / "llama.cpp"
        _unpack_converter(archives[0], staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / CONVERTER_SCRIPT).is_file():  # not a concurrent fetch that won
                raise
    return target


def _unpack_converter(archive: Path, destination: Path) -> None:
    with tarfile.open(archive) as sdist:
        members = []
        for member in sdist.getmembers():
            # "<name>-<version>/vendor/llama.cpp/<part>/..."
            inner = member.name.partition("/")[2]
            if not inner.startswith(SDIST_VENDOR_DIR + "/"):
                continue
            relative = inner[len(SDIST_VENDOR_DIR) + 1 :]
            if relative.split("/", 1)[0] in CONVERTER_PARTS:
                member.name = relative
                members.append(member)
        if not any(m.name == CONVERTER_SCRIPT for m in members):
            raise ConversionError(f"{archive.name} holds no {SDIST_VENDOR_DIR}/{CONVERTER_SCRIPT}")
        sdist.extractall(destination, members=members, filter="data")


def check_exportable(model_dir: Path) -> dict:
    """The config to convert `model_dir` with, after refusing what llama.cpp could not run
    (errors name the file and the reason): the model's own, or its Llama equivalent when
    llama.cpp's graph of its family cannot take its hidden size."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    config = json.loads(config_file.read_text())
    provenance = config.get("dimcut") or {}
    if provenance.get("format") == Format.SLICEGPT.value:
        raise ValueError(
            f"{config_file}: a slicegpt-format model (model_type {config.get('model_type')!r}); "
            "its shortcut matrices between layers have no GGUF equivalent. Slice with "
            "--format plain (format='plain') to get a model llama.cpp can run"
        )
    if not list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin")):
        raise FileNotFoundError(f"{model_dir} holds no weights (*.safetensors or *.bin)")
    reason = missing_tokenizer_files(model_dir)
    if reason is not None:
        raise FileNotFoundError(f"a GGUF file carries its tokenizer, but {reason}")
    model_type = config.get("model_type")
    hidden = config.get("hidden_size")
    heads = config.get("num_attention_heads")
    if model_type not in ATTENTION_WIDTH_IS_HIDDEN_SIZE or not (hidden and heads):
        return config
    attention = heads * (config.get("head_dim") or hidden // heads)
    if attention == hidden:
        return config
    llama = ATTENTION_WIDTH_IS_HIDDEN_SIZE[model_type]
    if llama is None:
        raise ValueError(
            f"{config_file}: llama.cpp's {model_type} graph sizes attention as hidden_size × "
            f"hidden_size, but this model has hidden_size {hidden} and attention width "
            f"{attention} ({heads} heads × head_dim), and {model_type} has no Llama equivalent "
            "to convert it as: llama.cpp cannot run it"
        )
    return {**config, **llama}


def export_gguf(
    model_dir: str | Path,
    gguf_file: str | Path,
    outtype: str | OutType = OutType.F16,
    *,
    converter: str | Path | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Write `model_dir` (a plain-format or dense checkpoint) as the GGUF file `gguf_file`.

    The file appears whole or not at all: the converter writes a temporary file beside it,
    renamed at the end. See the module docstring for where the converter comes from
    (`converter`, `cache_dir`) and what llama.cpp needs of a model.
    """
    model_dir = Path(model_dir)
    gguf_file = Path(gguf_file)
    outtype = OutType.parse(outtype, "outtype")
    config = check_exportable(model_dir)
    if gguf_file.is_dir():
        raise IsADirectoryError(f"gguf_file {gguf_file} is a directory; name the file to write")
    if gguf_file.exists() and not overwrite:
        raise FileExistsError(f"{gguf_file} exists (pass overwrite=True / --overwrite)")
    if not gguf_file.parent.is_dir():
        raise FileNotFoundError(f"gguf_file {gguf_file}: directory {gguf_file.parent} not found")
    found = find_converter(converter, cache_dir=cache_dir, progress=progress)

    # The converter formats its outfile's name ({ftype}); a braces-free temporary name is safe.
    descriptor, temporary = tempfile.mkstemp(
        prefix=".dimcut-export-", suffix=".gguf.partial", dir=gguf_file.parent
    )
    os.close(descriptor)
    temporary = Path(temporary)
    try:
        with _converter_input(model_dir, config, gguf_file.parent) as source:
            output = _run_converter(found, found.command(source, temporary, outtype), model_dir)
        temporary.chmod(0o644)
        os.replace(temporary, gguf_file)
    finally:
        temporary.unlink(missing_ok=True)
    return ExportResult(
        gguf_file=gguf_file,
        outtype=outtype,
        converter=found.root,
        bytes=gguf_file.stat().st_size,
        hidden_size=config.get("hidden_size"),
        architecture=config.get("architectures", ["?"])[0],
        f16_fallback_tensors=_fallback_tensors(output) if outtype.value in QUANT_BLOCK else (),
    )


@contextlib.contextmanager
def _converter_input(model_dir: Path, config: dict, scratch_parent: Path) -> Iterator[Path]:
    """`model_dir` itself when `config` is its own; else a directory beside the output with
    links to its files and `config` as config.json (named like `model_dir`: the converter
    takes the GGUF's model name from it), removed afterwards."""
    if config == json.loads((model_dir / "config.json").read_text()):
        yield model_dir
        return
    scratch = Path(tempfile.mkdtemp(prefix=".dimcut-export-", dir=scratch_parent))
    try:
        staged = scratch / model_dir.resolve().name
        staged.mkdir()
        for file in model_dir.iterdir():
            if file.name != "config.json":
                (staged / file.name).symlink_to(file.resolve())
        (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        yield staged
    finally:
        shutil.rmtree(scratch)


def _run_converter(found: Converter, command: list[str], model_dir: Path) -> list[str]:
    """Run the converter, its output captured; the output lines, or ConversionError."""
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=found.environment()
        )
        try:
            returncode = process.wait()
        except BaseException:  # Ctrl-C or SIGTERM: stop the converter before cleaning up
            process.terminate()
            process.wait()
            raise
        log.seek(0)
        lines = log.read().splitlines()
    if returncode != 0:
        raise ConversionError(
            f"llama.cpp's converter ({found.script}) could not convert {model_dir} "
            f"(exit status {returncode}):\n" + _tail("\n".join(lines))
        )
    return lines


def _fallback_tensors(lines: list[str]) -> tuple[str, ...]:
    """Tensors the converter stored as F16 because they could not be quantized. Its log says
    "<name>, <dtype> --> F16" for each; a quantized export keeps F16 only for those."""
    return tuple(
        line.split(":", 2)[-1].split(",", 1)[0]
        for line in lines
        if line.startswith("INFO:hf-to-gguf:") and "--> F16," in line
    )


def _tail(text: str) -> str:
    return "\n".join(deque(text.strip().splitlines(), maxlen=ERROR_TAIL_LINES))


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        description=(
            "Convert a plain-format (dimcut slice --format plain) or dense checkpoint into one "
            "GGUF file with llama.cpp's own converter (convert_hf_to_gguf.py), which dimcut "
            "fetches on first use from the llama-cpp-python sdist unless --converter or "
            f"${CONVERTER_ENV} points at a llama.cpp source tree. Run the file with llama.cpp or "
            "llama-cpp-python (pip install 'dimcut[gguf]')."
        ),
    )
    parser.add_argument(
        "model",
        metavar="OUT",
        help="model directory, Hugging Face model ID ORG/NAME, or dimcut zoo alias (see "
        "`dimcut slice --help`)",
    )
    parser.add_argument("--revision", metavar="REV", help=zoo.REVISION_HELP)
    parser.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    parser.add_argument(
        "--outtype",
        choices=OutType.values(),
        default=OutType.F16.value,
        help="tensor type: f16 (default), bf16, or q8_0 (8-bit; tensors whose input width is "
        "not a multiple of 32 stay f16)",
    )
    parser.add_argument(
        "--converter",
        metavar="PATH",
        help=f"llama.cpp source tree (or its {CONVERTER_SCRIPT}) to convert with; default "
        f"${CONVERTER_ENV}, else the llama-cpp-python sdist fetched into dimcut's cache",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    parser.set_defaults(func=_run_export)


def _run_export(args) -> int:
    try:
        result = export_gguf(
            zoo.resolve_model(args.model, progress=not args.quiet, revision=args.revision),
            args.gguf,
            args.outtype,
            converter=args.converter,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except ConversionError as exc:
        print(f"dimcut export: error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0
