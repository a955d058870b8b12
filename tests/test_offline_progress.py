"""offline_sdpo/progress.py: the offline trainers' log lines and training.png."""
from offline_sdpo.progress import PANELS, format_log, plot_training


def test_a_log_is_one_line_of_plain_numbers():
    logs = {"loss": 0.12942282855510712, "grad_norm": 32.11170959472656, "learning_rate": 2e-06, "epoch": 0.0833,
            "total_flos": 12.0, "completion_tokens": 28}
    assert format_log(logs, 1, 3) == "step 1/3  loss 0.1294  grad_norm 32.11  learning_rate 2e-06  completion_tokens 28"


def test_plot_draws_a_panel_per_group_present_and_nothing_without_rows(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "grad_norm": 3.0, "signal_mean": 0.1 * s, "signal_abs_mean": 0.5,
             "signal_std": 0.9, "logp_x": -2.0, "logp_xo": -1.9} for s in (1, 2, 3)]
    path = plot_training(rows, tmp_path / "training.png")
    assert path and (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    sdpo_width = Image.open(path).size[0]
    sft = plot_training([{k: r[k] for k in ("step", "loss", "grad_norm")} for r in rows], tmp_path / "sft.png")
    assert Image.open(sft).size[0] * len(PANELS) == sdpo_width * 2  # SFT: only the loss and gradient panels
    assert plot_training([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
