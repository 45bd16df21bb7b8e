"""The training losses of `dimcut heal`: next-token cross-entropy and distillation from the
dense parent's top-k next-token distribution.

The teacher is summarised per token by its k most likely tokens and their log-probabilities
(`topk_targets`); the distillation loss is the KL divergence between the teacher's and the
student's distributions coarsened to those k tokens plus one bucket for all the others. It is
exact for that coarsening (zero when the student equals the teacher, whatever k), costs k + 1
terms instead of the vocabulary, and lets the teacher run once, before the student is loaded.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from dimcut.runtime import Choice


@enum.unique
class Loss(Choice):
    """What the student is trained to match."""

    KD = "kd"  # the dense teacher's next-token distribution (top-k + tail)
    LM = "lm"  # the text's next token
    KD_LM = "kd+lm"  # their sum

    @property
    def needs_teacher(self) -> bool:
        return self is not Loss.LM


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens of every position: (log-probabilities, token ids)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    values, indices = log_probs.topk(k, dim=-1)
    return values, indices.to(torch.int32)


def _log_tail(log_probs_topk: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ p) of the probability outside the top k, kept finite when Σ p rounds to 1."""
    inside = torch.logsumexp(log_probs_topk, dim=-1).clamp(max=-1e-7)
    return torch.log(-torch.expm1(inside))


def kd_loss(
    student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor
) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) on the k teacher tokens plus the tail.

    `student_logits` [..., V]; `teacher_values`/`teacher_indices` [..., k] from `topk_targets`.
    """
    student = F.log_softmax(student_logits.float(), dim=-1)
    student_topk = student.gather(-1, teacher_indices.long())
    teacher = torch.cat([teacher_values, _log_tail(teacher_values).unsqueeze(-1)], dim=-1)
    student = torch.cat([student_topk, _log_tail(student_topk).unsqueeze(-1)], dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return kl.mean()


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `logits` [B, L, V] on `input_ids` [B, L]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
