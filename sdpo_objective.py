"""The SDPO objective: hindsight context, batched scoring, per-token signal and losses.

One implementation, imported by the online updater, the offline trainer, the live chat
and the signal analysis.

    x   = the conversation up to the last user message
    y   = the assistant reply (token ids, never re-tokenised)
    o   = the user's next message (the follow-up)
    xo  = x with a hindsight block holding o appended to the LAST user message
    A_t = log p(y_t | xo, y<t) - log p(y_t | x, y<t)        (no gradient)
          (--contrast_followup: - log p(y_t | x o_neutral, y<t) instead of the second term)

Read it as "what, then how fast". What: `TokenLoss` is the per-token loss with every option
(token weights from ignore_first_k and the copy guard, signal shaping, contrast, divergence,
reference KL), and `reference_loss` computes it on full logits (the yardstick of the tests).
How fast: `sdpo_loss` sends only response positions through the LM head, in chunks of
`logits_chunk_size` positions, so float32 logits never exist for more than one chunk at a
time. With gradients on, the head's gradient is formed in the forward, chunk by chunk
(sdpo_fused_head: 4 head products per response row); LoRA-wrapped, biased or sharded heads,
or `fused_lm_head=False`, run the chunks under activation checkpointing instead
(`checkpointed_head_loss`, 6 products: top-k pass, teacher, forward, recompute, 2 backward).
Both call TokenLoss; same loss and gradients. Call `check_lm_head(model)` once when setting a
model up: it refuses logit post-processing the chunked head would not reproduce.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sdpo_fused_head import fused_head_loss, fused_head_supported, logits_into, logprobs_in_place

logger = logging.getLogger(__name__)

DEFAULT_HINDSIGHT_TEMPLATE = (
    "\n\n=== HINDSIGHT CONTEXT ===\n"
    "[What follows is the user's next message, written after reading your answer. "
    "Let it guide how you answer the request above.]\n"
    "{followup}"
)

LOSS_MODES = ("simple_signal", "full_distillation")
# full_distillation's divergence between the student's and the teacher's top-k buckets (docs/objective.md)
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
# who scores y under xo: the current model (the paper's), the initial weights, or a moving average
TEACHER_MODES = ("live", "frozen", "ema")

# Role names of the chat formats we read -> chat-template roles: ShareGPT's human/gpt,
# OpenAssistant's prompter, WildChat's and others' spellings. The preprocessors use it too.
ROLE_ALIASES = {"user": "user", "human": "user", "prompter": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                "chatgpt": "assistant", "system": "system"}


# --------------------------------------------------------------------------- contexts

def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Accept role/content or from/value (human/gpt/system) messages; return role/content."""
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} is not an object: {message!r}")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            raise ValueError(f"message {index} needs role/content (or from/value), got keys {sorted(message)}")
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise ValueError(f"message {index} has unknown role {role!r}")
        if not isinstance(content, str):  # str(5) or str([...]) would train on text nobody wrote
            raise ValueError(f"message {index} content must be text, got {type(content).__name__} {content!r:.40}")
        normalized.append({"role": ROLE_ALIASES[role.lower()], "content": content})
    return normalized


def validate_template(template: str) -> str:
    if "{followup}" not in template:
        raise ValueError("the hindsight template must contain the placeholder {followup}")
    template.format(followup="")  # fails early on stray braces
    return template


# where the hindsight block goes: the last user message (ours), a user turn after x, or an assistant turn after x
# (the paper's offline Qwen3-4B run); docs/objective.md
HINDSIGHT_PLACEMENTS = ("last_user_message", "separate_turn", "assistant_turn")


def hindsight_messages(messages: Sequence[dict], followup: str, template: str = DEFAULT_HINDSIGHT_TEMPLATE,
                       placement: str = "last_user_message") -> list[dict]:
    """xo: a copy of x whose LAST user message carries the hindsight block (not a new turn).

    placement "separate_turn" puts the block (stripped) in a user turn of its own after x instead;
    "assistant_turn" puts it in an assistant turn after x (as the paper's offline Qwen3-4B run did), so the
    reply y follows a second assistant header."""
    if not isinstance(followup, str) or not followup.strip():
        raise ValueError("the follow-up message is empty")
    if placement not in HINDSIGHT_PLACEMENTS:
        raise ValueError(f"unknown hindsight placement {placement!r}; choose one of {', '.join(HINDSIGHT_PLACEMENTS)}")
    xo = [dict(m) for m in messages]
    if not any(m["role"] == "user" for m in xo):
        raise ValueError("the conversation has no user message to attach the hindsight context to")
    block = template.format(followup=followup.strip())
    if placement != "last_user_message":
        role = "user" if placement == "separate_turn" else "assistant"
        return xo + [{"role": role, "content": block.strip()}]
    for message in reversed(xo):
        if message["role"] == "user":
            message["content"] = message["content"] + block
            return xo
    raise AssertionError("unreachable: a user message exists")


def hindsight_contexts(tokenizer, messages: Sequence[dict], followup: str,
                       template: str = DEFAULT_HINDSIGHT_TEMPLATE, placement: str = "last_user_message",
                       contrast_followup: str = "") -> tuple[list[int], list[int], list[int] | None]:
    """Token ids of x, xo and (with a contrast follow-up, else None) x o_neutral: the contexts one
    interaction is scored under, every caller (online, offline, chat) built the same way."""
    messages = normalize_messages(messages)
    neutral = None
    if contrast_followup:
        neutral = render_context_ids(tokenizer, hindsight_messages(messages, contrast_followup, template, placement))
    return (render_context_ids(tokenizer, messages),
            render_context_ids(tokenizer, hindsight_messages(messages, followup, template, placement)), neutral)


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


# --------------------------------------------------------------------------- the objective on full logits
#
# What the losses are, written on full [..., V] logits. The chunked paths below compute the
# same numbers without ever holding them (tests/test_objective.py, tests/test_fused_head.py);
# the benchmark's yardstick is these functions on whole-sequence logits.

def topk_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int,
                    tail: bool = True, divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """Per-position divergence over the student's top-k ids (the full_distillation term).

    The teacher's log-probs are read at the student's top-k ids. tail=True adds one bucket holding
    all the remaining mass of each distribution; tail=False renormalises both over the top-k.
    divergence: reverse_kl = KL(student || teacher) (default), forward_kl = KL(teacher || student),
    jsd = the generalized Jensen-Shannon divergence of weight `alpha` (see `buckets_divergence`).
    k >= V is the exact full-vocabulary divergence. No gradient flows to the teacher.
    """
    student_logp = torch.log_softmax(_at_least_float32(student_logits), dim=-1)
    teacher_logp = torch.log_softmax(_at_least_float32(teacher_logits.detach()), dim=-1)
    k, with_tail = topk_support(k, student_logp.shape[-1], tail)
    ids = student_logp.detach().topk(k, dim=-1).indices
    return buckets_divergence(topk_buckets(student_logp, ids, with_tail), topk_buckets(teacher_logp, ids, with_tail),
                              renormalise=not tail, divergence=divergence, alpha=alpha)


