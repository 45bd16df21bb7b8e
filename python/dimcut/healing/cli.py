"""`dimcut heal`: the command line of `heal()`."""

from __future__ import annotations

import sys

from dimcut.healing.adapters import LoraSettings
from dimcut.healing.losses import Loss
from dimcut.healing.run import PRECISIONS, HealOptions, heal, interrupted_hint
from dimcut.runtime import Device
from dimcut.zoo import MODEL_HELP, REVISION_HELP, resolve_model, text_or_default

DEFAULTS = HealOptions()


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "heal",
        description=(
            "Recovery fine-tuning of a sliced model: LoRA adapters (peft) on its attention and "
            "MLP projections, trained to match its dense parent's next-token distribution "
            "(top-k knowledge distillation; the teacher runs once, before the student is "
            "loaded) or the text itself, then merged into the weights. OUTPUT is an ordinary "
            "dimcut checkpoint of the same format that loads exactly as the sliced one did. "
            "Training state is checkpointed in OUTPUT.dimcut-heal/ (--resume continues it)."
        ),
    )
    parser.add_argument("sliced", help="a model written by `dimcut slice` (either format)")
    parser.add_argument(
        "--teacher", required=True, help="the dense model it was cut from. " + MODEL_HELP
    )
    parser.add_argument("--revision", metavar="REV", help="of --teacher: " + REVISION_HELP)
    parser.add_argument("-o", "--output", required=True, help="output directory (must not exist)")
    data = parser.add_argument_group("training text")
    data.add_argument(
        "--data",
        default=None,
        help="a text source as for `dimcut slice --calib` (its train part; default: "
        "python-stdlib when --teacher is an offline coder model, else the corpus shipped with "
        "dimcut, disjoint from wiki-offline's test part)",
    )
    data.add_argument(
        "--steps",
        type=int,
        default=DEFAULTS.steps,
        help=f"optimizer steps; each reads --batch-size new sequences (default {DEFAULTS.steps})",
    )
    data.add_argument(
        "--seqlen",
        type=int,
        default=DEFAULTS.seqlen,
        help=f"tokens per sequence (default {DEFAULTS.seqlen})",
    )
    data.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help=f"sequences per step (default {DEFAULTS.batch_size})",
    )
    data.add_argument("--seed", type=int, default=DEFAULTS.seed, help="sampling and order seed")
    train = parser.add_argument_group("training")
    train.add_argument(
        "--loss",
        choices=Loss.values(),
        default=DEFAULTS.loss.value,
        help="kd: KL divergence to the teacher's top-k distribution (+ the rest as one bucket); "
        f"lm: next-token cross-entropy on the text; kd+lm: their sum (default {DEFAULTS.loss.value})",
    )
    train.add_argument(
        "--topk",
        type=int,
        default=DEFAULTS.topk,
        help=f"teacher tokens kept per position for kd (default {DEFAULTS.topk})",
    )
    train.add_argument(
        "--lr", type=float, default=DEFAULTS.lr, help=f"peak AdamW learning rate ({DEFAULTS.lr:g})"
    )
    train.add_argument(
        "--rank", type=int, default=DEFAULTS.lora.rank, help=f"LoRA rank ({DEFAULTS.lora.rank})"
    )
    train.add_argument(
        "--alpha",
        type=float,
        default=DEFAULTS.lora.alpha,
        help=f"LoRA alpha; the update is scaled by alpha/rank ({DEFAULTS.lora.alpha:g})",
    )
    train.add_argument(
        "--dropout",
        type=float,
        default=DEFAULTS.lora.dropout,
        help="LoRA dropout; each sequence is seen once, so there is little to regularise, and "
        f"every dropped-out input is kept for the backward ({DEFAULTS.lora.dropout:g})",
    )
    train.add_argument(
        "--train-shortcuts",
        action="store_true",
        help="slicegpt format: train the shortcut matrices too (full matrices, not LoRA)",
    )
    train.add_argument(
        "--shortcut-lr",
        type=float,
        default=DEFAULTS.shortcut_lr,
        help="peak learning rate of the trained shortcut matrices; at the adapters' rate they "
        f"diverged ({DEFAULTS.shortcut_lr:g})",
    )
    train.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory for long sequences and "
        "big models, ~30%% more compute",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--dtype",
        choices=[p.value for p in PRECISIONS],
        default=DEFAULTS.dtype.value,
        help="weights of teacher and student while training (the output keeps the sliced "
        "model's dtypes)",
    )
    run.add_argument("--device", choices=Device.values(), default=Device.AUTO.value)
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        metavar="N",
        help="save the training state every N steps (default 50)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT.dimcut-heal/'s checkpoint"
    )
    run.add_argument(
        "--keep-adapter",
        action="store_true",
        help="also save the LoRA adapter (peft format, on top of SLICED) in OUTPUT-adapter/",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory"
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run_heal)


def _run_heal(args) -> int:
    options = HealOptions(
        steps=args.steps,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        lr=args.lr,
        loss=Loss.parse(args.loss, "--loss"),
        topk=args.topk,
        lora=LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout),
        train_shortcuts=args.train_shortcuts,
        shortcut_lr=args.shortcut_lr,
        data=text_or_default(args.data, args.teacher, "--data", args.quiet),
        seed=args.seed,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    try:
        result = heal(
            args.sliced,
            resolve_model(args.teacher, revision=args.revision, progress=not args.quiet),
            args.output,
            options,
            device=args.device,
            resume=args.resume,
            keep_adapter=args.keep_adapter,
            checkpoint_every=args.checkpoint_every,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        hint = interrupted_hint(args.output)
        if hint:
            print(hint, file=sys.stderr)
        raise
    print(result.summary())
    return 0
