"""Healing: recovery fine-tuning of a sliced model, distilled from its dense parent.

Modules, in the order data flows: `losses` (kd, lm) → `teacher` (is it the parent; its top-k
targets, computed once, streamed) → `student` (the sliced model, frozen weights mapped from the
shards) → `adapters` (LoRA through peft on the family's linears; the merge) → `state`
(checkpoints in `<OUT>.dimcut-heal/`) → `run` (`heal`) → `cli` (`dimcut heal`).
"""

from dimcut.healing.adapters import LoraSettings
from dimcut.healing.cli import add_commands
from dimcut.healing.losses import Loss, kd_loss, lm_loss, topk_targets
from dimcut.healing.run import HealOptions, HealResult, heal

__all__ = [
    "HealOptions",
    "HealResult",
    "LoraSettings",
    "Loss",
    "add_commands",
    "heal",
    "kd_loss",
    "lm_loss",
    "topk_targets",
]
