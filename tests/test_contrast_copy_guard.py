"""--contrast_followup (contrastive signal / tilted teacher) and --copy_guard_ngram (no signal on repeats), with
the short-reply rule of ignore_first_k: both head paths equal the full-logit reference, with every teacher
and divergence; the options reach the online updater, the offline collator and the placebo's check."""
import copy

import pytest
import torch

from auxiliary.runtime.tiny_model import build_tiny_model
from sdpo_objective import (ObjectiveOptions, Teacher, build_scoring_batch, end_token_ids, hindsight_contexts,
                            hindsight_messages, reference_loss, render_context_ids, repeated_ngram_mask, sdpo_loss,
                            token_weights)
from test_teacher_modes import _perturb

# replies with repeats (copy guard), one without, one shorter than ignore_first_k
RESPONSES = [[5, 6, 7, 5, 6, 7, 5, 6, 2], [10, 11, 10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 2], [9, 2]]
CONTEXTS_X = [[3, 4, 20, 21], [3, 30, 31, 32, 33, 34, 4], [3, 50, 4], [3, 22, 23, 4]]
CONTEXTS_XO = [c + [60, 61, 62] for c in CONTEXTS_X]
CONTEXTS_NEUTRAL = [c + [70, 71] for c in CONTEXTS_X]
# Gradients against the reference, relative to each tensor's largest entry: batched, padded forwards against
# unbatched ones differ by float32 rounding (~1e-6 in the logits), up to 1.5e-5 of a centred signal's small gradient.
REFERENCE_GRAD_TOLERANCE = 4e-5


def _batches(tokenizer, neutral=True):
    pad = tokenizer.pad_token_id
    return (build_scoring_batch(CONTEXTS_X, RESPONSES, pad), build_scoring_batch(CONTEXTS_XO, RESPONSES, pad),
            build_scoring_batch(CONTEXTS_NEUTRAL, RESPONSES, pad) if neutral else None)


def _response_logits(model, contexts):
    """[B, R, V]: unbatched forwards of context + reply, the logits predicting each reply token, zero-padded."""
    width = max(len(r) for r in RESPONSES)
    rows = []
    for context, response in zip(contexts, RESPONSES):
        logits = model(torch.tensor([context + response])).logits[0, len(context) - 1:len(context) + len(response) - 1]
        rows.append(torch.cat([logits, logits.new_zeros(width - len(response), logits.shape[-1])]))
    return torch.stack(rows)


def _full_logit_reference(student, teacher_model, opts, ref_model=None):
    """reference_loss on independent full logits: the student under x, `teacher_model` under xo and x o_neutral."""
    width = max(len(r) for r in RESPONSES)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in RESPONSES])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in RESPONSES])
    with torch.no_grad():
        teacher = _response_logits(teacher_model, CONTEXTS_XO)
        neutral = _response_logits(teacher_model, CONTEXTS_NEUTRAL) if opts.contrast_followup else None
        ref_logp = None
        if ref_model is not None:
            ref_logp = torch.log_softmax(_response_logits(ref_model, CONTEXTS_X), -1)
            ref_logp = ref_logp.gather(-1, ids.unsqueeze(-1))[..., 0]
    end = end_token_ids(student) if opts.end_signal_weight else None
    return reference_loss(_response_logits(student, CONTEXTS_X), teacher, ids, mask, opts, neutral, ref_logp, end)


def _assert_equals_reference(model, teacher_model, teacher_object=None, ref_model=None, tokenizer=None, **options):
    """Fused == checkpointed (test_fused_head._assert_same) == the full-logit reference: loss and gradients."""
    from test_fused_head import _assert_same

    batch_x, batch_xo, batch_neutral = _batches(tokenizer, neutral=bool(options.get("contrast_followup")))
    loss, stats, grads = _assert_same(model, batch_x, batch_xo, ref_model, teacher_object, batch_neutral, **options)
    model.zero_grad(set_to_none=True)
    expected = _full_logit_reference(model, teacher_model, ObjectiveOptions(**options), ref_model)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-6, rtol=1e-5)
    for name, param in model.named_parameters():
        if param.grad is not None and name in grads:
            scale = float(param.grad.abs().max().clamp(min=1e-8))
            torch.testing.assert_close(grads[name] / scale, param.grad / scale, atol=REFERENCE_GRAD_TOLERANCE, rtol=0,
                                       msg=name)
    model.zero_grad(set_to_none=True)
    return loss, stats


