"""Loading a checkpoint's tokenizer, with an error that says what is missing.

Without vocabulary files transformers tries to convert a "slow" tokenizer it does not have and
reports "You need to have sentencepiece or tiktoken installed", which sends people to install
packages instead of copying the tokenizer files they forgot.
"""

from __future__ import annotations

from pathlib import Path

# Any one of these holds a vocabulary transformers can build a tokenizer from; BPE vocab.json
# also needs its merges.txt. tokenizer_config.json alone only says which class to build.
VOCABULARY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "tekken.json",
)
TIKTOKEN_SUFFIX = ".tiktoken"
BPE_MERGES = "merges.txt"


def missing_tokenizer_files(model_dir: str | Path) -> str | None:
    """Why `model_dir` cannot provide a tokenizer, or None when it can."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return f"{model_dir} is not a directory"
    present = {path.name for path in model_dir.iterdir()}
    if any(name.endswith(TIKTOKEN_SUFFIX) for name in present):
        return None
    vocabularies = [name for name in VOCABULARY_FILES if name in present]
    if vocabularies == ["vocab.json"] and BPE_MERGES not in present:
        return f"{model_dir} has vocab.json but not its {BPE_MERGES}"
    if vocabularies:
        return None
    config_only = "tokenizer_config.json" in present
    return (
        f"{model_dir} has no tokenizer files: none of {', '.join(VOCABULARY_FILES)}, "
        f"*{TIKTOKEN_SUFFIX}"
        + (" (its tokenizer_config.json holds no vocabulary)" if config_only else "")
        + "; copy the tokenizer files of the model it came from "
        "(tokenizer.json and tokenizer_config.json, or tokenizer.model)"
    )


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved in `model_dir`; FileNotFoundError naming the missing files if none."""
    from transformers import AutoTokenizer

    reason = missing_tokenizer_files(model_dir)
    if reason is not None:
        raise FileNotFoundError(reason)
    # Remote code stays off, as for the model (dimcut's own classes are registered locally).
    return AutoTokenizer.from_pretrained(Path(model_dir), trust_remote_code=False)
