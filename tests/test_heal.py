"""`dimcut heal`: losses against direct computations, healing a sliced tiny model end to end
(both formats), the merge, resume after Ctrl-C, and refusals of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import dimcut
from dimcut.calibration import calibration_documents
from dimcut.evaluation import perplexity
from dimcut.healing import HealOptions, Loss, kd_loss, lm_loss, topk_targets
from dimcut.runtime import Precision
from helpers import leftovers, refuse, run_cli, run_cli_subprocess, tree_hash
from tiny_models import save_tiny_model

QUICK = HealOptions(steps=12, seqlen=64, lr=2e-3)


def held_out_ppl(model_dir) -> float:
    docs, _ = calibration_documents(None)
    model, tokenizer = dimcut.load(model_dir)
    return perplexity(model, tokenizer, docs[-40:], seqlen=64)["ppl"]


@pytest.fixture(scope="module")
def sliced(trained_llama, tmp_path_factory):
    """The trained tiny Llama sliced at s = 0.5 in both formats (never modified)."""
    root = tmp_path_factory.mktemp("sliced")
    out = {}
    for fmt in ("slicegpt", "plain"):
        out[fmt] = root / fmt
        dimcut.slice_model(
            trained_llama, 0.5, out[fmt], fmt=fmt, nsamples=8, seqlen=64, progress=False
        )
    return out


# --- losses ----------------------------------------------------------------------------------


def test_kd_loss_is_zero_for_a_student_identical_to_its_teacher():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50) * 3
    for k in (1, 5, 50):
        assert kd_loss(logits, *topk_targets(logits, k)).abs().item() < 1e-6
    assert kd_loss(torch.randn(2, 7, 50), *topk_targets(logits, 5)).item() > 0.1


def test_kd_loss_is_the_kl_of_the_top_k_plus_tail_coarsening():
    torch.manual_seed(1)
    teacher, student = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40) * 2
    values, indices = topk_targets(teacher, 6)
    p, q = teacher.softmax(-1), student.double().softmax(-1)
    expected = 0.0
    for row in range(3):
        top = indices[row].long()
        p_top, q_top = p[row, top], q[row, top]
        p_all = torch.cat([p_top, 1 - p_top.sum(0, keepdim=True)])
        q_all = torch.cat([q_top, 1 - q_top.sum(0, keepdim=True)])
        expected += (p_all * (p_all / q_all).log()).sum().item() / 3
    assert kd_loss(student, values, indices).item() == pytest.approx(expected, rel=1e-5)
    # With the whole vocabulary kept it is the full KL divergence.
    values, indices = topk_targets(teacher, 40)
    full = F.kl_div(
        student.log_softmax(-1),
        teacher.float().log_softmax(-1),
        log_target=True,
        reduction="batchmean",
    )
    assert kd_loss(student, values, indices).item() == pytest.approx(full.item(), rel=1e-4)


def test_lm_loss_is_next_token_cross_entropy():
    torch.manual_seed(2)
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    direct = -logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert lm_loss(logits, ids).item() == pytest.approx(direct.item(), rel=1e-6)


# --- healing end to end ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["slicegpt", "plain"])
def test_heal_lowers_the_loss_and_perplexity_and_the_output_loads(
    fmt, sliced, trained_llama, tmp_path
):
    from transformers import AutoModelForCausalLM

    before = tree_hash(sliced[fmt])
    out = tmp_path / "healed"
    result = dimcut.heal(
        sliced[fmt],
        trained_llama,
        out,
        HealOptions(steps=30, seqlen=64, lr=2e-3),
        progress=False,
    )
    assert result.final_loss < 0.95 * result.initial_loss, result
    assert held_out_ppl(out) < 0.97 * held_out_ppl(sliced[fmt])
    assert tree_hash(sliced[fmt]) == before  # the input is never written
    assert leftovers(tmp_path, "healed") == ["healed"]  # the state directory is gone
    config = json.loads((out / "config.json").read_text())
    sliced_config = json.loads((sliced[fmt] / "config.json").read_text())
    heal = config["dimcut"].pop("heal")
    assert config == sliced_config  # the same model, with the heal recorded
    assert heal["loss"] == "kd" and heal["steps"] == 30 and heal["data"]["source"] == "builtin"
    assert len(heal["data"]["token_sha256"]) == 64
    # Only the adapted linears changed; embedding, head, norms are the sliced model's bytes.
    old, new = load_file(sliced[fmt] / "model.safetensors"), load_file(out / "model.safetensors")
    assert old.keys() == new.keys()
    changed = {name for name in old if not torch.equal(old[name], new[name])}
    assert changed and all(("_proj." in name) for name in changed), changed
    assert len(changed) == 2 * 7  # 2 layers × (q, k, v, o, gate, up, down)
    # It loads as it did before healing: plain as a stock model without dimcut's classes.
    if fmt == "plain":
        model = AutoModelForCausalLM.from_pretrained(out)
        assert type(model).__name__ == "LlamaForCausalLM"
    record = dimcut.evaluate(out, tasks=[], ppl=None)
    assert record["model"]["heal"]["loss"] == "kd"
    assert "shortcut_lr" not in record["model"]["heal"]  # untrained shortcuts: their rate is moot


def test_merged_weights_equal_the_base_plus_the_adapter_product(sliced, trained_llama, tmp_path):
    options = HealOptions(steps=6, seqlen=64, lr=2e-3, loss=Loss.LM)
    dimcut.heal(
        sliced["plain"], trained_llama, tmp_path / "h", options, keep_adapter=True, progress=False
    )
    adapter = load_file(tmp_path / "h-adapter" / "adapter_model.safetensors")
    adapter_config = json.loads((tmp_path / "h-adapter" / "adapter_config.json").read_text())
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    base = load_file(sliced["plain"] / "model.safetensors")
    healed = load_file(tmp_path / "h" / "model.safetensors")
    checked = 0
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        b = adapter[name.replace(".lora_A.", ".lora_B.")]
        weight = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        expected = base[weight] + scale * b @ a
        torch.testing.assert_close(healed[weight], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(healed[weight], base[weight])
        checked += 1
    assert checked == 14


def test_trained_shortcuts_change_and_reload(sliced, trained_llama, tmp_path):
    options = HealOptions(steps=4, seqlen=64, lr=2e-3, train_shortcuts=True)
    dimcut.heal(sliced["slicegpt"], trained_llama, tmp_path / "h", options, progress=False)
    old = load_file(sliced["slicegpt"] / "model.safetensors")
    new = load_file(tmp_path / "h" / "model.safetensors")
    shortcuts = [n for n in old if n.endswith("_shortcut")]
    assert shortcuts and all(not torch.equal(old[n], new[n]) for n in shortcuts)
    model, _ = dimcut.load(tmp_path / "h")
    assert torch.equal(model.model.layers[0].attn_shortcut.detach(), new[shortcuts[0]])
    heal = dimcut.evaluate(tmp_path / "h", tasks=[], ppl=None)["model"]["heal"]
    assert heal["train_shortcuts"] is True and heal["shortcut_lr"] == options.shortcut_lr


def _mapped_rss(path) -> int:
    """Resident bytes of this process's maps of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):  # noqa: SIM115
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="no madvise")
def test_the_students_frozen_weights_are_file_maps_released_after_use(tmp_path):
    """Out of core: frozen weights stored in the training dtype are views of the shard, not
    copies, and a training step leaves only the first layer's pages resident (its input needs
    no gradient, so nothing marks the end of its backward); every other layer, the embedding
    and the head are dropped as soon as the step is done with them. The model is wide enough
    (MiB tensors) that the kernel's fault-around (64 KiB mapped around each page fault) is a
    small allowance, not the whole model."""
    from dimcut.healing import adapters, student
    from dimcut.healing.losses import lm_loss

    model_dir = save_tiny_model("llama", tmp_path / "wide", shard=None, hidden_size=512, layers=3)
    model, shards = student.load_student(
        model_dir, torch.device("cpu"), Precision.FLOAT32, trained=lambda _name: False
    )
    name = "model.layers.1.mlp.down_proj.weight"
    assert model.get_parameter(name).data_ptr() == shards.view(name).data_ptr()
    config = json.loads((model_dir / "config.json").read_text())
    wrapped = adapters.attach(
        model, adapters.family_of(config), adapters.LoraSettings(), train_shortcuts=False
    )
    wrapped.train()
    batch = torch.randint(0, config["vocab_size"], (1, 32))
    lm_loss(wrapped(input_ids=batch, use_cache=False).logits, batch).backward()
    first_layer = [n for n in shards.names() if n.startswith("model.layers.0.")]
    first_layer_bytes = sum(shards.view(n).nbytes for n in first_layer)
    fault_around = 2 * (len(first_layer) + 1) * 65536  # a window either side of each
    everything = sum(shards.view(n).nbytes for n in shards.names())
    resident = _mapped_rss((model_dir / "model.safetensors").resolve())
    assert 0 < resident <= first_layer_bytes + fault_around < everything / 2, (
        resident,
        first_layer_bytes,
    )
    assert any(p.grad is not None for p in wrapped.parameters())
    del wrapped, model
    shards.close()


