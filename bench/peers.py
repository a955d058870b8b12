"""The update as our peers compute it, for the benchmarks: TRL's self-distillation loss functions.

trl_loss(model, batch_x, batch_xo, opts) runs what TRL's SDPO trainer does per batch: two full
forwards (student on x+y with gradient, teacher on xo+y under no_grad) whose logits at the
response positions go to TRL's own `trl.experimental.sdpo.loss_utils` functions:
  full_distillation -> compute_topk_self_distillation_loss(k, alpha=1.0 (reverse KL), tail)
  simple_signal     -> compute_sampled_token_self_distillation_loss (TRL's "sampled_token" mode:
                       (log p_student - log p_teacher).detach() * log p_student = -A_t log p(y_t | x))
The per-token values are then reduced the way sdpo_objective reduces them (mean over tokens;
per-reply mean, then mean over replies for simple_signal), so that the losses are equal and the
timings compare like with like (TRL's trainer would average per sequence first).

The paper repository's updater (full-vocabulary log-softmax of student and teacher, no chunking)
is bench_common's straightforward path; its re-tokenisation of the reply is string work that
costs nothing measurable next to the forwards and is left out (the batches are random ids).
"""
from __future__ import annotations

from bench_common import student_and_teacher_logits
from sdpo_objective import ObjectiveOptions, ScoringBatch


def trl_available() -> bool:
    try:
        import trl.experimental.sdpo.loss_utils  # noqa: F401
    except ImportError:
        return False
    return True


def trl_loss(model, batch_x: ScoringBatch, batch_xo: ScoringBatch, opts: ObjectiveOptions) -> torch.Tensor:
    from trl.experimental.sdpo.loss_utils import (compute_sampled_token_self_distillation_loss,
                                                  compute_topk_self_distillation_loss)

    student_logits, teacher_logits = student_and_teacher_logits(model, batch_x, batch_xo, opts)
    mask = batch_x.response_mask.float()
    if opts.loss_mode == "simple_signal":
        per_token = compute_sampled_token_self_distillation_loss(student_logits, teacher_logits, batch_x.response_ids,
                                                                 distillation_alpha=1.0)
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    per_token = compute_topk_self_distillation_loss(student_logits, teacher_logits,
                                                    distillation_topk=opts.distillation_topk, distillation_alpha=1.0,
                                                    distillation_add_tail=opts.distillation_tail)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
