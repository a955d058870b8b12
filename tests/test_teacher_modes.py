"""--teacher live|frozen|ema (--teacher_ema_rate): who scores xo, on both head paths, online and offline, resumed."""
import copy

import pytest
import torch

from auxiliary.runtime.tiny_model import build_tiny_model
from online_sdpo_updater import TEACHER_FILE, OnlineSDPOUpdater
from online_sdpo_updater_config import OnlineSDPOConfig
from reliability_helpers import tiny_updater
from sdpo_objective import ObjectiveOptions, Teacher, build_scoring_batch, sdpo_loss, topk_divergence

RESPONSES = [[5, 6, 7, 8, 9, 2], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 2]]
CONTEXTS_X = [[3, 4, 20, 21], [3, 30, 31, 32, 33, 34, 4], [3, 50, 4]]
CONTEXTS_XO = [c + [60, 61, 62] for c in CONTEXTS_X]
MESSAGES = [{"role": "user", "content": "Write a short email to my manager."}]
LORA = dict(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="q_proj,v_proj")


def _batches(tokenizer):
    pad = tokenizer.pad_token_id
    return build_scoring_batch(CONTEXTS_X, RESPONSES, pad), build_scoring_batch(CONTEXTS_XO, RESPONSES, pad)


def _perturb(module, seed, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def full_logit_loss(student, teacher_model, opts):
    """Reference on full logits: the student under x, a separate teacher model under xo (unbatched)."""
    values = []
    for cx, cxo, response in zip(CONTEXTS_X, CONTEXTS_XO, RESPONSES):
        s = student(torch.tensor([cx + response])).logits[0, len(cx) - 1:len(cx) + len(response) - 1]
        with torch.no_grad():
            t = teacher_model(torch.tensor([cxo + response])).logits[0, len(cxo) - 1:len(cxo) + len(response) - 1]
        if opts.loss_mode == "full_distillation":
            values.append(topk_divergence(s, t, opts.distillation_topk, opts.distillation_tail, opts.divergence,
                                          opts.divergence_alpha))
        else:
            logp_s = torch.log_softmax(s.float(), -1)[torch.arange(len(response)), response]
            logp_t = torch.log_softmax(t.float(), -1)[torch.arange(len(response)), response]
            values.append((-(logp_t - logp_s).detach() * logp_s).mean().unsqueeze(0))
    return torch.cat(values).mean()


@pytest.mark.parametrize("loss_mode, divergence", [("full_distillation", "reverse_kl"), ("full_distillation", "jsd"),
                                                   ("simple_signal", "reverse_kl")])
@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_full_weight_teacher_fused_equals_checkpointed_equals_full_logits(tiny_tokenizer, mode, loss_mode, divergence):
    from test_fused_head import _assert_same

    model = build_tiny_model(tiny_tokenizer, seed=0).eval()
    teacher = Teacher(model, mode, ema_rate=0.5)
    initial = copy.deepcopy(model)
    _perturb(model, seed=1)  # the student moved away from the teacher's weights
    options = dict(loss_mode=loss_mode, divergence=divergence, teacher=mode, distillation_topk=5, logits_chunk_size=4)
    fused = _assert_same(model, *_batches(tiny_tokenizer), teacher_object=teacher, **options)
    expected = full_logit_loss(model, initial, ObjectiveOptions(**options))
    torch.testing.assert_close(fused[0], expected.detach(), atol=1e-6, rtol=1e-5)
    live = sdpo_loss(model, *_batches(tiny_tokenizer), ObjectiveOptions(**{**options, "teacher": "live"}))[0]
    assert abs(float(live.detach()) - float(expected.detach())) > 1e-6  # the teacher made a difference


@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_lora_teachers_match_and_train_only_the_adapter(tiny_tokenizer, mode):
    peft = pytest.importorskip("peft")
    from test_fused_head import _assert_same

    base = build_tiny_model(tiny_tokenizer, seed=0)
    reference = copy.deepcopy(base).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False)).eval()
    teacher = Teacher(model, mode, ema_rate=0.3)
    if mode == "ema":  # the teacher adapter starts as the student's, then the student moves
        expected_teacher = copy.deepcopy(model).eval()
        expected_teacher.requires_grad_(False)
    else:  # frozen: the adapter switched off = the base model
        expected_teacher = reference
    _perturb(model, seed=2)
    options = dict(loss_mode="full_distillation", teacher=mode, distillation_topk=5, logits_chunk_size=4)
    fused = _assert_same(model, *_batches(tiny_tokenizer), teacher_object=teacher, **options)
    assert fused[2] and all("lora_" in name and Teacher.EMA_ADAPTER not in name for name in fused[2])
    expected = full_logit_loss(model, expected_teacher, ObjectiveOptions(**options))
    torch.testing.assert_close(fused[0], expected.detach(), atol=1e-6, rtol=1e-5)
    assert model.active_adapter == "default"
    assert all(p.requires_grad == ("lora_" in n and Teacher.EMA_ADAPTER not in n) for n, p in model.named_parameters())


