"""Benchmark vLLM generation against HF generation on a CPU (the CPU build of vLLM, .venv-vllm), in one run.

Measured, one engine alive at a time:
  engine_start_s           vllm.LLM for the policy (SmolLM2-135M, fp32 as the HF policy, LoRA enabled)
  adapter_sync             per update: saving the adapter (VLLMPolicyGenerator.sync_weights) and the first
                           generation on the new adapter (the engine loads it) against a second
                           generation on the same adapter (`ratio first_generate_after_sync_vs_loaded`)
  interactions per minute  the real online loop (eval_online_sdpo.OnlineRun: rule user, one update per
                           batch of B interactions, no evaluation) with HF generation against
                           --use_vllm, for each B of --batch_sizes: one warm-up batch, --batches timed
                           ones, one last untimed (`ratio interactions_per_minute_vllm_vs_hf_B8`)
  dtype                    greedy replies of a bf16 engine identical to the fp32 HF policy's (of 8)
  hf_with_engine_alive     HF greedy generation of 8 replies without an engine, then with an idle engine
                           alive (`ratio hf_generate_engine_alive_vs_none`, above 1 = slower), with the
                           CPU the idle engine's processes burn meanwhile (`engine_idle_cpu_percent`)

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/bench_vllm.py [--batch_sizes 1,8] [--batches 2]
                                                                      [--max_new_tokens 48] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch_sizes", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--batches", type=int, default=2, help="timed batches per loop")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--syncs", type=int, default=3, help="adapter syncs timed")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def build_run(args, out_dir: Path, batch_size: int, use_vllm: bool):
    from eval_online_sdpo import OnlineRun, OnlineRunConfig
    from online_sdpo_updater_config import OnlineSDPOConfig

    sdpo = OnlineSDPOConfig(model=args.model, device="cpu", use_lora=True, lora_r=args.lora_r, use_vllm=use_vllm,
                            max_new_tokens=args.max_new_tokens, generation_batch_size=batch_size)
    run = OnlineRunConfig(train_jsonl=str(REPO / "data/samples/train.jsonl"),
                          val_jsonl=str(REPO / "data/samples/validation.jsonl"),
                          train_n=batch_size * (args.batches + 2), eval_n=0, eval_every=0, output_dir=str(out_dir),
                          interactions_per_update=batch_size)
    return OnlineRun(sdpo, run)


def loop_rate(args, work: Path, batch_size: int, use_vllm: bool) -> dict:
    """Interactions per minute of the real loop, the first and last batch untimed; the engine stopped after."""
    from bench_common import time_interactions

    from auxiliary.runtime.vllm_adapter import shutdown_engines

    run = build_run(args, work / f"{'vllm' if use_vllm else 'hf'}_B{batch_size}", batch_size, use_vllm)
    try:
        run.setup()
        walls = time_interactions(run)
        run.loop()
    finally:
        shutdown_engines()
        if run.folder is not None:
            run.folder.close()
    measured = walls[1:-1]
    return {"batch_walls_s": [round(w, 2) for w in walls],
            "interactions_per_minute": 60 * batch_size * len(measured) / sum(measured)}


def adapter_sync_and_engine_start(args) -> dict:
    """Engine start, then per update: save + hand over the adapter, and the generation that loads it."""
    import torch

    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from auxiliary.runtime.vllm_adapter import VLLMPolicyGenerator
    from online_sdpo_updater_config import OnlineSDPOConfig

    config = OnlineSDPOConfig(model=args.model, device="cpu", use_vllm=True, use_lora=True, lora_r=args.lora_r)
    from online_sdpo_updater import OnlineSDPOUpdater

    model, tokenizer, path = load_model_and_tokenizer(args.model, device="cpu")
    updater = OnlineSDPOUpdater(config, model, tokenizer)
    started = time.perf_counter()
    engine = VLLMPolicyGenerator(path, tokenizer, config, dtype=updater.model.dtype)
    start_s = time.perf_counter() - started
    conversations = [[{"role": "user", "content": "Name three colors."}]]
    saves, first, again = [], [], []
    try:
        for step in range(args.syncs):
            with torch.no_grad():  # a new adapter each time, as after an update
                for name, p in updater.model.named_parameters():
                    if "lora_B" in name:
                        p.add_(0.01)
            started = time.perf_counter()
            engine.sync_weights(updater.model, step)
            saves.append(time.perf_counter() - started)
            for walls in (first, again):
                started = time.perf_counter()
                engine.generate(conversations, 16, 0.0, 1.0)
                walls.append(time.perf_counter() - started)
    finally:
        engine.close()
    return {"engine_start_s": start_s, "adapter_save_s": saves, "first_generate_after_sync_s": first,
            "generate_loaded_adapter_s": again}


def engine_cpu_percent(seconds: float = 3.0) -> float:
    import psutil

    engines = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM")]
    for p in engines:
        p.cpu_percent(None)
    time.sleep(seconds)
    return sum(p.cpu_percent(None) for p in engines)


def hf_with_engine_alive(args) -> dict:
    """HF greedy generation (8 replies) with no engine, then with an idle engine alive, then after it stopped."""
    import torch

    from auxiliary.runtime.generation import generate_responses
    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from auxiliary.runtime.vllm_adapter import VLLMGenerator

    model, tokenizer, path = load_model_and_tokenizer(args.model, device="cpu")
    conversations = [[{"role": "user", "content": f"Write a sentence about the number {i}."}] for i in range(8)]

    def hf_time():
        started = time.perf_counter()
        generate_responses(model, tokenizer, conversations, args.max_new_tokens, 0.0, 1.0, 8, None, None)
        return time.perf_counter() - started

    hf_ids = [r.ids for r in generate_responses(model, tokenizer, conversations, args.max_new_tokens, 0.0, 1.0, 8)]
    result = {"torch_threads_before": torch.get_num_threads(), "hf_no_engine_s": hf_time()}
    # bf16: what vLLM's "auto" gave before the engine followed the policy's dtype
    engine = VLLMGenerator(path, tokenizer, seed=0, dtype="bf16")
    try:
        bf16_ids = [r.ids for r in engine.generate(conversations, args.max_new_tokens, 0.0, 1.0)]
        result["bf16_engine_replies_identical_to_hf_fp32"] = sum(a == b for a, b in zip(bf16_ids, hf_ids))
        time.sleep(2)  # past the engine's busy-wait after its last step
        result["engine_idle_cpu_percent"] = engine_cpu_percent()
        result["torch_threads_engine_alive"] = torch.get_num_threads()
        result["hf_engine_alive_s"] = hf_time()
    finally:
        engine.close()
    result["hf_after_engine_s"] = hf_time()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import platform

    import torch
    import vllm

    loads = os.getloadavg()
    results = {"vllm": vllm.__version__, "torch": torch.__version__, "cpus": os.cpu_count(),
               "machine": platform.machine(), "load_average_start": loads}
    work = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    results["hf_with_engine_alive"] = hf_with_engine_alive(args)
    print(json.dumps(results["hf_with_engine_alive"]), flush=True)
    results["adapter_sync"] = adapter_sync_and_engine_start(args)
    print(json.dumps(results["adapter_sync"]), flush=True)
    for batch_size in args.batch_sizes:
        for use_vllm in (False, True):
            name = f"{'vllm' if use_vllm else 'hf'}_B{batch_size}"
            results[name] = loop_rate(args, work, batch_size, use_vllm)
            print(name, json.dumps(results[name]), flush=True)
    results["load_average_end"] = os.getloadavg()

    sync = results["adapter_sync"]
    alive = results["hf_with_engine_alive"]
    print(f"\nvLLM {vllm.__version__} (CPU build), torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load {loads[0]:.1f} -> {results['load_average_end'][0]:.1f}")
    print(f"engine start {sync['engine_start_s']:.1f} s; adapter save {1000 * min(sync['adapter_save_s']):.0f} ms; "
          f"idle engine burns {alive['engine_idle_cpu_percent']:.0f}% CPU; bf16 engine: "
          f"{alive['bf16_engine_replies_identical_to_hf_fp32']} of 8 greedy replies identical to HF fp32")
    for batch_size in args.batch_sizes:
        hf, vl = results[f"hf_B{batch_size}"], results[f"vllm_B{batch_size}"]
        print(f"B={batch_size}: HF {hf['interactions_per_minute']:.1f}, vLLM {vl['interactions_per_minute']:.1f} "
              "interactions/min")
        print(f"ratio interactions_per_minute_vllm_vs_hf_B{batch_size} "
              f"{vl['interactions_per_minute'] / hf['interactions_per_minute']:.2f}")
    print(f"ratio first_generate_after_sync_vs_loaded "
          f"{sum(sync['first_generate_after_sync_s']) / sum(sync['generate_loaded_adapter_s']):.2f}")
    print(f"ratio hf_generate_engine_alive_vs_none {alive['hf_engine_alive_s'] / alive['hf_no_engine_s']:.2f}")
    print(f"ratio hf_generate_after_engine_vs_none {alive['hf_after_engine_s'] / alive['hf_no_engine_s']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
