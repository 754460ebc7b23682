"""Knowledge distillation from the parent: the "subclone+distill" candidate's loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subclone_core.core.errors import SubcloneError
from subclone_core.tasks import IGNORE_INDEX


def distill_mask(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Which logit rows take part in the distillation term.

    Causal LM logits (B, T, V) at position t predict token t + 1, so the last position has no target
    and position t counts when labels[:, t + 1] is a real token, as in Hugging Face's shifted loss.
    Classifier logits (B, C) all count.

    Returns:
        A boolean mask with the shape of ``logits`` minus its last dimension.
    """
    if logits.dim() == 2:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    mask = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)  # (B, T)
    if labels is None:
        mask[:, :-1] = True
    else:
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def kl_to_teacher(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over masked rows of KL(softmax(teacher / T) || softmax(student / T)), times T^2.

    The T^2 factor keeps the gradient scale of the soft term independent of T (Hinton et al. 2015).
    Computed in float32; identical logits give exactly 0.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise SubcloneError(
            f"student has {student_logits.shape[-1]} outputs but the teacher has {teacher_logits.shape[-1]}; "
            "distillation needs the same vocabulary (or labels)"
        )
    student = student_logits[mask].float() / temperature  # (N, V)
    teacher = teacher_logits[mask].float() / temperature  # (N, V)
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0  # no valid rows: a zero that keeps the graph
    log_s = F.log_softmax(student, dim=-1)
    log_t = F.log_softmax(teacher, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (N,)
    return kl.mean() * temperature**2


def distillation_loss(
    ce: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the hard-label loss with the distillation term.

    Args:
        ce: the student's cross-entropy on the labels (the model's own ``outputs.loss``).
        student_logits: (B, T, V) or (B, C).
        teacher_logits: the same shape, from the frozen teacher.
        labels: (B, T) token labels with -100 for padding, or (B,) class labels.
        alpha: weight of the distillation term.
        temperature: softmax temperature T.

    Returns:
        (loss, kl): loss = (1 - alpha) * ce + alpha * T^2 * KL, and the T^2 * KL term alone.
    """
    mask = distill_mask(student_logits, labels)
    kl = kl_to_teacher(student_logits, teacher_logits, mask, temperature)
    return (1.0 - alpha) * ce + alpha * kl, kl
