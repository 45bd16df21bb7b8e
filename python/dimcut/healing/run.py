"""`heal()`: recovery fine-tuning of a sliced model, distilled from its dense parent.

The data flow: sample training text (as calibration does) → the teacher's top-k targets, once
(`teacher`) → LoRA adapters on the student (`adapters`) → train, checkpointing into
`<OUT>.dimcut-heal/` (`state`) → merge the adapters and write OUT through the engine, which
copies every untouched tensor and file of the sliced model and renames the output into place.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dimcut import _hooks
from dimcut.architectures import read_config
from dimcut.calibration.text import sampled_text
from dimcut.engine import TensorOp, inspect_checkpoint, rewrite_checkpoint
from dimcut.evaluation.record import checkpoint_fingerprint
from dimcut.healing import adapters, state, student, teacher
from dimcut.healing.losses import Loss, kd_loss, lm_loss
from dimcut.runtime import (
    DEFAULT_MEMORY_BUDGET,
    Precision,
    check_output_dir,
    engine_budget,
    package_version,
    peak_rss_bytes,
    return_freed_memory,
    torch_device,
)
from dimcut.tokenizers import load_tokenizer

# float16 is left out: on a CPU its matmuls are slow, and training in it needs loss scaling.
PRECISIONS = (Precision.FLOAT32, Precision.BFLOAT16)
MERGED_DIR = "merged"  # in the state directory: the merged tensors on their way to OUT
LOSS_LOGITS = 2**24  # logits of one loss chunk (64 MiB of float32)


@dataclass(frozen=True)
class HealOptions:
    """How to heal; every field is recorded in the output's provenance and must match to
    resume."""

    steps: int = 200
    seqlen: int = 512
    batch_size: int = 1
    lr: float = 5e-4
    loss: Loss = Loss.KD
    topk: int = 64
    lora: adapters.LoraSettings = field(default_factory=adapters.LoraSettings)
    train_shortcuts: bool = False
    # A full shortcut matrix trained at the adapters' 5e-4 diverged on SmolLM2 (KD loss 1.26 →
    # 2.3 within 20 steps): its every entry moves, where LoRA's update is rank-limited and scaled.
    shortcut_lr: float = 5e-5
    data: str | None = None
    seed: int = 42
    dtype: Precision = Precision.FLOAT32
    gradient_checkpointing: bool = False

    def __post_init__(self):
        object.__setattr__(self, "loss", Loss.parse(self.loss, "loss"))
        object.__setattr__(self, "dtype", Precision.parse(self.dtype, "dtype", PRECISIONS))

    def check(self) -> None:
        for name in ("steps", "seqlen", "batch_size", "topk"):
            if getattr(self, name) < (2 if name == "seqlen" else 1):
                raise ValueError(f"{name} must be at least {2 if name == 'seqlen' else 1}")
        for name in ("lr", "shortcut_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        self.lora.check()

    def record(self) -> dict:
        fields = asdict(self)
        fields["loss"] = self.loss.value
        fields["dtype"] = self.dtype.value
        return fields


@dataclass
class HealResult:
    """What `heal` did: the losses, time and memory."""

    output: Path
    format: str
    steps: int
    tokens: int
    initial_loss: float
    final_loss: float
    seconds: float
    teacher_seconds: float
    training_seconds: float
    peak_rss_bytes: int
    resumed_at: int = 0

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else float("nan")
        trained = self.steps - self.resumed_at
        return "\n".join(
            [
                f"healed model     {self.output} (format {self.format})",
                (
                    f"training loss    {self.initial_loss:.4f} -> {self.final_loss:.4f} "
                    f"(mean of the first and last {state.LOSS_WINDOW} steps)"
                ),
                f"steps            {self.steps} ({self.tokens:,} tokens"
                + (f", resumed at step {self.resumed_at})" if self.resumed_at else ")"),
                (
                    f"wall time        {self.seconds:.1f} s ({rate:.0f} tokens/s; teacher "
                    f"{self.teacher_seconds:.1f} s, training {self.training_seconds:.1f} s = "
                    f"{self.training_seconds / max(trained, 1):.2f} s/step)"
                ),
                f"peak memory      {self.peak_rss_bytes / 2**20:.0f} MiB (RSS)",
            ]
        )


def heal(
    sliced_dir: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    options: HealOptions | None = None,
    *,
    device: str = "auto",
    resume: bool = False,
    keep_adapter: bool = False,
    checkpoint_every: int = 50,
    overwrite: bool = False,
    progress: bool = True,
) -> HealResult:
    """Fine-tune the sliced model in `sliced_dir` with LoRA, distilled from (or, with
    `Loss.LM`, without) its dense parent `teacher_dir`, and write the merged model to
    `out_dir` in the same format.

    Training state is checkpointed every `checkpoint_every` steps into `<out_dir>.dimcut-heal/`
    (removed once the output is complete); `resume=True` continues from it. `keep_adapter` also
    writes the adapter (peft format, on top of the sliced model) to `<out_dir>-adapter/`.
    """
    started = time.perf_counter()
    if importlib.util.find_spec("peft") is None:
        raise ModuleNotFoundError("dimcut heal needs peft: pip install 'dimcut[heal]'")
    options = options or HealOptions()
    options.check()
    return_freed_memory()
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    sliced_dir, teacher_dir, out_dir = Path(sliced_dir), Path(teacher_dir), Path(out_dir)
    config = read_config(sliced_dir)
    check_output_dir(sliced_dir, out_dir, overwrite)
    tokenizer = load_tokenizer(sliced_dir)
    provenance = teacher.check_parent(sliced_dir, teacher_dir, tokenizer)
    if options.train_shortcuts and not provenance.get("shortcuts"):
        raise ValueError(
            f"train_shortcuts: the {provenance.get('format')} model {sliced_dir} has no "
            "shortcut matrices"
        )
    adapter_dir = out_dir.with_name(out_dir.name + "-adapter")
    if keep_adapter and adapter_dir.exists() and not overwrite:
        raise FileExistsError(f"adapter output {adapter_dir}: the directory exists")
    torch_dev = torch_device(device)
    tokens, data_record = sampled_text(
        options.data, tokenizer, options.steps * options.batch_size, options.seqlen, options.seed
    )
    identity = {
        **options.record(),
        "data": data_record,  # the text as sampled (the option only named its source)
        "sliced_fingerprint": checkpoint_fingerprint(sliced_dir),
        "teacher_fingerprint": checkpoint_fingerprint(teacher_dir),
    }
    state_dir = state.state_dir_for(out_dir)
    saved = state.open_state(state_dir, identity, resume=resume)

    teacher_seconds = 0.0
    targets = None
    if options.loss.needs_teacher:
        key = f"{data_record['token_sha256']}:{options.topk}:{identity['teacher_fingerprint']}"
        targets = teacher.load_targets(state_dir / teacher.TARGETS_FILE, key)
        if targets is None:
            values, indices, teacher_seconds = teacher.teacher_targets(
                teacher_dir,
                tokens,
                options.topk,
                device=torch_dev,
                dtype=options.dtype,
                progress=progress,
            )
            teacher.save_targets(state_dir / teacher.TARGETS_FILE, values, indices, key)
            targets = (values, indices)

    family = adapters.family_of(config)
    model, shards = _load_student(sliced_dir, torch_dev, options)
    torch.manual_seed(options.seed)  # the adapters' initial values, then LoRA dropout
    wrapped = adapters.attach(model, family, options.lora, train_shortcuts=options.train_shortcuts)
    trainer = _Trainer(wrapped, tokens, targets, options, torch_dev)
    resumed_at = 0
    if saved is not None:
        resumed_at = trainer.restore(saved)
    training_started = time.perf_counter()
    trainer.train(state_dir, checkpoint_every, progress)
    training_seconds = time.perf_counter() - training_started

    window, losses = state.LOSS_WINDOW, trainer.losses
    heal_record = {
        "version": package_version(),
        "teacher": str(teacher_dir.resolve()),
        **identity,
        "lora": {**asdict(options.lora), "target_modules": adapters.target_modules(family)},
        "initial_loss": sum(losses[:window]) / len(losses[:window]),
        "final_loss": sum(losses[-window:]) / len(losses[-window:]),
    }
    # The adapter is staged beside its target (merging consumes it) and moved there only once
    # OUT is complete, so a failed write leaves neither behind.
    staged_adapter = _stage_adapter(wrapped, adapter_dir) if keep_adapter else None
    try:
        merged = adapters.merged_weights(
            wrapped,
            family,
            int(config["num_hidden_layers"]),
            state_dir / MERGED_DIR,
            train_shortcuts=options.train_shortcuts,
            release=shards.release,
        )
        del wrapped, model, trainer  # the views of the file maps, before they close
        shards.close()
        _write_healed(sliced_dir, out_dir, config, merged, heal_record, overwrite, progress)
        if staged_adapter is not None:
            if adapter_dir.exists():
                shutil.rmtree(adapter_dir)  # only with overwrite (checked up front)
            staged_adapter.rename(adapter_dir)
    finally:
        shutil.rmtree(state_dir / MERGED_DIR, ignore_errors=True)  # the checkpoint stays
        if staged_adapter is not None and staged_adapter.exists():
            shutil.rmtree(staged_adapter, ignore_errors=True)
    shutil.rmtree(state_dir, ignore_errors=True)  # the output is complete: state is moot
    _hooks.reached("written", 1)
    return HealResult(
        output=out_dir,
        format=provenance.get("format", "?"),
        steps=options.steps,
        tokens=options.steps * options.batch_size * options.seqlen,
        initial_loss=heal_record["initial_loss"],
        final_loss=heal_record["final_loss"],
        seconds=time.perf_counter() - started,
        teacher_seconds=teacher_seconds,
        training_seconds=training_seconds,
        peak_rss_bytes=peak_rss_bytes(),
        resumed_at=resumed_at,
    )


def _load_student(sliced_dir: Path, device: torch.device, options: HealOptions):
    """The student with its frozen weights mapped from the shards (`student`); trained
    shortcut matrices are copies."""
    trained = (
        (lambda name: name.rsplit(".", 1)[-1] in adapters.SHORTCUTS)
        if options.train_shortcuts
        else (lambda _name: False)
    )
    model, shards = student.load_student(sliced_dir, device, options.dtype, trained=trained)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, shards


class _Trainer:
    """AdamW on the trainable parameters (the adapters at lr, trained shortcuts at
    shortcut_lr), linear warm-up then cosine decay to a tenth of each, gradients clipped to
    norm 1; one pass over the training sequences in a seeded order."""

    def __init__(self, wrapped, tokens, targets, options: HealOptions, device: torch.device):
        self.model, self.tokens, self.targets = wrapped, tokens, targets
        self.options, self.device = options, device
        lora, shortcuts = [], []
        for name, parameter in wrapped.named_parameters():
            if parameter.requires_grad:
                is_shortcut = name.rsplit(".", 1)[-1] in adapters.SHORTCUTS
                (shortcuts if is_shortcut else lora).append(parameter)
        self.parameters = lora + shortcuts
        groups = [
            {"params": lora, "lr": options.lr},
            {"params": shortcuts, "lr": options.shortcut_lr},
        ]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
        warmup = max(1, options.steps // 20)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, options.steps - warmup)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        generator = torch.Generator().manual_seed(options.seed)
        self.order = torch.randperm(tokens.shape[0], generator=generator)
        self.step = 0
        self.losses: list[float] = []

    def restore(self, saved: dict) -> int:
        adapters.restore_trainable_state(self.model, saved["trainable"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        self.step, self.losses = saved["step"], list(saved["losses"])
        return self.step

    def snapshot(self) -> dict:
        return {
            "step": self.step,
            "losses": self.losses,
            "trainable": adapters.trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        """The step's loss, the head and the losses computed a chunk of positions at a time
        under checkpointing: the [batch, seqlen, vocabulary] float32 logits, their
        log-softmax and their gradients are never whole (1.2 GB for Qwen-1.5B at 512
        tokens; the decoder's own activations are about twice that)."""
        batch = self.tokens[rows].to(self.device)
        causal = self.model.get_base_model()
        with adapters.computing_in(self.model, self.options.dtype.torch, self.device):
            hidden = causal.base_model(input_ids=batch, use_cache=False).last_hidden_state
        targets = None
        if self.options.loss.needs_teacher:
            targets = [t[rows].to(self.device) for t in self.targets]
        head = causal.get_output_embeddings()
        predicted = batch.shape[1] - 1  # positions that predict a next token
        step = max(1, LOSS_LOGITS // (batch.shape[0] * head.out_features))
        total = torch.zeros((), device=self.device)
        for start in range(0, predicted, step):
            stop = min(start + step, predicted)
            chunk = torch.utils.checkpoint.checkpoint(
                self._chunk_loss,
                head,
                hidden[:, start : stop + 1],
                batch[:, start : stop + 1],
                *([t[:, start:stop] for t in targets] if targets else []),
                use_reentrant=False,
            )
            total = total + chunk * ((stop - start) / predicted)
        return total

    def _chunk_loss(self, head, hidden, input_ids, *targets) -> torch.Tensor:
        """The mean losses of positions [0, n − 1) of a chunk whose n positions are given (the
        last one is only the next token of the one before)."""
        logits = head(hidden)
        total = torch.zeros((), device=self.device)
        if targets:
            total = total + kd_loss(logits[:, :-1], *targets)
        if self.options.loss is not Loss.KD:
            total = total + lm_loss(logits, input_ids)
        return total

    def train(self, state_dir: Path, checkpoint_every: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        options = self.options
        tokens_per_step = options.batch_size * options.seqlen
        self.model.train()
        bar = tqdm(
            total=options.steps,
            initial=self.step,
            desc="healing",
            unit="step",
            disable=not progress,
        )
        clock = time.perf_counter()
        with bar:
            while self.step < options.steps:
                start = self.step * options.batch_size
                loss = self.loss(self.order[start : start + options.batch_size])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.losses.append(loss.item())
                self.step += 1
                if not math.isfinite(self.losses[-1]):
                    raise ValueError(
                        f"the training loss became {self.losses[-1]} at step {self.step}; "
                        "lower the learning rate (--lr)"
                    )
                if self.step % checkpoint_every == 0 and self.step < options.steps:
                    state.save_checkpoint(state_dir, self.snapshot())
                elapsed = time.perf_counter() - clock
                recent = self.losses[-state.LOSS_WINDOW :]
                bar.set_postfix(
                    loss=f"{sum(recent) / len(recent):.4f}",
                    tok_s=f"{tokens_per_step * bar.n / max(elapsed, 1e-9):.0f}" if bar.n else "-",
                )
                bar.update(1)
                _hooks.reached("heal", self.step)
        self.model.eval()


def _stage_adapter(wrapped, adapter_dir: Path) -> Path:
    """The peft adapter saved in a temporary directory beside `adapter_dir`."""
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}.", dir=adapter_dir.parent))
    try:
        wrapped.save_pretrained(str(staging))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _write_healed(sliced_dir, out_dir, config, merged, heal_record, overwrite, progress) -> None:
    """OUT = the sliced checkpoint with the merged tensors replaced (in their own dtype) and the
    heal recorded under config.json's "dimcut" block; every other file is copied."""
    ops = [
        TensorOp(name, literal=name, dtype=dtype) if name in merged else TensorOp(name, name)
        for name, (dtype, _shape, _file) in inspect_checkpoint(sliced_dir).items()
    ]
    config = {**config, "dimcut": {**config["dimcut"], "heal": heal_record}}
    rewrite_checkpoint(
        sliced_dir,
        out_dir,
        ops,
        merged,
        extra_files={"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"},
        memory_budget=engine_budget(DEFAULT_MEMORY_BUDGET),
        overwrite=overwrite,
        progress=progress,
    )


def interrupted_hint(out_dir: str | Path) -> str | None:
    """What to tell a user whose heal was interrupted, when a checkpoint was left."""
    checkpoint = state.state_dir_for(Path(out_dir)) / state.CHECKPOINT_FILE
    if not checkpoint.is_file():
        return None
    return (
        f"dimcut heal: training state kept in {checkpoint.parent}; rerun the same command with "
        "--resume to continue after the last checkpoint"
    )
