"""Hugging Face hub model IDs (`ORG/NAME`): a snapshot directory of the local Hugging Face cache.

`hub_snapshot` asks huggingface_hub for the files dimcut reads (config, generation config,
tokenizer, safetensors weights and their index), never other weight formats: online it downloads
what the cache lacks, offline (`HF_HUB_OFFLINE=1`) it only looks in the cache. huggingface_hub is
imported on first use, so `import dimcut` and `dimcut --help` stay cheap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from dimcut.tokenizers import BPE_MERGES, TIKTOKEN_SUFFIX, VOCABULARY_FILES

DEFAULT_REVISION = "main"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Everything but the weights that dimcut reads, or copies into what it writes (top level only:
# exact names do not match `original/tokenizer.model` and the like).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    *VOCABULARY_FILES,
    BPE_MERGES,
    f"*{TIKTOKEN_SUFFIX}",
    # a model written by `dimcut slice` and uploaded as is
    "modeling_dimcut.py",
    "dimcut-manifest.json",
)


def is_repo_id(name: str) -> bool:
    """Whether `name` has the shape of a hub model ID (`NAME` or `ORG/NAME`), by huggingface_hub's
    own validation."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_cache_dir() -> Path:
    """The Hugging Face cache, from the environment as it is now (huggingface_hub reads it once,
    when imported): `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[name])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set, now or when huggingface_hub was
    imported (it then refuses every request)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    set_now = value is not None and value.upper() in constants.ENV_VARS_TRUE_VALUES
    return set_now or constants.HF_HUB_OFFLINE


def hub_snapshot(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """The cache's snapshot directory of `repo_id` at `revision` (a branch, tag or commit;
    default "main") holding config.json and safetensors weights, downloading what is missing
    unless offline. FileNotFoundError / PermissionError / OSError say what is wrong, naming the
    model and the revision."""
    revision = revision or DEFAULT_REVISION
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    offline = hub_offline()
    model = f"{repo_id} (revision {revision})"
    fetch_hint = f"`hf download {repo_id} --revision {revision}`"

    folder = _fetch(
        repo_id,
        revision,
        (*SIDE_FILES, INDEX_FILE, SINGLE_FILE),
        cache,
        offline,
        progress,
        fetch_hint,
    )
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{model}: {index} is not a safetensors index ({exc!r})") from None
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing and not offline:
            # Pinned to the commit just resolved: the branch may move between the two requests.
            _fetch(repo_id, folder.name, missing, cache, offline, progress, fetch_hint)
            missing = [shard for shard in missing if not (folder / shard).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{model}: the cached snapshot {folder} lacks {len(missing)} safetensors shard(s) "
                f"named by {INDEX_FILE} ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''})"
                + (
                    f"; HF_HUB_OFFLINE is set: run with network access, or {fetch_hint}"
                    if offline
                    else ""
                )
            )
    elif not (folder / SINGLE_FILE).is_file():
        where = "the cached snapshot" if offline else "the repository"
        raise FileNotFoundError(
            f"{model}: {where} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
            "dimcut reads safetensors only (not *.bin, *.pth or *.gguf)"
            + (
                f"; if the repository has them, run with network access or {fetch_hint}"
                if offline
                else ""
            )
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{model}: no config.json in {folder}")
    return folder


def snapshot_name(model_dir: str | Path) -> str | None:
    """NAME of the model ID ORG/NAME when `model_dir` is a snapshot in a Hugging Face cache
    (`.../models--ORG--NAME/snapshots/<commit>`): a better label than the commit hash."""
    parent = Path(model_dir).parent
    repo_folder = parent.parent.name
    if parent.name != "snapshots" or not repo_folder.startswith("models--"):
        return None
    return repo_folder.split("--")[-1]


def model_label(model_dir: str | Path) -> str:
    """The name results give a model: NAME for a snapshot of the hub model ID ORG/NAME (its
    directory is named by a commit hash), else the directory's own name."""
    return snapshot_name(model_dir) or Path(model_dir).resolve().name


def _fetch(
    repo_id: str,
    revision: str,
    patterns: Iterable[str],
    cache: Path,
    offline: bool,
    progress: bool,
    fetch_hint: str,
) -> Path:
    """`snapshot_download` of the files matching `patterns`, its errors made into one-line
    messages naming the model and the revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    model = f"{repo_id} (revision {revision})"
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=list(patterns),
            local_files_only=offline,
            tqdm_class=None if progress else _silent_tqdm(),
        )
    except IncompleteSnapshotError as exc:
        raise FileNotFoundError(
            f"{model}: the cached snapshot in {cache} is incomplete and cannot be completed "
            f"now: {_first_line(exc)}; run with network access, or {fetch_hint}"
        ) from None
    except LocalEntryNotFoundError as exc:
        if offline:
            reason = "HF_HUB_OFFLINE is set, so nothing is downloaded"
        else:
            reason = f"the Hugging Face hub could not be reached ({_cause(exc)})"
        raise FileNotFoundError(
            f"{model} is not a local directory, nor in the Hugging Face cache at {cache} "
            f"(HF_HUB_CACHE, else HF_HOME/hub), and {reason}: run with network access, or "
            f"download it with {fetch_hint}"
        ) from None
    except GatedRepoError:
        raise PermissionError(
            f"{model}: the model is gated on the Hugging Face hub: accept its terms at "
            f"https://huggingface.co/{repo_id} and log in (`hf auth login`, or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{model} is not a local directory, nor a model on the Hugging Face hub (or it is "
            "private: log in with `hf auth login`, or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(
            f"{model}: the Hugging Face repository {repo_id} has no revision {revision!r} "
            "(a branch, tag or commit hash)"
        ) from None
    except HfHubHTTPError as exc:
        raise OSError(f"{model}: the Hugging Face hub refused: {_first_line(exc)}") from None
    return Path(folder)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {_first_line(cause)}"


def _silent_tqdm():
    """A tqdm class whose bars never show."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
