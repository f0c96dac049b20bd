"""ragkern's GPU proof in one command, for a lent GPU machine with no network.

    bash bench/gpu/wheels.sh                          # here: the peer wheels into bench/gpu/wheels/
    python -m bench.gpu --output DIR [--quick]        # there (bench/gpu/run_on_device.sh does it)
    python -m bench.gpu --output DIR --dry-run        # anywhere: every part on the CPU, tiny shapes (CI)

It installs the wheels into a temporary folder, prints the device, driver, versions and two measured ceilings
(device-to-device copy, 8192^3 bf16 matmul), warms the Triton and Inductor caches in parallel, then runs five
parts, each within a time budget and each case guarded (a failure is recorded with its traceback, the next case
runs):

    correctness  the kernels on the device in fp32 / fp16 / bf16 against float64; packing invariants through a
                 RagTrainer step in bf16 autocast                                  (bench/gpu/correctness.py)
    attention    varlen attention fwd+bwd on a 16k-token RAG row vs SDPA, FlexAttention, torch varlen
    flce         fused linear cross-entropy vs Liger-Kernel, Cut Cross-Entropy, plain torch
    lora         LoRA linear vs peft's layer                                       (bench/gpu/micro.py)
    e2e          RagTrainer's ablations vs Trainer + padding, Trainer + flattening (sdpa, FlexAttention, Liger),
                 TRL SFTTrainer padding-free + Liger, LoRA rows, on Qwen2.5-0.5B / Llama-3.2-1B shapes: the same
                 examples and tokens per step, 3 rotating repeats, MFU, memory, longest row (bench/gpu/e2e.py)

Everything lands in DIR/gpu_bench.json (rewritten after every case, so a killed run keeps what it measured);
the last thing printed is a short table, also in DIR/table.txt.
"""
