"""The SDPO objective: hindsight context, batched scoring, per-token signal and losses.

One implementation, imported by the online updater, the offline trainer, the live chat
and the signal analysis.

    x   = the conversation up to the last user message
    y   = the assistant reply (token ids, never re-tokenised)
    o   = the user's next message (the follow-up)
    xo  = x with a hindsight block holding o appended to the LAST user message
    A_t = log p(y_t | xo, y<t) - log p(y_t | x, y<t)        (no gradient)

Memory and time: only response positions go through the LM head, in chunks of
`logits_chunk_size` positions, so float32 logits never exist for more than one chunk at a
time. With gradients on, the head's gradient is formed in the forward, chunk by chunk
(`_fused_head_loss`: 4 head products per response row); LoRA-wrapped, biased or sharded
heads, or `fused_lm_head=False`, run the chunks under activation checkpointing instead
(6 products: top-k pass, teacher, forward, recompute, 2 backward). Same loss and gradients.
"""
from __future__ import annotations

import dataclasses
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
        if str(role).lower() not in ROLE_ALIASES:
            raise ValueError(f"message {index} has unknown role {role!r}")
        normalized.append({"role": ROLE_ALIASES[str(role).lower()], "content": str(content)})
    return normalized


def validate_template(template: str) -> str:
    if "{followup}" not in template:
        raise ValueError("the hindsight template must contain the placeholder {followup}")
    template.format(followup="")  # fails early on stray braces
    return template


HINDSIGHT_PLACEMENTS = ("last_user_message", "separate_turn")


def hindsight_messages(messages: Sequence[dict], followup: str, template: str = DEFAULT_HINDSIGHT_TEMPLATE,
                       placement: str = "last_user_message") -> list[dict]:
    """xo: a copy of x whose LAST user message carries the hindsight block (not a new turn).

    placement "separate_turn" puts the block in a user turn of its own after x instead (the paper's
    offline Qwen3-4B run did this)."""
    if not isinstance(followup, str) or not followup.strip():
        raise ValueError("the follow-up message is empty")
    if placement not in HINDSIGHT_PLACEMENTS:
        raise ValueError(f"unknown hindsight placement {placement!r}; choose one of {', '.join(HINDSIGHT_PLACEMENTS)}")
    xo = [dict(m) for m in messages]
    if placement == "separate_turn":
        if not any(m["role"] == "user" for m in xo):
            raise ValueError("the conversation has no user message to attach the hindsight context to")
        return xo + [{"role": "user", "content": template.format(followup=followup.strip()).strip()}]
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
        ours = _HeadLogits(model)(last_hidden)
        theirs = last_logits.float()
        scale = float(theirs.abs().max().clamp(min=1.0))
        # fp32 agrees to ~1e-6; a 16-bit head or autocast rounds each logit by ~eps(bf16) = 4e-3.
        exact = last_hidden.dtype == torch.float32 and not torch.is_autocast_enabled(last_hidden.device.type)
        tolerance = 1e-3 if exact else 3e-2
        if not torch.allclose(ours, theirs, atol=tolerance * scale, rtol=tolerance):
            raise NotImplementedError(
                f"{type(_unwrap(model)).__name__} post-processes its logits in a way the chunked LM head of "
                "sdpo_objective does not reproduce (it knows final_logit_softcapping only)")
    _HEAD_CHECKED[key] = True


def _head(model):
    return _unwrap(model).get_output_embeddings()


def _logit_softcap(model) -> float | None:
    """Gemma-2 style final-logit soft-capping (logits = cap * tanh(logits / cap)), None when off."""
    cap = getattr(_unwrap(model).config, "final_logit_softcapping", None)
    return float(cap) if cap else None


class _HeadLogits:
    """The LM head as the model applies it, in float32: linear, then soft-capping where the model has it."""

    def __init__(self, model):
        self.linear = _head(model)
        self.softcap = _logit_softcap(model)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
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
    return logp.gather(1, target_chunk.unsqueeze(1)).squeeze(1)


