"""Shared fixtures. Nothing may come from the Hugging Face hub: tests run offline."""

from __future__ import annotations

import os
import signal

# Set before transformers / datasets are imported: they read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A shell starting the suite in the background ignores SIGINT, and child processes inherit an
# ignored signal (Python then installs no KeyboardInterrupt handler): the Ctrl-C tests would see
# their signal vanish. A caught signal is reset to the default in children, so catch it here.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest

from tiny_models import save_tiny_model, save_trained_tiny_model, tiny_config


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64) with a real tokenizer, saved as one safetensors file."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), shard=None)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    """The same tiny Llama sharded, with an index; never modified (tests that break it copy it)."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("pristine") / "model")


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory):
    """The tiny Llama trained on the built-in corpus (`save_trained_tiny_model`); never modified."""
    return save_trained_tiny_model(tmp_path_factory.mktemp("trained") / "dense")


@pytest.fixture
def tiny_llama_config() -> dict:
    """config.json of tiny_models' 2-layer Llama (hidden 64, 4 heads, 2 key/value heads)."""
    return tiny_config("llama").to_dict()
