"""GPU check: online updates at real Qwen3 shapes, our objective against the straightforward path and TRL's.

Builds random-initialised models with the Qwen3-0.6B, Qwen3-1.7B and Qwen3-8B shapes from a
Qwen3Config (no download, no tokenizer: random token ids). Setups: 0.6B and 1.7B fully
fine-tuned; 8B fully fine-tuned and with LoRA r 256 on every linear layer of the backbone
(alpha 512, head frozen). For each setup, loss mode and path it runs `--warmup` untimed and
`--updates` timed online updates (per setup: 20 for the small models, 4 for 8B, so that the
whole check stays under 5 minutes on one H100/H200): the loss of the path + backward +
grad-norm clip 1.0 + AdamW step (lr 5e-6, fused on CUDA), in bf16, as the online updater does.
Paths: `ours` (sdpo_loss, fused LM head), `checkpointed` (sdpo_loss with the fused head off:
the other head), `straightforward` (bench_common's yardstick) and `trl` (bench/peers.py: TRL's
trainer forwards and its own loss functions). Prints per path: update time (median), response
tokens trained per second, and peak GPU memory (torch.cuda.max_memory_allocated over the timed
updates: the total, and the part above what was allocated before them: weights and optimizer
state excluded). Ratios last, per setup (<setup> = model, or model_lora<r>):

    ratio update_time_<mode>_<setup> VALUE      ours / straightforward
    ratio update_time_<mode>_<setup>_fused_vs_checkpointed VALUE   ours / ours with the fused head off
    ratio peak_memory_<mode>_<setup> VALUE      (peak above the pre-update allocation)
    ratio peak_memory_total_<mode>_<setup> VALUE
    ratio update_time_vs_trl_<mode>_<setup> VALUE, ratio peak_memory_vs_trl_<mode>_<setup> VALUE

An out-of-memory case is reported as OOM and the check goes on. `--device cpu --tiny` is the
CPU smoke run (a tiny Qwen3, float32; fully fine-tuned and LoRA r 8) used by the tests. Before
anything is timed, every path must agree on loss (and ours on gradients) with the yardstick on
a small fp32 model on the same device; in bf16 the paths' losses are recorded, not compared
(TRL keeps the logits in the model's dtype).

    bash bench/gpu_check.sh                       # on the GPU machine
    python bench/gpu_check.py --device cpu --tiny # anywhere
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from bench_common import (
    LOSS_FUNCTIONS, LOSS_MODES, PATHS, QWEN3_VOCAB, PeakMemory, check_equivalence, environment_lines, format_table,
    median, qwen3_model,
    random_batches, synchronize,
)
from peers import check_peers, trl_available, trl_loss

from sdpo_objective import ObjectiveOptions

# Shapes of the released configs (hidden, layers, intermediate, heads, kv heads, head dim; tied embeddings).
QWEN3_SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, num_layers=28, intermediate_size=3072, num_heads=16, num_kv_heads=8,
                       head_dim=128, tie=True, vocab_size=QWEN3_VOCAB),
    "qwen3-1.7b": dict(hidden_size=2048, num_layers=28, intermediate_size=6144, num_heads=16, num_kv_heads=8,
                       head_dim=128, tie=True, vocab_size=QWEN3_VOCAB),
    "qwen3-8b": dict(hidden_size=4096, num_layers=36, intermediate_size=12288, num_heads=32, num_kv_heads=8,
                     head_dim=128, tie=False, vocab_size=QWEN3_VOCAB),
}
# (model, LoRA rank or 0 for full fine-tuning, timed updates): the default list of the check.
SETUPS = [("qwen3-0.6b", 0, 20), ("qwen3-1.7b", 0, 20), ("qwen3-8b", 0, 4), ("qwen3-8b", 256, 4)]
TINY_SETUPS = [("tiny", 0, 2), ("tiny", 8, 2)]
TINY_SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                 tie=True, vocab_size=4096),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model, short sequences, 2 updates (smoke test)")
    parser.add_argument("--models", default=None,
                        help=f"comma list from {', '.join(QWEN3_SHAPES)} (default: every setup of SETUPS)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--response-length", type=int, default=1024)
    parser.add_argument("--updates", type=int, default=None, help="timed updates per path (default: per setup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=ObjectiveOptions.logits_chunk_size)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for --device cpu (0 = torch's choice)")
    parser.add_argument("--out", default=None, help="write all numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch_size, args.context_length, args.response_length = 2, 32, 48
        args.warmup = 1
    return args


def setup_name(model: str, lora_rank: int) -> str:
    return f"{model}_lora{lora_rank}" if lora_rank else model


def with_lora(model, rank: int):
    """LoRA r `rank` (alpha 2r, no dropout) on every linear layer but the head, as the online updater's `all-linear`."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def run_path(model, path, mode, batch_x, batch_xo, args, setup_updates: int) -> dict:
    """`warmup` + `updates` online updates of one path; returns times and memory, or the OOM error."""
    device = args.device
    opts = ObjectiveOptions(loss_mode=mode, logits_chunk_size=args.chunk_size)
    loss_fn = trl_loss if path == "trl" else LOSS_FUNCTIONS[path]
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW on CUDA: one kernel over all tensors, without the foreach path's parameter-sized temporaries
    optimizer = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.0, fused=torch.device(device).type == "cuda")

    def update():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch_x, batch_xo, opts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    result = {"times": [], "error": None}
    updates = args.updates or setup_updates  # --updates overrides the setup's own count
    try:
        for _ in range(args.warmup):  # also creates the AdamW state, so it is not counted as update memory
            update()
        synchronize(device)
        on_cuda = torch.device(device).type == "cuda"
        before = torch.cuda.memory_allocated() if on_cuda else 0
        # CUDA: the peak over the timed updates themselves (no overhead). CPU: the memory meter is a
        # profiler, so the timed updates run bare and one more update is measured afterwards.
        with (PeakMemory(device) if on_cuda else _Nothing()) as meter:
            for _ in range(updates):
                synchronize(device)
                start = time.perf_counter()
                loss = update()
                synchronize(device)
                result["times"].append(time.perf_counter() - start)
        if not on_cuda:
            with PeakMemory(device) as meter:
                update()
        result["peak_bytes"] = meter.peak
        result["peak_total_bytes"] = meter.peak + before
        result["final_loss"] = float(loss.detach())
    except torch.OutOfMemoryError as error:
        result["error"] = "OOM"
        result["message"] = str(error).split("\n")[0][:200]
    finally:
        optimizer.zero_grad(set_to_none=True)
        optimizer = None  # release the state before emptying the cache
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return result


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def ratio_of(results: dict, path: str, other: str, key: str) -> float:
    a, b = results.get(path), results.get(other)
    if a is None or b is None or a["error"] or b["error"]:
        return float("nan")
    if key == "times":
        return median(a["times"]) / median(b["times"])
    return a[key] / max(1, b[key])


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; for a CPU smoke run use --device cpu --tiny")
    shapes = TINY_SHAPES if args.tiny else QWEN3_SHAPES
    setups = TINY_SETUPS if args.tiny else SETUPS
    if args.models:
        names = [n.strip() for n in args.models.split(",")]
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(shapes)}")
        setups = [setup for setup in setups if setup[0] in names]
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    paths = PATHS + (("trl",) if trl_available() else ())
    for line in environment_lines(args.device):
        print(line, flush=True)
    print(f"batch {args.batch_size} x (context {args.context_length} + response {args.response_length}); "
          f"timed updates per setup {[args.updates or n for _, _, n in setups]} after {args.warmup} warm-up; "
          f"{dtype}; chunk size {args.chunk_size}; paths {', '.join(paths)}", flush=True)

    torch.backends.cuda.matmul.allow_tf32 = False  # the equivalence check compares fp32 numbers
    for mode, (loss_ours, loss_straight, grad_diff) in check_equivalence(args.device).items():
        print(f"equivalence {mode} (fp32, small model): loss {loss_ours:.6f} vs {loss_straight:.6f}, "
              f"max relative gradient difference {grad_diff:.1e}", flush=True)
    for mode, losses in check_peers(args.device).items():
        print(f"equivalence {mode} (fp32, small model): " + ", ".join(f"{p} {v:.6f}" for p, v in losses.items()),
              flush=True)

    started = time.time()
    rows, ratio_lines, records = [], [], []
    for name, lora_rank, updates in setups:
        setup = setup_name(name, lora_rank)
        shape = dict(shapes[name])
        vocab = shape["vocab_size"]
        try:
            model = qwen3_model(**shape, seed=0, device=args.device, dtype=dtype)
            if lora_rank:
                model = with_lora(model, lora_rank)
        except torch.OutOfMemoryError:
            print(f"{setup}: OOM while building the model, skipped", flush=True)
            continue
        batch_x, batch_xo = random_batches(args.batch_size, args.context_length, args.response_length, vocab,
                                           seed=1, device=args.device)
        tokens = int(batch_x.response_mask.sum())
        parameters = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{setup}: {parameters / 1e9:.2f} B parameters, {trainable / 1e6:,.1f} M trained", flush=True)
        for mode in LOSS_MODES:
            results = {}
            for path in paths:
                results[path] = run_path(model, path, mode, batch_x, batch_xo, args, updates)
                r = results[path]
                time_s = median(r["times"]) if not r["error"] else float("nan")
                rows.append([setup, mode, path, r["error"] or f"{time_s:.3f}",
                             "-" if r["error"] else f"{tokens / time_s:,.0f}",
                             "-" if r["error"] else f"{r['peak_bytes'] / 2**30:.2f}",
                             "-" if r["error"] else f"{r['peak_total_bytes'] / 2**30:.2f}"])
                records.append({"setup": setup, "model": name, "lora_rank": lora_rank, "parameters": parameters,
                                "trained_parameters": trainable, "mode": mode, "path": path,
                                "tokens_per_update": tokens, **r})
                print(f"{setup} {mode} {path}: " + ("OOM" if r["error"] else
                      f"{time_s:.3f} s/update, peak {r['peak_bytes'] / 2**30:.2f} GiB"), flush=True)
            for metric, key in (("update_time", "times"), ("peak_memory", "peak_bytes"),
                                ("peak_memory_total", "peak_total_bytes")):
                ratio_lines.append(
                    f"ratio {metric}_{mode}_{setup} {ratio_of(results, 'ours', 'straightforward', key):.4f}")
            ratio_lines.append(f"ratio update_time_{mode}_{setup}_fused_vs_checkpointed "
                               f"{ratio_of(results, 'ours', 'checkpointed', 'times'):.4f}")
            if "trl" in results:
                for metric, key in (("update_time", "times"), ("peak_memory", "peak_bytes")):
                    ratio_lines.append(f"ratio {metric}_vs_trl_{mode}_{setup} "
                                       f"{ratio_of(results, 'ours', 'trl', key):.4f}")
        del model, batch_x, batch_xo
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(format_table(["setup", "mode", "path", "s/update", "resp tok/s", "peak GiB", "total GiB"], rows))
    print(f"\nelapsed {time.time() - started:.0f} s")
    if args.out:
        from auxiliary.runtime.io_utils import atomic_write_json

        atomic_write_json(args.out, {"environment": environment_lines(args.device), "args": vars(args),
                                     "records": records,
                                     "ratios": {l.split()[1]: float(l.split()[2]) for l in ratio_lines}})
    for line in ratio_lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
