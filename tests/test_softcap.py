"""Models that soft-cap their logits (Gemma-2: z = cap * tanh(a / cap)): signal and losses match the model's own
logits."""
import pytest
import torch

from sdpo_objective import ObjectiveOptions, build_scoring_batch, check_lm_head, compute_signal, sdpo_loss

CONTEXTS_X = [[3, 4, 20, 21], [3, 30, 31, 32, 33, 34, 4]]
CONTEXTS_XO = [c + [60, 61, 62] for c in CONTEXTS_X]
RESPONSES = [[5, 6, 7, 8, 9, 2], [10, 11, 12]]


def gemma2(cap=2.0, seed=0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                          final_logit_softcapping=cap, sliding_window=64, pad_token_id=0, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # spread the logits so that the cap bends them
        model.get_output_embeddings().weight.normal_(0.0, 1.0)
    return model


def model_logprobs(model, context, response):
    with torch.no_grad():
        logits = model(torch.tensor([context + response])).logits[0].float()
    assert logits.abs().max() <= model.config.final_logit_softcapping + 1e-4  # the model really caps
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[len(context) - 1 + t, y] for t, y in enumerate(response)])


def test_signal_of_a_soft_capped_model_equals_its_own_logits():
    model = gemma2()
    results = compute_signal(model, CONTEXTS_X, CONTEXTS_XO, RESPONSES, pad_token_id=0, chunk_size=4)
    for i, response in enumerate(RESPONSES):
        expected_x = model_logprobs(model, CONTEXTS_X[i], response)
        expected_xo = model_logprobs(model, CONTEXTS_XO[i], response)
        torch.testing.assert_close(torch.tensor(results[i]["logp_x"]), expected_x, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(results[i]["signal"]), expected_xo - expected_x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_mode", ["simple_signal", "full_distillation"])
def test_fused_head_with_soft_capping_matches_checkpointed_path(loss_mode):
    model = gemma2()
    batch_x = build_scoring_batch(CONTEXTS_X, RESPONSES, 0)
    batch_xo = build_scoring_batch(CONTEXTS_XO, RESPONSES, 0)
    results = []
    for fused in (True, False):
        opts = ObjectiveOptions(loss_mode=loss_mode, distillation_topk=6, logits_chunk_size=4, fused_lm_head=fused)
        loss, stats = sdpo_loss(model, batch_x, batch_xo, opts)
        loss.backward()
        results.append(
            (loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (loss_f, stats_f, grads_f), (loss_c, stats_c, grads_c) = results
    assert stats_f["fused_lm_head"] and not stats_c["fused_lm_head"]
    torch.testing.assert_close(loss_f, loss_c, atol=1e-6, rtol=1e-5)
    assert grads_f.keys() == grads_c.keys()
    for name, grad in grads_c.items():
        scale = float(grad.abs().max().clamp(min=1e-8))
        # 1e-5 of the largest entry: the fused path's log-probs are z - max - log sum in float64, the
        # checkpointed path's float32 log_softmax; the two round differently (measured: 4.8e-6 at most here)
        torch.testing.assert_close(grads_f[name] / scale, grad / scale, atol=1e-5, rtol=0, msg=name)


def test_simple_signal_loss_of_soft_capped_model_by_hand():
    model = gemma2()
    batch_x = build_scoring_batch(CONTEXTS_X, RESPONSES, 0)
    batch_xo = build_scoring_batch(CONTEXTS_XO, RESPONSES, 0)
    loss, _ = sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(loss_mode="simple_signal"))
    expected = 0.0
    for cx, cxo, response in zip(CONTEXTS_X, CONTEXTS_XO, RESPONSES):
        logp_x, logp_xo = model_logprobs(model, cx, response), model_logprobs(model, cxo, response)
        expected -= ((logp_xo - logp_x) * logp_x).sum() / len(response)
    torch.testing.assert_close(loss.detach(), expected / len(RESPONSES), atol=1e-5, rtol=1e-5)


def test_unknown_logit_post_processing_is_refused(tiny_tokenizer):
    from auxiliary.runtime.tiny_model import build_tiny_model

    model = build_tiny_model(tiny_tokenizer, seed=0).eval()
    original_forward = model.forward

    def scaled_forward(*args, **kwargs):  # a head the chunked path cannot reproduce
        output = original_forward(*args, **kwargs)
        output.logits = output.logits * 3.0
        return output

    model.forward = scaled_forward
    check_lm_head(build_tiny_model(tiny_tokenizer, seed=0))  # the model as it is passes
    check_lm_head(gemma2())  # soft-capping is reproduced
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        check_lm_head(model)
