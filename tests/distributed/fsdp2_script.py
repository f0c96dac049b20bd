"""Run by tests/distributed/test_fsdp2.py under torchrun (2 CPU ranks, gloo): RagTrainer's loss under FSDP2.

Each rank builds the same tiny Llama and computes, in one process and without FSDP, the loss of two packed rows
and its gradients (the reference). Then it applies ``fully_shard`` (each decoder layer, optionally the lm_head
(with the tied embedding) as its own unit, then the root), runs ``ragkern.loss.causal_lm_loss`` with the fused
loss on row ``rank`` only, and compares the loss (summed over ranks) and every trainable gradient (gathered
with ``full_tensor``) with the reference. Two iterations, so state left over from the first one would show.
Rank 0 writes one JSON record per configuration to ``--out``.
"""

import argparse
import json
import os
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ragkern.loss as rk_loss
from ragkern import PackingCollator
from ragkern import lora as rk_lora
from tests.ragkern.tiny import random_examples, tiny_model

# Two packed rows of three examples each; answer-only targets (RAFT-like), so rows hold different numbers.
ROWS = ([9, 14, 6], [11, 5, 13])


def rows() -> list[dict]:
    examples = random_examples([n for row in ROWS for n in row], seed=5, answer_tail=4)
    collate = PackingCollator()
    return [collate(examples[:3]), collate(examples[3:])]


def build(cfg: dict) -> torch.nn.Module:
    """The same model on every rank: seeded init, LoRA B matrices random so that every LoRA grad is nonzero."""
    model = tiny_model("llama", seed=1, tie_word_embeddings=cfg["tied"]).train()
    if cfg["lora"]:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj"] + (["lm_head"] if cfg["lora_head"] else [])
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
        torch.manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        rk_lora.apply(model)  # the LoRA layers' fused forward (RagTrainer's default on CUDA)
    return model


def run_step(model, batch, denom, scale=1.0):
    """One fused-loss forward (with hits, as RagTrainer's token accuracy asks) and backward:
    ``(loss, token_loss, hits)``, detached."""
    loss, token_loss, hits = rk_loss.causal_lm_loss(
        model, dict(batch), num_items_in_batch=denom, fused=True, return_hits=True
    )
    (loss * scale).backward()
    return loss.detach(), token_loss.detach(), hits


def grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        assert g is not None, f"no gradient for {name}"
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in a)


def build_sharded(cfg: dict, mesh) -> torch.nn.Module:
    """``build(cfg)`` under ``fully_shard``: each decoder layer, the lm_head (with the tied embedding) as its own
    unit when ``cfg["head_unit"]``, then the root."""
    model = build(cfg)
    base = model.get_base_model() if cfg["lora"] else model
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    if cfg["head_unit"]:
        # An lm_head tied to the embedding must share its FSDP unit (one parameter, one group).
        fully_shard([base.model.embed_tokens, base.lm_head] if cfg["tied"] else base.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=cfg["root_reshard"])
    return model