CONTRAST = "OK."
OPTIONS = [
    dict(loss_mode="simple_signal"),  # the reference itself, no new option
    dict(loss_mode="full_distillation", distillation_topk=5),
    dict(loss_mode="simple_signal", contrast_followup=CONTRAST),
    dict(loss_mode="simple_signal", contrast_followup=CONTRAST, center_signal=True, ignore_first_k=2, signal_clip=0.5,
         logits_chunk_size=3),
    dict(loss_mode="simple_signal", copy_guard_ngram=2, center_signal=True, ignore_first_k=1, logits_chunk_size=4),
    dict(loss_mode="simple_signal", contrast_followup=CONTRAST, copy_guard_ngram=3, negate_signal=True,
         center_signal=True),
    dict(loss_mode="full_distillation", contrast_followup=CONTRAST, distillation_topk=5, logits_chunk_size=3),
    dict(loss_mode="full_distillation", contrast_followup=CONTRAST, distillation_topk=7, distillation_tail=False),
    dict(loss_mode="full_distillation", copy_guard_ngram=2, ignore_first_k=1, distillation_topk=5),
    dict(loss_mode="full_distillation", contrast_followup=CONTRAST, copy_guard_ngram=1, divergence="jsd",
         divergence_alpha=0.3, distillation_topk=6, logits_chunk_size=4),
    dict(loss_mode="full_distillation", contrast_followup=CONTRAST, copy_guard_ngram=2, divergence="forward_kl",
         distillation_topk=10_000),  # k clipped to V: the exact full-vocabulary divergence
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_both_head_paths_equal_the_full_logit_reference(tiny_model, tiny_tokenizer, options):
    model = tiny_model.eval()
    _assert_equals_reference(model, model, tokenizer=tiny_tokenizer, **options)


@pytest.mark.parametrize("loss_mode", ["simple_signal", "full_distillation"])
def test_with_reference_kl(tiny_model, tiny_tokenizer, loss_mode):
    other = build_tiny_model(tiny_tokenizer, seed=1).eval()
    _, stats = _assert_equals_reference(tiny_model.eval(), tiny_model, ref_model=other, tokenizer=tiny_tokenizer,
                                        loss_mode=loss_mode, beta=0.3, contrast_followup=CONTRAST, copy_guard_ngram=2,
                                        distillation_topk=5)
    assert stats["ref_kl"] > 0


@pytest.mark.parametrize("loss_mode, divergence", [("simple_signal", "reverse_kl"), ("full_distillation", "reverse_kl"),
                                                   ("full_distillation", "jsd")])
@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_frozen_and_ema_teachers_with_contrast_and_copy_guard(tiny_tokenizer, mode, loss_mode, divergence):
    model = build_tiny_model(tiny_tokenizer, seed=0).eval()
    teacher = Teacher(model, mode, ema_rate=0.5)
    initial = copy.deepcopy(model)
    _perturb(model, seed=1)  # the student moved away from the teacher's weights
    options = dict(loss_mode=loss_mode, divergence=divergence, teacher=mode, distillation_topk=5, logits_chunk_size=4,
                   contrast_followup=CONTRAST, copy_guard_ngram=2)
    loss, _ = _assert_equals_reference(model, initial, teacher_object=teacher, tokenizer=tiny_tokenizer, **options)
    batch_x, batch_xo, batch_neutral = _batches(tiny_tokenizer)
    live = sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(**{**options, "teacher": "live"}),
                     batch_neutral=batch_neutral)[0]
    assert abs(float(live.detach()) - float(loss)) > 1e-6  # the teacher made a difference


@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_lora_teachers_with_contrast_and_copy_guard(tiny_tokenizer, mode):
    peft = pytest.importorskip("peft")
    base = build_tiny_model(tiny_tokenizer, seed=0)
    reference = copy.deepcopy(base).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False)).eval()
    teacher = Teacher(model, mode, ema_rate=0.3)
    expected_teacher = copy.deepcopy(model).eval() if mode == "ema" else reference
    _perturb(model, seed=2)
    _assert_equals_reference(model, expected_teacher, teacher_object=teacher, tokenizer=tiny_tokenizer,
                             loss_mode="full_distillation", teacher=mode, distillation_topk=5, logits_chunk_size=4,
                             contrast_followup=CONTRAST, copy_guard_ngram=2)


# ----------------------------------------------------------------------------- what the options do

def test_a_contrast_equal_to_the_followup_cancels_the_hindsight_block(tiny_model, tiny_tokenizer):
    """o_neutral = o: the signal is identically zero and the tilted teacher is the student (no loss, no gradient)."""
    batch_x, batch_xo, _ = _batches(tiny_tokenizer)
    model = tiny_model.eval()
    loss, stats = sdpo_loss(model, batch_x, batch_xo,
                            ObjectiveOptions(loss_mode="simple_signal", contrast_followup="o"), batch_neutral=batch_xo)
    assert float(loss) == 0.0 and all(float(s.abs().max()) == 0.0 for s in stats["signal_per_sequence"])
    for fused in (True, False):
        loss, stats = sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(contrast_followup="o", distillation_topk=5,
                                                                          fused_lm_head=fused), batch_neutral=batch_xo)
        loss.backward()
        assert abs(float(loss)) < 1e-6 and stats["distill_kl"] < 1e-6
        assert max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None) < 1e-5
        model.zero_grad(set_to_none=True)


