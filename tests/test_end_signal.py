"""--end_signal_weight: the hindsight signal of the end-of-turn token at every reply position (simple_signal).
Both head paths equal the full-logit reference; the term equals a computation by hand from plain forwards;
it vanishes where the follow-up says nothing about ending; bad input fails clearly; it reaches the updaters."""
import pytest
import torch

from auxiliary.runtime.tiny_model import build_tiny_model
from sdpo_objective import ObjectiveOptions, Teacher, end_token_ids, sdpo_loss, token_weights
from test_contrast_copy_guard import (CONTEXTS_NEUTRAL, CONTEXTS_X, CONTEXTS_XO, CONTRAST, RESPONSES,
                                      _assert_equals_reference, _batches, _response_logits)
from test_teacher_modes import _perturb

OPTIONS = [
    dict(end_signal_weight=0.7),
    dict(end_signal_weight=0.7, center_signal=True, ignore_first_k=2, logits_chunk_size=3),
    dict(end_signal_weight=1.3, contrast_followup=CONTRAST, center_signal=True, ignore_first_k=2, copy_guard_ngram=2,
         logits_chunk_size=3),
    dict(end_signal_weight=2.0, contrast_followup=CONTRAST, signal_clip=0.2, negate_signal=True),
    dict(end_signal_weight=1.3, contrast_followup=CONTRAST, ignore_first_k=1, copy_guard_ngram=2,
         end_signal_copy_guard=False, logits_chunk_size=3),
    dict(end_signal_weight=1.1, contrast_followup=CONTRAST, ignore_first_k=1, copy_guard_ngram=2,
         end_signal_center=True, logits_chunk_size=3),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_both_head_paths_equal_the_full_logit_reference(tiny_model, tiny_tokenizer, options):
    model = tiny_model.eval()
    _, stats = _assert_equals_reference(model, model, tokenizer=tiny_tokenizer, loss_mode="simple_signal", **options)
    assert stats["fused_lm_head"]


def test_with_a_frozen_teacher_and_reference_kl(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=0).eval()
    teacher = Teacher(model, "frozen")
    initial = build_tiny_model(tiny_tokenizer, seed=0).eval()
    _perturb(model, seed=1)
    other = build_tiny_model(tiny_tokenizer, seed=1).eval()
    _assert_equals_reference(model, initial, teacher_object=teacher, ref_model=other, tokenizer=tiny_tokenizer,
                             loss_mode="simple_signal", teacher="frozen", beta=0.2, end_signal_weight=1.0,
                             contrast_followup=CONTRAST, copy_guard_ngram=2)


@pytest.mark.parametrize("contrast,guard_end,center_end", [(False, True, False), (True, True, False),
                                                          (True, False, False), (True, True, True)])
def test_the_end_term_by_hand(tiny_model, tiny_tokenizer, contrast, guard_end, center_end):
    """loss(with) - loss(without) = -(1/B) sum_b (1/|y_b|) sum_t e w'_t A_end,t log p(<end> | x, y<t), from plain
    unbatched forwards: A_end,t the teacher's log-prob of <end> under xo minus under x o_neutral (contrast) or minus
    the student's under x; w'_t the token weight, 0 where y_t is <end> itself; with end_signal_copy_guard off, w'_t
    is the weight without the copy guard (|y_b| keeps it); with end_signal_center, A_end minus its w'-mean."""
    model = tiny_model.eval()
    (end,) = end_token_ids(model)
    assert any(end in reply for reply in RESPONSES)  # the rule that skips the sampled end token is exercised
    options = dict(loss_mode="simple_signal", center_signal=True, ignore_first_k=1, copy_guard_ngram=2,
                   contrast_followup=CONTRAST if contrast else "")
    batch_x, batch_xo, batch_neutral = _batches(tiny_tokenizer, neutral=contrast)
    with torch.no_grad():
        without, _ = sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(**options), batch_neutral=batch_neutral)
        with_end, _ = sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(
            end_signal_weight=0.5, end_signal_copy_guard=guard_end, end_signal_center=center_end, **options),
            batch_neutral=batch_neutral)
        student = torch.log_softmax(_response_logits(model, CONTEXTS_X), -1)[..., end]
        teacher = torch.log_softmax(_response_logits(model, CONTEXTS_XO), -1)[..., end]
        baseline = torch.log_softmax(_response_logits(model, CONTEXTS_NEUTRAL), -1)[..., end] if contrast else student
    width = max(len(r) for r in RESPONSES)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in RESPONSES])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in RESPONSES])
    flat_weights = token_weights(ids, mask, ObjectiveOptions(**options)).tolist()
    end_options = {**options, "copy_guard_ngram": 2 if guard_end else 0}
    flat_end_weights = token_weights(ids, mask, ObjectiveOptions(**end_options)).tolist()
    assert guard_end or flat_end_weights != flat_weights  # the guard drops some token here
    expected, start = 0.0, 0
    for row, reply in enumerate(RESPONSES):
        weights = flat_weights[start:start + len(reply)]
        end_weights = flat_end_weights[start:start + len(reply)]
        start += len(reply)
        kept = [(t, w) for t, w in enumerate(end_weights) if reply[t] != end]
        signal = {t: float(teacher[row, t]) - float(baseline[row, t]) for t, _ in kept}
        if center_end:  # each reply's mean A_end over the end term's weights
            mean = sum(w * signal[t] for t, w in kept) / max(sum(w for _, w in kept), 1.0)
            signal = {t: value - mean for t, value in signal.items()}
        term = sum(w * signal[t] * float(student[row, t]) for t, w in kept)
        expected -= 0.5 * term / max(sum(weights), 1.0)
    expected /= len(RESPONSES)
    assert abs(expected) > 1e-4
    assert float(with_end - without) == pytest.approx(expected, abs=1e-5)