def token_logprobs(model, hidden_rows: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log p(target) for each row, chunked; checkpointed when gradients flow."""
    head = _HeadLogits(model)
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
    """The loss options; also the objective group of every config (online, offline, chat), whose
    fields are CLI flags and YAML keys, so the help text lives here once."""
    loss_mode: str = field(default="full_distillation", metadata={"help": f"one of {', '.join(LOSS_MODES)}"})
    distillation_topk: int = field(default=20, metadata={"help": "student top-k support of full_distillation"})
    distillation_tail: bool = field(default=True, metadata={
        "help": "full_distillation: keep a tail bucket for the remaining mass (else renormalise over top-k)"})
    signal_clip: float = field(default=0.0, metadata={"help": "clamp the signal to +-c (0 = off)"})
    ignore_first_k: int = field(default=0, metadata={"help": "give no signal to the first k reply tokens"})
    center_signal: bool = field(default=False, metadata={"help": "subtract each reply's mean signal (simple_signal)"})
    negate_signal: bool = field(default=False, metadata={"help": "control experiments only: train on -A (simple_signal)"})
    beta: float = field(default=0.0, metadata={"help": "weight of a KL to a frozen reference model (k3 estimator on y; 0 = off)"})
    logits_chunk_size: int = field(default=256, metadata={"help": "response positions per chunk of the LM head / log-softmax"})
    fused_lm_head: bool = field(default=True, metadata={
        "help": "form the LM head's gradient during the forward (faster; falls back to checkpointed chunks for LoRA/biased/sharded heads)"})

    def __post_init__(self):
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode '{self.loss_mode}'; choose one of {', '.join(LOSS_MODES)}")
        for name, value, low in (("distillation_topk", self.distillation_topk, 1),
                                 ("logits_chunk_size", self.logits_chunk_size, 1), ("ignore_first_k", self.ignore_first_k, 0),
                                 ("signal_clip", self.signal_clip, 0), ("beta", self.beta, 0)):
            if not value >= low or value == float("inf"):  # also catches NaN
                raise ValueError(f"--{name} must be >= {low}{' and finite' if isinstance(value, float) else ''}, "
                                 f"got {value}")
        if self.negate_signal and self.loss_mode != "simple_signal":
            raise ValueError("negate_signal is only defined for loss_mode simple_signal")

    @classmethod
    def from_config(cls, config: "ObjectiveOptions") -> "ObjectiveOptions":
        """The objective group of a config that inherits it (online, offline or chat config)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


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
    logits = head(hidden_chunk)
    return logits.topk(k, dim=-1).indices


def _teacher_chunk(head, hidden_chunk, ids_chunk, target_chunk):
    logp = torch.log_softmax(head(hidden_chunk), dim=-1)
    return logp.gather(1, ids_chunk), logp.gather(1, target_chunk.unsqueeze(1)).squeeze(1)


def _student_distill_chunk(head, hidden_chunk, ids_chunk, target_chunk, teacher_topk_chunk, tail: bool):
    logp = torch.log_softmax(head(hidden_chunk), dim=-1)
    kl = reverse_kl_topk(logp.gather(1, ids_chunk), teacher_topk_chunk, tail)
    return kl, logp.gather(1, target_chunk.unsqueeze(1)).squeeze(1)


@dataclass
class _TokenLossPlan:
    """What the per-token loss needs besides the student's log-probs; indexed by token (row-major)."""
    opts: ObjectiveOptions
    num_seq: int
    seq_index: torch.Tensor
    positions: torch.Tensor
    weight: torch.Tensor                        # 0 for the first ignore_first_k tokens of each reply
    tokens_per_seq: torch.Tensor                # weighted token count of each token's reply (>= 1)
    logp_xo: torch.Tensor | None = None         # teacher log p(y_t | xo) (simple_signal)
    signal: torch.Tensor | None = None          # shaped signal when known up front (else shaped per chunk)
    ref_logp: torch.Tensor | None = None        # reference model log p(y_t | x) (beta > 0)


def _token_loss_sum(plan: _TokenLossPlan, rows: slice, logp_x: torch.Tensor, kl: torch.Tensor | None) -> torch.Tensor:
    """Sum of the loss terms of tokens `rows` (the whole loss when rows covers every token).

    simple_signal:      -(1/B) sum_b (1/|y_b|) sum_t A_t log p(y_t | x)
    full_distillation:  mean over tokens of the top-k reverse KL
    beta > 0:           + beta * mean over tokens of the k3 estimate of KL(policy || reference)
    logp_x and kl carry the gradient; the signal never does.
    """
    opts, weight = plan.opts, plan.weight[rows]
    weight_total = plan.weight.sum().clamp(min=1)
    if opts.loss_mode == "simple_signal":
        signal = plan.signal[rows] if plan.signal is not None else shape_signal(
            plan.logp_xo[rows] - logp_x.detach(), plan.seq_index[rows], plan.positions[rows], plan.num_seq, opts)[0]
        total = (-signal * logp_x / plan.tokens_per_seq[rows]).sum() / plan.num_seq
    else:
        total = (kl * weight).sum() / weight_total
    if plan.ref_logp is not None:
        total = total + opts.beta * (k3_kl(plan.ref_logp[rows], logp_x) * weight).sum() / weight_total
    return total


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) on sampled tokens: exp(r) - r - 1, r = log p_ref - log p."""
    delta = ref_logp - logp
    return delta.exp() - delta - 1.0


# ----------------------------------------------------------------------------- fused LM head

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
    head = _head(model)
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False  # LoRA-wrapped or biased heads
    weight = head.weight
    if hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor":
        return False  # DeepSpeed ZeRO-3 / FSDP2 shards
    if "FullyShardedDataParallel" in type(model).__name__:
        return False  # FSDP1 owns the parameters' gradients
    return weight.dim() == 2 and weight.shape[1] == hidden.shape[-1]


def _fused_head_loss(model, plan: _TokenLossPlan, hidden_s, hidden_t, targets, chunk_size: int):
    """Loss of all tokens with the LM head's gradient computed chunk by chunk in the forward.

    Per chunk: student logits once (top-k ids taken from them), teacher logits (no grad), the
    loss on the few log-probs it reads, then its gradient with respect to the logits in closed
    form: for s_j = z_j - logsumexp(z), ds_j/dz = e_j - softmax(z), so
    dL/dz = scatter(ids, g) - softmax(z) * sum(g), with g = dL/ds from autograd over [rows, k+1].
    grad_hidden = G W and grad_W += G^T h are formed at once, so the chunk's logits are never
    needed again: 4 head products per response row instead of 6 (checkpointed path). With
    soft-capping (z = cap * tanh(a / cap)), G is multiplied by dz/da = 1 - tanh(a / cap)^2.
    Returns (loss, logp_x, logp_xo, kl or None), all but loss detached.
    """
    opts, head, softcap = plan.opts, _head(model), _logit_softcap(model)
    weight = head.weight
    device_type = hidden_s.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    distill = opts.loss_mode == "full_distillation"
    k = min(opts.distillation_topk, weight.shape[0])
    total = hidden_s.shape[0]
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        w = weight.detach().to(compute_dtype)
        h_all = hidden_s.detach()
        grad_hidden = torch.empty_like(h_all)
        grad_weight = None
        if weight.requires_grad:  # frozen under LoRA: skip the largest product
            grad_weight = torch.zeros(weight.shape, dtype=weight.dtype if weight.dtype == compute_dtype else torch.float32,
                                      device=weight.device)
        loss_value = torch.zeros((), device=hidden_s.device)
        logp_x = torch.empty(total, device=hidden_s.device)
        logp_xo = torch.empty(total, device=hidden_s.device) if distill else plan.logp_xo
        kl_values = torch.empty(total, device=hidden_s.device) if distill else None
        for start, end in _chunks(total, chunk_size):
            rows = slice(start, end)
            h = h_all[rows].to(compute_dtype)
            target = targets[rows].unsqueeze(1)
            logits = F.linear(h, w).float()
            cap_slope = None
            if softcap is not None:
                squashed = logits.div_(softcap).tanh_()
                logits = squashed * softcap
                cap_slope = squashed.square_().neg_().add_(1.0)  # in place: 1 - tanh^2
            columns = torch.cat([logits.topk(k, dim=-1).indices, target], dim=1) if distill else target
            logp = torch.log_softmax(logits, dim=-1)
            del logits
            if distill:
                teacher_logits = F.linear(hidden_t[rows].to(compute_dtype), w).float()
                if softcap is not None:
                    teacher_logits.div_(softcap).tanh_().mul_(softcap)
                teacher_picked = torch.log_softmax(teacher_logits, dim=-1).gather(1, columns)
                del teacher_logits
                logp_xo[rows] = teacher_picked[:, -1]
            picked = logp.gather(1, columns).requires_grad_(True)
            with torch.enable_grad():
                kl = reverse_kl_topk(picked[:, :-1], teacher_picked[:, :-1], opts.distillation_tail) if distill else None
                chunk_loss = _token_loss_sum(plan, rows, picked[:, -1], kl)
                (grad_picked,) = torch.autograd.grad(chunk_loss, picked)
            loss_value += chunk_loss.detach()
            logp_x[rows] = picked[:, -1].detach()
            if distill:
                kl_values[rows] = kl.detach()
            grad_logits = logp.exp_()  # softmax, in place: logp is not needed any more
            grad_logits.mul_(-grad_picked.sum(dim=1, keepdim=True)).scatter_add_(1, columns, grad_picked)
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
            del logp, grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
    loss = _LossWithPrecomputedGradients.apply(loss_value, hidden_s, weight, grad_hidden, grad_weight)
    return loss, logp_x, logp_xo, kl_values


# ----------------------------------------------------------------------------- the loss

def sdpo_loss(model, batch_x: ScoringBatch, batch_xo: ScoringBatch, opts: ObjectiveOptions,
              ref_model=None) -> tuple[torch.Tensor, dict]:
    """The SDPO loss for a batch of interactions. The teacher is the same model under xo, no grad, eval mode.

    Returns (loss, stats); stats holds floats plus `signal_per_sequence` (list of CPU tensors, raw A_t).
    With gradients on and a plain LM head (opts.fused_lm_head), the head's gradient is formed in
    the forward (`_fused_head_loss`); otherwise the head runs in checkpointed chunks. Same loss and
    gradients either way (tests/test_fused_head.py).
    """
    if not torch.equal(batch_x.response_ids, batch_xo.response_ids):
        raise ValueError("x and xo batches must hold the same response ids")
    num_seq = batch_x.response_ids.shape[0]
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

    weight = (positions >= opts.ignore_first_k).float()
    tokens_per_seq = torch.zeros(num_seq, device=weight.device).index_add_(0, seq_index, weight).clamp(min=1)
    plan = _TokenLossPlan(opts, num_seq, seq_index, positions, weight, tokens_per_seq[seq_index])
    use_ref = opts.beta > 0 and ref_model is not None
    if use_ref:
        with torch.no_grad():
            plan.ref_logp, _ = score_tokens(ref_model, batch_x, chunk)
    fused = (opts.fused_lm_head and torch.is_grad_enabled() and hidden_s.requires_grad
             and fused_head_supported(model, hidden_s))

    if opts.loss_mode == "simple_signal":
        with torch.no_grad():
            plan.logp_xo = token_logprobs(model, hidden_t, targets, chunk)
    if fused:
        if opts.loss_mode == "simple_signal" and opts.center_signal:
            with torch.no_grad():  # centring needs each reply's whole signal before any token's weight is known
                prepass = token_logprobs(model, hidden_s.detach(), targets, chunk)
                plan.signal = shape_signal(plan.logp_xo - prepass, seq_index, positions, num_seq, opts)[0]
        loss, logp_x, logp_xo, kl_values = _fused_head_loss(model, plan, hidden_s, hidden_t, targets, chunk)
    elif opts.loss_mode == "simple_signal":
        logp_x = token_logprobs(model, hidden_s, targets, chunk)
        logp_xo = plan.logp_xo
        plan.signal = shape_signal(logp_xo - logp_x.detach(), seq_index, positions, num_seq, opts)[0]
        loss = _token_loss_sum(plan, slice(None), logp_x, None)
        kl_values = None
    else:
        head = _HeadLogits(model)
        k = min(opts.distillation_topk, getattr(head.linear, "out_features", opts.distillation_topk))
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
        kl_values = torch.cat(kl_pieces) if kl_pieces else hidden_s.new_zeros(0, dtype=torch.float32)
        logp_x = torch.cat(logp_x_pieces) if logp_x_pieces else kl_values
        logp_xo = torch.cat(logp_xo_pieces) if logp_xo_pieces else kl_values
        loss = _token_loss_sum(plan, slice(None), logp_x, kl_values)

    raw = (logp_xo - logp_x).detach()
    stats: dict = {"fused_lm_head": bool(fused)}
    if use_ref:
        stats["ref_kl"] = float((k3_kl(plan.ref_logp, logp_x.detach()) * weight).sum() / weight.sum().clamp(min=1))
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
