"""Tiny random checkpoints of every supported family, saved as real (sharded) safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Question: Which gas do plants take in from the air?\nAnswer: carbon dioxide",
    "Paris is the capital and most populous city of France, on the Seine.",
    "How do you boil an egg? Put the egg in water and heat it until it boils.",
    "Sarah was a much better surgeon than Maria so she always got the harder cases.",
]


def build_tokenizer(vocab_size: int = 384):
    """A small byte-level BPE tokenizer (any text encodes) that adds one BOS, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


VOCAB = 384  # = len(build_tokenizer())

FAMILY_CONFIGS = {
    # name: (config class name, extra config fields)
    "llama": ("LlamaConfig", {}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"rms_norm_eps": 1e-6}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
}


def tiny_config(family: str, hidden_size: int = 64, layers: int = 2):
    import transformers

    class_name, extra = FAMILY_CONFIGS[family]
    fields = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size + 16,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
    }
    fields.update(extra)
    return getattr(transformers, class_name)(**fields)


def save_tiny_model(
    family: str,
    path: Path,
    *,
    seed: int = 0,
    shard: str | None = "60KB",
    dtype=torch.float32,
    hidden_size: int = 64,
    layers: int = 2,
) -> Path:
    """A checkpoint (2 layers unless told) with the tokenizer: random weights with non-trivial
    norm scales (so that norm fusion is exercised), sharded at `shard` (None: one file)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, hidden_size=hidden_size, layers=layers)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.1)
    model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    build_tokenizer(VOCAB).save_pretrained(path)
    return path


def save_trained_tiny_model(path: Path) -> Path:
    """The tiny Llama after 150 Adam steps on the built-in corpus: it has learnt enough
    structure for slicing to cost perplexity (and for healing to win some of it back)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dimcut.calibration import calibration_documents, sample_sequences

    dense = save_tiny_model("llama", path, shard=None)
    tokenizer = AutoTokenizer.from_pretrained(dense)
    docs, _ = calibration_documents(None)
    tokens = sample_sequences(tokenizer, docs[:600], 64, 64, seed=0)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        batch = tokens[torch.randint(0, len(tokens), (8,))]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(dense)
    return dense


def tiny_logits(model_dir: Path, tokens: torch.Tensor, **load_kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **load_kwargs)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def random_orthogonal(size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.sign(np.diag(r))
