"""--divergence reverse_kl|forward_kl|jsd (--divergence_alpha) against TRL, full logits and float64, on both head
paths."""
import pytest
import torch

from sdpo_objective import ObjectiveOptions, buckets_divergence, build_scoring_batch, sdpo_loss, topk_divergence

ALPHAS = (0.0, 0.1, 0.5, 0.9, 1.0)
CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.9)]


def float64_divergence(student_logp, teacher_logp, divergence, alpha):
    """The definitions, written independently in float64 on probability vectors."""
    ps, pt = student_logp.double().exp(), teacher_logp.double().exp()
    if divergence == "reverse_kl" or (divergence == "jsd" and alpha == 1):
        return (ps * (ps.log() - pt.log())).sum(-1)
    if divergence == "forward_kl" or (divergence == "jsd" and alpha == 0):
        return (pt * (pt.log() - ps.log())).sum(-1)
    mix = (1 - alpha) * ps + alpha * pt
    return (1 - alpha) * (ps * (ps / mix).log()).sum(-1) + alpha * (pt * (pt / mix).log()).sum(-1)


def _buckets(rows=6, size=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.log_softmax(2 * torch.randn(rows, size, generator=generator), -1)
    teacher = torch.log_softmax(2 * torch.randn(rows, size, generator=generator), -1)
    return student, teacher


@pytest.mark.parametrize("alpha", ALPHAS)
def test_jsd_equals_trl_compute_divergence_on_the_same_buckets(alpha):
    loss_utils = pytest.importorskip("trl.experimental.sdpo.loss_utils")
    student, teacher = _buckets()
    ours = buckets_divergence(student, teacher, renormalise=False, divergence="jsd", alpha=alpha)
    theirs = loss_utils.compute_divergence(student, teacher, alpha)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.double(), float64_divergence(student, teacher, "jsd", alpha), atol=1e-6, rtol=1e-5)


def test_reverse_and_forward_kl_are_the_endpoints_of_trl_alpha():
    loss_utils = pytest.importorskip("trl.experimental.sdpo.loss_utils")
    student, teacher = _buckets(seed=1)
    reverse = buckets_divergence(student, teacher, renormalise=False, divergence="reverse_kl")
    forward = buckets_divergence(student, teacher, renormalise=False, divergence="forward_kl")
    torch.testing.assert_close(reverse, loss_utils.compute_divergence(student, teacher, 1.0))
    torch.testing.assert_close(forward, loss_utils.compute_divergence(student, teacher, 0.0))
    assert not torch.allclose(reverse, forward)  # the rows differ, so the two directions do


@pytest.mark.parametrize("divergence, alpha", CASES)
@pytest.mark.parametrize("tail", [True, False])
def test_topk_divergence_equals_trl_topk_loss(divergence, alpha, tail):
    """TRL's compute_topk_self_distillation_loss on the same logits (tails of moderate size, where its
    1 - sum(top-k) tail is accurate too)."""
    loss_utils = pytest.importorskip("trl.experimental.sdpo.loss_utils")
    generator = torch.Generator().manual_seed(3)
    student_logits, teacher_logits = torch.randn(2, 5, 40, generator=generator).unbind(0)
    trl_alpha = {"reverse_kl": 1.0, "forward_kl": 0.0}.get(divergence, alpha)
    ours = topk_divergence(student_logits, teacher_logits, 6, tail=tail, divergence=divergence, alpha=alpha)
    theirs = loss_utils.compute_topk_self_distillation_loss(
        student_logits, teacher_logits, distillation_topk=6, distillation_alpha=trl_alpha, distillation_add_tail=tail)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("divergence, alpha", CASES)
def test_full_vocabulary_value_and_gradient_against_float64(divergence, alpha):
    generator = torch.Generator().manual_seed(4)
    student64 = (3 * torch.randn(7, 30, generator=generator, dtype=torch.float64)).requires_grad_(True)
    teacher64 = 3 * torch.randn(7, 30, generator=generator, dtype=torch.float64)
    expected = float64_divergence(torch.log_softmax(student64, -1), torch.log_softmax(teacher64, -1), divergence, alpha)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student64)
    student = student64.detach().float().requires_grad_(True)
    ours = topk_divergence(student, teacher64.float(), k=30, tail=False, divergence=divergence, alpha=alpha)
    ours.sum().backward()
    torch.testing.assert_close(ours.double(), expected.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(student.grad.double(), expected_grad, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("divergence, alpha", CASES[1:])
def test_tail_bucket_divergences_against_float64_over_tail_masses(divergence, alpha):
    from test_objective import crafted_logits, tail_pairs

    pairs = tail_pairs()
    student64 = crafted_logits([s for s, _ in pairs], seed=2).requires_grad_(True)
    teacher64 = crafted_logits([t for _, t in pairs], seed=3)
    k = 4

    def buckets(logits):  # float64, top-k = ids 0..k-1 by construction
        p = torch.softmax(logits, -1)
        return torch.cat([p[:, :k], p[:, k:].sum(-1, keepdim=True)], -1).log()

    expected = float64_divergence(buckets(student64), buckets(teacher64), divergence, alpha)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student64)
    student = student64.detach().float().requires_grad_(True)
    ours = topk_divergence(student, teacher64.float(), k, divergence=divergence, alpha=alpha)
    ours.sum().backward()
    torch.testing.assert_close(ours.double(), expected.detach(), rtol=2e-5, atol=1e-6)
    scale = expected_grad.abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(student.grad.double() / scale, expected_grad / scale, rtol=0, atol=2e-5)


def test_a_bucket_empty_for_both_contributes_nothing():
    student = torch.tensor([[-0.2, -1.7, float("-inf")]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -0.9339, float("-inf")]])
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        value = buckets_divergence(student, teacher, renormalise=False, divergence=divergence)
        (grad,) = torch.autograd.grad(value.sum(), student)
        expected = float64_divergence(student[:, :2].detach(), teacher[:, :2], divergence, 0.5)
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=1e-5)
        assert torch.isfinite(grad).all() and grad[0, 2] == 0, divergence


