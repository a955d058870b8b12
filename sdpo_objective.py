"""The SDPO objective: hindsight context, batched scoring, per-token signal and losses.

One implementation, imported by the online updater, the offline trainer, the live chat
and the signal analysis.

    x   = the conversation up to the last user message
    y   = the assistant reply (token ids, never re-tokenised)
    o   = the user's next message (the follow-up)
    xo  = x with a hindsight block holding o appended to the LAST user message
    A_t = log p(y_t | xo, y<t) - log p(y_t | x, y<t)        (no gradient)

Memory: only response positions go through the LM head, and the head + log-softmax run
in chunks of `logits_chunk_size` positions under activation checkpointing, so float32
logits never exist for more than one chunk at a time (forward or backward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_HINDSIGHT_TEMPLATE = (
    "\n\n=== HINDSIGHT CONTEXT ===\n"
    "[What follows is the user's next message, written after reading your answer. "
    "Let it guide how you answer the request above.]\n"
    "{followup}"
)

LOSS_MODES = ("simple_signal", "full_distillation")


# --------------------------------------------------------------------------- contexts

def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Accept role/content or from/value (human/gpt/system) messages; return role/content."""
    role_names = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} is not an object: {message!r}")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            raise ValueError(f"message {index} needs role/content (or from/value), got keys {sorted(message)}")
        if str(role).lower() not in role_names:
            raise ValueError(f"message {index} has unknown role {role!r}")
        normalized.append({"role": role_names[str(role).lower()], "content": str(content)})
    return normalized


def validate_template(template: str) -> str:
    if "{followup}" not in template:
        raise ValueError("the hindsight template must contain the placeholder {followup}")
    template.format(followup="")  # fails early on stray braces
    return template


def hindsight_messages(messages: Sequence[dict], followup: str,
                       template: str = DEFAULT_HINDSIGHT_TEMPLATE) -> list[dict]:
    """xo: a copy of x whose LAST user message carries the hindsight block (not a new turn)."""
    if not isinstance(followup, str) or not followup.strip():
        raise ValueError("the follow-up message is empty")
    xo = [dict(m) for m in messages]
    for message in reversed(xo):
        if message["role"] == "user":
            message["content"] = message["content"] + template.format(followup=followup.strip())
            return xo
    raise ValueError("the conversation has no user message to attach the hindsight context to")


def chat_template_kwargs(tokenizer) -> dict:
    """Qwen3 thinking off, passed only where the template knows the switch."""
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):  # named templates
        template = " ".join(template.values())
    return {"enable_thinking": False} if "enable_thinking" in template else {}


def render_context_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Chat-template the conversation with the generation prompt on, then tokenize once."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                         **chat_template_kwargs(tokenizer))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- batching

@dataclass
class ScoringBatch:
    """[left pad | context | response | right pad]; response positions start at `context_width`."""
    input_ids: torch.Tensor       # [B, C + R]
    attention_mask: torch.Tensor  # [B, C + R]
    position_ids: torch.Tensor    # [B, C + R]; padding never shifts positions
    response_ids: torch.Tensor    # [B, R]
    response_mask: torch.Tensor   # [B, R] bool
    context_width: int
    truncated: list[bool] = field(default_factory=list)

    def to(self, device) -> "ScoringBatch":
        return ScoringBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                            self.response_ids.to(device), self.response_mask.to(device), self.context_width,
                            self.truncated)