def test_no_end_signal_where_the_followup_says_nothing_of_ending(tiny_model, tiny_tokenizer):
    """Contrast with o_neutral = o: A_end is 0, so the term adds nothing to the loss or its gradient."""
    model = tiny_model.eval()
    batch_x, batch_xo, _ = _batches(tiny_tokenizer)
    for fused in (True, False):
        options = dict(loss_mode="simple_signal", contrast_followup="o", fused_lm_head=fused)
        loss, _ = sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(end_signal_weight=3.0, **options),
                            batch_neutral=batch_xo)
        loss.backward()
        assert float(loss) == 0.0
        assert max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None) == 0.0
        model.zero_grad(set_to_none=True)


def test_bad_end_signal_input_fails_clearly(tiny_tokenizer):
    with pytest.raises(ValueError, match="--end_signal_weight must be >= 0, got -1"):
        ObjectiveOptions(loss_mode="simple_signal", end_signal_weight=-1)
    with pytest.raises(ValueError, match="--end_signal_weight needs --loss_mode simple_signal"):
        ObjectiveOptions(loss_mode="full_distillation", end_signal_weight=1.0)
    model = build_tiny_model(tiny_tokenizer, seed=0)
    model.generation_config.eos_token_id = None
    batch_x, batch_xo, _ = _batches(tiny_tokenizer, neutral=False)
    with pytest.raises(ValueError, match="names no eos_token_id"):
        sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(loss_mode="simple_signal", end_signal_weight=1.0))


def _end_term(model, tokenizer, contrast=True, **options):
    """loss(with the end signal, weight 1) - loss(without), both under `options`: the end term alone."""
    batch_x, batch_xo, batch_neutral = _batches(tokenizer, neutral=contrast)
    common = dict(loss_mode="simple_signal", contrast_followup=CONTRAST if contrast else "", **options)
    with torch.no_grad():
        with_end, stats = sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(end_signal_weight=1.0, **common),
                                    batch_neutral=batch_neutral)
        without, _ = sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(**common), batch_neutral=batch_neutral)
    return float(with_end - without), stats


def test_several_stop_tokens_sum_their_probability_and_none_of_them_gets_an_end_term(tiny_tokenizer):
    """Llama 3 lists three stop tokens: <end> is any of them (log of the summed probability), and a reply position
    whose token is one of them (here 9, the first token of the last reply) carries no end term."""
    model = build_tiny_model(tiny_tokenizer, seed=0).eval()
    model.generation_config.eos_token_id = [2, 9, 2]
    assert end_token_ids(model) == [2, 9]
    assert RESPONSES[3][0] == 9
    _assert_equals_reference(model, model, tokenizer=tiny_tokenizer, loss_mode="simple_signal", end_signal_weight=1.0,
                             contrast_followup=CONTRAST, logits_chunk_size=3)
    several, stats = _end_term(model, tiny_tokenizer)
    model.generation_config.eos_token_id = 2
    assert end_token_ids(model) == [2]
    one, _ = _end_term(model, tiny_tokenizer)
    assert abs(several - one) > 1e-6 and "end_signal_mean" in stats