def count_all_gathers(model, batch, denom, fused: bool) -> int:
    """FSDP2 all-gathers in one training step (forward and backward) of ``model`` on ``batch``."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module

    real, n = group_module.foreach_all_gather, []

    def counted(*args, **kwargs):
        n.append(1)
        return real(*args, **kwargs)

    loss, _ = rk_loss.causal_lm_loss(model, dict(batch), num_items_in_batch=denom, fused=fused)
    loss.backward()  # a first step of the same kind, so that each count starts from the state it leaves
    group_module.foreach_all_gather = counted
    try:
        loss, _ = rk_loss.causal_lm_loss(model, dict(batch), num_items_in_batch=denom, fused=fused)
        loss.backward()
    finally:
        group_module.foreach_all_gather = real
    model.zero_grad(set_to_none=True)
    return len(n)


def check(cfg: dict, mesh, rank: int, world: int) -> dict:
    batches = rows()
    denom = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    # Reference: one process, no FSDP, both rows (per-row losses over the count of both rows sum to the mean).
    ref_model = build(cfg)
    ref = [run_step(ref_model, b, denom) for b in batches]
    ref_loss = sum(loss for loss, _, _ in ref)
    ref_grads = grads(ref_model)
    with torch.no_grad():  # evaluation's call
        ref_eval = rk_loss.causal_lm_loss(ref_model, dict(batches[rank]), fused=True)[0]
    del ref_model

    # all-gathers of a plain step on a sharded model that never ran the fused loss
    plain_before = count_all_gathers(build_sharded(cfg, mesh), batches[rank], denom, fused=False)
    model = build_sharded(cfg, mesh)  # its first forward (FSDP2's lazy initialisation) is the fused loss's

    calls = []
    real = rk_loss.fused_linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    rk_loss.fused_linear_cross_entropy = counted
    rk_loss._logged.clear()
    record = {"losses": [], "grad_rel": [], "loss_rel": [], "token_rel": [], "hits_equal": []}
    try:
        for _ in range(2):  # twice: leftover FSDP state from the first iteration would break the second
            model.zero_grad(set_to_none=True)
            # FSDP averages gradients over ranks: scale the loss so the gradient is that of the global sum.
            loss, token_loss, hits = run_step(model, batches[rank], denom, scale=world)
            record["token_rel"].append(
                float((token_loss - ref[rank][1]).abs().max() / ref[rank][1].abs().max())
            )
            record["hits_equal"].append(bool(torch.equal(hits, ref[rank][2])))
            total = loss.clone()
            dist.all_reduce(total)
            got = grads(model)
            record["losses"].append([float(total), float(ref_loss)])
            record["loss_rel"].append(abs(float(total) - float(ref_loss)) / abs(float(ref_loss)))
            record["grad_rel"].append(max_rel(got, ref_grads))
        record["n_grads"] = len(got)
        with torch.no_grad():  # evaluation under FSDP2: no backward follows
            got_eval = rk_loss.causal_lm_loss(model, dict(batches[rank]), fused=True)[0]
        record["eval_rel"] = abs(float(got_eval) - float(ref_eval)) / abs(float(ref_eval))
        record["min_grad_scale"] = min(g.abs().max().item() for g in ref_grads.values())
    finally:
        rk_loss.fused_linear_cross_entropy = real
    # communication: the fused step all-gathers no more than the plain step (logits materialised)
    record["all_gathers"] = {
        "plain_before": plain_before,
        "plain": count_all_gathers(model, batches[rank], denom, fused=False),
        "fused": count_all_gathers(model, batches[rank], denom, fused=True),
    }
    record["fused_calls"] = len(calls)  # 2 training steps and 1 evaluation
    record["fallback"] = sorted(rk_loss._logged)
    return record


CONFIGS = {
    "lora": dict(lora=True, lora_head=False, tied=False, head_unit=False),
    "lora_head_unit": dict(lora=True, lora_head=False, tied=False, head_unit=True),
    "lora_on_lm_head": dict(lora=True, lora_head=True, tied=False, head_unit=False),
    "lora_on_lm_head_unit": dict(lora=True, lora_head=True, tied=False, head_unit=True),
    "full": dict(lora=False, lora_head=False, tied=False, head_unit=False),
    "full_head_unit": dict(lora=False, lora_head=False, tied=False, head_unit=True),
    "full_tied": dict(lora=False, lora_head=False, tied=True, head_unit=False),
    "full_tied_head_unit": dict(lora=False, lora_head=False, tied=True, head_unit=True),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="*", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, cfg in CONFIGS.items():
        if a.only and name not in a.only:
            continue
        # FSDP2's default (the root kept unsharded after forward), and the root resharded
        for root_reshard in (None, True):
            key = f"{name}/root_reshard={root_reshard}"
            try:
                results[key] = check({**cfg, "root_reshard": root_reshard}, mesh, rank, world)
            except Exception:
                results[key] = {"error": traceback.format_exc()[-3000:]}
            dist.barrier()
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