def test_ema_update_is_the_moving_average(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=0)
    teacher = Teacher(model, "ema", ema_rate=0.25)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seed in (1, 2):
        _perturb(model, seed)
        teacher.update()
        for name, param in model.named_parameters():
            expected[name] = 0.75 * expected[name] + 0.25 * param.detach()
    state = teacher.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, atol=1e-7, rtol=1e-6)


def test_a_teacher_must_match_the_options(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="--teacher frozen needs a Teacher object"):
        sdpo_loss(tiny_model, *_batches(tiny_tokenizer), ObjectiveOptions(teacher="frozen"))
    with pytest.raises(ValueError, match="unknown --teacher 'old'; choose one of live, frozen, ema"):
        ObjectiveOptions(teacher="old")
    with pytest.raises(ValueError) as caught:
        OnlineSDPOConfig(teacher="ema", teacher_ema_rate=0.0)
    assert str(caught.value) == "--teacher_ema_rate must be in (0, 1], got 0.0"


# ----------------------------------------------------------------------------- online updater

def make_updater(tokenizer, tmp_path=None, **overrides):
    values = dict(lr=1e-2, max_new_tokens=8, loss_mode="full_distillation", distillation_topk=5, device="cpu")
    if tmp_path is not None:
        values["checkpoint_dir"] = str(tmp_path / "checkpoints")
    return tiny_updater(tokenizer, **{**values, **overrides})


def test_online_frozen_teacher_keeps_the_initial_weights(tiny_tokenizer):
    updater = make_updater(tiny_tokenizer, teacher="frozen")
    initial = copy.deepcopy(updater.model)
    reply = updater.generate([MESSAGES], seed=1)[0]
    for _ in range(2):
        updater.train_step(MESSAGES, reply.ids, "Use a formal tone.")
    assert any(not torch.equal(a, b) for a, b in zip(updater.model.parameters(), initial.parameters()))
    for a, b in zip(updater.teacher.copy.parameters(), initial.parameters()):
        assert torch.equal(a, b)


def test_online_frozen_teacher_reuses_the_reference_model(tiny_tokenizer, tiny_model_dir):
    config = OnlineSDPOConfig(model=str(tiny_model_dir), lr=1e-2, device="cpu", teacher="frozen", beta=0.1)
    updater = OnlineSDPOUpdater(config)
    assert updater.teacher.copy is updater.ref_model  # one frozen copy for both


@pytest.mark.parametrize("lora", [False, True])
def test_online_ema_teacher_survives_save_and_resume(tiny_tokenizer, tmp_path, lora):
    extra = dict(teacher="ema", teacher_ema_rate=0.5, **(LORA if lora else {}))
    straight = make_updater(tiny_tokenizer, tmp_path / "a", **extra)
    replies = [straight.generate([MESSAGES], seed=s)[0] for s in (1, 2)]
    straight.train_step(MESSAGES, replies[0].ids, "Use a formal tone.")
    path = straight.save_checkpoint()
    assert (path / TEACHER_FILE).is_file()
    second = straight.train_step(MESSAGES, replies[1].ids, "Be brief.")

    resumed = make_updater(tiny_tokenizer, tmp_path / "b", **extra)
    resumed.load_checkpoint(path)
    again = resumed.train_step(MESSAGES, replies[1].ids, "Be brief.")
    assert again["loss"] == second["loss"] and again["logp_xo"] == second["logp_xo"]
    for (name, value), other in zip(straight.teacher.state_dict().items(), resumed.teacher.state_dict().values()):
        assert torch.equal(value, other), name
    fresh = make_updater(tiny_tokenizer, tmp_path / "c", **{**extra, "teacher": "live"})
    fresh.load_checkpoint(path)  # a live run ignores the teacher file
    (path / TEACHER_FILE).unlink()
    from online_sdpo_updater import write_manifest

    write_manifest(path)
    with pytest.raises(ValueError, match=f"{TEACHER_FILE}: missing"):
        make_updater(tiny_tokenizer, tmp_path / "d", **extra).load_checkpoint(path)


# ----------------------------------------------------------------------------- offline trainer

