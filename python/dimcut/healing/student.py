"""The student of `dimcut heal`: the sliced model with its frozen weights memory-mapped.

On the CPU, every weight that training does not change and whose dtype on disk is the one
training computes in is a read-only view of the shard file (no copy). Its pages are dropped from
resident memory as soon as the step is done with them — a decoder layer's after its forward and
again after its backward, the head's after its backward, the embedding's after its lookup — so
the resident model is about one layer and the head, whatever its size; the next step reads the
pages back from the page cache. What training changes (the LoRA adapters, trained shortcut
matrices) and weights stored in another dtype are ordinary tensors.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from dimcut._core import DimcutError
from dimcut.architectures import EMBEDDING, LM_HEAD
from dimcut.runtime import Precision

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class MappedShards:
    """Read-only maps of a checkpoint's safetensors shards, with their tensors as views."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._maps: dict[str, mmap.mmap] = {}
        # tensor name -> (shard, dtype, shape, byte offset, byte length)
        self._where: dict[str, tuple[str, str, list[int], int, int]] = {}
        for shard in _shard_files(model_dir):
            with open(model_dir / shard, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
                self._maps[shard] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                self._where[name] = (shard, entry["dtype"], entry["shape"], 8 + length + begin,
                                     end - begin)  # fmt: skip

    def names(self) -> set[str]:
        return set(self._where)

    def dtype(self, name: str) -> torch.dtype | None:
        return _DTYPES.get(self._where[name][1])

    def view(self, name: str) -> torch.Tensor:
        """The tensor as stored, backed by the file map (read-only: never write to it)."""
        shard, dtype, shape, offset, nbytes = self._where[name]
        torch_dtype = _DTYPES.get(dtype)
        if torch_dtype is None:
            raise DimcutError(f"{self.model_dir / shard}: tensor {name!r} has dtype {dtype}")
        count = nbytes // torch_dtype.itemsize
        with warnings.catch_warnings():  # "the given buffer is not writable": it is read only
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._maps[shard], dtype=torch_dtype, count=count, offset=offset
            )
        return flat.view(shape)

    def release(self, names: Iterable[str]) -> None:
        """Drop these tensors' pages from resident memory (they stay in the page cache)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for name in names:
            shard, _dtype, _shape, offset, nbytes = self._where[name]
            start = offset - offset % mmap.PAGESIZE
            if nbytes:
                self._maps[shard].madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)

    def close(self) -> None:
        for file_map in self._maps.values():
            try:
                file_map.close()
            except BufferError:  # a view is still alive: the map closes when it goes
                pass
        self._maps.clear()


def _shard_files(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def load_student(
    sliced_dir: Path,
    device: torch.device,
    dtype: Precision,
    *,
    trained: Callable[[str], bool],
) -> tuple[torch.nn.Module, MappedShards]:
    """The sliced model in `dtype` on `device`, every tensor for which `trained(name)` is false
    mapped from the shards where it can be (on the CPU, stored in `dtype`), with the hooks that
    release its pages; returns (model, shards)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(sliced_dir, trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype.torch)
    shards = MappedShards(sliced_dir)
    stored = shards.names()
    mapped: set[str] = set()
    for name, parameter in list(model.named_parameters(remove_duplicate=False)):
        if name not in stored:
            continue  # a tied head: set below
        if not trained(name) and device.type == "cpu" and shards.dtype(name) == dtype.torch:
            value = shards.view(name)
            mapped.add(name)
        else:
            value = shards.view(name).to(device, dtype.torch, copy=True)
        module_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(module_name), attribute,
                torch.nn.Parameter(value, requires_grad=parameter.requires_grad))  # fmt: skip
    if LM_HEAD not in stored:
        model.lm_head.weight = model.get_input_embeddings().weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        shards.close()
        raise DimcutError(f"{sliced_dir}: the checkpoint has no tensor {missing[0]!r}")
    _release_after_use(model, shards, mapped)
    return model.eval(), shards


def _release_after_use(model, shards: MappedShards, mapped: set[str]) -> None:
    def release(names: list[str]) -> None:
        if names:
            shards.release(names)

    def after_backward(names: list[str]):
        """A forward pre-hook: once the gradient of the module's input is computed, the
        module's backward is over."""

        def hook(_module, args, kwargs=None):
            first = args[0] if args else (kwargs or {}).get("hidden_states")
            if isinstance(first, torch.Tensor) and first.requires_grad:
                first.register_hook(lambda _gradient: release(names))

        return hook

    layers = model.model.layers
    for index, layer in enumerate(layers):
        prefix = f"model.layers.{index}."
        names = sorted(n for n in mapped if n.startswith(prefix))
        layer.register_forward_hook(lambda *_a, names=names: release(names))
        layer.register_forward_pre_hook(after_backward(names), with_kwargs=True)
    stored_head = LM_HEAD if LM_HEAD in shards.names() else EMBEDDING  # tied: the embedding
    head = [stored_head] if stored_head in mapped else []
    model.lm_head.register_forward_pre_hook(after_backward(head), with_kwargs=True)
    model.lm_head.register_forward_hook(lambda *_a: release(head))
    embedding = [EMBEDDING] if EMBEDDING in mapped else []
    model.get_input_embeddings().register_forward_hook(lambda *_a: release(embedding))
