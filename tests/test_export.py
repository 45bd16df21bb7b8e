"""`dimcut export`: plain-format and dense checkpoints as GGUF, by llama.cpp's own converter.

The refusals run always (they are decided before the converter is looked for). The conversions
need a llama.cpp converter tree ($DIMCUT_LLAMA_CPP, the one `dimcut export` fetched into the
cache, or fetched here when llama-cpp-python is installed) and, to run the result,
llama-cpp-python (`pip install 'dimcut[gguf]'`, as CI does); without them they are skipped,
saying which is missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dimcut import cli, export, zoo
from dimcut.export import ConversionError, OutType, export_gguf
from dimcut.modeling_dimcut import MODEL_TYPE as SLICEGPT_MODEL_TYPE
from dimcut.slicing import write_sliced_model
from test_formats import per_layer_rotations
from tiny_models import TOKENIZER_CORPUS, VOCAB, random_orthogonal, save_tiny_model, tiny_logits

TOKENS = [0, *torch.randint(3, VOCAB, (15,), generator=torch.Generator().manual_seed(0)).tolist()]
WIDTH = 48  # sliced from 64: not a multiple of Q8_0's block of 32


def sentencepiece_tokenizer(model_dir: Path) -> Path:
    """Add a tiny SentencePiece `tokenizer.model`: llama.cpp's converter reads one without
    needing to recognise the tokenizer (a byte-level BPE must be one it knows by hash)."""
    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 20),
        model_writer=proto,
        vocab_size=120,
        model_type="bpe",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (model_dir / "tokenizer.model").write_bytes(proto.getvalue())
    return model_dir


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory) -> Path:
    dense = save_tiny_model("llama", tmp_path_factory.mktemp("llama") / "dense", shard=None)
    return sentencepiece_tokenizer(dense)


@pytest.fixture(scope="module")
def plain_llama(dense_llama) -> Path:
    out = dense_llama.parent / "plain"
    rotations = {"Q": random_orthogonal(64, 7)}
    write_sliced_model(dense_llama, out, fmt="plain", rotations=rotations, width=WIDTH)
    if not (out / "tokenizer.model").is_file():
        sentencepiece_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def converter() -> export.Converter:
    """$DIMCUT_LLAMA_CPP, else the cached tree; with llama-cpp-python installed (`dimcut[gguf]`,
    as CI installs it) the converter is fetched from the same sdist like `dimcut export` does
    (pip has it cached from the build), so the conversions run wherever the runtime does."""
    wanted = export.installed_llama_cpp_version()
    cached = zoo.default_cache_dir() / f"llama.cpp-{wanted or export.LLAMA_CPP_PYTHON}"
    try:
        return export.find_converter(os.environ.get(export.CONVERTER_ENV) or cached)
    except FileNotFoundError:
        if wanted is not None:
            return export.find_converter(progress=False)
        pytest.skip(
            f"no llama.cpp converter: install 'dimcut[gguf]', set ${export.CONVERTER_ENV} to a "
            "llama.cpp source tree, or run `dimcut export` once to fetch it into the cache"
        )


def files_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# --- refusals (always run) ------------------------------------------------------------------


def test_slicegpt_model_is_refused_and_nothing_written(dense_llama, tmp_path, capsys):
    sliced = tmp_path / "slicegpt"
    rotations = per_layer_rotations(64, 2)
    write_sliced_model(dense_llama, sliced, fmt="slicegpt", rotations=rotations, width=WIDTH)
    assert json.loads((sliced / "config.json").read_text())["model_type"] == SLICEGPT_MODEL_TYPE
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"config\.json: a slicegpt-format.*--format plain"):
        export_gguf(sliced, out / "model.gguf", converter="/nonexistent")
    assert cli.main(["export", str(sliced), "--gguf", str(out / "model.gguf")]) == 1
    error = capsys.readouterr().err
    assert "dimcut export: error:" in error and f"{sliced}/config.json" in error
    assert "shortcut matrices" in error and "--format plain" in error
    assert files_in(out) == []


def test_plain_phi3_narrower_than_its_heads_is_refused(tmp_path):
    dense = save_tiny_model("phi3", tmp_path / "dense", shard=None)
    plain = tmp_path / "plain"
    write_sliced_model(dense, plain, fmt="plain", rotations={"Q": np.eye(64)}, width=WIDTH)
    message = r"hidden_size 48 and attention width 64 .* no Llama equivalent"
    with pytest.raises(ValueError, match=message):
        export_gguf(plain, tmp_path / "model.gguf", converter="/nonexistent")
    assert not (tmp_path / "model.gguf").exists()


def test_inputs_are_checked_before_converting(dense_llama, tmp_path):
    gguf_file = tmp_path / "model.gguf"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_gguf(tmp_path, gguf_file)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((dense_llama / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="carries its tokenizer.*no tokenizer files"):
        export_gguf(no_tokenizer, gguf_file)
    with pytest.raises(ValueError, match="outtype must be one of f16, bf16, q8_0, got 'q4_k'"):
        export_gguf(dense_llama, gguf_file, "q4_k")
    gguf_file.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="model.gguf exists"):
        export_gguf(dense_llama, gguf_file)
    with pytest.raises(FileNotFoundError, match="converter /nonexistent: no llama.cpp converter"):
        export_gguf(dense_llama, gguf_file, converter="/nonexistent", overwrite=True)
    assert gguf_file.read_bytes() == b"old"


def test_a_failing_converter_leaves_nothing_behind(dense_llama, tmp_path):
    fake = tmp_path / "llama.cpp"
    (fake / "conversion").mkdir(parents=True)
    # Writes part of its output, then fails the way the converter reports errors.
    (fake / "convert_hf_to_gguf.py").write_text(
        "import sys\n"
        "open(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF partial')\n"
        "print('INFO:hf-to-gguf:Loading model')\n"
        "sys.exit('NotImplementedError: BPE pre-tokenizer was not recognized')\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match=r"could not convert .*dense \(exit status 1\)"):
        export_gguf(dense_llama, out / "model.gguf", converter=fake)
    assert files_in(out) == []


def fake_sdist(path: Path, version: str) -> Path:
    """A tar.gz laid out like the llama-cpp-python sdist (bindings + vendored llama.cpp)."""
    top = f"llama_cpp_python-{version}"
    files = {
        f"{top}/llama_cpp/__init__.py": "",
        f"{top}/vendor/llama.cpp/CMakeLists.txt": "",
        f"{top}/vendor/llama.cpp/src/llama.cpp": "",
        f"{top}/vendor/llama.cpp/LICENSE": "MIT",
        f"{top}/vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')",
        f"{top}/vendor/llama.cpp/conversion/__init__.py": "",
        f"{top}/vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
    }
    archive = path / f"{top}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return archive


def test_converter_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    archive = fake_sdist(tmp_path, "9.9")
    downloads = []

    def pip_download(command, **kwargs):  # what `pip download -d DIR` leaves in DIR
        assert command[-4:-2] == ["llama-cpp-python", "llama-cpp-python==9.9"]
        downloads.append(command)
        shutil.copy(archive, command[-1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(export.subprocess, "run", pip_download)
    monkeypatch.delenv(export.CONVERTER_ENV, raising=False)
    monkeypatch.setattr(export, "installed_llama_cpp_version", lambda: "9.9")
    cache = tmp_path / "cache"
    found = export.find_converter(cache_dir=cache, progress=False)
    assert found.root == cache / "llama.cpp-9.9"
    assert sorted(p.name for p in found.root.iterdir()) == [
        "LICENSE",
        "conversion",
        "convert_hf_to_gguf.py",
        "gguf-py",
    ]
    assert files_in(cache) == ["llama.cpp-9.9"]  # no scratch left
    assert export.find_converter(cache_dir=cache).root == found.root
    assert len(downloads) == 1
    monkeypatch.setenv(export.CONVERTER_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"DIMCUT_LLAMA_CPP .*nowhere: no llama.cpp"):
        export.find_converter(cache_dir=cache)


def test_a_failed_download_says_what_to_do(tmp_path, monkeypatch):
    def pip_fails(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(export.subprocess, "run", pip_fails)
    with pytest.raises(ConversionError, match=r"(?s)DIMCUT_LLAMA_CPP.*No matching distribution"):
        export.fetch_converter("9.9", tmp_path, progress=False)
    assert files_in(tmp_path) == []


# --- conversions (need the converter; running them needs llama-cpp-python) ------------------


def llama_cpp_logits(gguf_file: Path, tokens: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install 'dimcut[gguf]')"
    )
    model = llama_cpp.Llama(
        model_path=str(gguf_file), logits_all=True, n_ctx=64, n_threads=2, verbose=False
    )
    try:
        model.eval(tokens)
        return np.array(model.scores[: len(tokens)], dtype=np.float64)
    finally:
        model.close()


@pytest.mark.parametrize("which", ["plain", "dense"])
def test_f16_gguf_gives_transformers_logits(which, plain_llama, dense_llama, converter, tmp_path):
    model_dir = plain_llama if which == "plain" else dense_llama
    gguf_file = tmp_path / f"{which}.gguf"
    result = export_gguf(model_dir, gguf_file, "f16", converter=converter.root)
    assert result.gguf_file == gguf_file and result.bytes == gguf_file.stat().st_size
    assert result.hidden_size == (WIDTH if which == "plain" else 64)
    assert files_in(tmp_path) == [gguf_file.name]
    got = llama_cpp_logits(gguf_file, TOKENS)
    expected = tiny_logits(model_dir, torch.tensor([TOKENS]))[0].double().numpy()
    assert got.shape == expected.shape == (len(TOKENS), VOCAB)
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert relative < 5e-3, f"{which}: max relative logit error {relative:.2e} (f16 weights)"
    # A wrong head width, eps or rotary layout would change the ranking, not only the digits.
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.9


def test_plain_qwen2_is_converted_as_llama(converter, tmp_path):
    """llama.cpp's Qwen2 graph wants attention hidden_size wide; its Llama graph takes head_dim."""
    dense = sentencepiece_tokenizer(save_tiny_model("qwen2", tmp_path / "dense", shard=None))
    plain = tmp_path / "plain"
    write_sliced_model(
        dense, plain, fmt="plain", rotations={"Q": random_orthogonal(64, 3)}, width=WIDTH
    )
    out = tmp_path / "out"
    out.mkdir()
    result = export_gguf(plain, out / "qwen2.gguf", converter=converter.root)
    assert result.architecture == "LlamaForCausalLM" and "as LlamaForCausalLM" in result.summary()
    assert files_in(out) == ["qwen2.gguf"]  # the relabelled staging directory is gone
    assert json.loads((plain / "config.json").read_text())["model_type"] == "qwen2"
    got = llama_cpp_logits(out / "qwen2.gguf", TOKENS)
    expected = tiny_logits(plain, torch.tensor([TOKENS]))[0].double().numpy()
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert relative < 5e-3, f"qwen2 as llama: max relative logit error {relative:.2e}"


def test_q8_0_keeps_f16_where_rows_are_not_whole_blocks(plain_llama, converter, tmp_path):
    sys.path.insert(0, str(converter.root / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    result = export_gguf(plain_llama, tmp_path / "q8.gguf", OutType.Q8_0, converter=converter.root)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors}
    # Input width 48 (the sliced hidden size) or 144 (intermediate): not multiples of 32.
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "F16"
    assert types["blk.0.attn_output.weight"] == "Q8_0"  # input width 4 heads × 16 = 64
    assert set(result.f16_fallback_tensors) == {n for n, t in types.items() if t == "F16"}
    fallbacks = len(result.f16_fallback_tensors)
    assert f"{fallbacks} tensors stayed F16" in result.summary() and fallbacks == 14


def test_the_export_command_does_not_import_torch():
    """The converter runs in its own process: `dimcut export` itself stays light."""
    code = "import sys, dimcut.export; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == "[]"
