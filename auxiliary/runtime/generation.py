"""Batched generation with Hugging Face `generate`: left padding, text AND token ids back."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sdpo_objective import render_context_ids


@dataclass
class GeneratedResponse:
    text: str
    ids: list[int]        # the sampled ids, EOS included when the reply ended with it
    finished: bool        # ended with an EOS (not cut by max_new_tokens)


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        attention[row, width - len(seq):] = 1
    return input_ids.to(device), attention.to(device)


def cut_at_stop(generated: Sequence[int], stops: set[int]) -> tuple[list[int], bool]:
    ids = []
    for token in generated:
        ids.append(int(token))
        if int(token) in stops:
            return ids, True
    return ids, False


def run_side_by_side(calls: Sequence[Callable[[], Any]]) -> list:
    """Run `calls` at once, each in a thread of its own with an equal share of the caller's torch threads
    (at least one), and return their results in order; the caller keeps its count afterwards. Each thread
    sets its share itself: torch's count is per thread, and a thread started later may inherit whichever
    count another thread set last (which nested side-by-side work would make a race). An interrupt of the
    caller waits for the calls to finish before it propagates."""
    threads = torch.get_num_threads()
    share = max(1, threads // max(1, len(calls)))
    results: list = [None] * len(calls)
    errors: list = [None] * len(calls)
    finished = [threading.Event() for _ in calls]

    def pinned(index, call):
        try:
            if torch.get_num_threads() != share:
                torch.set_num_threads(share)
            results[index] = call()
        except BaseException as err:  # re-raised in the caller, the first in order
            errors[index] = err
        finally:
            finished[index].set()

    workers = [threading.Thread(target=pinned, args=(i, call), name=f"side-{i}") for i, call in enumerate(calls)]
    try:
        for worker in workers:
            worker.start()
        try:
            for event in finished:
                event.wait()
        except BaseException:
            # An interrupt (Ctrl-C, SIGTERM) reaches the caller only: let the workers finish their call before it
            # propagates, so the process never exits with a thread inside torch (an abort). Events, not join():
            # a join interrupted by a signal marks a thread that is still running as stopped (CPython 3.11).
            for event in finished:
                event.wait()
            raise
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(threads)
    for err in errors:
        if err is not None:
            raise err
    return results


class SeededSampler:
    """Sampling as a logits processor with its own torch.Generator, for `generate(do_sample=False)`.

    `generate` samples from the process's one random stream; two policies generating at once (the
    arms of an online run in two threads) would then draw from it in an order that varies run to
    run. This processor applies transformers' own temperature and top-p warpers, draws the next
    token from its private generator, and leaves only that token finite, so greedy selection picks
    it: the same replies whatever else the process does meanwhile."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator):
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


@torch.no_grad()
def generate_responses(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 256,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16,
                       max_context_length: int | None = None, seed: int | None = None,
                       progress: bool = False, desc: str = "generate", workers: int = 1) -> list[GeneratedResponse]:
    """Generate one reply per conversation. temperature 0 means greedy decoding. `workers` > 1 runs that
    many batches at once in threads (run_side_by_side: each its share of the torch threads): the same replies, since
    each seeded batch samples from its own generator (unseeded sampling stays one batch at a time)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    contexts = [render_context_ids(tokenizer, conv) for conv in conversations]
    if max_context_length:
        contexts = [c[-max_context_length:] for c in contexts]
    sampling = temperature > 0
    # do_sample stays off: a seeded run samples through SeededSampler (its own generator), an unseeded
    # one through transformers' sampling on the process's random stream, as before.
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling and seed is None, eos_token_id=stops,
                  pad_token_id=tokenizer.pad_token_id)
    if sampling and seed is None:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # keep the model's generation_config from asking for sampling (or warping) of its own
        kwargs.update(temperature=1.0, top_p=1.0)
    starts = list(range(0, len(contexts), batch_size))

    def one_batch(batch_index: int) -> list[list[int]]:
        chunk = contexts[starts[batch_index]:starts[batch_index] + batch_size]
        input_ids, attention = left_pad(chunk, tokenizer.pad_token_id, device)
        extra = {}
        if sampling and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed + batch_index)
            extra["logits_processor"] = [SeededSampler(temperature, top_p, generator)]
        output = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs, **extra)
        return output[:, input_ids.shape[1]:].tolist()

    # Batches side by side only where nothing draws from the process's one random stream.
    workers = max(1, min(int(workers), len(starts))) if (seed is not None or not sampling) else 1
    generated: list = [None] * len(starts)  # token ids per batch, in batch order
    results: list[GeneratedResponse] = []
    try:
        with tqdm(total=len(starts), desc=desc, disable=not progress, leave=False) as bar:
            def share_of(worker: int):
                def run():  # this worker's batches: every workers-th one
                    for index in range(worker, len(starts), workers):
                        generated[index] = one_batch(index)
                        bar.update(1)
                return run

            if workers > 1:
                run_side_by_side([share_of(worker) for worker in range(workers)])
            else:
                share_of(0)()
        for rows in generated:
            for row in rows:  # decoded here, in this thread: one tokenizer, never used by two at once
                ids, finished = cut_at_stop(row, set(stops))
                if not ids:  # max_new_tokens == 0 or immediate pad; keep one stop token so y is never empty
                    ids, finished = [stops[0]], True
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                results.append(GeneratedResponse(text=text, ids=ids, finished=finished))
    finally:
        model.train(was_training)
    return results