def simple_signal_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_b (1/|y_b|) sum_t A_t log p(y_t | x), A_t = log p(y_t | xo) - log p(y_t | x) without gradient.

    Logits [B, R, V] at the positions predicting y (student under x, teacher under xo), targets and
    mask [B, R]. Default shaping (no ignore_first_k, centring or clipping).
    """
    def target_logp(logits):
        return torch.log_softmax(_at_least_float32(logits), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    logp_x = target_logp(student_logits)
    signal = (target_logp(teacher_logits.detach()) - logp_x).detach()
    mask = mask.float()
    return (-(signal * logp_x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def reference_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, opts: "ObjectiveOptions", neutral_logits: torch.Tensor | None = None,
                   ref_logp: torch.Tensor | None = None, end_token_ids: Sequence[int] | None = None) -> torch.Tensor:
    """The whole loss on full logits [B, R, V] at the positions predicting y, every option of `opts` included:
    the yardstick the chunked and fused paths of `sdpo_loss` are tested against.

    student_logits: the student under x (with gradient); teacher_logits: the teacher under xo;
    neutral_logits: the teacher under x o_neutral (--contrast_followup); ref_logp: [B, R] reference model
    log-probs of y (beta > 0); end_token_ids: the model's stop tokens (end_signal_weight > 0). Full-vocabulary
    log-softmax everywhere; the per-token loss itself is TokenLoss's.
    """
    if bool(opts.contrast_followup) != (neutral_logits is not None):
        raise ValueError("--contrast_followup needs the teacher's logits under x o_neutral, and only it does")
    plan = TokenLoss.for_batch(opts, response_ids, response_mask)
    mask = response_mask.bool()
    targets = response_ids[mask].unsqueeze(1)
    student = _at_least_float32(student_logits[mask])
    teacher = _at_least_float32(teacher_logits.detach()[mask])
    logp_x = torch.log_softmax(student, dim=-1).gather(1, targets).squeeze(1)
    if ref_logp is not None and opts.beta > 0:
        plan.ref_logp = ref_logp[mask]
    neutral = _at_least_float32(neutral_logits.detach()[mask]) if neutral_logits is not None else None
    if opts.loss_mode == "simple_signal":
        plan.logp_xo = torch.log_softmax(teacher, dim=-1).gather(1, targets).squeeze(1)
        if neutral is not None:
            plan.logp_neutral = torch.log_softmax(neutral, dim=-1).gather(1, targets).squeeze(1)
        plan.signal = shape_signal(plan.raw_signal(slice(None), logp_x), plan.weight, plan.seq_index, plan.num_seq,
                                   opts)
        logp_end = None
        if opts.end_signal_weight > 0:
            if not end_token_ids:
                raise ValueError("--end_signal_weight needs the model's stop token ids")
            ends = list(end_token_ids)

            def stop_logp(logits):  # log of the probability of stopping: summed over the stop tokens
                return torch.log_softmax(logits, dim=-1)[:, ends].logsumexp(dim=-1)

            logp_end = stop_logp(student)
            plan.use_end_tokens(ends, targets.squeeze(1), stop_logp(teacher),
                                None if neutral is None else stop_logp(neutral), logp_end.detach())
        return plan.loss_sum(slice(None), logp_x, None, logp_end)
    if neutral is not None:
        teacher = plan.tilt(teacher, neutral, student)
    kl = topk_divergence(student, teacher, opts.distillation_topk, opts.distillation_tail, opts.divergence,
                         opts.divergence_alpha)
    return plan.loss_sum(slice(None), logp_x, kl)


def topk_support(k: int, vocab: int, tail: bool) -> tuple[int, bool]:
    """(k clipped to the vocabulary, whether a tail bucket exists: not when the top-k is everything)."""
    k = min(int(k), vocab)
    return k, tail and k < vocab


def topk_buckets(logp: torch.Tensor, ids: torch.Tensor, with_tail: bool, in_place: bool = False) -> torch.Tensor:
    """Log-probs at `ids` [..., k], then (with_tail) the log-prob of all other ids together: [..., k + 1].

    The tail comes from a log-sum-exp over the ids outside the top-k, not from log(1 - sum of the
    top-k probs), which cancels in float32 once the top-k mass is ~1 (a teacher tail of 1e-9 reads
    as 1e-7 or 0). Written as log sigmoid(lse_outside - lse_topk) = log(P_out / (P_topk + P_out)):
    the same value, and a gradient that sums to zero over the vocabulary, so that log-softmax's
    backward does not subtract two nearly equal terms when the tail is most of the mass.
    in_place=True masks the top-k entries of `logp` to -inf instead of copying it.
    """
    picked = logp.gather(-1, ids)
    if not with_tail:
        return picked
    outside = logp.scatter_(-1, ids, float("-inf")) if in_place else logp.scatter(-1, ids, float("-inf"))
    tail = F.logsigmoid(torch.logsumexp(outside, dim=-1, keepdim=True) - torch.logsumexp(picked, dim=-1, keepdim=True))
    return torch.cat([picked, tail], dim=-1)


def buckets_divergence(student: torch.Tensor, teacher: torch.Tensor, renormalise: bool,
                       divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """The divergence between two bucket log-prob vectors over the last dimension (teacher: no gradient).

    renormalise=True first makes each sum to 1. With s, t the student's and teacher's log-probs and
    p_s, p_t their probabilities (TRL's `distillation_alpha` convention, trl.experimental.sdpo):
        reverse_kl   sum p_s (s - t)                                   (= jsd with alpha 1)
        forward_kl   sum p_t (t - s)                                   (= jsd with alpha 0)
        jsd          (1 - a) sum p_s (s - m) + a sum p_t (t - m),  m = log((1 - a) p_s + a p_t), 0 < a < 1
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if renormalise:
        student = student - torch.logsumexp(student, dim=-1, keepdim=True)
        teacher = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    if divergence == "jsd" and alpha >= 1.0:
        divergence = "reverse_kl"
    elif divergence == "jsd" and alpha <= 0.0:
        divergence = "forward_kl"
    with torch.no_grad():
        s, t = student.detach(), teacher.detach()
        p_s, p_t = s.exp(), t.exp()
        # Each value comes with its exact gradient with respect to the student's buckets, up to a
        # multiple of p_s (which sums to d(sum of p_s) = 0 over buckets that always sum to 1): written
        # out, so that float32 never forms O(1) terms that cancel against a small gradient.
        if divergence == "reverse_kl":
            terms = _times(p_s, s - t)
            value, grad = terms.sum(dim=-1), terms
        elif divergence == "forward_kl":
            value = _times(p_t, t - s).sum(dim=-1)
            grad = -p_s * torch.expm1(t - s)  # -p_t + p_s, without the cancellation when t ~ s
            grad = torch.where(p_s > 0, grad, -p_t)
        else:
            mixture = torch.logaddexp(s + math.log1p(-alpha), t + math.log(alpha))
            student_terms = _times(p_s, s - mixture)
            value = (1 - alpha) * student_terms.sum(dim=-1) + alpha * _times(p_t, t - mixture).sum(dim=-1)
            grad = (1 - alpha) * student_terms  # d/ds of both sums: the +p_s and -p_s parts cancel exactly
    # an empty bucket (log-prob -inf) has gradient 0: keep it out of the product, which would be NaN
    surrogate = (grad * torch.where(torch.isfinite(s), student, 0.0)).sum(dim=-1)
    return value + surrogate - surrogate.detach()


def _times(probs: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """probs * log_ratio with 0 where probs is 0 (an empty bucket contributes nothing, not NaN)."""
    return torch.where(probs > 0, probs * log_ratio, 0.0)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


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
    width_c = batch.context_width
    width_r = batch.response_ids.shape[1]
    return hidden[:, width_c - 1: width_c + width_r - 1]


def check_lm_head(model, probe_length: int = 8) -> None:
    """Refuse a model whose logits the chunked LM head would not reproduce; call once when setting it up.

    The objective applies the head itself (linear, then final_logit_softcapping where the config
    has it), so any other post-processing of the logits in the model's forward would go unseen.
    One no-grad forward on a few token ids, autocast off, compares the two. Models whose weights
    are not materialised here (meta tensors, ZeRO-3 partitions) are not checked.
    """
    params = list(model.parameters())
    if not params or any(p.is_meta or p.numel() == 0 for p in params):
        return
    device = params[0].device
    vocab = _unwrap(model).config.vocab_size
    ids = (torch.arange(1, probe_length + 1, device=device) % vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            output = model(input_ids=ids, use_cache=False, output_hidden_states=True)
            hidden = output.hidden_states[-1]
            ours = HeadLogits(model)(hidden)
            theirs = output.logits.float()
    finally:
        model.train(was_training)
    scale = float(theirs.abs().max().clamp(min=1.0))
    # fp32 agrees to ~1e-6; a 16-bit head rounds each logit by ~eps(bf16) = 4e-3.
    tolerance = 1e-3 if hidden.dtype == torch.float32 else 3e-2
    if not torch.allclose(ours, theirs, atol=tolerance * scale, rtol=tolerance):
        raise NotImplementedError(
            f"{type(_unwrap(model)).__name__} post-processes its logits in a way the chunked LM head of "
            "sdpo_objective does not reproduce (it knows final_logit_softcapping only)")


def _sharded_head(model) -> bool:
    """The LM head's weight is a DeepSpeed ZeRO-3 partition or an FSDP2 shard."""
    weight = getattr(_head(model), "weight", None)
    return weight is not None and (hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor")


def _head(model):
    return _unwrap(model).get_output_embeddings()


def _logit_softcap(model) -> float | None:
    """Gemma-2 style final-logit soft-capping (logits = cap * tanh(logits / cap)), None when off."""
    cap = getattr(_unwrap(model).config, "final_logit_softcapping", None)
    return float(cap) if cap else None


class HeadLogits:
    """The LM head as the model applies it, in float32: linear, then soft-capping where the model has it.

    `scope`: a context manager factory each call runs under (a teacher that is the same model with
    its LoRA adapter switched, whose head is itself adapted)."""

    def __init__(self, model, scope=None):
        self.linear = _head(model)
        self.softcap = _logit_softcap(model)
        self.vocab_size = getattr(self.linear, "out_features", None) or _unwrap(model).config.vocab_size
        self.scope = scope

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.scope is not None:
            with self.scope():
                logits = self.linear(hidden).float()
        else:
            logits = self.linear(hidden).float()
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap


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
def _target_logprob_chunk(head, hidden_chunk, target_chunk):
    logp = torch.log_softmax(head(hidden_chunk), dim=-1)
    if target_chunk.dim() == 2:  # several targets per row: the log of their summed probability
        return logp.gather(1, target_chunk).logsumexp(dim=1)
    return logp.gather(1, target_chunk.unsqueeze(1)).squeeze(1)


# The default chunk of response positions per device, by measurement (bench/bench_chunk_size.py, 2-core
# CPU at V 151,936: 64 fastest for simple_signal, 32-256 within noise for full_distillation, memory falling
# with the chunk); 256 on accelerators until measured there.
CPU_CHUNK_SIZE = 64
ACCELERATOR_CHUNK_SIZE = 256


def resolve_chunk_size(chunk_size: int | None, device) -> int:
    """--logits_chunk_size, or the measured default of the device the rows live on."""
    if chunk_size:
        return int(chunk_size)
    return CPU_CHUNK_SIZE if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_SIZE


def token_logprobs(head: "HeadLogits", hidden_rows: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int, fused_numerics: bool = False) -> torch.Tensor:
    """log p(target) for each row, chunked; checkpointed when gradients flow (log_softmax). Targets [N, m]: the
    log of the summed probability of each row's m targets.

    `fused_numerics` (no gradients; a plain head, as the fused head needs): the fused head's way instead,
    each chunk's logits written into one reused buffer and normalised in place, log p = z - max - log sum
    in float64 (closer to float64 than log_softmax at V = 151,936: 1e-6 against 5e-5). Log-probs that
    are subtracted from one another (the signal, the reference KL) must all come one way or the other:
    their rounding then cancels where the rows are alike."""
    if fused_numerics and not (torch.is_grad_enabled() and hidden_rows.requires_grad):
        return _target_logprobs_in_place(head, hidden_rows, targets, chunk_size)
    pieces = []
    for start, end in _chunks(hidden_rows.shape[0], chunk_size):
        if torch.is_grad_enabled() and hidden_rows.requires_grad:
            pieces.append(checkpoint(_target_logprob_chunk, head, hidden_rows[start:end], targets[start:end],
                                     use_reentrant=False))
        else:
            pieces.append(_target_logprob_chunk(head, hidden_rows[start:end], targets[start:end]))
    return torch.cat(pieces) if pieces else hidden_rows.new_zeros(0, dtype=torch.float32)


def _target_logprobs_in_place(head: "HeadLogits", hidden_rows, targets, chunk_size: int):
    total = hidden_rows.shape[0]
    out = torch.empty(total, device=hidden_rows.device)
    weight = head.linear.weight
    buffer = None
    if head.scope is None and weight.dtype == hidden_rows.dtype == torch.float32 and total:
        buffer = torch.empty((min(max(1, int(chunk_size)), total), weight.shape[0]), device=hidden_rows.device)
    for start, end in _chunks(total, chunk_size):
        if buffer is not None:
            logits, _ = logits_into(buffer[:end - start], hidden_rows[start:end], weight, head.softcap)
        else:
            logits = head(hidden_rows[start:end])
        columns = targets[start:end] if targets.dim() == 2 else targets[start:end].unsqueeze(1)
        (target_logp,), _, _ = logprobs_in_place(logits, [logits.gather(1, columns).double()])
        out[start:end] = target_logp.logsumexp(dim=1) if targets.dim() == 2 else target_logp.squeeze(1)
    return out


def score_tokens(model, batch: ScoringBatch, chunk_size: int | None = None,
                 fused_numerics: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y_t | context), sequence index) over the N real response tokens, row-major. `fused_numerics`:
    as the fused head rounds (token_logprobs), where the model's head allows it."""
    hidden, targets, seq_index = _valid_rows(_response_hidden(model, batch), batch)
    fused_numerics = fused_numerics and fused_head_supported(model, hidden)
    return token_logprobs(HeadLogits(model), hidden, targets, resolve_chunk_size(chunk_size, hidden.device),
                          fused_numerics), seq_index


@torch.no_grad()
def response_token_stats(model, batch: ScoringBatch, chunk_size: int | None = None):
    """No gradients: (log p(y_t | context), the entropy of the next-token distribution there, sequence
    index) over the N real response tokens, row-major; the batch is scored as the objective scores it."""
    hidden, targets, seq_index = _valid_rows(_response_hidden(model, batch), batch)
    head = HeadLogits(model)
    logp_out, entropy_out = [], []
    for start, end in _chunks(hidden.shape[0], resolve_chunk_size(chunk_size, hidden.device)):
        logp = torch.log_softmax(head(hidden[start:end]), dim=-1)
        logp_out.append(logp.gather(1, targets[start:end].unsqueeze(1)).squeeze(1))
        entropy_out.append(-(logp.exp() * logp).sum(dim=-1))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    return (torch.cat(logp_out) if logp_out else empty), (torch.cat(entropy_out) if entropy_out else empty), seq_index


def split_by_sequence(values: torch.Tensor, batch: ScoringBatch) -> list[torch.Tensor]:
    lengths = batch.response_mask.sum(dim=1).tolist()
    return list(torch.split(values, lengths))


@torch.no_grad()
def compute_signal(model, contexts_x, contexts_xo, responses, pad_token_id: int, max_context_length=None,
                   chunk_size: int | None = None, teacher: "Teacher | None" = None,
                   contexts_neutral=None) -> list[dict]:
    """Per-token signal for each response (analysis and /why): dicts of signal, logp_x, logp_xo (CPU floats).
    xo is scored by `teacher` (a frozen or EMA Teacher) where given, else by the model itself.
    `contexts_neutral` (x o_neutral): the contrastive signal A_t = log p_T(y_t | xo) - log p_T(y_t | x o_neutral),
    both scored by the teacher; the dicts then hold logp_neutral too."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch_x = build_scoring_batch(contexts_x, responses, pad_token_id, max_context_length, device)
        batch_xo = build_scoring_batch(contexts_xo, responses, pad_token_id, max_context_length, device)
        logp_x, _ = score_tokens(model, batch_x, chunk_size)
        logp_n = None
        with contextlib.nullcontext(model) if teacher is None else teacher.scoring(model) as teacher_model:
            logp_xo, _ = score_tokens(teacher_model, batch_xo, chunk_size)
            if contexts_neutral is not None:
                batch_n = build_scoring_batch(contexts_neutral, responses, pad_token_id, max_context_length, device)
                logp_n, _ = score_tokens(teacher_model, batch_n, chunk_size)
    finally:
        model.train(was_training)
    results = []
    pieces_n = split_by_sequence(logp_n, batch_x) if logp_n is not None else [None] * len(responses)
    for lx, lxo, ln in zip(split_by_sequence(logp_x, batch_x), split_by_sequence(logp_xo, batch_x), pieces_n):
        result = {"signal": (lxo - (lx if ln is None else ln)).cpu().tolist(), "logp_x": lx.cpu().tolist(),
                  "logp_xo": lxo.cpu().tolist()}
        if ln is not None:
            result["logp_neutral"] = ln.cpu().tolist()
        results.append(result)
    return results


# --------------------------------------------------------------------------- losses

# The allowed range of each numeric objective option: (low, low inclusive, high, high inclusive), None = no bound;
# a row may add a fifth item, (value, meaning): the one value outside the range that is allowed too ("-1: off").
# These rows belong to the project's one table of ranges (auxiliary/runtime/option_groups.RANGES takes them
# in); they live here because the objective checks its own options and imports nothing from auxiliary/.
OBJECTIVE_RANGES: dict[str, tuple] = {
    "distillation_topk": (1, True, None, None), "logits_chunk_size": (1, True, None, None),
    "ignore_first_k": (0, True, None, None), "copy_guard_ngram": (0, True, None, None),
    "signal_clip": (0, True, None, None), "beta": (0, True, None, None), "end_signal_weight": (0, True, None, None),
    "divergence_alpha": (0, True, 1, True), "teacher_ema_rate": (0, False, 1, True),
}


def describe_range(low, low_inclusive, high, high_inclusive, unset=None) -> str:
    if high is None:
        text = f"{'>=' if low_inclusive else '>'} {low}"
    elif low is None:
        text = f"{'<=' if high_inclusive else '<'} {high}"
    else:
        text = f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    return text + (f", or {unset[0]} ({unset[1]})" if unset else "")


def check_in_range(name: str, value, ranges: dict[str, tuple]) -> None:
    """A float must be finite (no --lr inf) and a number named in `ranges` must lie in its range; the
    one-line message names the flag, the allowed range and the value. None, bools and text pass."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"--{name} must be a finite number, got {value}")
    if name not in ranges:
        return
    low, low_inclusive, high, high_inclusive, *unset = ranges[name]
    if unset and value == unset[0][0]:
        return
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        raise ValueError(f"--{name} must be {describe_range(*ranges[name])}, got {value}")


@dataclass
class ObjectiveOptions:
    """The loss options; also the objective group of every config (online, offline, chat), whose
    fields are CLI flags and YAML keys, so the help text lives here once."""
    loss_mode: str = field(default="full_distillation", metadata={"help": f"one of {', '.join(LOSS_MODES)}"})
    distillation_topk: int = field(default=20, metadata={"help": "student top-k support of full_distillation"})
    distillation_tail: bool = field(default=True, metadata={
        "help": "full_distillation: keep a tail bucket for the remaining mass (else renormalise over top-k)"})
    divergence: str = field(default="reverse_kl", metadata={
        "help": "full_distillation: reverse_kl = KL(student||teacher), forward_kl = KL(teacher||student), "
                "or jsd (generalized Jensen-Shannon, weight --divergence_alpha)"})
    divergence_alpha: float = field(default=0.5, metadata={
        "help": "jsd: TRL's distillation_alpha, the teacher's weight in the mixture (0 = forward KL, 1 = reverse KL)"})
    teacher: str = field(default="live", metadata={
        "help": "who scores y under xo: live (the current model, the paper's), frozen (the initial weights; "
                "LoRA: the adapter switched off) or ema (a moving average of the weights; LoRA: a second adapter)"})
    teacher_ema_rate: float = field(default=0.05, metadata={
        "help": "ema teacher: teacher <- (1 - r) teacher + r student after every optimizer step"})
    signal_clip: float = field(default=0.0, metadata={"help": "clamp the signal to +-c (0 = off)"})
    ignore_first_k: int = field(default=0, metadata={
        "help": "give no signal to the first k reply tokens (a reply of k tokens or fewer keeps all, as the "
                "paper's code)"})
    center_signal: bool = field(default=False, metadata={"help": "subtract each reply's mean signal (simple_signal)"})
    negate_signal: bool = field(default=False, metadata={
        "help": "control experiments only: train on -A (simple_signal)"})
    beta: float = field(default=0.0, metadata={
        "help": "weight of a KL to a frozen reference model (k3 estimator on y; 0 = off)"})
    contrast_followup: str = field(default="", metadata={
        "help": "contrastive signal: score y under this neutral follow-up too and use A_t = log p(y_t | x, o) - "
                "log p(y_t | x, o_neutral); full_distillation tilts the teacher the same way (docs/objective.md; "
                "empty = off, the paper's)"})
    copy_guard_ngram: int = field(default=0, metadata={
        "help": "copy guard: no signal and no distillation term on reply tokens that complete a repeat of an earlier "
                "n-gram of the same reply, n this value (0 = off, the paper's)"})
    end_signal_weight: float = field(default=0.0, metadata={
        "help": "simple_signal: also teach where the reply should end: + w A_end,t log p(<end> | x, y<t) at every "
                "weighted position, A_end,t the hindsight signal of the end-of-turn token there (against the neutral "
                "follow-up with contrast); w this value (0 = off, the paper's; docs/objective.md)"})
    end_signal_copy_guard: bool = field(default=True, metadata={
        "help": "end signal with --copy_guard_ngram: the guard removes the end term too where it removes a token's "
                "signal (false: the end term stays at those positions, inside a loop, where stopping is wanted)"})
    end_signal_center: bool = field(default=False, metadata={
        "help": "end signal: subtract each reply's weighted mean A_end (teach where in a reply to stop, not how much "
                "more often)"})
    logits_chunk_size: Optional[int] = field(default=None, metadata={
        "help": f"response positions per chunk of the LM head / log-softmax (default: {CPU_CHUNK_SIZE} on CPU, "
                f"{ACCELERATOR_CHUNK_SIZE} on GPU, chosen by bench/bench_chunk_size.py)"})
    fused_lm_head: bool = field(default=True, metadata={
        "help": "form the LM head's gradient during the forward (faster; falls back to checkpointed chunks for "
                "LoRA/biased/sharded heads)"})

    def __post_init__(self):
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode '{self.loss_mode}'; choose one of {', '.join(LOSS_MODES)}")
        for name in OBJECTIVE_RANGES:
            check_in_range(name, getattr(self, name), OBJECTIVE_RANGES)
        if not isinstance(self.contrast_followup, str):
            raise ValueError(f"--contrast_followup must be a text, got {self.contrast_followup!r}")
        if self.contrast_followup and not self.contrast_followup.strip():
            raise ValueError("--contrast_followup is blank: give a neutral follow-up text, or leave it empty (off)")
        if self.end_signal_weight and self.loss_mode != "simple_signal":
            raise ValueError("--end_signal_weight needs --loss_mode simple_signal (full_distillation reads the end "
                             "token's probability wherever it is in the top-k)")
        if self.negate_signal and self.loss_mode != "simple_signal":
            raise ValueError("negate_signal is only defined for loss_mode simple_signal")
        for name, value, choices in (("divergence", self.divergence, DIVERGENCES),
                                     ("teacher", self.teacher, TEACHER_MODES)):
            if value not in choices:
                raise ValueError(f"unknown --{name} {value!r}; choose one of {', '.join(choices)}")
        if self.divergence != "reverse_kl" and self.loss_mode != "full_distillation":
            raise ValueError(f"--divergence {self.divergence} needs --loss_mode full_distillation "
                             "(simple_signal has no divergence)")

    @classmethod
    def from_config(cls, config: "ObjectiveOptions") -> "ObjectiveOptions":
        """The objective group of a config that inherits it (online, offline or chat config)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def repeated_ngram_mask(ids: Sequence[int], n: int) -> list[bool]:
    """For each position t of `ids`: whether the n-gram ending at t (ids[t-n+1 .. t]) already ended at an
    earlier position of `ids` (overlaps count). The copy guard's rule, and bench/demo_copy_signal.py's."""
    seen: set[tuple] = set()
    flags = []
    for t in range(len(ids)):
        gram = tuple(ids[t - n + 1:t + 1]) if n >= 1 and t >= n - 1 else None
        flags.append(gram is not None and gram in seen)
        if gram is not None:
            seen.add(gram)
    return flags


def token_weights(response_ids: torch.Tensor, response_mask: torch.Tensor, opts: "ObjectiveOptions") -> torch.Tensor:
    """1.0 for each real reply token (row-major, [N]) that gets signal and distillation term, else 0.0.

    ignore_first_k: the first k tokens of a reply get none, except in a reply of k tokens or fewer,
    which keeps every token (the paper's code; a short reply would otherwise teach nothing at all).
    copy_guard_ngram n > 0: a token that completes a repeat of an earlier n-gram of its reply gets none.
    """
    mask = response_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0).expand_as(mask)
    lengths = mask.sum(dim=1, keepdim=True).expand_as(mask)
    keep = (positions >= opts.ignore_first_k) | (lengths <= opts.ignore_first_k)
    if opts.copy_guard_ngram:
        rows = [repeated_ngram_mask(ids[:length].tolist(), opts.copy_guard_ngram) + [False] * (mask.shape[1] - length)
                for ids, length in zip(response_ids.cpu(), mask.sum(dim=1).tolist())]
        keep = keep & ~torch.tensor(rows, dtype=torch.bool, device=mask.device).reshape(mask.shape)
    return keep[mask].float()


def shape_signal(raw_signal: torch.Tensor, weight: torch.Tensor, seq_index: torch.Tensor, num_sequences: int,
                 opts: ObjectiveOptions) -> torch.Tensor:
    """negate_signal, then centring (each reply's weighted mean), then clipping; zero where `weight` is 0."""
    signal = -raw_signal if opts.negate_signal else raw_signal.clone()
    if opts.center_signal:
        sums = torch.zeros(num_sequences, device=signal.device).index_add_(0, seq_index, signal * weight)
        counts = torch.zeros(num_sequences, device=signal.device).index_add_(0, seq_index, weight).clamp(min=1)
        signal = signal - (sums / counts)[seq_index]
    if opts.signal_clip and opts.signal_clip > 0:
        signal = signal.clamp(-opts.signal_clip, opts.signal_clip)
    return signal * weight


@dataclass
class TokenLoss:
    """The per-token loss of one batch, every option included; tokens row-major ([N], real reply tokens only).

    What the loss is lives here alone: the full-logit reference (`reference_loss`) and both LM-head
    paths (checkpointed chunks below, fused in sdpo_fused_head) compute log-probs and buckets, then call
    these methods. Build it with `TokenLoss.for_batch`.
    """
    opts: ObjectiveOptions
    num_seq: int
    seq_index: torch.Tensor                     # the reply each token belongs to
    weight: torch.Tensor                        # token_weights: 0 where ignore_first_k or the copy guard drop a token
    tokens_per_seq: torch.Tensor                # weighted token count of each token's reply (>= 1)
    logp_xo: torch.Tensor | None = None         # teacher log p(y_t | xo) (simple_signal)
    logp_neutral: torch.Tensor | None = None    # teacher log p(y_t | x o_neutral) (simple_signal, contrast on)
    signal: torch.Tensor | None = None          # shaped signal when known up front (else shaped per chunk)
    ref_logp: torch.Tensor | None = None        # reference model log p(y_t | x) (beta > 0)
    end_token_ids: list[int] | None = None      # end_signal_weight > 0: the model's stop tokens (use_end_tokens)
    end_weight: torch.Tensor | None = None      # weight, 0 where y_t is a stop token itself
    end_signal_values: torch.Tensor | None = None  # A_end,t, no gradient (negated with negate_signal)
    end_base_weight: torch.Tensor | None = None  # the end term's weight before stop tokens (None: `weight`)

    @classmethod
    def for_batch(cls, opts: ObjectiveOptions, response_ids: torch.Tensor, response_mask: torch.Tensor) -> "TokenLoss":
        mask = response_mask.bool()
        num_seq = mask.shape[0]
        seq_index = torch.arange(num_seq, device=mask.device).unsqueeze(1).expand_as(mask)[mask]
        weight = token_weights(response_ids, mask, opts)
        counts = torch.zeros(num_seq, device=weight.device).index_add_(0, seq_index, weight).clamp(min=1)
        end_base_weight = weight
        if opts.end_signal_weight and opts.copy_guard_ngram and not opts.end_signal_copy_guard:
            end_base_weight = token_weights(response_ids, mask, dataclasses.replace(opts, copy_guard_ngram=0))
        return cls(opts, num_seq, seq_index, weight, counts[seq_index], end_base_weight=end_base_weight)

    @property
    def contrast(self) -> bool:
        return bool(self.opts.contrast_followup)

    def support(self, vocab: int) -> tuple[int, bool]:
        return topk_support(self.opts.distillation_topk, vocab, self.opts.distillation_tail)

    @staticmethod
    def tilt(teacher_logits: torch.Tensor, neutral_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """The contrastive teacher of full_distillation: z_T(xo) - z_T(x o_neutral) + z_S(x) (no gradient), i.e.
        q(.) proportional to p_S(. | x) p_T(. | xo) / p_T(. | x o_neutral). Float32 logits in, the same out."""
        return teacher_logits - neutral_logits + student_logits.detach()

    def raw_signal(self, rows, logp_x: torch.Tensor) -> torch.Tensor:
        """A_t = log p_T(y_t | xo) - log p_T(y_t | x o_neutral) with contrast, else - log p(y_t | x); no gradient."""
        baseline = self.logp_neutral[rows] if self.contrast else logp_x.detach()
        return (self.logp_xo[rows] - baseline).detach()

    def shaped_signal(self, rows, logp_x: torch.Tensor) -> torch.Tensor:
        if self.signal is not None:
            return self.signal[rows]
        # per chunk: no centring here (centring needs a whole reply; sdpo_loss shapes up front then)
        return shape_signal(self.raw_signal(rows, logp_x), self.weight[rows], self.seq_index[rows], self.num_seq,
                            self.opts)

    def use_end_tokens(self, end_token_ids: Sequence[int], targets: torch.Tensor, end_logp_xo: torch.Tensor,
                       end_logp_neutral: torch.Tensor | None, end_logp_x: torch.Tensor | None) -> None:
        """Turn the end signal on. <end> is "any stop token": log p(<end>) = log sum_s p(s) over end_token_ids.
        A_end,t = log p_T(<end> | xo, y<t) - (log p_T(<end> | x o_neutral, y<t) with contrast, else the student's own
        log p(<end> | x, y<t), computed the way the teacher's was, so that their rounding cancels). No clipping, and no
        centring unless end_signal_center (each reply's mean over w'): <end> is one action among the vocabulary, not a
        token of the reply; negate_signal negates it too.
        Where y_t is a stop token the sampled token carries that signal already: no end term there."""
        baseline = end_logp_neutral if self.contrast else end_logp_x
        if baseline is None:
            raise ValueError("the end signal needs the student's log p(<end> | x) without contrast")
        signal = (end_logp_xo - baseline).detach()
        self.end_token_ids = list(end_token_ids)
        signal = -signal if self.opts.negate_signal else signal
        stops = torch.tensor(self.end_token_ids, device=targets.device)
        base = self.weight if self.end_base_weight is None else self.end_base_weight
        self.end_weight = base * (~torch.isin(targets, stops)).float()
        if self.opts.end_signal_center:
            zeros = torch.zeros(self.num_seq, device=signal.device)
            sums = zeros.index_add(0, self.seq_index, signal * self.end_weight)
            counts = zeros.index_add(0, self.seq_index, self.end_weight)
            signal = signal - (sums / counts.clamp(min=1))[self.seq_index]
        self.end_signal_values = signal

    def kl(self, student_buckets: torch.Tensor, teacher_buckets: torch.Tensor) -> torch.Tensor:
        """The per-token divergence of full_distillation (`--divergence`; named kl for the default)."""
        return buckets_divergence(student_buckets, teacher_buckets, renormalise=not self.opts.distillation_tail,
                                  divergence=self.opts.divergence, alpha=self.opts.divergence_alpha)

    def loss_sum(self, rows, logp_x: torch.Tensor, kl: torch.Tensor | None,
                 logp_end: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the loss terms of tokens `rows` (the whole loss when rows covers every token).

        simple_signal:      -(1/B) sum_b (1/|y_b|) sum_t w_t A_t log p(y_t | x)    (A shaped: shape_signal)
        full_distillation:  sum_t w_t D_t / sum_t w_t, D_t the top-k divergence (reverse KL by default)
        beta > 0:           + beta * sum_t w_t k3_t / sum_t w_t, k3 the estimate of KL(policy || reference)
        end signal:         - (1/B) sum_b (1/|y_b|) sum_t e w'_t A_end,t log p(<end> | x, y<t), e = end_signal_weight,
                            w'_t = w_t (without the copy guard when end_signal_copy_guard is off) but 0 where
                            y_t is a stop token (`use_end_tokens`)
        w_t = token_weights, |y_b| = sum of w_t over reply b. logp_x and kl carry the gradient; the signal never does.
        """
        opts, weight = self.opts, self.weight[rows]
        weight_total = self.weight.sum().clamp(min=1)
        if opts.loss_mode == "simple_signal":
            total = (-self.shaped_signal(rows, logp_x) * logp_x / self.tokens_per_seq[rows]).sum() / self.num_seq
            if self.end_token_ids is not None:
                end_coefficient = self.opts.end_signal_weight * self.end_signal_values[rows] * self.end_weight[rows]
                total = total - (end_coefficient * logp_end / self.tokens_per_seq[rows]).sum() / self.num_seq
        else:
            total = (kl * weight).sum() / weight_total
        if self.ref_logp is not None:
            total = total + opts.beta * (k3_kl(self.ref_logp[rows], logp_x) * weight).sum() / weight_total
        return total


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) on sampled tokens: exp(r) - r - 1, r = log p_ref - log p."""
    delta = ref_logp - logp
    return delta.exp() - delta - 1.0


# --------------------------------------------------------------------------- checkpointed LM head

def _teacher_distill_chunk(head, hidden_chunk, ids_chunk, target_chunk, with_tail: bool, neutral_chunk=None,
                           student_logits=None):
    logits = head(hidden_chunk)
    if neutral_chunk is not None:  # contrast: the tilted teacher
        logits = TokenLoss.tilt(logits, head(neutral_chunk), student_logits)
    logp = torch.log_softmax(logits, dim=-1)
    target_logp = logp.gather(1, target_chunk.unsqueeze(1)).squeeze(1)
    return topk_buckets(logp, ids_chunk, with_tail, in_place=True), target_logp


def _student_distill_chunk(head, hidden_chunk, ids_chunk, target_chunk, teacher_buckets_chunk, plan):
    logp = torch.log_softmax(head(hidden_chunk), dim=-1)
    with_tail = teacher_buckets_chunk.shape[1] > ids_chunk.shape[1]
    kl = plan.kl(topk_buckets(logp, ids_chunk, with_tail), teacher_buckets_chunk)
    return kl, logp.gather(1, target_chunk.unsqueeze(1)).squeeze(1)


def checkpointed_head_loss(head: "HeadLogits", plan: TokenLoss, hidden_s, hidden_t, targets, chunk_size: int,
                           teacher_head: "HeadLogits | None" = None, hidden_neutral=None):
    """The loss with the LM head in chunks; with gradients on, each chunk runs under activation checkpointing.

    Per chunk and response row: student top-k pass (no grad), teacher, student forward, its
    recompute and 2 backward products: 6 head products. Returns (loss, logp_x, logp_xo, kl or None);
    logp_xo is the (tilted, with contrast) teacher's log-prob of y_t. `teacher_head` scores hidden_t and
    hidden_neutral (the teacher under x o_neutral, full_distillation with contrast; default `head`).
    """
    opts = plan.opts
    teacher_head = teacher_head or head
    grad_on = torch.is_grad_enabled() and hidden_s.requires_grad
    if opts.loss_mode == "simple_signal":
        logp_x = token_logprobs(head, hidden_s, targets, chunk_size)
        if plan.signal is None:
            plan.signal = shape_signal(plan.raw_signal(slice(None), logp_x), plan.weight, plan.seq_index, plan.num_seq,
                                       opts)
        logp_end = None
        if plan.end_token_ids is not None:
            logp_end = token_logprobs(head, hidden_s, stop_columns(plan.end_token_ids, targets), chunk_size)
        return plan.loss_sum(slice(None), logp_x, None, logp_end), logp_x, plan.logp_xo, None
    k, with_tail = plan.support(head.vocab_size)
    kl_pieces, logp_x_pieces, logp_xo_pieces = [], [], []
    for start, end in _chunks(hidden_s.shape[0], chunk_size):
        rows = slice(start, end)
        with torch.no_grad():
            student_logits = head(hidden_s[rows].detach())
            ids = student_logits.topk(k, dim=-1).indices
            neutral = hidden_neutral[rows] if hidden_neutral is not None else None
            teacher_buckets, teacher_target = _teacher_distill_chunk(teacher_head, hidden_t[rows], ids, targets[rows],
                                                                     with_tail, neutral, student_logits)
            del student_logits
        arguments = (head, hidden_s[rows], ids, targets[rows], teacher_buckets, plan)
        kl, student_target = (checkpoint(_student_distill_chunk, *arguments, use_reentrant=False) if grad_on
                              else _student_distill_chunk(*arguments))
        kl_pieces.append(kl)
        logp_x_pieces.append(student_target)
        logp_xo_pieces.append(teacher_target)
    empty = hidden_s.new_zeros(0, dtype=torch.float32)
    kl_values = torch.cat(kl_pieces) if kl_pieces else empty
    logp_x = torch.cat(logp_x_pieces) if logp_x_pieces else empty
    logp_xo = torch.cat(logp_xo_pieces) if logp_xo_pieces else empty
    return plan.loss_sum(slice(None), logp_x, kl_values), logp_x, logp_xo, kl_values


# --------------------------------------------------------------------------- the teacher

class Teacher:
    """Who scores y under xo (ObjectiveOptions.teacher); always in eval mode and without gradient.

    live    the current model (the paper's; nothing kept).
    frozen  the initial weights: under LoRA the same model with its adapter switched off (peft's
            disable_adapter); otherwise a frozen copy (`frozen_copy`, e.g. the reference model of
            beta > 0 when that is the initial policy too, else a deep copy made here).
    ema     teacher <- (1 - rate) teacher + rate student after every optimizer step (`update`): under
            LoRA a second adapter of the same model (only adapter weights are averaged), otherwise a copy.
    `state_dict` / `load_state_dict` carry the EMA weights through checkpoints (plain tensors).
    """

    EMA_ADAPTER = "sdpo_teacher_ema"

    def __init__(self, model, mode: str = "live", ema_rate: float = 0.05, frozen_copy=None):
        if mode not in TEACHER_MODES:
            raise ValueError(f"unknown teacher {mode!r}; choose one of {', '.join(TEACHER_MODES)}")
        if mode == "ema":
            check_in_range("teacher_ema_rate", ema_rate, OBJECTIVE_RANGES)
        self.mode, self.ema_rate = mode, float(ema_rate)
        self.student = _unwrap(model)
        self.lora = hasattr(self.student, "peft_config") and hasattr(self.student, "disable_adapter")
        self.copy = None
        self._pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, teacher tensor, student tensor)
        if mode == "live":
            return
        if not self.lora:
            self.copy = frozen_copy if (mode == "frozen" and frozen_copy is not None) else _frozen_copy(self.student)
            if mode == "ema":
                students = dict(self.student.named_parameters())
                self._pairs = [(name, p, students[name]) for name, p in self.copy.named_parameters()
                               if name in students]
        elif mode == "ema":
            self._add_ema_adapter()
        # 16-bit EMA weights average in a float32 copy: r * (student - teacher) is often below a bf16
        # weight's rounding step, and would be lost at every update
        self._float32 = {name: teacher_param.detach().float().clone() for name, teacher_param, _ in self._pairs
                         if teacher_param.dtype in (torch.float16, torch.bfloat16)}

    def _add_ema_adapter(self):
        active = self.student.active_adapter
        config = dataclasses.replace(self.student.peft_config[active], inference_mode=True)
        if self.EMA_ADAPTER in self.student.peft_config:  # a copy of a model that had one (the placebo arm's)
            self.student.delete_adapter(self.EMA_ADAPTER)
        self.student.add_adapter(self.EMA_ADAPTER, config)
        self.student.set_adapter(active)  # the trained adapter stays the active, trainable one
        params = dict(self.student.named_parameters())
        marker = f".{active}."
        for name, student_param in params.items():
            if marker in name and "lora_" in name:
                teacher_param = params[name.replace(marker, f".{self.EMA_ADAPTER}.")]
                with torch.no_grad():
                    teacher_param.copy_(student_param)  # the teacher starts as the student
                teacher_param.requires_grad_(False)
                self._pairs.append((name, teacher_param, student_param))
        if not self._pairs:
            raise ValueError("--teacher ema under LoRA: found no LoRA weights to average")

    @contextlib.contextmanager
    def scoring(self, model):
        """The module to score xo with (`model` is the possibly DDP-wrapped student), in eval mode."""
        if self.copy is not None:
            yield self.copy
            return
        was_training = model.training
        model.eval()
        try:
            if self.mode == "frozen":
                with self.student.disable_adapter():
                    yield model
            elif self.mode == "ema":
                active = self.student.active_adapter
                self.student.set_adapter(self.EMA_ADAPTER, inference_mode=True)
                try:
                    yield model
                finally:
                    self.student.set_adapter(active)  # trainable again; the EMA adapter frozen
            else:
                yield model
        finally:
            model.train(was_training)

    def head(self, model, student_head: "HeadLogits") -> "HeadLogits":
        """The teacher's LM head: the copy's own, or the student's (run under the teacher's scope
        when LoRA adapts the head itself)."""
        if self.copy is not None:
            return HeadLogits(self.copy)
        if self.mode == "live" or type(student_head.linear) is torch.nn.Linear:
            return student_head
        return HeadLogits(model, scope=lambda: self.scoring(model))

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step (after each optimizer step); nothing for live and frozen teachers."""
        for name, teacher_param, student_param in self._pairs:
            master = self._float32.get(name)
            if master is None:
                teacher_param.lerp_(student_param.detach().to(teacher_param.dtype), self.ema_rate)
            else:
                master.lerp_(student_param.detach().float(), self.ema_rate)
                teacher_param.copy_(master)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights by the student parameter's name (float32 for 16-bit weights; empty unless ema)."""
        return {name: self._float32.get(name, teacher_param).detach().cpu().clone()
                for name, teacher_param, _ in self._pairs}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "teacher state") -> None:
        expected = {name for name, _, _ in self._pairs}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(
                f"{source}: does not match the ema teacher (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, teacher_param, _ in self._pairs:
                if tensors[name].shape != teacher_param.shape:
                    raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, "
                                     f"expected {tuple(teacher_param.shape)}")
                teacher_param.copy_(tensors[name])
                if name in self._float32:
                    self._float32[name].copy_(tensors[name])


@functools.cache
def log_fused_head_fallback(reason: str) -> None:
    """Say why the fused head is off, once per reason and process: the loss runs every step.
    log_fused_head_fallback.cache_clear() forgets what was said."""
    logger.info("fused LM head off, checkpointed chunks instead: %s", reason)


def end_token_ids(model) -> list[int]:
    """The model's stop tokens: its generation config's eos_token_id (one id or several, e.g. Llama 3's end of text,
    end of message and end of turn), the set the end signal sums the probability of stopping over."""
    eos = getattr(getattr(_unwrap(model), "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError("--end_signal_weight: the model's generation config names no eos_token_id")
    return list(dict.fromkeys(int(i) for i in ids))


def stop_columns(end_token_ids: Sequence[int], targets: torch.Tensor) -> torch.Tensor:
    """[N, m]: the stop token ids at every one of the N rows, for token_logprobs (which then sums their probability)."""
    return torch.tensor(list(end_token_ids), device=targets.device).expand(targets.shape[0], -1)


def _fused_head_refusal(model, teacher: Teacher, teacher_head: "HeadLogits", hidden: torch.Tensor) -> str | None:
    """Why the fused head cannot take this model and teacher (None: it can)."""
    if not fused_head_supported(model, hidden):
        return "the LM head is not a plain, bias-free, unsharded nn.Linear (LoRA-wrapped, biased or sharded)"
    if teacher_head.scope is not None or (teacher.copy is not None and not fused_head_supported(teacher.copy, hidden)):
        return f"the {teacher.mode} teacher's LM head is not a plain nn.Linear"
    return None


def _frozen_copy(model):
    import copy

    duplicate = copy.deepcopy(model).eval()
    duplicate.requires_grad_(False)
    return duplicate


# ----------------------------------------------------------------------------- the loss

def sdpo_loss(model, batch_x: ScoringBatch, batch_xo: ScoringBatch, opts: ObjectiveOptions,
              ref_model=None, teacher: Teacher | None = None,
              batch_neutral: ScoringBatch | None = None) -> tuple[torch.Tensor, dict]:
    """The SDPO loss for a batch of interactions. The teacher scores xo (and, with --contrast_followup,
    x o_neutral: `batch_neutral`) without gradient, in eval mode: by default (teacher None or live) the
    same model; else the frozen or EMA teacher given.

    Returns (loss, stats); stats holds floats plus `signal_per_sequence` (list of CPU tensors, raw A_t:
    the teacher's log-prob of y_t minus the student's, or with contrast in simple_signal minus the
    teacher's under x o_neutral). With gradients on and a plain LM head (opts.fused_lm_head), the head's
    gradient is formed in the forward (sdpo_fused_head); otherwise the head runs in checkpointed chunks.
    Same loss and gradients either way, and as `reference_loss` on full logits (tests/test_fused_head.py).
    """
    for name, other in (("xo", batch_xo), ("x o_neutral", batch_neutral)):
        if other is not None and not torch.equal(batch_x.response_ids, other.response_ids):
            raise ValueError(f"x and {name} batches must hold the same response ids")
    if bool(opts.contrast_followup) != (batch_neutral is not None):
        raise ValueError("--contrast_followup needs the batch of x o_neutral (batch_neutral), and only it does")
    if teacher is not None and teacher.mode != opts.teacher:
        raise ValueError(f"the teacher given is {teacher.mode!r} but the options say --teacher {opts.teacher}")
    if teacher is None and opts.teacher != "live":
        raise ValueError(f"--teacher {opts.teacher} needs a Teacher object (sdpo_objective.Teacher)")
    teacher = teacher or Teacher(model)
    chunk = resolve_chunk_size(opts.logits_chunk_size, batch_x.response_ids.device)
    plan = TokenLoss.for_batch(opts, batch_x.response_ids, batch_x.response_mask)

    hidden_n = None
    with torch.no_grad(), teacher.scoring(model) as teacher_model:
        hidden_t, targets, _ = _valid_rows(_response_hidden(teacher_model, batch_xo), batch_xo)
        if batch_neutral is not None:
            hidden_n, _, _ = _valid_rows(_response_hidden(teacher_model, batch_neutral), batch_neutral)
    hidden_s, _, _ = _valid_rows(_response_hidden(model, batch_x), batch_x)
    total = hidden_s.shape[0]
    if _sharded_head(model):
        # ZeRO-3 / FSDP gather the head's weight at every call, a collective: every process must make
        # the same number of head calls whatever its number of response rows, so one chunk per pass.
        chunk = max(chunk, total, 1)

    use_ref = opts.beta > 0 and ref_model is not None
    head = HeadLogits(model)
    teacher_head = teacher.head(model, head)
    fused = False
    if opts.fused_lm_head and torch.is_grad_enabled() and hidden_s.requires_grad:
        refusal = _fused_head_refusal(model, teacher, teacher_head, hidden_s)
        fused = refusal is None
        if refusal:
            log_fused_head_fallback(refusal)

    # The log-probs the student's are compared with come the way the student's own will (token_logprobs).
    if use_ref:
        with torch.no_grad():
            plan.ref_logp, _ = score_tokens(ref_model, batch_x, chunk, fused_numerics=fused)
    if opts.loss_mode == "simple_signal":
        with torch.no_grad():
            if opts.end_signal_weight > 0:
                stops = end_token_ids(model)
                ends = stop_columns(stops, targets)
                end_xo = token_logprobs(teacher_head, hidden_t, ends, chunk, fused_numerics=fused)
                end_neutral = None if hidden_n is None else token_logprobs(teacher_head, hidden_n, ends, chunk,
                                                                           fused_numerics=fused)
                # without contrast the baseline is the student's own, scored as the teacher's was (a no-grad prepass)
                end_x = None if hidden_n is not None else token_logprobs(head, hidden_s.detach(), ends, chunk,
                                                                         fused_numerics=fused)
                plan.use_end_tokens(stops, targets, end_xo, end_neutral, end_x)
            plan.logp_xo = token_logprobs(teacher_head, hidden_t, targets, chunk, fused_numerics=fused)
            if hidden_n is not None:  # the signal no longer depends on the student: shaped once, up front
                plan.logp_neutral = token_logprobs(teacher_head, hidden_n, targets, chunk, fused_numerics=fused)
                plan.signal = shape_signal(plan.raw_signal(slice(None), None), plan.weight, plan.seq_index,
                                           plan.num_seq, opts)
            elif fused and opts.center_signal:
                # centring needs each reply's whole signal before any token's weight is known
                prepass = token_logprobs(head, hidden_s.detach(), targets, chunk, fused_numerics=True)
                plan.signal = shape_signal(plan.raw_signal(slice(None), prepass), plan.weight, plan.seq_index,
                                           plan.num_seq, opts)
        hidden_n = None  # simple_signal needs only its log-probs
    head_loss = fused_head_loss if fused else checkpointed_head_loss
    loss, logp_x, logp_xo, kl_values = head_loss(head, plan, hidden_s, hidden_t, targets, chunk,
                                                 teacher_head=teacher_head, hidden_neutral=hidden_n)

    raw = plan.raw_signal(slice(None), logp_x) if opts.loss_mode == "simple_signal" else (logp_xo - logp_x).detach()
    weight = plan.weight
    stats: dict = {"fused_lm_head": bool(fused)}
    if use_ref:
        stats["ref_kl"] = float((k3_kl(plan.ref_logp, logp_x.detach()) * weight).sum() / weight.sum().clamp(min=1))
    lengths = batch_x.response_mask.sum(dim=1)
    per_seq_sum = torch.zeros(plan.num_seq, device=raw.device).index_add_(0, plan.seq_index, raw)
    stats.update({
        "loss": float(loss.detach()),
        "signal_mean": float(raw.mean()) if total else 0.0,
        "signal_std": float(raw.std()) if total > 1 else 0.0,
        "signal_abs_mean": float(raw.abs().mean()) if total else 0.0,
        "signal_seq_mean": float((per_seq_sum / lengths.clamp(min=1)).mean()),
        "logp_x": float(logp_x.detach().mean()) if total else 0.0,
        "logp_xo": float(logp_xo.detach().mean()) if total else 0.0,
        "tokens": int(total),
        "weighted_tokens": int(weight.sum()),
        "signal_per_sequence": [s.cpu() for s in torch.split(raw, lengths.tolist())],
    })
    if plan.logp_neutral is not None:
        stats["logp_neutral"] = float(plan.logp_neutral.mean()) if total else 0.0
    if plan.end_token_ids is not None:  # the end signal's mean over the positions it trains (A_end, as trained)
        stats["end_signal_mean"] = float((plan.end_signal_values * plan.end_weight).sum()
                                         / plan.end_weight.sum().clamp(min=1))
    if kl_values is not None:
        stats["distill_kl"] = float(kl_values.detach().mean()) if total else 0.0
    return loss, stats