def test_contrastive_signal_by_hand(tiny_model, tiny_tokenizer):
    """A_t = log p(y_t | xo) - log p(y_t | x o_neutral), from plain full forwards."""
    batch_x, batch_xo, batch_neutral = _batches(tiny_tokenizer)
    model = tiny_model.eval()
    _, stats = sdpo_loss(model, batch_x, batch_xo, ObjectiveOptions(loss_mode="simple_signal", contrast_followup="o"),
                         batch_neutral=batch_neutral)
    with torch.no_grad():
        xo = torch.log_softmax(_response_logits(model, CONTEXTS_XO), -1)
        neutral = torch.log_softmax(_response_logits(model, CONTEXTS_NEUTRAL), -1)
    for row, (response, signal) in enumerate(zip(RESPONSES, stats["signal_per_sequence"])):
        positions = torch.arange(len(response))
        expected = xo[row, positions, response] - neutral[row, positions, response]
        torch.testing.assert_close(signal, expected, atol=1e-5, rtol=0)


def test_repeated_ngram_mask_by_hand():
    ids = [5, 6, 7, 5, 6, 7, 5, 6, 2]
    assert repeated_ngram_mask(ids, 3) == [False] * 5 + [True, True, True, False]
    assert repeated_ngram_mask(ids, 2) == [False] * 4 + [True, True, True, True, False]
    assert repeated_ngram_mask(ids, 1) == [False] * 3 + [True] * 5 + [False]
    assert repeated_ngram_mask([4, 4, 4, 4], 2) == [False, False, True, True]  # overlapping repeats count
    assert repeated_ngram_mask(ids, 0) == [False] * len(ids)
    assert repeated_ngram_mask([], 3) == []


def test_token_weights_copy_guard_and_short_replies():
    width = max(len(r) for r in RESPONSES)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in RESPONSES])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in RESPONSES])

    def weights(**options):
        flat = token_weights(ids, mask, ObjectiveOptions(**options)).tolist()
        lengths = [len(r) for r in RESPONSES]
        return [flat[sum(lengths[:i]):sum(lengths[:i + 1])] for i in range(len(lengths))]

    assert weights(copy_guard_ngram=3) == [[1] * 5 + [0, 0, 0, 1], [1] * 5, [1] * 9, [1, 1]]
    assert weights(copy_guard_ngram=2, ignore_first_k=1) == [[0, 1, 1, 1, 0, 0, 0, 0, 1], [0, 1, 1, 0, 1],
                                                             [0] + [1] * 8, [0, 1]]
    # a reply of ignore_first_k tokens or fewer keeps every token (the paper's code), a longer one loses the first k
    assert weights(ignore_first_k=2)[3] == [1, 1] and weights(ignore_first_k=3)[3] == [1, 1]
    assert weights(ignore_first_k=4)[1] == [0, 0, 0, 0, 1] and weights(ignore_first_k=5)[1] == [1] * 5


@pytest.mark.parametrize("options", [dict(loss_mode="simple_signal", center_signal=True),
                                     dict(loss_mode="full_distillation", distillation_topk=4)])
