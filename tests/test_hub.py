"""Hugging Face model IDs (`dimcut slice ORG/NAME`): resolved through huggingface_hub's cache.

Everything runs offline: the cache is built here, laid out as huggingface_hub lays it out
(`models--ORG--NAME/refs/<ref>` holding a commit hash, `snapshots/<hash>/<file>`, linking into
`blobs/` or plain files), and the one online test replaces `snapshot_download` by a fake repo.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from dimcut import hub, zoo
from helpers import SLICE, refuse, run_cli, run_cli_subprocess, tree_hash
from tiny_models import TOKENIZER_CORPUS, save_tiny_model

MAIN = "a" * 40  # commit hashes
V2 = "b" * 40


def add_snapshot(
    cache: Path, repo_id: str, commit: str, files: Path, refs=("main",), blobs: bool = True
) -> Path:
    """Put the files of the directory `files` into `cache` as revision `commit` of `repo_id`,
    named by `refs`: as symbolic links into blobs/ (as downloads are stored), or plain files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        if blobs:
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
        else:
            shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # as huggingface_hub writes it: no newline
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """org/tiny: a sharded tiny Llama (with index) at main, a single-file one at refs/v2;
    org/binonly: PyTorch weights only; org/partial: a shard of its index missing."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    sharded = save_tiny_model("llama", root / "sharded")
    assert (sharded / hub.INDEX_FILE).is_file()
    add_snapshot(cache, "org/tiny", MAIN, sharded)
    add_snapshot(
        cache,
        "org/tiny",
        V2,
        save_tiny_model("llama", root / "v2", seed=1, shard=None),
        refs=("v2",),
        blobs=False,
    )

    binonly = root / "binonly"
    binonly.mkdir()
    shutil.copy(sharded / "config.json", binonly)
    (binonly / "pytorch_model.bin").write_bytes(b"not read")
    add_snapshot(cache, "org/binonly", MAIN, binonly, blobs=False)

    partial = root / "partial"
    shutil.copytree(sharded, partial)
    max(partial.glob("model-*.safetensors")).unlink()
    add_snapshot(cache, "org/partial", MAIN, partial, blobs=False)
    return cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch) -> Path:
    """The environment of an offline machine whose Hugging Face cache is `hub_cache`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def snapshot(cache: Path, repo_id: str, commit: str) -> Path:
    return (cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit).resolve()


def test_a_model_id_resolves_to_its_cached_snapshot(offline_cache):
    expected = snapshot(offline_cache, "org/tiny", MAIN)
    assert zoo.resolve_model("org/tiny") == expected
    assert zoo.resolve_model("org/tiny", revision="main") == expected
    assert zoo.resolve_model("org/tiny", revision=MAIN) == expected  # a commit hash
    assert (expected / "config.json").is_symlink()  # the cache's layout, untouched


def test_a_revision_picks_another_snapshot(offline_cache):
    expected = snapshot(offline_cache, "org/tiny", V2)
    assert zoo.resolve_model("org/tiny", revision="v2") == expected
    assert zoo.resolve_model("org/tiny", revision=V2) == expected
    assert (expected / hub.SINGLE_FILE).is_file()


@pytest.mark.parametrize(
    ("model", "revision", "expected"),
    [
        ("org/missing", None, r"org/missing \(revision main\) is not a local directory, nor in"),
        ("org/tiny", "v3", r"org/tiny \(revision v3\) is not a local directory, nor in"),
        ("missing", None, r"missing \(revision main\) is not a local directory"),
    ],
)
def test_a_model_missing_from_the_cache_offline_is_refused(
    offline_cache, model, revision, expected
):
    with pytest.raises(FileNotFoundError, match=expected) as raised:
        zoo.resolve_model(model, revision=revision)
    message = str(raised.value)
    assert f"the Hugging Face cache at {offline_cache}" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert f"`hf download {model} --revision {revision or 'main'}`" in message
    assert "\n" not in message


