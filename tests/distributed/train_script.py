"""Run by tests/distributed/test_distributed.py under torchrun (or alone): a tiny RagTrainer job.

Writes the final parameters (rank 0) and the example indices each rank fetched to --out.
"""

import argparse
import json
import os

import torch
from transformers import TrainerCallback

from ragkern import RagTrainer, RagTrainingArguments
from ragkern.data import EncodedDataset, RecordError
from tests.ragkern.tiny import random_examples, tiny_model

LENGTHS = [20, 17, 9, 30, 12, 25, 8, 14, 22, 5, 28, 11, 19, 7, 26, 16, 3, 21]  # 18 examples, max_length 32


class LoggedDataset(EncodedDataset):
    """Records which indices this process fetched; raises on `fail_index` (a bad record one rank meets)."""

    def __init__(self, examples, fail_index=None):
        super().__init__(examples)
        self.fetched, self.fail_index = [], fail_index

    def __getitem__(self, i):
        if i == self.fail_index:
            raise RecordError(f"example {i} is corrupt (seen only by rank {os.environ.get('RANK', 0)})")
        self.fetched.append(i)
        return super().__getitem__(i)


class StepGrads(TrainerCallback):
    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms.append(
            sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--fail-index", type=int, default=None)
    p.add_argument("--fsdp", action="store_true")
    a = p.parse_args()

    rank = int(os.environ.get("RANK", 0))
    os.makedirs(a.out, exist_ok=True)
    dataset = LoggedDataset(random_examples(LENGTHS, answer_tail=4, seed=11), fail_index=a.fail_index)
    extra = {}
    if a.fsdp:
        extra = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
    args = RagTrainingArguments(
        output_dir=a.out,
        max_length=32,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=a.accum,
        max_steps=a.max_steps,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        seed=3,
        report_to=[],
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        **extra,
    )
    model = tiny_model("llama", seed=0 if a.resume is None else 99)
    if rank == 0:
        torch.save(
            {k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(a.out, "initial.pt")
        )
    trainer = RagTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=a.resume)
    wrapped = trainer.model_wrapped
    sharded = any(type(p).__name__ == "DTensor" for p in wrapped.parameters())  # FSDP2 shards into DTensors
    with open(os.path.join(a.out, f"seen-rank{rank}.json"), "w") as f:
        json.dump({"fetched": dataset.fetched, "wrapper": type(wrapped).__name__, "sharded": sharded}, f)
    state = trainer.accelerator.get_state_dict(trainer.model)
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, os.path.join(a.out, "params.pt"))
    # Tear the process group down before exit: a gloo group left to the interpreter's shutdown can abort
    # the process ("terminate called without an active exception") after all the work is done.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
