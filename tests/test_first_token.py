"""benches/first_token.py, code or prose from one forward pass: its mask and its probabilities
against a float64 computation on a tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

import dimcut
from tiny_models import save_tiny_model

BENCH = Path(__file__).resolve().parents[1] / "benches" / "first_token.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("first_token", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_first_token_probabilities_match_a_float64_reference(tmp_path):
    bench = load_bench()
    model_dir = save_tiny_model("llama", tmp_path / "tiny")
    prompts = ['def f(x):\n    """Twice x."""\n', "Once upon a time", "x = [1, 2"]
    found = bench.measure(str(model_dir), prompts)

    model, tokenizer = dimcut.load(model_dir, dtype="bfloat16")
    indented = [i for i in range(len(tokenizer)) if tokenizer.decode([i])[:1] in (" ", "\t")]
    assert tokenizer.convert_tokens_to_ids("Ġ") in indented  # the byte-level space
    assert tokenizer.convert_tokens_to_ids("a") not in indented
    assert bench.indented_tokens(tokenizer).nonzero().flatten().tolist() == indented
    p_indented, greedy = [], []
    with torch.no_grad():
        for prompt in prompts:
            logits = model(tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1]
            probs = logits.double().softmax(-1)[: len(tokenizer)]
            p_indented.append(probs[indented].sum().item())
            greedy.append(int(probs.argmax()) in indented)
    assert abs(found.p_indented - sum(p_indented) / 3) < 1e-5
    assert 0 < found.p_indented < 1
    assert found.greedy_indented == sum(greedy) / 3
    assert 1 <= found.count <= 3
