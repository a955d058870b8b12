"""The objective against independent computations: contexts, signal, padding, truncation, losses, gradients."""
import math

import pytest
import torch

from sdpo_objective import (
    DEFAULT_HINDSIGHT_TEMPLATE,
    ObjectiveOptions,
    build_scoring_batch,
    chat_template_kwargs,
    compute_signal,
    hindsight_messages,
    normalize_messages,
    render_context_ids,
    sdpo_loss,
    shape_signal,
    token_weights,
    topk_divergence,
    validate_template,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Write a short email to my manager."}],
    [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "What is 27 times 4? Explain."}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Give me three tips for better sleep."}],
]
FOLLOWUPS = ["Use a formal tone.", "  Too long, be concise.  ", "No emojis please."]
RESPONSES = [[5, 6, 7, 8, 9, 2], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 2]]


def contexts(tokenizer):
    cx = [render_context_ids(tokenizer, m) for m in CONVERSATIONS]
    cxo = [render_context_ids(tokenizer, hindsight_messages(m, o)) for m, o in zip(CONVERSATIONS, FOLLOWUPS)]
    return cx, cxo


def independent_logprobs(model, context, response):
    """Plain fp32 forward on the concatenated ids, full log-softmax: no padding, no chunking."""
    with torch.no_grad():
        logits = model(torch.tensor([list(context) + list(response)])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([logp[len(context) - 1 + t, token] for t, token in enumerate(response)])


# ----------------------------------------------------------------------------- contexts

def test_hindsight_block_goes_into_last_user_message():
    xo = hindsight_messages(CONVERSATIONS[2], "  Please be brief. ")
    assert len(xo) == len(CONVERSATIONS[2])  # no new turn
    assert xo[:2] == CONVERSATIONS[2][:2]
    assert xo[2]["content"].startswith("Give me three tips for better sleep.")
    assert "=== HINDSIGHT CONTEXT ===" in xo[2]["content"]
    assert xo[2]["content"].endswith("\nPlease be brief.")
    assert CONVERSATIONS[2][2]["content"] == "Give me three tips for better sleep."  # input untouched
    with_system = hindsight_messages(CONVERSATIONS[1], "ok")
    assert with_system[0] == {"role": "system", "content": "Be nice."}


def test_hindsight_errors_and_template_validation():
    with pytest.raises(ValueError, match="empty"):
        hindsight_messages(CONVERSATIONS[0], "   ")
    with pytest.raises(ValueError, match="no user message"):
        hindsight_messages([{"role": "system", "content": "x"}], "ok")
    with pytest.raises(ValueError, match="followup"):
        validate_template("no placeholder")
    assert validate_template(DEFAULT_HINDSIGHT_TEMPLATE)


def test_normalize_messages_accepts_from_value():
    assert normalize_messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ValueError, match="message 0"):
        normalize_messages([{"text": "hi"}])


def test_enable_thinking_only_where_template_accepts_it(tiny_tokenizer):
    assert chat_template_kwargs(tiny_tokenizer) == {"enable_thinking": False}
    text = tiny_tokenizer.decode(render_context_ids(tiny_tokenizer, CONVERSATIONS[0]))
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")

    class PlainTemplate:
        chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    assert chat_template_kwargs(PlainTemplate()) == {}


# ----------------------------------------------------------------------------- scoring

