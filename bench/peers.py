"""The update as our peers compute it, for the benchmarks: TRL's SDPO trainer and the paper's updater.

trl_loss(model, batch_x, batch_xo, opts): what TRL's SDPO trainer does per batch
(`SDPOTrainer._compute_teacher_student_logits`): two full forwards, the student on x+y with
gradient and the teacher on xo+y under no_grad, each with `logits_to_keep = |y| + 1` (input ids,
attention mask, no cache; logits in the model's dtype, divided by the sampling temperature, 1.0),
then TRL's own `trl.experimental.sdpo.loss_utils` functions on those logits:
  full_distillation -> compute_topk_self_distillation_loss(k, alpha=1.0 (reverse KL), tail)
  simple_signal     -> compute_sampled_token_self_distillation_loss (TRL's "sampled_token" mode:
                       (log p_student - log p_teacher).detach() * log p_student = -A_t log p(y_t | x))
TRL's trainer averages each sequence's tokens, then the sequences; sdpo_objective averages over
all tokens for full_distillation. The per-token values are reduced the way sdpo_objective reduces
them, so that the two losses are equal and the timings compare like with like (with one reply or
equal lengths, as in the benchmarks, both reductions are the same number).

paper_loss(model, tokenizer, texts, opts): the paper repository's updater as its README and the
issue describe it: the reply arrives as text and is tokenised again, appended to each context,
padded into one batch; then two full forwards with logits over every position and a
full-vocabulary float32 log-softmax of student and teacher at the reply positions, no chunking.
After re-tokenisation that is bench_common's yardstick, so the loss math is shared with it.

The benchmarks use random token ids, so the tokenizer is `word_tokenizer(V)`: a word-level fast
tokenizer whose word i is token i, built on the spot. Its text round-trips to the same ids (the
paper path scores exactly the batch the other paths score) and encoding costs what a fast
tokenizer costs per token.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from bench_common import straightforward_loss

from sdpo_objective import ObjectiveOptions, ScoringBatch, build_scoring_batch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL warns on every import of trl.experimental
TRL_TEMPERATURE = 1.0  # SDPOConfig's default sampling temperature; TRL divides the logits by it


def trl_available() -> bool:
    try:
        import trl.experimental.sdpo.loss_utils  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- TRL

def _trl_forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_width: int):
    """Logits aligned to the reply tokens, as TRL's trainer forms them (model dtype, / temperature)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=reply_width + 1).logits
    return logits[:, :-1, :][:, -reply_width:, :] / TRL_TEMPERATURE


def trl_loss(model, batch_x: ScoringBatch, batch_xo: ScoringBatch, opts: ObjectiveOptions) -> torch.Tensor:
    from trl.experimental.sdpo.loss_utils import (compute_sampled_token_self_distillation_loss,
                                                  compute_topk_self_distillation_loss)

    if opts.ignore_first_k or opts.center_signal or opts.signal_clip or opts.negate_signal or opts.beta:
        raise ValueError("the TRL path implements the default signal options only")
    reply_width = batch_x.response_ids.shape[1]
    student_logits = _trl_forward_logits(model, batch_x.input_ids, batch_x.attention_mask, reply_width)
    was_training = model.training
    model.eval()  # as sdpo_objective scores its teacher (no dropout; the benchmark models have none anyway)
    with torch.no_grad():
        teacher_logits = _trl_forward_logits(model, batch_xo.input_ids, batch_xo.attention_mask, reply_width)
    model.train(was_training)
    mask = batch_x.response_mask.float()
    if opts.loss_mode == "simple_signal":
        per_token = compute_sampled_token_self_distillation_loss(student_logits, teacher_logits, batch_x.response_ids,
                                                                 distillation_alpha=1.0)
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    per_token = compute_topk_self_distillation_loss(student_logits, teacher_logits,
                                                    distillation_topk=opts.distillation_topk, distillation_alpha=1.0,
                                                    distillation_add_tail=opts.distillation_tail)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------- the paper's updater

@dataclass
class TextBatch:
    """What the paper's updater receives: context ids (x and xo) and each reply as text."""
    contexts_x: list[list[int]]
    contexts_xo: list[list[int]]
    replies: list[str]
    pad_token_id: int = 0


def word_tokenizer(vocab_size: int):
    """A fast word-level tokenizer over words w0 .. w{V-1} (token i = word i): lossless for any ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", pad_token="w0")


def text_batch(tokenizer, batch_x: ScoringBatch, batch_xo: ScoringBatch) -> TextBatch:
    """The batch as the paper's updater gets it: unpadded context ids and the replies decoded to text."""
    def contexts(batch):
        return [row[mask.bool()].tolist() for row, mask in
                zip(batch.input_ids[:, :batch.context_width], batch.attention_mask[:, :batch.context_width])]

    replies = [tokenizer.decode(ids[mask].tolist()) for ids, mask in zip(batch_x.response_ids, batch_x.response_mask)]
    return TextBatch(contexts(batch_x), contexts(batch_xo), replies, pad_token_id=0)


def paper_loss(model, tokenizer, texts: TextBatch, opts: ObjectiveOptions, device=None) -> torch.Tensor:
    """Re-tokenise the replies, batch them after each context, then the yardstick's full-logit loss."""
    replies = tokenizer(texts.replies, add_special_tokens=False)["input_ids"]
    batch_x = build_scoring_batch(texts.contexts_x, replies, texts.pad_token_id, device=device)
    batch_xo = build_scoring_batch(texts.contexts_xo, replies, texts.pad_token_id, device=device)
    return straightforward_loss(model, batch_x, batch_xo, opts)


# --------------------------------------------------------------------------- equal losses

def check_peers(device="cpu", vocab_size: int = 512, rtol: float = 1e-4) -> dict:
    """TRL's and the paper's loss must equal the yardstick's (fp32, small model, equal lengths); raises if not.

    Equal lengths: TRL's trainer passes no position ids, so left padding would shift its positions.
    Returns {mode: {path: loss}}.
    """
    from bench_common import qwen3_model, random_batches, spread_logits

    model = spread_logits(qwen3_model(vocab_size, hidden_size=64, num_layers=2, seed=1, device=device,
                                      dtype=torch.float32))
    batch_x, batch_xo = random_batches(2, 20, 32, vocab_size, hindsight_tokens=9, seed=3, device=device)
    tokenizer = word_tokenizer(vocab_size)
    texts = text_batch(tokenizer, batch_x, batch_xo)
    report = {}
    for mode in ("simple_signal", "full_distillation"):
        opts = ObjectiveOptions(loss_mode=mode)
        losses = {"straightforward": float(straightforward_loss(model, batch_x, batch_xo, opts).detach()),
                  "paper": float(paper_loss(model, tokenizer, texts, opts, device=device).detach())}
        if trl_available():
            losses["trl"] = float(trl_loss(model, batch_x, batch_xo, opts).detach())
        reference = losses["straightforward"]
        for path, value in losses.items():
            assert abs(value - reference) <= rtol * abs(reference), f"{mode}: loss {value} ({path}) vs {reference}"
        report[mode] = losses
    return report
