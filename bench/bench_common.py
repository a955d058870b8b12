"""Shared pieces of the update benchmarks: the yardstick path, random batches, models, timers, memory meters.

The "straightforward path" here is the yardstick our objective is compared against. It is
written the obvious way on purpose, so that the equivalence check in the benchmarks is a real
cross-check of the chunked, fused paths:

- two separate full forwards: x+y with gradient, xo+y without (teacher in eval mode),
- float32 logits over ALL positions, then the response positions sliced out,
- the loss on those full logits by sdpo_objective's public reference (`simple_signal_loss`,
  `topk_divergence` averaged over tokens: full-vocabulary log-softmax at every response
  position), with default options.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from sdpo_objective import (ObjectiveOptions, resolve_chunk_size, ScoringBatch, build_scoring_batch, sdpo_loss,
                            simple_signal_loss,
                            topk_divergence)

PATHS = ("ours", "checkpointed", "straightforward")
LOSS_MODES = ("simple_signal", "full_distillation")
QWEN3_VOCAB = 151_936


# --------------------------------------------------------------------------- the yardstick

def _full_response_logits(model, batch: ScoringBatch) -> torch.Tensor:
    """[B, R, V] float32 logits at the positions predicting y, from logits over every position.

    The model's head runs over all positions (context included) and the result is cast to
    float32, then the response slice is taken: what "score the whole sequence, then pick y" costs.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits.float()
    width_c, width_r = batch.context_width, batch.response_ids.shape[1]
    return logits[:, width_c - 1: width_c + width_r - 1]


def student_and_teacher_logits(model, batch_x: ScoringBatch, batch_xo: ScoringBatch, opts: ObjectiveOptions):
    """Two full forwards: the teacher (xo + y, eval mode, no gradient), then the student (x + y)."""
    if opts.ignore_first_k or opts.center_signal or opts.signal_clip or opts.negate_signal or opts.beta:
        raise ValueError("the full-logit paths implement the default signal options only")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        teacher_logits = _full_response_logits(model, batch_xo)
    model.train(was_training)
    return _full_response_logits(model, batch_x), teacher_logits


def straightforward_loss(model, batch_x: ScoringBatch, batch_xo: ScoringBatch, opts: ObjectiveOptions) -> torch.Tensor:
    """The same loss as sdpo_loss with default shaping options, computed the obvious way."""
    student_logits, teacher_logits = student_and_teacher_logits(model, batch_x, batch_xo, opts)
    mask = batch_x.response_mask
    if opts.loss_mode == "simple_signal":
        return simple_signal_loss(student_logits, teacher_logits, batch_x.response_ids, mask)
    kl = topk_divergence(student_logits, teacher_logits, opts.distillation_topk, opts.distillation_tail)  # [B, R]
    mask = mask.float()
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def ours_loss(model, batch_x, batch_xo, opts) -> torch.Tensor:
    """sdpo_loss as shipped: the fused LM head (its gradient formed in the forward)."""
    return sdpo_loss(model, batch_x, batch_xo, dataclasses.replace(opts, fused_lm_head=True))[0]


def checkpointed_loss(model, batch_x, batch_xo, opts) -> torch.Tensor:
    """sdpo_loss with the fused head off: chunks under activation checkpointing (the path before it)."""
    return sdpo_loss(model, batch_x, batch_xo, dataclasses.replace(opts, fused_lm_head=False))[0]


LOSS_FUNCTIONS = {"ours": ours_loss, "checkpointed": checkpointed_loss, "straightforward": straightforward_loss}