def test_weights_stored_in_another_dtype_are_converted_copies(sliced):
    from dimcut.healing import student

    model, shards = student.load_student(
        sliced["plain"], torch.device("cpu"), Precision.BFLOAT16, trained=lambda _name: False
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    weight = model.get_parameter(name)
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, shards.view(name).to(torch.bfloat16))
    assert weight.data_ptr() != shards.view(name).data_ptr()
    shards.close()


def _adapted_step(wrapped, batch, low_precision: bool):
    """One forward and backward of the decoder; what autograd saved for it (bytes of distinct
    storages) and the adapters' gradients."""
    from dimcut.healing import adapters

    saved: dict[int, int] = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    wrapped.zero_grad(set_to_none=True)
    precision = torch.bfloat16 if low_precision else torch.float32
    with (
        adapters.computing_in(wrapped, precision, torch.device("cpu")),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        hidden = wrapped.get_base_model().model(input_ids=batch).last_hidden_state
    hidden.float().square().mean().backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
    return hidden.detach().float(), sum(saved.values()), grads


def test_bfloat16_adapters_keep_float32_weights_and_save_no_float32_inputs(tmp_path):
    """In bfloat16 the adapters' matmuls run in bfloat16 while their weights and gradients stay
    float32 (AdamW updates float32 masters): the same forward and gradients as peft's own
    float32 adapter path to bfloat16 rounding, and a third less saved for the backward (no
    float32 copy of each adapted linear's input)."""
    from dimcut.healing import adapters, student

    model_dir = save_tiny_model("qwen2", tmp_path / "m", shard=None, dtype=torch.bfloat16)
    model, shards = student.load_student(
        model_dir, torch.device("cpu"), Precision.BFLOAT16, trained=lambda _name: False
    )
    config = json.loads((model_dir / "config.json").read_text())
    wrapped = adapters.attach(
        model, adapters.family_of(config), adapters.LoraSettings(), train_shortcuts=False
    )
    with torch.no_grad():  # B starts at zero: give the adapters an effect to compare
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    batch = torch.randint(0, config["vocab_size"], (2, 48))
    peft_out, peft_saved, peft_grads = _adapted_step(wrapped, batch, low_precision=False)
    ours_out, ours_saved, ours_grads = _adapted_step(wrapped, batch, low_precision=True)
    assert {g.dtype for g in ours_grads.values()} == {torch.float32}
    assert {p.dtype for p in wrapped.parameters() if p.requires_grad} == {torch.float32}
    error = (ours_out - peft_out).norm() / peft_out.norm()
    assert error < 0.01, error.item()
    for name, grad in ours_grads.items():
        cosine = F.cosine_similarity(grad.flatten(), peft_grads[name].flatten(), dim=0)
        assert cosine > 0.999, (name, cosine.item())
    assert ours_saved < 0.75 * peft_saved, (ours_saved, peft_saved)
    shards.close()


@pytest.mark.parametrize("loss", [Loss.KD, Loss.KD_LM])
def test_the_loss_in_chunks_of_positions_is_the_whole_sequences_loss(
    sliced, trained_llama, tmp_path, monkeypatch, loss
):
    """The head and the losses run a chunk of positions at a time (7 of the 63 here): the
    same training, to float32 rounding, as one chunk of every position."""
    from dimcut.healing import run

    options = HealOptions(steps=3, seqlen=64, lr=2e-3, loss=loss)
    whole = dimcut.heal(sliced["slicegpt"], trained_llama, tmp_path / "a", options, progress=False)
    monkeypatch.setattr(run, "LOSS_LOGITS", 7 * 384)  # 7 positions of the 384-token vocabulary
    chunked = dimcut.heal(
        sliced["slicegpt"], trained_llama, tmp_path / "b", options, progress=False
    )
    assert chunked.initial_loss == pytest.approx(whole.initial_loss, rel=1e-5)
    assert chunked.final_loss == pytest.approx(whole.final_loss, rel=1e-4)
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_a_healed_identity_slice_reproduces_the_teacher(trained_llama, tmp_path):
    """At s = 0 the student is the teacher rotated: the KD loss of the first step (before any
    update) is zero up to float32 rounding."""
    dimcut.slice_model(trained_llama, 0.0, tmp_path / "s0", nsamples=4, seqlen=64, progress=False)
    result = dimcut.heal(
        tmp_path / "s0",
        trained_llama,
        tmp_path / "h",
        HealOptions(steps=1, seqlen=64),
        progress=False,
    )
    assert result.initial_loss < 1e-6


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_matches_a_straight_run(
    sliced, trained_llama, tmp_path
):
    args = [
        "heal", sliced["plain"], "--teacher", trained_llama, "-o", tmp_path / "out",
        "--steps", "10", "--seqlen", "64", "--lr", "2e-3", "--checkpoint-every", "4", "-q",
    ]  # fmt: skip
    child = run_cli_subprocess(args, hook="heal:6:SIGINT")
    assert child.returncode == 130, child.stderr
    assert "--resume" in child.stderr and "no partial output" in child.stderr
    assert leftovers(tmp_path) == ["out.dimcut-heal"]
    state = tmp_path / "out.dimcut-heal"
    assert {p.name for p in state.iterdir()} >= {"checkpoint.pt", "teacher-topk.safetensors"}
    resumed = dimcut.heal(
        sliced["plain"],
        trained_llama,
        tmp_path / "out",
        HealOptions(steps=10, seqlen=64, lr=2e-3),
        checkpoint_every=4,
        resume=True,
        progress=False,
    )
    assert resumed.resumed_at == 4 and not state.exists()
    straight = dimcut.heal(
        sliced["plain"],
        trained_llama,
        tmp_path / "straight",
        HealOptions(steps=10, seqlen=64, lr=2e-3),
        progress=False,
    )
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-5)
    a = load_file(tmp_path / "out" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_an_unfinished_state_is_never_discarded_silently(sliced, trained_llama, tmp_path, capsys):
    state = tmp_path / "out.dimcut-heal"
    state.mkdir()
    (state / "run.json").write_text("{}")
    args = ["heal", sliced["plain"], "--teacher", trained_llama, "-o", tmp_path / "out", "-q"]
    code, output = run_cli([*args, "--steps", "2", "--seqlen", "64"], capsys)
    assert code == 1 and "--resume" in output and state.is_dir()
    code, output = run_cli([*args, "--steps", "2", "--seqlen", "64", "--resume"], capsys)
    assert code == 1 and "other inputs or options" in output


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("others")
    wider = save_tiny_model("llama", root / "wider", hidden_size=96, shard=None)
    qwen = save_tiny_model("qwen2", root / "qwen", shard=None)
    other_vocab = root / "other-vocab"
    shutil.copytree(save_tiny_model("llama", root / "base", shard=None), other_vocab)
    tokenizer = json.loads((other_vocab / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "x"] = vocab.pop(first)
    (other_vocab / "tokenizer.json").write_text(json.dumps(tokenizer))
    return {"wider": wider, "qwen": qwen, "other-vocab": other_vocab}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("sliced is dense", r"no \"dimcut\" block"),
        ("teacher is sliced", "itself a dimcut-sliced model"),
        ("teacher wider", "hidden_size is 96"),
        ("teacher of another family", "model_type is 'qwen2'"),
        ("teacher tokenizer", "vocabulary differs"),
        ("text too short", "shorter than one sequence"),
        ("shortcuts of plain", "no shortcut matrices"),
        ("bad lr", "lr must be a positive number"),
        ("bad shortcut lr", "shortcut_lr must be a positive number"),
        ("missing teacher", "no config.json"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(
    case, expected, sliced, trained_llama, other_models, tmp_path, capsys
):
    student, teacher, extra = sliced["slicegpt"], trained_llama, []
    if case == "sliced is dense":
        student = trained_llama
    elif case == "teacher is sliced":
        teacher = sliced["plain"]
    elif case == "teacher wider":
        teacher = other_models["wider"]
    elif case == "teacher of another family":
        teacher = other_models["qwen"]
    elif case == "teacher tokenizer":
        teacher = other_models["other-vocab"]
    elif case == "text too short":
        extra = ["--seqlen", "1000000"]
    elif case == "shortcuts of plain":
        student, extra = sliced["plain"], ["--train-shortcuts"]
    elif case == "bad lr":
        extra = ["--lr", "-1"]
    elif case == "bad shortcut lr":
        extra = ["--train-shortcuts", "--shortcut-lr", "0"]
    elif case == "missing teacher":
        teacher = tmp_path / "nowhere"
    args = ["heal", student, "--teacher", teacher, "-o", tmp_path / "out", "--steps", "2", *extra]
    inputs = tuple(p for p in (student, teacher) if p.exists())
    refuse(args, capsys, expected, inputs=inputs)


def test_options_parse_their_precision_once():
    options = HealOptions(dtype="bfloat16")
    assert options.dtype is Precision.BFLOAT16 and options.record()["dtype"] == "bfloat16"
    # float16 is a Precision, but not one healing trains in
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, got 'float16'"):
        HealOptions(dtype="float16")


def test_an_existing_output_is_refused(sliced, trained_llama, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    args = ["heal", sliced["plain"], "--teacher", trained_llama, "-o", tmp_path / "out"]
    code, output = run_cli(args, capsys)
    assert code == 1 and "exists" in output and list((tmp_path / "out").iterdir()) == []


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        run_cli(["heal", "--help"], capsys)
    text = capsys.readouterr().out
    for option in ("--teacher", "--loss", "--topk", "--rank", "--resume", "--keep-adapter"):
        assert option in text