def test_offline_ema_teacher_is_checkpointed_and_restored(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file
    from offline_sdpo.main_offline_sdpo import main
    from reliability_helpers import read_metrics, run_in_process
    from test_offline_training import common_flags

    out = tmp_path / "ema"
    extra = ["--batch_size", "2", "--grad_accum", "1", "--max_steps", "3", "--loss_mode", "full_distillation",
             "--teacher", "ema", "--teacher_ema_rate", "0.5"]
    run_in_process(main, common_flags(tiny_model_dir, out) + extra)
    saved = load_file(str(out / "checkpoint-2" / "teacher_ema.safetensors"))
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-3")  # as if the job had died after step 2
    run_in_process(main, common_flags(tiny_model_dir, resumed) + extra + ["--resume_from_checkpoint", "latest"])
    # step 3 used the restored teacher: the same loss as without the interruption
    assert read_metrics(resumed)[2]["loss"] == pytest.approx(read_metrics(out)[2]["loss"], rel=1e-5)
    final_straight = load_file(str(out / "checkpoint-3" / "teacher_ema.safetensors"))
    final_resumed = load_file(str(resumed / "checkpoint-3" / "teacher_ema.safetensors"))
    for name, value in final_straight.items():
        torch.testing.assert_close(final_resumed[name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lora", [False, True])
def test_compute_signal_scores_xo_with_the_teacher(tiny_tokenizer, lora):
    """The chat's /why and min_signal read the same A_t the update trains on."""
    from sdpo_objective import compute_signal

    updater = make_updater(tiny_tokenizer, teacher="frozen", **(LORA if lora else {}))
    initial = copy.deepcopy(build_tiny_model(tiny_tokenizer, seed=0)).eval()
    _perturb(updater.model, seed=3, scale=0.2)
    pad = tiny_tokenizer.pad_token_id
    ours = compute_signal(updater.model, CONTEXTS_X, CONTEXTS_XO, RESPONSES, pad, teacher=updater.teacher)
    student = compute_signal(updater.model, CONTEXTS_X, CONTEXTS_X, RESPONSES, pad)
    frozen = compute_signal(initial, CONTEXTS_XO, CONTEXTS_XO, RESPONSES, pad)
    for a, s, f in zip(ours, student, frozen):
        assert a["logp_x"] == pytest.approx(s["logp_x"], abs=1e-6)
        assert a["logp_xo"] == pytest.approx(f["logp_xo"], abs=1e-5)
    live = compute_signal(updater.model, CONTEXTS_X, CONTEXTS_XO, RESPONSES, pad)
    assert live[0]["logp_xo"] != pytest.approx(ours[0]["logp_xo"], abs=1e-4)


@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_lora_adapted_lm_head_is_scored_under_the_teacher(tiny_tokenizer, mode):
    """LoRA on the LM head itself: the teacher's head calls (chunked, after the forward) switch adapters too."""
    peft = pytest.importorskip("peft")
    base = build_tiny_model(tiny_tokenizer, seed=0)
    reference = copy.deepcopy(base).eval()
    base.config.tie_word_embeddings = False
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                      init_lora_weights=False)).eval()
    teacher = Teacher(model, mode, ema_rate=0.3)
    expected_teacher = reference if mode == "frozen" else copy.deepcopy(model).eval()
    _perturb(model, seed=4)
    opts = ObjectiveOptions(loss_mode="full_distillation", teacher=mode, distillation_topk=5, logits_chunk_size=4)
    loss, stats = sdpo_loss(model, *_batches(tiny_tokenizer), opts, teacher=teacher)
    assert stats["fused_lm_head"] is False  # a LoRA-wrapped head: the checkpointed chunks
    torch.testing.assert_close(loss.detach(), full_logit_loss(model, expected_teacher, opts).detach(),
                               atol=1e-6, rtol=1e-5)


def test_ema_of_bf16_weights_keeps_the_small_steps(tiny_tokenizer):
    """r * (student - teacher) below a bf16 weight's rounding step still moves the teacher (a float32 average)."""
    model = build_tiny_model(tiny_tokenizer, seed=0).to(torch.bfloat16)
    teacher = Teacher(model, "ema", ema_rate=0.05)
    expected = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.01)  # a 1% step: 0.05 of it is below bf16's 2^-8 relative resolution
    for _ in range(20):  # 1 - 0.95^20 = 64% of the step: the bf16 weights move, one step alone would not
        teacher.update()
        for name, param in model.named_parameters():
            expected[name] = expected[name].lerp(param.detach().float(), 0.05)
    state = teacher.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert state[name].dtype == torch.float32
    torch.testing.assert_close(state[name], expected[name], atol=1e-7, rtol=1e-6)
    teacher_weight = dict(teacher.copy.named_parameters())[name]
    assert torch.equal(teacher_weight, expected[name].to(torch.bfloat16))  # the weights scored with follow
    before = dict(build_tiny_model(tiny_tokenizer, seed=0).to(torch.bfloat16).named_parameters())[name]
    assert not torch.equal(teacher_weight, before)
