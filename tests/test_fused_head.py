"""The fused LM head (gradient formed in the forward) against the checkpointed chunks: same loss, same gradients."""
from types import SimpleNamespace

import pytest
import torch

from sdpo_objective import ObjectiveOptions, build_scoring_batch, fused_head_supported, sdpo_loss

RESPONSES = [[5, 6, 7, 8, 9, 2], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 2]]
CONTEXTS_X = [[3, 4, 20, 21], [3, 30, 31, 32, 33, 34, 4], [3, 50, 4]]
CONTEXTS_XO = [c + [60, 61, 62] for c in CONTEXTS_X]
# Gradients, relative to each tensor's largest entry. Each path is 2e-6 to 7e-6 from a float64
# computation on these divergences of 3e-5 to 2e-4 (test_both_paths_are_as_close_to_float64): the fused
# path normalises its tail buckets in float64, so the two paths no longer share their float32 rounding.
GRAD_TOLERANCE = 1e-5


def _batches(tokenizer):
    pad = tokenizer.pad_token_id
    return build_scoring_batch(CONTEXTS_X, RESPONSES, pad), build_scoring_batch(CONTEXTS_XO, RESPONSES, pad)


def _loss_and_grads(model, batch_x, batch_xo, opts, ref_model=None, teacher_object=None, batch_neutral=None):
    model.zero_grad(set_to_none=True)
    loss, stats = sdpo_loss(model, batch_x, batch_xo, opts, ref_model, teacher_object, batch_neutral)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), stats, grads