def test_guarded_tokens_do_not_move_the_loss(options):
    """Changing the student's or the teacher's logits at a guarded token leaves the loss as it was."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 2]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    student, teacher = torch.randn(2, 1, 7, 12, generator=generator)
    opts = ObjectiveOptions(copy_guard_ngram=2, **options)
    guarded = [i for i, flag in enumerate(repeated_ngram_mask(ids[0].tolist(), 2)) if flag]
    assert guarded == [4, 5]
    base = reference_loss(student, teacher, ids, mask, opts)
    moved_student, moved_teacher = student.clone(), teacher.clone()
    moved_student[0, guarded] += torch.randn(len(guarded), 12, generator=generator)
    moved_teacher[0, guarded] += torch.randn(len(guarded), 12, generator=generator)
    torch.testing.assert_close(reference_loss(moved_student, moved_teacher, ids, mask, opts), base)
    unguarded = reference_loss(moved_student, moved_teacher, ids, mask, ObjectiveOptions(**options))
    assert abs(float(unguarded - reference_loss(student, teacher, ids, mask, ObjectiveOptions(**options)))) > 1e-4


def test_bad_contrast_and_copy_guard_input_fails_clearly(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="--copy_guard_ngram must be >= 0, got -1"):
        ObjectiveOptions(copy_guard_ngram=-1)
    with pytest.raises(ValueError, match="--contrast_followup is blank"):
        ObjectiveOptions(contrast_followup="   ")
    batch_x, batch_xo, batch_neutral = _batches(tiny_tokenizer)
    with pytest.raises(ValueError, match="--contrast_followup needs the batch of x o_neutral"):
        sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(contrast_followup="OK."))
    with pytest.raises(ValueError, match="--contrast_followup needs the batch of x o_neutral"):
        sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(), batch_neutral=batch_neutral)
    other = build_scoring_batch(CONTEXTS_NEUTRAL, [[1]] * len(RESPONSES), tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="x and x o_neutral batches must hold the same response ids"):
        sdpo_loss(tiny_model, batch_x, batch_xo, ObjectiveOptions(contrast_followup="OK."), batch_neutral=other)


# ----------------------------------------------------------------------------- the options reach every caller

MESSAGES = [{"role": "user", "content": "Write a short email to my manager."}]


def test_hindsight_contexts_render_the_neutral_followup(tiny_tokenizer):
    x, xo, neutral = hindsight_contexts(tiny_tokenizer, MESSAGES, "Shorter!", contrast_followup="OK.")
    assert x == render_context_ids(tiny_tokenizer, MESSAGES)
    assert xo == render_context_ids(tiny_tokenizer, hindsight_messages(MESSAGES, "Shorter!"))
    assert neutral == render_context_ids(tiny_tokenizer, hindsight_messages(MESSAGES, "OK."))
    assert hindsight_contexts(tiny_tokenizer, MESSAGES, "Shorter!")[2] is None


def test_online_updater_trains_on_the_contrastive_signal(tiny_tokenizer):
    from online_sdpo_updater import OnlineSDPOUpdater
    from online_sdpo_updater_config import OnlineSDPOConfig
    from sdpo_objective import compute_signal

    config = OnlineSDPOConfig(model="tiny", device="cpu", loss_mode="simple_signal", contrast_followup="OK.",
                              copy_guard_ngram=2, lr=1e-3)
    updater = OnlineSDPOUpdater(config, build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer)
    reply = [5, 6, 5, 6, 7, 2]
    batch_x, batch_xo, batch_neutral = updater.build_batches([MESSAGES], [reply], ["Shorter!"])
    x, xo, neutral = hindsight_contexts(tiny_tokenizer, MESSAGES, "Shorter!", contrast_followup="OK.")
    assert batch_neutral.input_ids[0].tolist() == neutral + reply
    expected = compute_signal(updater.model, [x], [xo], [reply], tiny_tokenizer.pad_token_id,
                              contexts_neutral=[neutral])
    metrics = updater.train_step(MESSAGES, reply, "Shorter!")
    torch.testing.assert_close(metrics["signal_per_sequence"][0], torch.tensor(expected[0]["signal"]), atol=1e-5,
                               rtol=0)
    assert metrics["weighted_tokens"] == 5  # the second (5, 6) completes a repeated bigram
    assert "logp_neutral" in metrics


def test_offline_collator_gives_the_neutral_context(tiny_tokenizer):
    from offline_sdpo.offline_sdpo_trainer import SDPOCollator

    record = {"prompt": MESSAGES, "completion": "Dear manager, ...", "user_response": "Shorter!"}
    encoded = SDPOCollator(tiny_tokenizer, contrast_followup="OK.").encode(record)
    expected = hindsight_contexts(tiny_tokenizer, MESSAGES, "Shorter!", contrast_followup="OK.")[2]
    assert encoded["neutral_ids"] == expected
    assert "neutral_ids" not in SDPOCollator(tiny_tokenizer).encode(record)


def test_the_placebo_must_not_say_the_contrast_text():
    from online_sdpo_updater_config import OnlineRunConfig, OnlineSDPOConfig, check_online_rules

    sdpo = OnlineSDPOConfig(model="tiny", contrast_followup=" OK, thanks. ")
    with pytest.raises(ValueError, match="--placebo_texts holds the --contrast_followup text 'OK, thanks.'"):
        check_online_rules(sdpo, OnlineRunConfig(placebo=True))
    check_online_rules(sdpo, OnlineRunConfig(placebo=True, placebo_texts=["Thanks!", "Got it."]))
    check_online_rules(sdpo, OnlineRunConfig(placebo=False))  # no placebo arm: nothing to check

@pytest.mark.parametrize("loss_mode", ["simple_signal", "full_distillation"])
def test_soft_capped_model_with_contrast_and_copy_guard(loss_mode):
    """Gemma-2's capped logits: the tilt acts on the capped logits on both paths, as in the reference."""
    from types import SimpleNamespace

    from test_softcap import gemma2

    _assert_equals_reference(gemma2(), gemma2(), tokenizer=SimpleNamespace(pad_token_id=0), loss_mode=loss_mode,
                             contrast_followup=CONTRAST, copy_guard_ngram=2, distillation_topk=6, logits_chunk_size=4)
