"""RagTrainer on SmolLM2 with LoRA under bf16 autocast (CPU): three steps on one repeated batch."""

import copy
import math

from peft import LoraConfig, get_peft_model

from ragkern import RagTrainer, RagTrainingArguments
from ragkern.data.counterfactual import counterfactual_records


def test_three_lora_steps_under_bf16_autocast_lower_the_loss(smollm2_model, smollm2_tokenizer, tmp_path):
    model = get_peft_model(
        copy.deepcopy(smollm2_model),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )
    # Two short records: one packed row of 512 tokens holds both, so every step trains the same batch.
    records = counterfactual_records(2, seed=11, num_passages=1, facts_per_passage=2)
    args = RagTrainingArguments(
        output_dir=str(tmp_path),
        max_length=512,
        per_device_train_batch_size=1,
        max_steps=3,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        bf16=True,
        use_cpu=True,
        fused_lora=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer = RagTrainer(model=model, args=args, train_dataset=records, processing_class=smollm2_tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] > losses[1] > losses[2], losses