def floor_loss(model, batch_x: ScoringBatch, batch_xo: ScoringBatch, opts: ObjectiveOptions) -> torch.Tensor:
    """The floor: the work any exact update must do, and nothing else; its "loss" is a surrogate.

    The backbone (decoder without the head) forward with gradient over x+y, a no-grad forward
    over xo+y (eval mode), and the 4 LM-head products per response row that an exact method needs:
    student logits h W^T, teacher logits h_o W^T, and the two backward products G W and G^T h,
    in chunks of `opts.logits_chunk_size` rows. G stands in for dL/dlogits (the teacher logits
    are reused: no softmax, top-k or loss is formed). The returned scalar,
    sum(hidden * G W) + sum(W * G^T h), has exactly those gradients, so its backward is the
    backbone's backward plus two elementwise products.
    """
    decoder, weight = model.get_decoder(), model.get_output_embeddings().weight

    def response_hidden(batch):
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, use_cache=False).last_hidden_state
        width_c, width_r = batch.context_width, batch.response_ids.shape[1]
        return hidden[:, width_c - 1: width_c + width_r - 1][batch.response_mask]

    was_training = model.training
    model.eval()
    with torch.no_grad():
        hidden_t = response_hidden(batch_xo)
    model.train(was_training)
    hidden_s = response_hidden(batch_x)
    grad_hidden = torch.empty_like(hidden_s)
    grad_weight = torch.zeros_like(weight)
    size = resolve_chunk_size(opts.logits_chunk_size, weight.device)
    # The products written into two [chunk, V] buffers reused by every chunk, as the fused head does: a
    # fresh [chunk, V] tensor per product is page-faulted in anew on CPU and would raise the floor.
    logits = weight.new_empty((min(size, max(1, hidden_s.shape[0])), weight.shape[0]))
    stand_in = torch.empty_like(logits)
    with torch.no_grad():
        for start in range(0, hidden_s.shape[0], size):
            rows = hidden_s[start:start + size].detach()
            n = rows.shape[0]
            torch.mm(rows, weight.t(), out=logits[:n])  # the student's logits: computed by every method, unused here
            torch.mm(hidden_t[start:start + size], weight.t(), out=stand_in[:n])
            torch.mm(stand_in[:n], weight, out=grad_hidden[start:start + size])
            grad_weight.addmm_(stand_in[:n].t(), rows)
    return (hidden_s * grad_hidden).sum() + (weight * grad_weight).sum()


# --------------------------------------------------------------------------- models and batches