def _assert_same(model, batch_x, batch_xo, ref_model=None, teacher_object=None, batch_neutral=None, **options):
    """Fused and checkpointed head paths: same loss, gradients and stats (`teacher_object`: a sdpo_objective.Teacher;
    `batch_neutral`: x o_neutral, with contrast_followup in the options)."""
    fused = _loss_and_grads(model, batch_x, batch_xo, ObjectiveOptions(fused_lm_head=True, **options), ref_model,
                            teacher_object, batch_neutral)
    plain = _loss_and_grads(model, batch_x, batch_xo, ObjectiveOptions(fused_lm_head=False, **options), ref_model,
                            teacher_object, batch_neutral)
    assert fused[1]["fused_lm_head"] and not plain[1]["fused_lm_head"]
    torch.testing.assert_close(fused[0], plain[0], atol=1e-6, rtol=1e-5)
    assert fused[2].keys() == plain[2].keys() and fused[2]
    for name, grad in plain[2].items():
        scale = float(grad.abs().max().clamp(min=1e-8))
        torch.testing.assert_close(fused[2][name] / scale, grad / scale, atol=GRAD_TOLERANCE, rtol=0, msg=name)
    for key in ("loss", "signal_mean", "logp_x", "logp_xo", "logp_neutral", "distill_kl", "ref_kl"):
        if key in plain[1]:
            assert fused[1][key] == pytest.approx(plain[1][key], abs=1e-6, rel=1e-5), key
    for a, b in zip(fused[1]["signal_per_sequence"], plain[1]["signal_per_sequence"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    return fused


@pytest.mark.parametrize("options", [
    dict(loss_mode="simple_signal"),
    dict(loss_mode="simple_signal", logits_chunk_size=2, ignore_first_k=2, signal_clip=0.05),
    dict(loss_mode="simple_signal", center_signal=True, logits_chunk_size=4),
    dict(loss_mode="simple_signal", negate_signal=True, center_signal=True, ignore_first_k=1),
    dict(loss_mode="full_distillation", distillation_topk=5, logits_chunk_size=3),
    dict(loss_mode="full_distillation", distillation_topk=7, distillation_tail=False, ignore_first_k=3),
    dict(loss_mode="full_distillation", distillation_topk=10_000, logits_chunk_size=7),  # k clipped to V
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fused_head_equals_checkpointed_path(tiny_model, tiny_tokenizer, options):
    torch.manual_seed(0)
    batch_x, batch_xo = _batches(tiny_tokenizer)
    _assert_same(tiny_model.eval(), batch_x, batch_xo, **options)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_both_paths_are_as_close_to_float64(tiny_tokenizer, divergence):
    from auxiliary.runtime.tiny_model import build_tiny_model

    batch_x, batch_xo = _batches(tiny_tokenizer)
    options = dict(loss_mode="full_distillation", distillation_topk=5, logits_chunk_size=4, divergence=divergence)
    model = build_tiny_model(tiny_tokenizer, seed=0).eval()
    exact = _loss_and_grads(build_tiny_model(tiny_tokenizer, seed=0).double().eval(), batch_x, batch_xo,
                            ObjectiveOptions(fused_lm_head=False, **options))
    errors = {}
    for fused in (True, False):
        loss, _, grads = _loss_and_grads(model, batch_x, batch_xo, ObjectiveOptions(fused_lm_head=fused, **options))
        assert abs(float(loss) - float(exact[0])) <= 2e-5 * float(exact[0])
        errors[fused] = max(float((grads[n].double() - g).abs().max() / g.abs().max()) for n, g in exact[2].items())
    assert errors[True] < 1e-5 and errors[True] <= 3 * errors[False], errors


@pytest.mark.parametrize("loss_mode", ["simple_signal", "full_distillation"])
def test_fused_head_with_reference_kl(tiny_model, tiny_tokenizer, loss_mode):
    from auxiliary.runtime.tiny_model import build_tiny_model

    batch_x, batch_xo = _batches(tiny_tokenizer)
    other = build_tiny_model(tiny_tokenizer, seed=1).eval()
    fused = _assert_same(tiny_model.eval(), batch_x, batch_xo, other, loss_mode=loss_mode, beta=0.3,
                         logits_chunk_size=4, distillation_topk=5)
    assert fused[1]["ref_kl"] > 0


def test_fused_head_with_untied_head_and_frozen_head(tiny_tokenizer):
    from auxiliary.runtime.tiny_model import build_tiny_model

    batch_x, batch_xo = _batches(tiny_tokenizer)
    model = build_tiny_model(tiny_tokenizer, seed=0)
    head = model.get_output_embeddings()
    untied = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    with torch.no_grad():
        untied.weight.copy_(head.weight + 0.01 * torch.randn_like(head.weight))
    model.set_output_embeddings(untied)
    model.config.tie_word_embeddings = False
    model.eval()
    fused = _assert_same(model, batch_x, batch_xo, loss_mode="full_distillation", distillation_topk=4,
                         logits_chunk_size=5)
    assert fused[2]["lm_head.weight"].abs().sum() > 0
    untied.weight.requires_grad_(False)  # as under LoRA: the head gets no gradient, the rest does
    fused = _assert_same(model, batch_x, batch_xo, loss_mode="simple_signal", logits_chunk_size=5)
    assert "lm_head.weight" not in fused[2]


def test_heads_the_fused_path_does_not_take(tiny_model, tiny_tokenizer, caplog):
    batch_x, batch_xo = _batches(tiny_tokenizer)
    hidden = torch.zeros(1, tiny_model.config.hidden_size)
    assert fused_head_supported(tiny_model, hidden)
    head = tiny_model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    tiny_model.set_output_embeddings(biased)
    assert not fused_head_supported(tiny_model, hidden)
    import logging

    import sdpo_objective

    sdpo_objective.log_fused_head_fallback.cache_clear()  # the reason is logged once per process
    with caplog.at_level(logging.INFO, logger="sdpo_objective"):
        _, stats = sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(loss_mode="simple_signal"))
        sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(loss_mode="simple_signal"))
    assert stats["fused_lm_head"] is False  # falls back, still trains
    reasons = [r.getMessage() for r in caplog.records if "fused LM head off" in r.getMessage()]
    assert reasons == ["fused LM head off, checkpointed chunks instead: the LM head is not a plain, bias-free, "
                       "unsharded nn.Linear (LoRA-wrapped, biased or sharded)"]
    with torch.no_grad():  # no gradient wanted: plain chunked scoring
        _, stats = sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(loss_mode="simple_signal"))
    assert stats["fused_lm_head"] is False


def test_fused_head_under_lora_matches_and_trains_only_adapters(tiny_model, tiny_tokenizer):
    peft = pytest.importorskip("peft")
    batch_x, batch_xo = _batches(tiny_tokenizer)
    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    model.eval()
    fused = _assert_same(model, batch_x, batch_xo, loss_mode="full_distillation", distillation_topk=5,
                         logits_chunk_size=4)
    assert fused[2] and all("lora_" in name for name in fused[2])


def test_fused_loss_scales_with_upstream_gradient(tiny_model, tiny_tokenizer):
    batch_x, batch_xo = _batches(tiny_tokenizer)
    tiny_model.eval()
    opts = ObjectiveOptions(loss_mode="full_distillation", distillation_topk=5)
    _, _, base = _loss_and_grads(tiny_model, batch_x, batch_xo, opts)
    loss, _ = sdpo_loss(tiny_model, batch_x, batch_xo, opts)
    (loss * -2.5).backward()
    for name, param in tiny_model.named_parameters():
        if name in base:
            torch.testing.assert_close(param.grad, -2.5 * base[name], atol=1e-6, rtol=1e-5, msg=name)


def test_fused_head_under_bf16_autocast_with_fp32_weights(tiny_model, tiny_tokenizer):
    """The offline trainer's GPU setting (fp32 master weights, bf16 autocast), here on CPU."""
    batch_x, batch_xo = _batches(tiny_tokenizer)
    tiny_model.eval()
    results = []
    for fused in (True, False):
        opts = ObjectiveOptions(loss_mode="full_distillation", distillation_topk=5, logits_chunk_size=4,
                                fused_lm_head=fused)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, stats = sdpo_loss(tiny_model, batch_x, batch_xo, opts)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        tiny_model.zero_grad(set_to_none=True)
        assert stats["fused_lm_head"] is fused
        results.append((loss.detach(), grads))
    (loss_f, grads_f), (loss_c, grads_c) = results
    assert all(g.dtype == torch.float32 for g in grads_f.values())
    torch.testing.assert_close(loss_f, loss_c, atol=2e-3, rtol=1e-2)  # bf16 rounding, both paths alike
    for name, grad in grads_c.items():
        cosine = torch.nn.functional.cosine_similarity(grads_f[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


def test_fused_head_with_bf16_weights(tiny_model, tiny_tokenizer):
    """The online updater's GPU setting (bf16 weights, no autocast), here on CPU."""
    batch_x, batch_xo = _batches(tiny_tokenizer)
    model = tiny_model.to(torch.bfloat16).eval()
    results = []
    for fused in (True, False):
        opts = ObjectiveOptions(loss_mode="simple_signal", logits_chunk_size=4, fused_lm_head=fused)
        loss, grads = _loss_and_grads(model, batch_x, batch_xo, opts)[::2]
        results.append((loss, grads))
    (loss_f, grads_f), (loss_c, grads_c) = results
    assert loss_f.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads_f.values())
    torch.testing.assert_close(loss_f, loss_c, atol=1e-3, rtol=1e-2)
    for name, grad in grads_c.items():
        cosine = torch.nn.functional.cosine_similarity(grads_f[name].float().flatten(), grad.float().flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


def test_fused_head_with_gradient_checkpointing_of_the_backbone(tiny_model, tiny_tokenizer):
    batch_x, batch_xo = _batches(tiny_tokenizer)
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.train()  # checkpointing is active in train mode only
    tiny_model.config.attention_dropout = 0.0
    _assert_same(tiny_model, batch_x, batch_xo, loss_mode="full_distillation", distillation_topk=5, logits_chunk_size=4)


# ----------------------------------------------------------------------------- exact tail bucket, both head paths

class _IdentityHeadModel(torch.nn.Module):
    """A 'model' whose LM head is the identity: hidden states are the logits, so tests can craft them."""

    def __init__(self, vocab):
        super().__init__()
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(vocab))
        self.config = SimpleNamespace(final_logit_softcapping=None, vocab_size=vocab)

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("path", ["fused", "checkpointed"])
def test_head_paths_tail_bucket_against_float64(path):
    from test_objective import brute_force_topk_kl, crafted_logits, tail_pairs

    from sdpo_fused_head import fused_head_loss
    from sdpo_objective import checkpointed_head_loss, HeadLogits, TokenLoss

    pairs = tail_pairs()
    student64 = crafted_logits([s for s, _ in pairs], seed=2)
    teacher64 = crafted_logits([t for _, t in pairs], seed=3)
    tokens, vocab, k = student64.shape[0], student64.shape[1], 4
    student64.requires_grad_(True)
    expected = brute_force_topk_kl(student64, teacher64, k)
    (expected_grad,) = torch.autograd.grad(expected.mean(), student64)

    model = _IdentityHeadModel(vocab)
    opts = ObjectiveOptions(loss_mode="full_distillation", distillation_topk=k)
    plan = TokenLoss(opts, 1, torch.zeros(tokens, dtype=torch.long), torch.ones(tokens),
                     torch.full((tokens,), float(tokens)))
    hidden_s = student64.detach().float().requires_grad_(True)
    head_loss = fused_head_loss if path == "fused" else checkpointed_head_loss
    loss, _, _, kl = head_loss(HeadLogits(model), plan, hidden_s, teacher64.float(),
                               torch.zeros(tokens, dtype=torch.long),
                               chunk_size=5)
    loss.backward()
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected.detach().mean(), rtol=2e-5, atol=0)
    scale = expected_grad.abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(hidden_s.grad.double() / scale, expected_grad / scale, rtol=0, atol=2e-5)
    # with W = I, dL/dW = G^T h: the head's gradient holds the same G, tail columns included
    expected_weight_grad = expected_grad.t() @ student64.detach()
    weight_scale = expected_weight_grad.abs().max()
    torch.testing.assert_close(model.head.weight.grad.double() / weight_scale, expected_weight_grad / weight_scale,
                               rtol=0, atol=2e-5)


@pytest.mark.parametrize("path", ["fused", "checkpointed"])
def test_head_paths_tail_bucket_below_float32_range(path):
    """Tails so small that float32's exp of their entries is denormal or 0 (1e-44: every entry flushes to 0):
    the fused path redoes those rows with the masked log-sum-exp; the values stay exact."""
    from test_objective import brute_force_topk_kl, crafted_logits

    from sdpo_fused_head import fused_head_loss
    from sdpo_objective import checkpointed_head_loss, HeadLogits, TokenLoss

    pairs = [(s, t) for s in (0.3, 1e-3) for t in (1e-20, 1e-30, 1e-40, 1e-44)] + [(1e-30, 0.3), (1e-44, 1e-3)]
    student64 = crafted_logits([s for s, _ in pairs], seed=4)
    teacher64 = crafted_logits([t for _, t in pairs], seed=5)
    tokens, vocab, k = student64.shape[0], student64.shape[1], 4
    expected = brute_force_topk_kl(student64, teacher64, k)
    model = _IdentityHeadModel(vocab)
    plan = TokenLoss(ObjectiveOptions(loss_mode="full_distillation", distillation_topk=k), 1,
                     torch.zeros(tokens, dtype=torch.long), torch.ones(tokens), torch.full((tokens,), float(tokens)))
    head_loss = fused_head_loss if path == "fused" else checkpointed_head_loss
    hidden_s = student64.float().requires_grad_(True)
    _, _, _, kl = head_loss(HeadLogits(model), plan, hidden_s, teacher64.float(), torch.zeros(tokens, dtype=torch.long),
                            chunk_size=5)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), expected, rtol=2e-5, atol=1e-6)


def test_bench_tail_bucket_tiny_prints_its_ratio(capsys):
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "bench"))
    import bench_common
    import bench_tail_bucket

    threads = torch.get_num_threads()
    try:  # in-process: a child would spend its time importing torch again
        returned = bench_tail_bucket.main(["--rows", "12", "--hidden", "8", "--vocab", "300", "--chunk", "5",
                                           "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    ratios = bench_common.parse_ratio_lines(capsys.readouterr().out)
    assert list(ratios) == ["tail_bucket_exact_vs_plain"] and ratios["tail_bucket_exact_vs_plain"] > 0
    assert returned == pytest.approx(ratios, abs=1e-4)