def test_signal_equals_independent_unbatched_computation(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    cx, cxo = contexts(tiny_tokenizer)
    results = compute_signal(tiny_model, cx, cxo, RESPONSES, tiny_tokenizer.pad_token_id, chunk_size=4)
    for i, result in enumerate(results):
        expected_x = independent_logprobs(tiny_model, cx[i], RESPONSES[i])
        expected_xo = independent_logprobs(tiny_model, cxo[i], RESPONSES[i])
        assert len(result["signal"]) == len(RESPONSES[i])
        torch.testing.assert_close(torch.tensor(result["logp_x"]), expected_x, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(result["signal"]), expected_xo - expected_x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_signal_independent_of_batch_padding_and_chunks(tiny_model, tiny_tokenizer, chunk_size):
    tiny_model.eval()
    cx, cxo = contexts(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    alone = compute_signal(tiny_model, cx[1:2], cxo[1:2], RESPONSES[1:2], pad, chunk_size=chunk_size)[0]
    together = compute_signal(tiny_model, cx, cxo, RESPONSES, pad, chunk_size=chunk_size)
    reordered = compute_signal(tiny_model, cx[::-1], cxo[::-1], RESPONSES[::-1], pad, chunk_size=chunk_size)
    torch.testing.assert_close(torch.tensor(together[1]["signal"]), torch.tensor(alone["signal"]), atol=1e-5, rtol=0)
    for a, b in zip(together, reordered[::-1]):
        torch.testing.assert_close(torch.tensor(a["signal"]), torch.tensor(b["signal"]), atol=1e-5, rtol=0)


def test_batch_layout_left_pads_contexts_and_right_pads_responses():
    batch = build_scoring_batch([[1, 2, 3], [4]], [[7], [8, 9]], pad_token_id=0)
    assert batch.context_width == 3
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 0], [0, 0, 4, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch.position_ids[1].tolist()[2:] == [0, 1, 2]
    assert batch.response_mask.tolist() == [[True, False], [True, True]]
    with pytest.raises(ValueError, match="empty"):
        build_scoring_batch([[1]], [[]], pad_token_id=0)


def test_left_truncation_keeps_assistant_header_and_alignment(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    long_conversation = [{"role": "user", "content": "alpha beta gamma delta " * 40 + "Write an email."}]
    context = render_context_ids(tiny_tokenizer, long_conversation)
    limit = 24
    assert len(context) > limit
    response = RESPONSES[0]
    batch = build_scoring_batch([context], [response], tiny_tokenizer.pad_token_id, max_context_length=limit)
    kept = batch.input_ids[0, : batch.context_width].tolist()
    assert batch.truncated == [True]
    assert kept == context[-limit:]
    header = tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    decoded_tail = tiny_tokenizer.decode(kept)
    assert "<|im_start|>assistant\n" in decoded_tail and len(kept) >= len(header)
    assert batch.input_ids[0, batch.context_width:].tolist() == response
    result = compute_signal(tiny_model, [context], [context], [response], tiny_tokenizer.pad_token_id,
                            max_context_length=limit)[0]
    expected = independent_logprobs(tiny_model, context[-limit:], response)
    torch.testing.assert_close(torch.tensor(result["logp_x"]), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- losses

def _batches(tokenizer):
    cx, cxo = contexts(tokenizer)
    pad = tokenizer.pad_token_id
    return build_scoring_batch(cx, RESPONSES, pad), build_scoring_batch(cxo, RESPONSES, pad), cx, cxo


def test_simple_signal_gradient_matches_formula(tiny_model, tiny_tokenizer):
    batch_x, batch_xo, cx, cxo = _batches(tiny_tokenizer)
    tiny_model.eval()
    loss, stats = sdpo_loss(tiny_model, batch_x, batch_xo,
                            ObjectiveOptions(loss_mode="simple_signal", logits_chunk_size=2))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    # -(1/B) sum_b (1/|y_b|) sum_t A_t grad log p(y_t | x), with A from the independent computation
    total = 0.0
    for i, response in enumerate(RESPONSES):
        signal = independent_logprobs(tiny_model, cxo[i], response) - independent_logprobs(tiny_model, cx[i], response)
        logits = tiny_model(torch.tensor([cx[i] + response])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        logp_y = torch.stack([logp[len(cx[i]) - 1 + t, tok] for t, tok in enumerate(response)])
        total = total - (signal * logp_y).sum() / len(response)
    (total / len(RESPONSES)).backward()
    torch.testing.assert_close(loss.detach(), (total / len(RESPONSES)).detach(), atol=1e-5, rtol=1e-4)
    for name, param in tiny_model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert [len(s) for s in stats["signal_per_sequence"]] == [len(r) for r in RESPONSES]


def test_full_distillation_with_full_vocab_and_no_tail_is_exact_reverse_kl(tiny_model, tiny_tokenizer):
    batch_x, batch_xo, cx, cxo = _batches(tiny_tokenizer)
    tiny_model.eval()
    vocab = tiny_model.config.vocab_size
    opts = ObjectiveOptions(loss_mode="full_distillation", distillation_topk=vocab, distillation_tail=False,
                            logits_chunk_size=5)
    loss, _ = sdpo_loss(tiny_model, batch_x, batch_xo, opts)
    kls = []
    with torch.no_grad():
        for i, response in enumerate(RESPONSES):
            ls = torch.log_softmax(tiny_model(torch.tensor([cx[i] + response])).logits[0].float(), -1)
            lt = torch.log_softmax(tiny_model(torch.tensor([cxo[i] + response])).logits[0].float(), -1)
            for t in range(len(response)):
                s, te = ls[len(cx[i]) - 1 + t], lt[len(cxo[i]) - 1 + t]
                kls.append((s.exp() * (s - te)).sum())
    torch.testing.assert_close(loss.detach(), torch.stack(kls).mean(), atol=1e-6, rtol=1e-4)


def test_tail_bucket_by_hand():
    student_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    teacher_logits = torch.tensor([[0.5, 1.5, 0.0, 0.2, -1.0]])
    student = torch.log_softmax(student_logits, -1)
    teacher = torch.log_softmax(teacher_logits, -1)
    top = student[:, :2]  # the student's top-2 ids are 0 and 1
    t_top = teacher[:, :2]
    ps, pt = top.exp(), t_top.exp()
    tail_s, tail_t = 1 - ps.sum(), 1 - pt.sum()
    expected = (ps * (top - t_top)).sum() + tail_s * (tail_s.log() - tail_t.log())
    torch.testing.assert_close(topk_divergence(student_logits, teacher_logits, 2, tail=True)[0], expected)
    renorm_s, renorm_t = top - top.logsumexp(-1, keepdim=True), t_top - t_top.logsumexp(-1, keepdim=True)
    expected_renorm = (renorm_s.exp() * (renorm_s - renorm_t)).sum()
    torch.testing.assert_close(topk_divergence(student_logits, teacher_logits, 2, tail=False)[0], expected_renorm)


def test_no_nan_when_topk_mass_is_one():
    logits = torch.tensor([[60.0, 0.0, -5.0, -5.0]], requires_grad=True)
    kl = topk_divergence(logits, torch.tensor([[70.0, 1.0, -5.0, -5.0]]), 2, tail=True)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logits.grad).all()
    assert kl.item() >= -1e-6


def test_full_distillation_gradient_is_finite_and_loss_nonnegative(tiny_model, tiny_tokenizer):
    batch_x, batch_xo, _, _ = _batches(tiny_tokenizer)
    loss, stats = sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(distillation_topk=5, logits_chunk_size=3))
    loss.backward()
    assert loss.item() >= 0 and stats["distill_kl"] == pytest.approx(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


def test_signal_shaping_ignore_center_clip_by_hand():
    raw = torch.tensor([1.0, -2.0, 3.0, 0.5, -0.5])
    seq = torch.tensor([0, 0, 0, 1, 1])
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[True, True, True], [True, True, False]])

    def shaped(**options):
        opts = ObjectiveOptions(loss_mode="simple_signal", **options)
        weight = token_weights(ids, mask, opts)
        return shape_signal(raw, weight, seq, 2, opts), weight

    signal, weight = shaped(ignore_first_k=1)
    assert weight.tolist() == [0, 1, 1, 0, 1] and signal.tolist() == [0, -2, 3, 0, -0.5]
    centred, _ = shaped(center_signal=True)
    assert centred.tolist() == pytest.approx([1 - 2 / 3, -2 - 2 / 3, 3 - 2 / 3, 0.5, -0.5])
    centred_after_ignore, _ = shaped(center_signal=True, ignore_first_k=1)  # the mean of the kept tokens only
    assert centred_after_ignore.tolist() == pytest.approx([0, -2.5, 2.5, 0, 0])
    clipped, _ = shaped(signal_clip=1.0)
    assert clipped.tolist() == [1, -1, 1, 0.5, -0.5]
    negated, _ = shaped(negate_signal=True)
    assert negated.tolist() == [-1, 2, -3, -0.5, 0.5]


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="simple_signal, full_distillation"):
        ObjectiveOptions(loss_mode="ppo")
    with pytest.raises(ValueError, match="negate_signal"):
        ObjectiveOptions(loss_mode="full_distillation", negate_signal=True)


def test_reference_kl_is_zero_against_itself_and_adds_to_loss(tiny_model, tiny_tokenizer):
    from auxiliary.runtime.tiny_model import build_tiny_model

    batch_x, batch_xo, _, _ = _batches(tiny_tokenizer)
    tiny_model.eval()
    same = build_tiny_model(tiny_tokenizer, seed=0).eval()
    other = build_tiny_model(tiny_tokenizer, seed=1).eval()
    base, _ = sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(loss_mode="simple_signal"))
    with_same, stats = sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(loss_mode="simple_signal", beta=0.5),
                                 same)
    assert stats["ref_kl"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(with_same, base)
    with_other, stats = sdpo_loss(tiny_model, batch_x, batch_xo,
                                  ObjectiveOptions(loss_mode="simple_signal", beta=0.5), other)
    assert stats["ref_kl"] > 0
    torch.testing.assert_close(with_other, base + 0.5 * stats["ref_kl"], atol=1e-5, rtol=1e-5)


def test_configs_carry_every_objective_option():
    import dataclasses

    from offline_sdpo.main_offline_sdpo import OfflineSDPOArguments
    from online_sdpo_updater_config import OnlineSDPOConfig

    names = {f.name for f in dataclasses.fields(ObjectiveOptions)}
    online = OnlineSDPOConfig(loss_mode="simple_signal", signal_clip=0.5, center_signal=True, fused_lm_head=False,
                              logits_chunk_size=32, negate_signal=True)
    assert names <= {f.name for f in dataclasses.fields(OnlineSDPOConfig)}  # every option is a flag online
    options = online.objective_options()
    assert all(getattr(options, n) == getattr(online, n) for n in names)
    offline_names = {f.name for f in dataclasses.fields(OfflineSDPOArguments)}
    assert names <= offline_names  # both configs inherit the objective group (negate_signal included)
    offline = OfflineSDPOArguments(output_dir="x", distillation_topk=7, fused_lm_head=False)
    assert offline.objective_options().distillation_topk == 7 and not offline.objective_options().fused_lm_head


def test_hindsight_block_in_an_assistant_turn(tiny_tokenizer):
    """The paper's offline Qwen3-4B placement: the block in an assistant turn after x, y after another header."""
    from sdpo_objective import DEFAULT_HINDSIGHT_TEMPLATE, hindsight_messages

    x = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write an e-mail."}]
    xo = hindsight_messages(x, "  Use a formal tone. ", placement="assistant_turn")
    block = DEFAULT_HINDSIGHT_TEMPLATE.format(followup="Use a formal tone.").strip()
    assert xo == x + [{"role": "assistant", "content": block}]
    text = tiny_tokenizer.decode(render_context_ids(tiny_tokenizer, xo))
    assert text.endswith(f"<|im_start|>user\nWrite an e-mail.<|im_end|>\n<|im_start|>assistant\n{block}<|im_end|>\n"
                         "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(ValueError, match="no user message"):
        hindsight_messages([{"role": "system", "content": "x"}], "ok", placement="assistant_turn")


def test_lora_dropout_is_off_by_default_so_train_and_eval_mode_score_alike(tiny_tokenizer):
    """The paper's LoRA dropout (0): the teacher (eval mode) and the student (train mode) see the same model."""
    from auxiliary.runtime.tiny_model import build_tiny_model
    from online_sdpo_updater import OnlineSDPOUpdater
    from online_sdpo_updater_config import OnlineSDPOConfig

    config = OnlineSDPOConfig(model="tiny", device="cpu", use_lora=True, lora_r=4, lora_alpha=8)
    assert config.lora_dropout == 0.0
    updater = OnlineSDPOUpdater(config, build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer)
    with torch.no_grad():
        for name, param in updater.model.named_parameters():
            if "lora_B" in name:  # a trained adapter (B starts at 0, when dropout could not show)
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
        for _ in range(2):  # a nonzero dropout would draw other masks on each train-mode pass
            ids = torch.tensor([[3, 4, 5, 6, 7]])
            updater.model.train()
            train = updater.model(ids).logits
            updater.model.eval()
            torch.testing.assert_close(train, updater.model(ids).logits, atol=0, rtol=0)


def test_hindsight_block_in_a_separate_turn():
    from sdpo_objective import DEFAULT_HINDSIGHT_TEMPLATE, hindsight_messages

    x = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write an e-mail."}]
    xo = hindsight_messages(x, "  Use a formal tone. ", placement="separate_turn")
    assert xo[:2] == x and len(xo) == 3 and xo[2]["role"] == "user"
    assert xo[2]["content"] == DEFAULT_HINDSIGHT_TEMPLATE.format(followup="Use a formal tone.").strip()
    assert xo[2]["content"].startswith("=== HINDSIGHT CONTEXT ===")
    assert hindsight_messages(x, "Formal.") == hindsight_messages(x, "Formal.", placement="last_user_message")
    with pytest.raises(ValueError, match="choose one of last_user_message, separate_turn"):
        hindsight_messages(x, "Formal.", placement="end")


# ----------------------------------------------------------------------------- exact tail bucket

TAILS = (0.5, 0.3, 1e-3, 1e-6, 1e-9, 1e-12)


def crafted_logits(tails, vocab=64, k=4, seed=0):
    """float64 logits, one row per tail mass: ids 0..k-1 are the top-k, the other ids hold `tail` of the mass."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for tail in tails:
        top = torch.rand(k, generator=generator, dtype=torch.float64) + 1.0
        rest = -torch.rand(vocab - k, generator=generator, dtype=torch.float64)
        shift = torch.log(tail * top.exp().sum() / ((1 - tail) * rest.exp().sum()))
        rows.append(torch.cat([top, rest + shift]))
    return torch.stack(rows)


def brute_force_topk_kl(student_logits, teacher_logits, k):
    """float64, the top-k being ids 0..k-1: the tail is the sum of the probabilities outside them."""
    ps, pt = torch.softmax(student_logits.double(), -1), torch.softmax(teacher_logits.double(), -1)
    s_buckets = torch.cat([ps[:, :k], ps[:, k:].sum(-1, keepdim=True)], -1)
    t_buckets = torch.cat([pt[:, :k], pt[:, k:].sum(-1, keepdim=True)], -1)
    return (s_buckets * (s_buckets.log() - t_buckets.log())).sum(-1)


def tail_pairs():
    return [(s, t) for s in TAILS for t in TAILS]


def test_tail_bucket_is_exact_when_the_teacher_tail_is_tiny():
    student = crafted_logits([0.3], seed=1)
    teacher = student.clone()
    teacher[:, 4:] += torch.log(torch.tensor(1e-9 * 0.7 / (0.3 * (1 - 1e-9)), dtype=torch.float64))  # tail 1e-9
    expected = brute_force_topk_kl(student, teacher, 4)
    ours = topk_divergence(student.float(), teacher.float(), 4)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() == pytest.approx(0.3 * math.log(0.3 / 1e-9) + 0.7 * math.log(0.7), rel=1e-6)
    # the float32 tail 1 - sum(top-k probs) cancels: the teacher's 1e-9 reads as 0 (or ~1e-7)
    teacher_top_mass = torch.softmax(teacher.float(), -1)[:, :4].sum()
    assert abs(float(1 - teacher_top_mass) - 1e-9) > 0.5e-9


def test_topk_divergence_loss_and_gradient_against_float64_over_tail_masses():
    pairs = tail_pairs()
    student64 = crafted_logits([s for s, _ in pairs], seed=2)
    teacher64 = crafted_logits([t for _, t in pairs], seed=3)
    student64.requires_grad_(True)
    expected = brute_force_topk_kl(student64, teacher64, 4)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student64)
    student = student64.detach().float().requires_grad_(True)
    kl = topk_divergence(student, teacher64.float(), 4)
    kl.sum().backward()
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=2e-5, atol=1e-6)
    scale = expected_grad.abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(student.grad.double() / scale, expected_grad / scale, rtol=0, atol=2e-5)


def test_the_chunk_size_default_is_per_device_and_a_flag_overrides_it():
    from sdpo_objective import ACCELERATOR_CHUNK_SIZE, CPU_CHUNK_SIZE, resolve_chunk_size

    assert (CPU_CHUNK_SIZE, ACCELERATOR_CHUNK_SIZE) == (64, 256)
    assert ObjectiveOptions().logits_chunk_size is None
    assert resolve_chunk_size(None, "cpu") == 64 and resolve_chunk_size(None, torch.device("cuda", 1)) == 256
    assert resolve_chunk_size(7, "cpu") == 7
    with pytest.raises(ValueError, match="--logits_chunk_size must be >= 1"):
        ObjectiveOptions(logits_chunk_size=0)
