"""The fused LM head: sdpo_objective's loss with the head's gradient formed in the forward, chunk by chunk.

How fast, not what: the loss itself comes from the plan that sdpo_objective passes in
(`plan.loss_sum`, `plan.kl`, `plan.buckets`), so this module imports nothing of the project.
Same signature and results as sdpo_objective's checkpointed path (tests/test_fused_head.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _LossWithPrecomputedGradients(torch.autograd.Function):
    """A scalar loss whose gradients with respect to (hidden, weight) were computed in the forward."""

    @staticmethod
    def forward(ctx, value, hidden, weight, grad_hidden, grad_weight):
        ctx.grads = (grad_hidden, grad_weight)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads  # one backward, as for any graph without retain_graph
        return (None, grad_hidden * grad_output,
                grad_weight * grad_output if grad_weight is not None else None, None, None)


def fused_head_supported(model, hidden: torch.Tensor) -> bool:
    """The fused path needs a plain, bias-free, unsharded nn.Linear head (else: checkpointed chunks)."""
    head = getattr(model, "module", model).get_output_embeddings()  # under a DDP / FSDP1 wrapper
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False  # LoRA-wrapped or biased heads
    weight = head.weight
    if hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor":
        return False  # DeepSpeed ZeRO-3 / FSDP2 shards
    if "FullyShardedDataParallel" in type(model).__name__:
        return False  # FSDP1 owns the parameters' gradients
    return weight.dim() == 2 and weight.shape[1] == hidden.shape[-1]


def fused_head_loss(head, plan, hidden_s, hidden_t, targets, chunk_size: int, teacher_head=None, hidden_neutral=None):
    """Loss of all tokens with the LM head's gradient computed chunk by chunk in the forward.

    `head` has `.linear` (a plain nn.Linear) and `.softcap`; `plan` is sdpo_objective's loss plan.
    Per chunk: student logits once (top-k ids taken from them), teacher logits (no grad), the loss
    on the few log-probs it reads, then its gradient with respect to the logits z in closed form.
    With s = log_softmax(z), p = softmax(z), a read column s_c has ds_c/dz = e_c - p. The tail
    bucket s_tail = log sigmoid(lse(s outside the top-k K) - lse(s_K)) = log P_tail has
    ds_tail/ds_j = P_K * p_j / P_tail outside K and -p_j in K (summing to zero). With g = dL/d(read
    columns and tail) from autograd over [rows, k + 2]:
        dL/dz = scatter(columns, g) - p * sum(g without g_tail)
                + g_tail * (P_K / P_tail) * p_j outside K - g_tail * p_j in K.
    grad_hidden = G W and grad_W += G^T h are formed at once, so the chunk's logits are never
    needed again: 4 head products per response row instead of 6 (checkpointed path). With
    soft-capping (z = cap * tanh(a / cap)), G is multiplied by dz/da = 1 - tanh(a / cap)^2.
    `teacher_head` (a plain linear head too, same soft-capping) scores hidden_t; default `head`.
    `hidden_neutral` (full_distillation with contrast): the teacher's hidden states under x o_neutral; the
    teacher's logits are then tilted by `plan.tilt` before its buckets are read. With the end signal
    (simple_signal, `plan.end_token_ids`) the stop tokens' columns are read beside the target's.
    Returns (loss, logp_x, logp_xo, kl or None), all but loss detached.
    """
    opts, weight, softcap = plan.opts, head.linear.weight, head.softcap
    device_type = hidden_s.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    distill = opts.loss_mode == "full_distillation"
    k, with_tail = plan.support(weight.shape[0])
    total = hidden_s.shape[0]
    stop_ids = None if plan.end_token_ids is None else torch.tensor(plan.end_token_ids, device=hidden_s.device)
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        w = weight.detach().to(compute_dtype)
        teacher_weight = head.linear.weight if teacher_head is None else teacher_head.linear.weight
        w_teacher = w if teacher_weight is weight else teacher_weight.detach().to(compute_dtype)
        h_all = hidden_s.detach()
        grad_hidden = torch.empty_like(h_all)
        grad_weight = None
        if weight.requires_grad:  # frozen under LoRA: skip the largest product
            grad_weight = torch.zeros(weight.shape,
                                      dtype=weight.dtype if weight.dtype == compute_dtype else torch.float32,
                                      device=weight.device)
        loss_value = torch.zeros((), device=hidden_s.device)
        logp_x = torch.empty(total, device=hidden_s.device)
        logp_xo = torch.empty(total, device=hidden_s.device) if distill else plan.logp_xo
        kl_values = torch.empty(total, device=hidden_s.device) if distill else None
        chunk = max(1, int(chunk_size))
        # Two [chunk, V] float32 buffers for the whole call (student, teacher logits), filled in place: a fresh
        # one per chunk costs more than the product itself on CPU (tens of MB, page-faulted in every time).
        student_buffer = torch.empty((min(chunk, total), weight.shape[0]), device=hidden_s.device)
        teacher_buffer = torch.empty_like(student_buffer) if distill else None
        neutral_buffer = torch.empty_like(student_buffer) if distill and hidden_neutral is not None else None
        for start in range(0, total, chunk):
            rows = slice(start, min(total, start + chunk))
            h = h_all[rows].to(compute_dtype)
            target = targets[rows].unsqueeze(1)
            # simple_signal with the end signal also reads the stop tokens' columns, at every position
            end_column = None if plan.end_token_ids is None else stop_ids.expand(target.shape[0], -1)
            logits, cap_slope = logits_into(student_buffer[:h.shape[0]], h, w, softcap, with_slope=True)
            top = logits.topk(k, dim=-1) if distill else None
            if distill:  # the teacher's logits now: the contrast tilts them by the student's, consumed below
                h_teacher = hidden_t[rows].to(compute_dtype)
                teacher_logits, _ = logits_into(teacher_buffer[:h.shape[0]], h_teacher, w_teacher, softcap)
                if neutral_buffer is not None:
                    h_neutral = hidden_neutral[rows].to(compute_dtype)
                    neutral_logits, _ = logits_into(neutral_buffer[:h.shape[0]], h_neutral, w_teacher, softcap)
                    teacher_logits.sub_(neutral_logits).add_(logits)  # plan.tilt, in place
            ids, row_max = (top.indices, top.values[:, :1]) if distill else (None, None)  # the top-1 is the max
            tail_buckets = with_tail and distill
            if tail_buckets:  # logits become exp(z - max) outside the top-k, 0 at the top-k
                student_buckets, target_logp, student_log_total = _tail_buckets(
                    logits, ids, target, lambda index: _logits(h[index], w, softcap), row_max=row_max)
            else:  # logits become exp(z - max); the few log-probs read come from the row's log-sum-exp
                values = [logits.gather(1, target).double()] + ([top.values.double()] if distill else [])
                if end_column is not None:
                    values.append(logits.gather(1, end_column).double())
                logps, row_max, student_log_total = logprobs_in_place(logits, values, row_max)
                target_logp, student_buckets = logps[0], (logps[1] if distill else None)
            teacher_buckets = None
            if distill:
                def recompute_teacher(index):
                    exact = _logits(h_teacher[index], w_teacher, softcap)
                    if neutral_buffer is None:
                        return exact
                    return plan.tilt(exact, _logits(h_neutral[index], w_teacher, softcap),
                                     _logits(h[index], w, softcap))

                if tail_buckets:
                    teacher_buckets, teacher_target, _ = _tail_buckets(teacher_logits, ids, target, recompute_teacher)
                else:
                    (teacher_target, teacher_buckets), _, _ = logprobs_in_place(
                        teacher_logits,
                        [teacher_logits.gather(1, target).double(), teacher_logits.gather(1, ids).double()])
                logp_xo[rows] = teacher_target.squeeze(1)
                picked = torch.cat([student_buckets, target_logp], dim=1).requires_grad_(True)
            elif end_column is not None:  # the stop tokens' columns, then the target's
                picked = torch.cat([logps[-1], target_logp], dim=1).requires_grad_(True)
            else:
                picked = target_logp.requires_grad_(True)
            with torch.enable_grad():
                kl = plan.kl(picked[:, :-1], teacher_buckets) if distill else None
                logp_end = picked[:, :-1].logsumexp(dim=1) if end_column is not None else None
                chunk_loss = plan.loss_sum(rows, picked[:, -1], kl, logp_end)
                (grad_picked,) = torch.autograd.grad(chunk_loss, picked)
            picked = picked.detach()
            loss_value += chunk_loss.detach()
            logp_x[rows] = picked[:, -1]
            if distill:
                kl_values[rows] = kl.detach()
            row_scale = -grad_picked.sum(dim=1, keepdim=True)
            # In place: the buffer holds exp(z - max) (0 at the top-k with the tail bucket); the row's factor
            # carries the softmax's normalisation exp(-log_total), so p is never formed on its own.
            grad_logits = logits
            if with_tail and distill:
                grad_tail = grad_picked[:, k:k + 1]
                row_scale = row_scale + grad_tail  # the tail bucket's gradient sums to zero over z
                # g_tail * P_K / P_tail in float64: P_tail may be far below float32's range while g_tail ~ P_tail
                mass_ratio = torch.exp(torch.logsumexp(picked[:, :k].double(), dim=1, keepdim=True)
                                       - picked[:, k:k + 1].double())
                tail_scale = torch.where(grad_tail != 0, grad_tail.double() * mass_ratio, 0.0)
                grad_logits.mul_(((row_scale.double() + tail_scale) * torch.exp(-student_log_total)).float())
                grad_logits.scatter_add_(1, ids, picked[:, :k].exp() * (row_scale - grad_tail))
            else:
                grad_logits.mul_((row_scale.double() * torch.exp(-student_log_total)).float())
            if distill:
                columns = torch.cat([ids, target], dim=1)
                grad_columns = torch.cat([grad_picked[:, :k], grad_picked[:, -1:]], dim=1)
            elif end_column is not None:
                columns, grad_columns = torch.cat([end_column, target], dim=1), grad_picked
            else:
                columns, grad_columns = target, grad_picked
            grad_logits.scatter_add_(1, columns, grad_columns)
            if cap_slope is not None:
                grad_logits.mul_(cap_slope)
                del cap_slope
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[rows] = (grad_logits @ w).to(grad_hidden.dtype)
            if grad_weight is not None:
                if grad_weight.dtype == compute_dtype:
                    grad_weight.addmm_(grad_logits.t(), h)
                else:  # fp32 master weights under autocast: accumulate in fp32, as autograd would
                    grad_weight += (grad_logits.t() @ h).float()
            del logits, grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
    loss = _LossWithPrecomputedGradients.apply(loss_value, hidden_s, weight, grad_hidden, grad_weight)
    return loss, logp_x, logp_xo, kl_values


# --------------------------------------------------------------------------- the exact tail bucket, cheaply
#
# The tail bucket is log(P_out / (P_topk + P_out)), P_out the mass outside the student's top-k ids. A
# masked log-sum-exp over the vocabulary (sdpo_objective.topk_buckets, the reference) costs a second
# full pass with a temporary; 1 - P_topk cancels. Here P_out is a plain sum of exp over the row, whose
# exp the fused gradient needs anyway (the student) or which replaces the log-softmax (the teacher).
# A sum of positive terms does not cancel; float32's exp loses only terms below 2^-126 (the largest
# term is <= 1), together less than V * 2^-126, which is below float32's own rounding (2^-24) of any
# sum >= V * 2^-102 (3e-26 at V = 151,936). Rows with a smaller outside sum are redone exactly by the
# masked log-sum-exp on their recomputed logits (a handful of rows, if any).

def _logits(h, w, softcap):
    logits = F.linear(h, w).float()
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def logits_into(out, h, w, softcap, with_slope: bool = False):
    """(float32 logits of h in `out`, soft-capping's slope 1 - tanh^2 or None): the product written straight
    into the reused buffer when h and w are float32 (else computed in their dtype, then copied)."""
    if h.dtype == torch.float32 and w.dtype == torch.float32:
        torch.mm(h, w.t(), out=out)
    else:
        out.copy_(F.linear(h, w))
    if softcap is None:
        return out, None
    squashed = out.div_(softcap).tanh_()
    slope = squashed.square().neg_().add_(1.0) if with_slope else None
    return squashed.mul_(softcap), slope


def exp_in_place(logits, row_max=None):
    """`logits` becomes exp(logits - row max); returns (row max, log of the row's sum of those), float64
    [rows, 1] each: log p = logit - max - log sum. The largest term is exp(0) = 1, so the float32 sum
    neither underflows nor cancels: log_softmax's accuracy without its [rows, V] output."""
    if row_max is None:
        row_max = logits.amax(dim=1, keepdim=True)
    total = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)
    return row_max.double(), total.double().log()


def logprobs_in_place(logits, values, row_max=None):
    """log p (float32) of each of `values` (raw logits read from `logits` beforehand, float64), then
    `logits` becomes exp(logits - row max) in place (exp_in_place); returns (log-probs, row_max, log_total)."""
    row_max, log_total = exp_in_place(logits, row_max)
    return [(value - row_max - log_total).float() for value in values], row_max, log_total


def _log_outside_sum(values, ids, exact_masked_lse):
    """Per row, log of the sum of exp(values) outside `ids`, in float64 [rows, 1]. `values` (row max 0)
    becomes exp(values) with 0 at ids, in place; rows below the bound above take exact_masked_lse(row index)."""
    values.scatter_(1, ids, float("-inf")).exp_()
    # float32 accumulation (torch's blocked sum: relative error ~1e-7 here; a float64 one is ~10x slower on CPU)
    outside = values.sum(dim=1, keepdim=True).double()
    log_outside = outside.log()
    redo = (outside.squeeze(1) < values.shape[1] * 2.0 ** -102).nonzero().squeeze(1)
    if redo.numel():
        log_outside[redo] = exact_masked_lse(redo)
    return log_outside


def _tail_buckets(logits, ids, target, recompute_logits, row_max=None):
    """([log-probs at ids, tail] [rows, k + 1], log-prob of the target [rows, 1], log of the row's
    total sum of exp(logits - max) in float64 [rows, 1]) from float32 logits, without a log-softmax:
    the row max (or the given one: the student's top-1 value), one exp and one sum over the row; the few values
    read are normalised in float64. Student and teacher go through the same steps, so that the
    rounding of their log-probs is alike where they are alike (the divergence is their difference).
    `logits` is consumed: it becomes exp(logits - max) with 0 at ids (times exp(-total): the
    probabilities outside the top-k)."""
    if row_max is None:
        row_max = logits.amax(dim=1, keepdim=True)
    picked = logits.gather(1, ids).double() - row_max.double()
    target_value = logits.gather(1, target).double() - row_max.double()

    def exact(index):
        outside = recompute_logits(index).scatter_(1, ids[index], float("-inf"))
        return torch.logsumexp(outside, dim=1, keepdim=True).double() - row_max[index].double()

    log_outside = _log_outside_sum(logits.sub_(row_max), ids, exact)
    log_total = torch.logaddexp(torch.logsumexp(picked, dim=1, keepdim=True), log_outside)
    buckets = torch.cat([picked - log_total, log_outside - log_total], dim=1).float()
    return buckets, (target_value - log_total).float(), log_total