def test_the_cache_location_is_read_from_the_environment_at_call_time(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub.hub_cache_dir() == tmp_path / "hub"


def test_a_repo_without_safetensors_is_refused(offline_cache):
    with pytest.raises(FileNotFoundError) as raised:
        zoo.resolve_model("org/binonly")
    message = str(raised.value)
    assert message.startswith("org/binonly (revision main): the cached snapshot has no safetensors")
    assert "dimcut reads safetensors only" in message


def test_a_cached_snapshot_missing_a_shard_is_refused(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"org/partial \(revision main\): .* lacks 1 "):
        zoo.resolve_model("org/partial")


def test_local_paths_and_aliases_come_first_and_take_no_revision(
    offline_cache, tmp_path, monkeypatch
):
    def no_hub(*args, **kwargs):
        raise AssertionError("asked the hub")

    monkeypatch.setattr(hub, "hub_snapshot", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)  # a directory shaped like a model ID wins
    assert zoo.resolve_model("org/tiny") == Path("org/tiny")
    # Not a model ID (the caller reports the missing directory, as before).
    for name in ("./org/nowhere", "a/b/c", "org/no--where", str(tmp_path / "gone")):
        assert zoo.resolve_model(name) == Path(name)
    with pytest.raises(ValueError, match="--revision v2 applies to Hugging Face model IDs only"):
        zoo.resolve_model("org/tiny", revision="v2")
    with pytest.raises(ValueError, match="not to the offline model smollm2"):
        zoo.resolve_model("smollm2", revision="v2")


def test_the_commands_refuse_a_missing_model_in_one_line(offline_cache, tmp_path, capsys):
    out = tmp_path / "out"
    message = refuse(
        ["slice", "org/missing", "--sparsity", "0.25", "-o", out],
        capsys,
        r"^dimcut slice: error: org/missing \(revision main\) is not a local directory",
        "hf download org/missing",
    )
    assert message.count("\n") == 1
    refuse(
        ["heal", tmp_path, "--teacher", "org/tiny", "--revision", "nope", "-o", out],
        capsys,
        r"^dimcut heal: error: org/tiny \(revision nope\) is not a local directory",
    )
    refuse(["export", "org/binonly", "--gguf", tmp_path / "m.gguf"], capsys, "no safetensors")
    refuse(
        ["slice", "./nowhere/model", "--sparsity", "0.25", "-o", out],
        capsys,
        "no config.json",  # not a model ID: the missing directory, as before
    )
    # In a child process, whose huggingface_hub reads the environment when imported.
    result = run_cli_subprocess(
        ["eval", "org/missing", "--revision", "v9", "-o", tmp_path / "r.json"],
        environment={"HF_HUB_CACHE": str(offline_cache)},
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        f"dimcut eval: error: org/missing (revision v9) is not a local directory, nor in the "
        f"Hugging Face cache at {offline_cache}"
    ), result.stderr
    assert not (tmp_path / "r.json").exists()


def test_slice_reads_a_cached_model_id_and_leaves_the_cache_untouched(
    offline_cache, tmp_path, capsys
):
    from dimcut.evaluation.record import model_facts

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(TOKENIZER_CORPUS * 20))
    before = tree_hash(offline_cache)
    links = sorted(p for p in offline_cache.rglob("*") if p.is_symlink())
    out = tmp_path / "sliced"
    code, output = run_cli(["slice", "org/tiny", "-o", out, *SLICE, "--calib", calib], capsys)
    assert code == 0, output
    config = json.loads((out / "config.json").read_text())
    assert config["dimcut"]["source_model"] == str(snapshot(offline_cache, "org/tiny", MAIN))
    assert config["hidden_size"] == 64 and config["dimcut"]["hidden_size"] == 48
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()
    assert model_facts(out)["label"] == "tiny"  # the model it was cut from, not a commit hash
    assert tree_hash(offline_cache) == before
    assert sorted(p for p in offline_cache.rglob("*") if p.is_symlink()) == links

    # --revision: the other snapshot, a different model
    code, output = run_cli(
        ["slice", "org/tiny", "--revision", "v2", "-o", tmp_path / "v2", *SLICE, "--calib", calib],
        capsys,
    )
    assert code == 0, output
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert config["dimcut"]["source_model"] == str(snapshot(offline_cache, "org/tiny", V2))
    assert tree_hash(offline_cache) == before