def test_negate_signal_negates_the_end_signal_and_clipping_leaves_it_alone(tiny_model, tiny_tokenizer):
    model = tiny_model.eval()
    plain, stats = _end_term(model, tiny_tokenizer, center_signal=True)
    negated, negated_stats = _end_term(model, tiny_tokenizer, center_signal=True, negate_signal=True)
    assert abs(plain) > 1e-4 and negated == pytest.approx(-plain, rel=1e-4)
    assert negated_stats["end_signal_mean"] == pytest.approx(-stats["end_signal_mean"])
    clipped, _ = _end_term(model, tiny_tokenizer, center_signal=True, signal_clip=1e-3)
    assert clipped == pytest.approx(plain, rel=1e-4)


def test_no_spurious_end_signal_under_bf16_autocast_without_contrast(tiny_model, tiny_tokenizer):
    """xo = x with the live teacher: A_end is 0 exactly, also when the fused head computes in bfloat16 (the student's
    baseline is scored the way the teacher's log-probs are, not by the bf16 loop)."""
    model = tiny_model.eval()
    batch_x, _, _ = _batches(tiny_tokenizer, neutral=False)
    opts = ObjectiveOptions(loss_mode="simple_signal", center_signal=True, end_signal_weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = sdpo_loss(model, batch_x, batch_x, opts)
    loss.backward()
    assert stats["fused_lm_head"] and float(loss) == 0.0 and stats["end_signal_mean"] == 0.0
    assert max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None) == 0.0
    model.zero_grad(set_to_none=True)


def test_online_and_offline_configs_take_the_flag():
    from offline_sdpo.main_offline_sdpo import OfflineSDPOArguments
    from online_sdpo_updater_config import OnlineSDPOConfig

    online = OnlineSDPOConfig(model="tiny", device="cpu", loss_mode="simple_signal", end_signal_weight=0.5)
    assert ObjectiveOptions.from_config(online).end_signal_weight == 0.5
    with pytest.raises(ValueError, match="--end_signal_weight needs --loss_mode simple_signal"):
        OfflineSDPOArguments(loss_mode="full_distillation", end_signal_weight=0.5)
    assert OfflineSDPOArguments(end_signal_weight=0.5).objective_options().end_signal_weight == 0.5


def test_the_online_updater_trains_with_the_end_signal_and_logs_its_mean(tiny_tokenizer):
    """A real train_step: the update moves log p(<end>) where the follow-up raised it (e large: the end term leads)."""
    from online_sdpo_updater import OnlineSDPOUpdater
    from online_sdpo_updater_config import OnlineSDPOConfig
    from sdpo_objective import build_scoring_batch, score_tokens

    messages = [{"role": "user", "content": "Write a short email to my manager."}]
    reply = [5, 6, 7, 8, 9, 10, 11, 12]
    config = OnlineSDPOConfig(model="tiny", device="cpu", loss_mode="simple_signal", contrast_followup=CONTRAST,
                              end_signal_weight=50.0, lr=1e-3, max_grad_norm=0)
    updater = OnlineSDPOUpdater(config, build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer)
    batch_x, _, _ = updater.build_batches([messages], [reply], ["Shorter!"])
    (end,) = end_token_ids(updater.model)
    with_end = build_scoring_batch([batch_x.input_ids[0].tolist()[:-len(reply)]], [reply[:4] + [end]],
                                   tiny_tokenizer.pad_token_id)

    def stop_logprob():
        with torch.no_grad():
            return float(score_tokens(updater.model.eval(), with_end)[0][-1])

    before = stop_logprob()
    metrics = updater.train_step(messages, reply, "Shorter!")
    signal = metrics["end_signal_mean"]
    assert signal != 0.0
    assert (stop_logprob() - before) * signal > 0  # stopping moved the way its signal says