# ----------------------------------------------------------------------------- sdpo_loss, both head paths

RESPONSES = [[5, 6, 7, 8, 9, 2], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 2]]
CONTEXTS_X = [[3, 4, 20, 21], [3, 30, 31, 32, 33, 34, 4], [3, 50, 4]]
CONTEXTS_XO = [c + [60, 61, 62] for c in CONTEXTS_X]


def full_logit_reference(model, opts):
    """Unbatched full forwards, full-vocabulary logits, the reference topk_divergence, mean over tokens."""
    values = []
    with torch.no_grad():
        for cx, cxo, response in zip(CONTEXTS_X, CONTEXTS_XO, RESPONSES):
            student = model(torch.tensor([cx + response])).logits[0, len(cx) - 1:len(cx) + len(response) - 1]
            teacher = model(torch.tensor([cxo + response])).logits[0, len(cxo) - 1:len(cxo) + len(response) - 1]
            values.append(topk_divergence(student, teacher, opts.distillation_topk, opts.distillation_tail,
                                          opts.divergence, opts.divergence_alpha))
    return torch.cat(values).mean()


@pytest.mark.parametrize("divergence, alpha", CASES)
@pytest.mark.parametrize("tail", [True, False])
def test_sdpo_loss_each_divergence_fused_equals_checkpointed_equals_full_logits(tiny_model, tiny_tokenizer,
                                                                               divergence, alpha, tail):
    from test_fused_head import _assert_same

    pad = tiny_tokenizer.pad_token_id
    batch_x = build_scoring_batch(CONTEXTS_X, RESPONSES, pad)
    batch_xo = build_scoring_batch(CONTEXTS_XO, RESPONSES, pad)
    tiny_model.eval()
    options = dict(loss_mode="full_distillation", distillation_topk=5, distillation_tail=tail, logits_chunk_size=4,
                   divergence=divergence, divergence_alpha=alpha)
    fused = _assert_same(tiny_model, batch_x, batch_xo, **options)
    torch.testing.assert_close(fused[0], full_logit_reference(tiny_model, ObjectiveOptions(**options)),
                               atol=1e-6, rtol=1e-5)


def test_divergences_differ_and_jsd_endpoints_equal_the_kls(tiny_model, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    batch_x = build_scoring_batch(CONTEXTS_X, RESPONSES, pad)
    batch_xo = build_scoring_batch(CONTEXTS_XO, RESPONSES, pad)
    tiny_model.eval()

    def loss(**options):
        with torch.no_grad():
            return sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(distillation_topk=5, **options))[0]

    reverse, forward = loss(divergence="reverse_kl"), loss(divergence="forward_kl")
    assert abs(float(reverse - forward)) > 0.02 * float(reverse) > 0
    torch.testing.assert_close(loss(divergence="jsd", divergence_alpha=1.0), reverse)
    torch.testing.assert_close(loss(divergence="jsd", divergence_alpha=0.0), forward)
    assert 0 < float(loss(divergence="jsd", divergence_alpha=0.5)) < float(min(reverse, forward))


def test_bad_divergence_options_fail_clearly():
    from online_sdpo_updater_config import OnlineSDPOConfig

    with pytest.raises(ValueError, match="unknown --divergence 'tv'; choose one of reverse_kl, forward_kl, jsd"):
        ObjectiveOptions(divergence="tv")
    with pytest.raises(ValueError, match="--divergence jsd needs --loss_mode full_distillation"):
        ObjectiveOptions(loss_mode="simple_signal", divergence="jsd")
    with pytest.raises(ValueError) as caught:
        OnlineSDPOConfig(divergence="jsd", divergence_alpha=1.5)
    assert str(caught.value) == "--divergence_alpha must be in [0, 1], got 1.5"
