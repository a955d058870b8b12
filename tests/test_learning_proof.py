"""End-to-end learning proof: the whole chain (contexts, alignment, masking, sign) moves the policy
in the direction the follow-ups ask for, and only because of what the follow-ups say.

1. A tiny model is taught on synthetic chats (seconds) to put a marker word in about half of its
   replies, and to never use it when the conversation carries the hindsight follow-up
   "Please stop writing MARK." (a neutral "OK, thanks." follow-up leaves the rate at ~50%).
2. Online SDPO with a rule-based user who complains about the marker must drive the marker
   rate WITHOUT context down, while two controls must not: the same run with the sign of the
   signal flipped, and a placebo run whose user always answers "OK, thanks.".
"""
import random

import pytest
import torch

from auxiliary.runtime.tiny_model import build_tiny_model
from online_sdpo_updater import OnlineSDPOUpdater
from online_sdpo_updater_config import OnlineSDPOConfig
from sdpo_objective import hindsight_messages, render_context_ids

TOPICS = ["cats", "rain", "trains", "tea", "music", "chess", "boats", "stars"]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
COMPLAINT = "Please stop writing MARK."
NEUTRAL = "OK, thanks."


def prompt_for(topic):
    return [{"role": "user", "content": f"Tell me about {topic}."}]


def reply_text(rng, with_marker):
    words = " ".join(rng.choice(WORDS) for _ in range(3))
    return f"MARK {words}" if with_marker else words


def pretrain(tokenizer, steps=150, seed=0, lr=5e-3, batch=24):
    """Supervised warm-up: ~50% marker without hindsight or after NEUTRAL, 0% after COMPLAINT."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    model.train()
    for _ in range(steps):
        sequences, labels = [], []
        for _ in range(batch):
            messages = prompt_for(rng.choice(TOPICS))
            kind = rng.choice(["plain", "plain", "complaint", "neutral"])
            marker = rng.random() < 0.5
            if kind == "complaint":
                messages, marker = hindsight_messages(messages, COMPLAINT), False
            elif kind == "neutral":
                messages = hindsight_messages(messages, NEUTRAL)
            context = render_context_ids(tokenizer, messages)
            reply = tokenizer(reply_text(rng, marker), add_special_tokens=False)["input_ids"] + [eos]
            sequences.append(context + reply)
            labels.append([-100] * len(context) + reply)
        width = max(len(s) for s in sequences)
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        attention = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in sequences])[:, None]).long()
        loss = model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def marker_rate(updater, followup=None, samples=96, seed=999):
    conversations = [prompt_for(TOPICS[i % len(TOPICS)]) for i in range(samples)]
    if followup:
        conversations = [hindsight_messages(c, followup) for c in conversations]
    replies = updater.generate(conversations, temperature=1.0, seed=seed)
    return sum("MARK" in r.text for r in replies) / samples


def complaining_user(reply):
    return COMPLAINT if "MARK" in reply else NEUTRAL


def run_online(tokenizer, state, user, steps=50, batch=4, seed=0, lr=1e-4, **overrides):
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2)
    model.load_state_dict(state)
    config = OnlineSDPOConfig(model="tiny-synthetic", loss_mode="simple_signal", lr=lr, max_new_tokens=12,
                              temperature=1.0, seed=seed, **overrides)
    updater = OnlineSDPOUpdater(config, model, tokenizer)
    rng = random.Random(seed)
    for step in range(steps):
        conversations = [prompt_for(rng.choice(TOPICS)) for _ in range(batch)]
        replies = updater.generate(conversations, seed=seed * 1000 + step)
        followups = [user(r.text) for r in replies]
        updater.train_batch(conversations, [r.ids for r in replies], followups)
    return updater


@pytest.fixture(scope="module")
def taught(tiny_tokenizer):
    return pretrain(tiny_tokenizer)


@pytest.mark.slow
def test_sdpo_learns_from_complaints_and_controls_do_not(tiny_tokenizer, taught):
    probe = run_online(tiny_tokenizer, taught, complaining_user, steps=0)
    start = marker_rate(probe)
    in_context = marker_rate(probe, followup=COMPLAINT)
    assert 0.3 <= start <= 0.7, f"warm-up should give ~50% markers, got {start:.2f}"
    assert in_context <= 0.1, f"with the complaint in context the model should avoid the marker, got {in_context:.2f}"

    feedback = marker_rate(run_online(tiny_tokenizer, taught, complaining_user))
    flipped = marker_rate(run_online(tiny_tokenizer, taught, complaining_user, negate_signal=True))
    placebo = marker_rate(run_online(tiny_tokenizer, taught, lambda reply: NEUTRAL))
    print(f"marker rate: start {start:.2f}, in-context {in_context:.2f}, SDPO {feedback:.2f}, "
          f"flipped {flipped:.2f}, placebo {placebo:.2f}")
    assert feedback < 0.10, f"SDPO with complaints should remove the marker, rate {feedback:.2f}"
    assert flipped > start - 0.1, f"flipped signal must not remove the marker, rate {flipped:.2f}"
    assert placebo > 0.25, f"placebo follow-ups must not remove the marker, rate {placebo:.2f}"