class FakeHub:
    """`snapshot_download` of a repo holding `files` (name -> bytes) at commit `commit`: writes
    what the patterns select into the cache, the way huggingface_hub does, and records it."""

    def __init__(self, files: dict[str, bytes], commit: str = "c" * 40):
        self.files, self.commit, self.calls = files, commit, []

    def __call__(self, repo_id, *, revision, cache_dir, allow_patterns, local_files_only, **_):
        from huggingface_hub.utils import filter_repo_objects

        assert not local_files_only
        selected = sorted(filter_repo_objects(list(self.files), allow_patterns=allow_patterns))
        self.calls.append((revision, selected))
        folder = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
        folder = folder / self.commit
        for name in selected:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(self.files[name])
        return str(folder)


def test_online_only_what_dimcut_reads_is_downloaded(hub_cache, tmp_path, monkeypatch):
    import huggingface_hub

    model = snapshot(hub_cache, "org/tiny", MAIN)
    wanted = {p.name: p.read_bytes() for p in model.iterdir()}
    junk = [
        "pytorch_model.bin",
        "consolidated.safetensors",  # Mistral's own format, beside the HF shards
        "original/consolidated.00.pth",
        "original/tokenizer.model",
        "model.gguf",
        "onnx/model.onnx",
        "README.md",
    ]
    fake = FakeHub({**wanted, **{name: b"junk" for name in junk}})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))

    folder = zoo.resolve_model("org/remote", revision="v1")

    assert folder == tmp_path / "cache" / "models--org--remote" / "snapshots" / fake.commit
    shards = sorted(name for name in wanted if name.startswith("model-"))
    metadata = sorted(set(wanted) - set(shards))
    assert fake.calls == [("v1", metadata), (fake.commit, shards)]  # the shards at the commit
    assert tree_hash(folder) == tree_hash(model)

    # Everything there: one request, for the small files.
    fake.calls.clear()
    assert zoo.resolve_model("org/remote", revision="v1") == folder
    assert fake.calls == [("v1", metadata)]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            "RepositoryNotFoundError",
            (
                r"org/remote \(revision main\) is not a local directory, nor a model on the "
                r"Hugging Face hub \(or it is private"
            ),
        ),
        ("GatedRepoError", r"org/remote \(revision main\): the model is gated"),
        ("RevisionNotFoundError", r"repository org/remote has no revision 'main'"),
    ],
)
def test_online_errors_name_the_model_and_revision(error, expected, tmp_path, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    def refuse_request(*args, **kwargs):
        request = httpx2.Request("GET", "https://huggingface.co/api/models/org/remote")
        response = httpx2.Response(404, request=request)
        raise getattr(errors, error)("404 Client Error", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse_request)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match=expected):
        zoo.resolve_model("org/remote")


def test_every_model_command_documents_revision():
    from dimcut.cli import build_parser

    assert "ORG/NAME" in zoo.MODEL_HELP and "--revision" in zoo.MODEL_HELP
    for command in ("slice", "eval", "heal", "export", "sweep"):
        parser = build_parser(command)
        sub = parser._subparsers._group_actions[0].choices[command]
        help_text = " ".join(sub.format_help().split())
        assert "--revision REV" in help_text, command
        assert "branch, tag or commit of a Hugging Face model ID" in help_text, command


def test_huggingface_hub_is_imported_only_to_resolve_a_model_id():
    import subprocess
    import sys

    script = (
        "import sys, dimcut, dimcut.zoo, dimcut.hub\n"
        "from dimcut.cli import build_parser\n"
        "build_parser(None)\n"
        "print('huggingface_hub' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False", result.stderr


def test_results_label_a_model_id_by_its_name(offline_cache, tmp_path):
    """A snapshot directory is named by its commit: records (and sweep's label) say NAME."""
    from dimcut.evaluation.record import model_facts

    cached = snapshot(offline_cache, "org/tiny", V2)
    assert hub.snapshot_name(cached) == "tiny" and hub.snapshot_name(tmp_path) is None
    assert hub.model_label(cached) == "tiny" and hub.model_label(tmp_path) == tmp_path.name
    assert model_facts(cached)["label"] == "tiny"