def build_scoring_batch(contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int,
                        max_context_length: int | None = None, device=None) -> ScoringBatch:
    """Contexts are left-truncated (the assistant header right before y survives) and left-padded."""
    if len(contexts) != len(responses):
        raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
    if not contexts:
        raise ValueError("empty batch")
    for index, response in enumerate(responses):
        if len(response) == 0:
            raise ValueError(f"response {index} is empty")
    truncated = []
    kept = []
    for context in contexts:
        if max_context_length and len(context) > max_context_length:
            kept.append(list(context[-max_context_length:]))
            truncated.append(True)
        else:
            kept.append(list(context))
            truncated.append(False)
    width_c = max(len(c) for c in kept)
    width_r = max(len(r) for r in responses)
    batch = len(kept)
    input_ids = torch.full((batch, width_c + width_r), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width_c + width_r), dtype=torch.long)
    response_ids = torch.full((batch, width_r), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((batch, width_r), dtype=torch.bool)
    for row, (context, response) in enumerate(zip(kept, responses)):
        start = width_c - len(context)
        input_ids[row, start:width_c] = torch.tensor(context, dtype=torch.long)
        input_ids[row, width_c:width_c + len(response)] = torch.tensor(list(response), dtype=torch.long)
        attention_mask[row, start:width_c + len(response)] = 1
        response_ids[row, :len(response)] = torch.tensor(list(response), dtype=torch.long)
        response_mask[row, :len(response)] = True
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    result = ScoringBatch(input_ids, attention_mask, position_ids, response_ids, response_mask, width_c, truncated)
    return result.to(device) if device is not None else result


# --------------------------------------------------------------------------- scoring

def _unwrap(model):
    return getattr(model, "module", model)  # DDP wrapper


def _response_hidden(model, batch: ScoringBatch) -> torch.Tensor:
    """Final (post-norm) hidden states at the positions that predict the response tokens: [B, R, H].

    Goes through the model's own forward (so DDP hooks and PEFT adapters apply) asking for
    logits at a single position only; the head is applied later, chunked.
    """
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = output.hidden_states[-1]
    _check_head_matches(model, hidden[:, -1], output.logits[:, -1])
    width_c = batch.context_width
    width_r = batch.response_ids.shape[1]
    return hidden[:, width_c - 1: width_c + width_r - 1]


_HEAD_CHECKED: dict[int, bool] = {}


def _check_head_matches(model, last_hidden: torch.Tensor, last_logits: torch.Tensor) -> None:
    """Once per model: the chunked head must reproduce the model's own logits (catches soft-capping etc.)."""
    key = id(_unwrap(model))
    if key in _HEAD_CHECKED:
        return
    with torch.no_grad():
        ours = _unwrap(model).get_output_embeddings()(last_hidden).float()
        theirs = last_logits.float()
        scale = float(theirs.abs().max().clamp(min=1.0))
        # fp32 agrees to ~1e-6; a 16-bit head or autocast rounds each logit by ~eps(bf16) = 4e-3.
        exact = last_hidden.dtype == torch.float32 and not torch.is_autocast_enabled(last_hidden.device.type)
        tolerance = 1e-3 if exact else 3e-2
        if not torch.allclose(ours, theirs, atol=tolerance * scale, rtol=tolerance):
            raise NotImplementedError(
                f"{type(_unwrap(model)).__name__} post-processes its logits (e.g. soft-capping); "
                "the chunked LM head of sdpo_objective does not support it yet")
    _HEAD_CHECKED[key] = True


def _head(model):
    return _unwrap(model).get_output_embeddings()


def _valid_rows(hidden: torch.Tensor, batch: ScoringBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten to the N real response tokens: (hidden [N,H], targets [N], sequence index [N])."""
    mask = batch.response_mask
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
    return hidden[mask], batch.response_ids[mask], rows[mask]


def _chunks(total: int, size: int):
    size = max(1, int(size))
    for start in range(0, total, size):
        yield start, min(total, start + size)


# log_softmax, not logits - logsumexp: one fused full-vocabulary pass forward and backward (logsumexp
# runs max, subtract, exp, sum as separate kernels with temporaries): ~15% faster on CPU at V=151,936.
def _target_logprob_chunk(head_weight_owner, hidden_chunk, target_chunk):
    logp = torch.log_softmax(head_weight_owner(hidden_chunk).float(), dim=-1)
    return logp.gather(1, target_chunk.unsqueeze(1)).squeeze(1)


def token_logprobs(model, hidden_rows: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log p(target) for each row, chunked; checkpointed when gradients flow."""
    head = _head(model)
    pieces = []
    for start, end in _chunks(hidden_rows.shape[0], chunk_size):
        if torch.is_grad_enabled() and hidden_rows.requires_grad:
            pieces.append(checkpoint(_target_logprob_chunk, head, hidden_rows[start:end], targets[start:end],
                                     use_reentrant=False))
        else:
            pieces.append(_target_logprob_chunk(head, hidden_rows[start:end], targets[start:end]))
    return torch.cat(pieces) if pieces else hidden_rows.new_zeros(0, dtype=torch.float32)


def score_tokens(model, batch: ScoringBatch, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y_t | context), sequence index) over the N real response tokens, row-major."""
    hidden, targets, seq_index = _valid_rows(_response_hidden(model, batch), batch)
    return token_logprobs(model, hidden, targets, chunk_size), seq_index


def split_by_sequence(values: torch.Tensor, batch: ScoringBatch) -> list[torch.Tensor]:
    lengths = batch.response_mask.sum(dim=1).tolist()
    return list(torch.split(values, lengths))


@torch.no_grad()
def compute_signal(model, contexts_x, contexts_xo, responses, pad_token_id: int, max_context_length=None,
                   chunk_size: int = 256) -> list[dict]:
    """Per-token signal for each response (analysis and /why): dicts of signal, logp_x, logp_xo (CPU floats)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch_x = build_scoring_batch(contexts_x, responses, pad_token_id, max_context_length, device)
        batch_xo = build_scoring_batch(contexts_xo, responses, pad_token_id, max_context_length, device)
        logp_x, _ = score_tokens(model, batch_x, chunk_size)
        logp_xo, _ = score_tokens(model, batch_xo, chunk_size)
    finally:
        model.train(was_training)
    results = []
    for lx, lxo in zip(split_by_sequence(logp_x, batch_x), split_by_sequence(logp_xo, batch_x)):
        results.append({"signal": (lxo - lx).cpu().tolist(), "logp_x": lx.cpu().tolist(), "logp_xo": lxo.cpu().tolist()})
    return results


# --------------------------------------------------------------------------- losses

@dataclass
class ObjectiveOptions:
    loss_mode: str = "full_distillation"
    distillation_topk: int = 20
    distillation_tail: bool = True
    signal_clip: float = 0.0
    ignore_first_k: int = 0
    center_signal: bool = False
    negate_signal: bool = False  # control experiments only: train on -A (simple_signal)
    beta: float = 0.0            # weight of the KL to a reference model (k3 estimator on y)
    logits_chunk_size: int = 256

    def __post_init__(self):
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode '{self.loss_mode}'; choose one of {', '.join(LOSS_MODES)}")
        if self.distillation_topk < 1:
            raise ValueError("distillation_topk must be >= 1")
        if self.negate_signal and self.loss_mode != "simple_signal":
            raise ValueError("negate_signal is only defined for loss_mode simple_signal")


def shape_signal(raw_signal: torch.Tensor, seq_index: torch.Tensor, positions: torch.Tensor, num_sequences: int,
                 opts: ObjectiveOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ignore_first_k, centring and clipping. Returns (shaped signal, weight mask 0/1)."""
    weight = (positions >= opts.ignore_first_k).float()
    signal = -raw_signal if opts.negate_signal else raw_signal.clone()
    if opts.center_signal:
        sums = torch.zeros(num_sequences, device=signal.device).index_add_(0, seq_index, signal * weight)
        counts = torch.zeros(num_sequences, device=signal.device).index_add_(0, seq_index, weight).clamp(min=1)
        signal = signal - (sums / counts)[seq_index]
    if opts.signal_clip and opts.signal_clip > 0:
        signal = signal.clamp(-opts.signal_clip, opts.signal_clip)
    return signal * weight, weight


def _log1mexp(log_mass: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, safe when the top-k mass is ~1 (no NaN, no inf)."""
    return torch.log((-torch.expm1(log_mass)).clamp(min=eps))


def reverse_kl_topk(student_logp: torch.Tensor, teacher_logp: torch.Tensor, tail: bool) -> torch.Tensor:
    """KL(student || teacher) per row over the student's top-k support (+ tail bucket, or renormalised)."""
    if tail:
        s_tail = _log1mexp(torch.logsumexp(student_logp, dim=-1, keepdim=True))
        t_tail = _log1mexp(torch.logsumexp(teacher_logp, dim=-1, keepdim=True))
        student_logp = torch.cat([student_logp, s_tail], dim=-1)
        teacher_logp = torch.cat([teacher_logp, t_tail], dim=-1)
    else:
        student_logp = student_logp - torch.logsumexp(student_logp, dim=-1, keepdim=True)
        teacher_logp = teacher_logp - torch.logsumexp(teacher_logp, dim=-1, keepdim=True)
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(dim=-1)


def _student_topk_chunk(head, hidden_chunk, k):
    logits = head(hidden_chunk).float()
    return logits.topk(k, dim=-1).indices


def _teacher_chunk(head, hidden_chunk, ids_chunk, target_chunk):
    logp = torch.log_softmax(head(hidden_chunk).float(), dim=-1)
    return logp.gather(1, ids_chunk), logp.gather(1, target_chunk.unsqueeze(1)).squeeze(1)


def _student_distill_chunk(head, hidden_chunk, ids_chunk, target_chunk, teacher_topk_chunk, tail: bool):
    logp = torch.log_softmax(head(hidden_chunk).float(), dim=-1)
    kl = reverse_kl_topk(logp.gather(1, ids_chunk), teacher_topk_chunk, tail)
    return kl, logp.gather(1, target_chunk.unsqueeze(1)).squeeze(1)


def sdpo_loss(model, batch_x: ScoringBatch, batch_xo: ScoringBatch, opts: ObjectiveOptions,
              ref_model=None) -> tuple[torch.Tensor, dict]:
    """The SDPO loss for a batch of interactions. The teacher is the same model under xo, no grad, eval mode.

    Returns (loss, stats); stats holds floats plus `signal_per_sequence` (list of CPU tensors, raw A_t).
    """
    if not torch.equal(batch_x.response_ids, batch_xo.response_ids):
        raise ValueError("x and xo batches must hold the same response ids")
    num_seq = batch_x.response_ids.shape[0]
    head = _head(model)
    chunk = opts.logits_chunk_size
    mask = batch_x.response_mask
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0).expand_as(mask)[mask]

    was_training = model.training
    model.eval()
    with torch.no_grad():
        hidden_t, targets, seq_index = _valid_rows(_response_hidden(model, batch_xo), batch_xo)
    model.train(was_training)
    hidden_s, _, _ = _valid_rows(_response_hidden(model, batch_x), batch_x)
    total = hidden_s.shape[0]

    if opts.loss_mode == "simple_signal":
        with torch.no_grad():
            logp_xo = token_logprobs(model, hidden_t, targets, chunk)
        logp_x = token_logprobs(model, hidden_s, targets, chunk)
        raw_signal = logp_xo - logp_x.detach()
        signal, weight = shape_signal(raw_signal, seq_index, positions, num_seq, opts)
        counts = torch.zeros(num_seq, device=weight.device).index_add_(0, seq_index, weight).clamp(min=1)
        per_token = -signal * logp_x / counts[seq_index]  # sum over y / |y|, then mean over batch
        loss = per_token.sum() / num_seq
        kl_values = None
    else:
        k = min(opts.distillation_topk, head.out_features if hasattr(head, "out_features") else opts.distillation_topk)
        kl_pieces, logp_x_pieces, logp_xo_pieces = [], [], []
        for start, end in _chunks(total, chunk):
            with torch.no_grad():
                ids = _student_topk_chunk(head, hidden_s[start:end].detach(), k)
                teacher_topk, teacher_target = _teacher_chunk(head, hidden_t[start:end], ids, targets[start:end])
            if torch.is_grad_enabled() and hidden_s.requires_grad:
                kl, student_target = checkpoint(_student_distill_chunk, head, hidden_s[start:end], ids,
                                                targets[start:end], teacher_topk, opts.distillation_tail,
                                                use_reentrant=False)
            else:
                kl, student_target = _student_distill_chunk(head, hidden_s[start:end], ids, targets[start:end],
                                                            teacher_topk, opts.distillation_tail)
            kl_pieces.append(kl)
            logp_x_pieces.append(student_target)
            logp_xo_pieces.append(teacher_target)
        kl_values = torch.cat(kl_pieces)
        logp_x = torch.cat(logp_x_pieces)
        logp_xo = torch.cat(logp_xo_pieces)
        raw_signal = logp_xo - logp_x.detach()
        weight = (positions >= opts.ignore_first_k).float()
        loss = (kl_values * weight).sum() / weight.sum().clamp(min=1)

    stats: dict = {}
    if opts.beta > 0 and ref_model is not None:
        with torch.no_grad():
            ref_logp, _ = score_tokens(ref_model, batch_x, chunk)
        delta = ref_logp - logp_x
        ref_kl = delta.exp() - delta - 1.0
        weight = (positions >= opts.ignore_first_k).float()
        ref_kl_mean = (ref_kl * weight).sum() / weight.sum().clamp(min=1)
        loss = loss + opts.beta * ref_kl_mean
        stats["ref_kl"] = float(ref_kl_mean.detach())

    raw = raw_signal.detach()
    lengths = mask.sum(dim=1)
    per_seq_sum = torch.zeros(num_seq, device=raw.device).index_add_(0, seq_index, raw)
    stats.update({
        "loss": float(loss.detach()),
        "signal_mean": float(raw.mean()) if total else 0.0,
        "signal_std": float(raw.std()) if total > 1 else 0.0,
        "signal_abs_mean": float(raw.abs().mean()) if total else 0.0,
        "signal_seq_mean": float((per_seq_sum / lengths.clamp(min=1)).mean()),
        "logp_x": float(logp_x.detach().mean()) if total else 0.0,
        "logp_xo": float(logp_xo.detach().mean()) if total else 0.0,
        "tokens": int(total),
        "signal_per_sequence": [s.cpu() for s in torch.split(raw, lengths.tolist())],
    })
    if kl_values is not None:
        stats["distill_kl"] = float(kl_values.detach().mean()) if total else 0.0
    return loss, stats
