"""Batched generation with Hugging Face `generate`: left padding, text AND token ids back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


@torch.no_grad()
def generate_responses(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 256,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16,
                       max_context_length: int | None = None, seed: int | None = None,
                       progress: bool = False, desc: str = "generate") -> list[GeneratedResponse]:
    """Generate one reply per conversation. temperature 0 means greedy decoding."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    contexts = [render_context_ids(tokenizer, conv) for conv in conversations]
    if max_context_length:
        contexts = [c[-max_context_length:] for c in contexts]
    sampling = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, eos_token_id=stops,
                  pad_token_id=tokenizer.pad_token_id)
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    results: list[GeneratedResponse] = []
    starts = range(0, len(contexts), batch_size)
    try:
        for batch_index, start in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
            chunk = contexts[start:start + batch_size]
            input_ids, attention = left_pad(chunk, tokenizer.pad_token_id, device)
            if seed is not None:
                torch.manual_seed(seed + batch_index)
            output = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
            for row in output[:, input_ids.shape[1]:].tolist():
                ids, finished = cut_at_stop(row, set(stops))
                if not ids:  # max_new_tokens == 0 or immediate pad; keep one stop token so y is never empty
                    ids, finished = [stops[0]], True
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                results.append(GeneratedResponse(text=text, ids=ids, finished=finished))
    finally:
        model.train(was_training)
    return results