def qwen3_model(vocab_size: int, hidden_size: int, num_layers: int, intermediate_size: int | None = None,
                num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None, tie: bool = False,
                seed: int = 0, device="cpu", dtype=torch.float32):
    """A random-initialised Qwen3 built from a config (nothing downloaded), created directly on `device`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        intermediate_size=intermediate_size or 3 * hidden_size, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=40_960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, pad_token_id=0, bos_token_id=None, eos_token_id=1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).train()


def spread_logits(model, std: float = 0.5, seed: int = 2):
    """Redraw the LM head with a large spread: peaked next-token distributions, as a trained model has.

    At the default initialisation (std 0.02) every distribution is nearly uniform, so student and
    teacher agree to ~1e-7 in KL and top-k membership is decided by rounding: no test of a loss.
    """
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight.normal_(0.0, std, generator=torch.Generator(device=weight.device).manual_seed(seed))
    return model


def random_batches(batch_size: int, context_length: int, response_length: int, vocab_size: int,
                   hindsight_tokens: int = 64, ragged: bool = False, seed: int = 0, device="cpu"):
    """(batch_x, batch_xo) of random token ids; xo = x plus `hindsight_tokens` of follow-up block.

    ragged=True gives every row its own context and response length (padding on both sides).
    """
    generator = torch.Generator().manual_seed(seed)

    def ids(length):
        return torch.randint(2, vocab_size, (length,), generator=generator).tolist()

    contexts_x, contexts_xo, responses = [], [], []
    for row in range(batch_size):
        shrink_c = (row * 7) % max(1, context_length // 2) if ragged else 0
        shrink_r = (row * 5) % max(1, response_length // 2) if ragged else 0
        context = ids(context_length - shrink_c)
        contexts_x.append(context)
        contexts_xo.append(context + ids(hindsight_tokens))
        responses.append(ids(response_length - shrink_r))
    return (build_scoring_batch(contexts_x, responses, pad_token_id=0, device=device),
            build_scoring_batch(contexts_xo, responses, pad_token_id=0, device=device))


# --------------------------------------------------------------------------- equivalence

def check_equivalence(device="cpu", vocab_size: int = 512, rtol: float = 1e-4) -> dict:
    """Every path must give the same loss and gradients as the yardstick (fp32, ragged batch, several chunks).

    Returns {mode: (loss_ours, loss_straightforward, max relative gradient difference)}; raises
    AssertionError when they disagree, so no timing is ever reported for paths that differ.
    """
    model = spread_logits(qwen3_model(vocab_size, hidden_size=64, num_layers=2, seed=1, device=device,
                                      dtype=torch.float32))
    batch_x, batch_xo = random_batches(3, 24, 40, vocab_size, hindsight_tokens=9, ragged=True, seed=3, device=device)
    report = {}
    for mode in LOSS_MODES:
        opts = ObjectiveOptions(loss_mode=mode, logits_chunk_size=16)
        results = {}
        for path, loss_fn in LOSS_FUNCTIONS.items():
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch_x, batch_xo, opts)
            loss.backward()
            grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
            results[path] = (float(loss.detach()), grads)
        loss_b, grads_b = results["straightforward"]
        worst = 0.0
        for path, (loss_a, grads_a) in results.items():
            assert abs(loss_a - loss_b) <= rtol * max(abs(loss_b), 1e-6), f"{mode}: loss {loss_a} ({path}) vs {loss_b}"
            assert grads_a.keys() == grads_b.keys(), f"{mode}: different parameters received gradients ({path})"
            for name in grads_a:
                scale = float(grads_b[name].abs().max().clamp(min=1e-8))
                diff = float((grads_a[name] - grads_b[name]).abs().max()) / scale
                worst = max(worst, diff)
                assert diff <= 1e-3, f"{mode}: gradient of {name} differs by {diff:.2e} ({path}, relative to its max)"
        report[mode] = (results["ours"][0], loss_b, worst)
    model.zero_grad(set_to_none=True)
    return report


# --------------------------------------------------------------------------- measuring

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory allocated for tensors by the code inside the `with` block, in bytes (`.peak`).

    CUDA: torch.cuda.max_memory_allocated() minus the allocation at entry.
    CPU: the same quantity from the allocator itself: the block runs under torch.profiler with
    profile_memory=True, which records every allocation and free of PyTorch's CPU allocator
    (autograd buffers and kernel workspaces included); the peak of the running sum is the peak.
    This does not depend on how glibc returns memory to the OS, unlike RSS. Frees of blocks
    allocated before entry are not reported by the profiler, so the number can only err high.
    The profiler slows the block down: never time a block measured this way on CPU.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._quiet = _QuietStderr().__enter__()  # kineto prints start/stop lines on fd 2
            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = max(0, torch.cuda.max_memory_allocated() - self._base)
            return False
        try:
            self._profile.__exit__(*exc)
        finally:
            self._quiet.__exit__(*exc)
        if exc[0] is None:
            from torch.autograd import DeviceType

            events = [e for e in self._profile.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
            running = peak = 0
            for event in sorted(events, key=lambda e: e.start_ns()):
                running += event.nbytes()  # negative for a free
                peak = max(peak, running)
            self.peak = peak
        return False


class _QuietStderr:
    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False


class RssPeak:
    """Peak growth of the resident set size inside the `with` block, in bytes (`.peak`; None if unknown).

    glibc's free lists are trimmed on entry and the kernel's high-water mark is reset by writing
    "5" to /proc/self/clear_refs. Counts what the OS had to supply (allocator slack included);
    costs nothing, so it can wrap timed runs. Linux only.
    """

    def __enter__(self):
        self.peak = None
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            self._base = _status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._ok = True
        except (OSError, RuntimeError):
            self._ok = False
        return self

    def __exit__(self, *exc):
        if self._ok:
            self.peak = max(0, _status_bytes("VmHWM") - self._base)
        return False


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def parse_ratio_lines(stdout: str) -> dict[str, float]:
    """The final block of `ratio NAME VALUE` lines a benchmark prints: names -> floats (nothing may follow it)."""
    lines = stdout.strip().splitlines()
    ratios = {}
    while lines and lines[-1].startswith("ratio "):
        _, name, value = lines.pop().split()
        ratios[name] = float(value)
    return ratios


def time_interactions(run) -> list[float]:
    """Wrap run.interact_batch (an OnlineRun's) so that each call's wall seconds are appended to the list returned."""
    walls, interact = [], run.interact_batch

    def timed(*batch):
        started = time.perf_counter()
        try:
            return interact(*batch)
        finally:
            walls.append(time.perf_counter() - started)

    run.interact_batch = timed
    return walls


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


def environment_lines(device) -> list[str]:
    import platform

    import transformers

    lines = [f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}",
             f"device {device}  threads {torch.get_num_threads()}"]
    if torch.device(device).type == "cuda":
        lines.append(f"gpu {torch.cuda.get_device_name()}  cuda {torch.version.cuda}  "
                     f"memory {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
    else:
        lines.append(f"cpu {_cpu_model()}  cores {os.cpu_count()}")
    return lines


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
