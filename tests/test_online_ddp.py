"""The online loop on two CPU processes (torchrun, gloo): DDP's all-reduced gradient is the gradient of the
loss on the union of the processes' interactions, and only the main process writes the run's files.

Run as a script under torchrun, this file is the worker of the first test.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Replies of different lengths: a per-process token mean averaged over processes would weigh them wrongly.
REPLIES = ["Short answer.", "A much longer answer that goes on for quite a few more tokens than the other one does."]
PROMPTS = ["Tell me about rivers.", "Explain why the sky is blue."]
FOLLOWUPS = ["Shorter, please.", "Thanks, that was clear."]
LOSS_MODES = ("full_distillation", "simple_signal")


def updater_for(model_dir: str, loss_mode: str):
    from online_sdpo_updater import OnlineSDPOUpdater
    from online_sdpo_updater_config import OnlineSDPOConfig

    # Adam's first step is lr * g / (|g| + eps): with eps 1 it moves each weight by about its gradient, so equal
    # weights mean equal gradients (with a small eps, gradients near eps would magnify rounding differences).
    return OnlineSDPOUpdater(OnlineSDPOConfig(model=model_dir, lr=1.0, adam_epsilon=1.0, loss_mode=loss_mode,
                                              device="cpu", seed=3, max_grad_norm=0.0))


def interactions(updater):
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    return conversations, [updater.response_ids_from_text(r) for r in REPLIES], FOLLOWUPS


def worker(model_dir: str, out: str) -> None:
    """Each of 2 processes updates once on its own interaction; the main process saves the weights."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for loss_mode in LOSS_MODES:
        updater = updater_for(model_dir, loss_mode)
        conversations, ids, followups = interactions(updater)
        updater.distribute()
        updater.train_batch(conversations[rank::world], ids[rank::world], followups[rank::world])
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in updater.model.state_dict().items()},
                       Path(out) / f"{loss_mode}.pt")
        dist.barrier()
    dist.destroy_process_group()


def torchrun(args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # two extra Python processes
def test_two_processes_update_like_one_process_on_the_union_batch(tiny_model_dir, tmp_path):
    done = torchrun([Path(__file__), str(tiny_model_dir), str(tmp_path)])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for loss_mode in LOSS_MODES:
        single = updater_for(str(tiny_model_dir), loss_mode)
        initial = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
        single.train_batch(*interactions(single))
        ddp = torch.load(tmp_path / f"{loss_mode}.pt")
        assert any(not torch.equal(initial[k], ddp[k]) for k in ddp), loss_mode  # the update did something
        for key, value in single.model.state_dict().items():
            torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{loss_mode} {key}: {m}")


def torchrun_online(data, out, train_n, *extra):
    return torchrun([REPO / "eval_online_sdpo.py", "--model", data / "model", "--train_jsonl", data / "train.jsonl",
                     "--val_jsonl", data / "val.jsonl", "--style", "concise", "--train_n", train_n, "--eval_n", "2",
                     "--eval_every", "2", "--max_new_tokens", "6", "--eval_max_new_tokens", "6", "--seed", "5",
                     "--loss_mode", "simple_signal", "--interactions_per_update", "2", "--save_checkpoints",
                     "--output_dir", out, *extra])


@pytest.mark.slow  # two torchrun runs
def test_eval_online_sdpo_under_torchrun_writes_once_and_resumes_exactly(tiny_model_dir, tmp_path):
    from reliability_helpers import read_jsonl, without_timings

    data = tmp_path / "data"
    data.mkdir()
    (data / "model").symlink_to(tiny_model_dir)
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n"
                                              for i in range(4)))
    (data / "val.jsonl").write_text("".join(json.dumps({"prompt": f"Explain idea {i}."}) + "\n" for i in range(2)))
    out = tmp_path / "run"
    done = torchrun_online(data, out, 4)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["feedback"]["update"] for r in rows] == [1, 1, 2, 2]
    # each process reports its own share's loss; the gradient norm is of the all-reduced gradient: shared
    assert rows[0]["feedback"]["grad_norm"] == pytest.approx(rows[1]["feedback"]["grad_norm"], rel=1e-6)
    train = [r for r in read_jsonl(out / "completions.jsonl") if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and len({r["prompt"] for r in train}) == 4
    history = json.loads((out / "eval_history.json").read_text())
    assert sorted({r["step"] for r in history}) == [0, 2, 4]  # evaluated once (by the main process)
    assert json.loads((out / "checkpoints/latest.json").read_text())["step"] == 4
    assert (out / "summary.json").is_file()

    # stopped after the first update (killed in step 3: the records of steps 1-2 and the checkpoint of step 2, nothing
    # after; a copy of the run's folder cut there, as the same run stopped there writes it up to there), then resumed
    # on both processes from the main process's checkpoint
    part = tmp_path / "part"
    shutil.copytree(out, part)
    marker = part / "checkpoints" / "latest.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "step": 2}))
    assert (part / "checkpoints" / "feedback" / "step_000002").is_dir()
    shutil.rmtree(part / "checkpoints" / "feedback" / "step_000004")
    for name in ("metrics.jsonl", "completions.jsonl"):
        (part / name).write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(part / name) if r["step"] <= 2))
    (part / "eval_history.json").write_text(json.dumps([r for r in history if r["step"] <= 2]))
    (part / "summary.json").unlink()
    resumed = torchrun_online(data, part, 4, "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert without_timings(read_jsonl(part / "metrics.jsonl")) == without_timings(rows)
    assert read_jsonl(part / "completions.jsonl") == read_jsonl(out / "completions.jsonl")


@pytest.mark.parametrize("flags, expected", [(["--interactions_per_update", "1"], "a multiple of the 2 processes"),
                                              (["--interactions_per_update", "2", "--beta", "0.1"], "--beta 0")])
def test_processes_that_cannot_share_a_batch_are_refused_in_one_line(flags, expected, tiny_model_dir, tmp_path,
                                                                     monkeypatch, capsys):
    import eval_online_sdpo

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = eval_online_sdpo.main(["--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"),
                                  "--eval_every", "2", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("eval_online_sdpo.py: error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
