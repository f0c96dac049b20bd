"""Fine-tune a causal LM on RAG records with RagTrainer; runs alone, under torchrun or accelerate launch.

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train.py \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --data train.jsonl \
        --output_dir out --max_length 4096 --per_device_train_batch_size 1 --gradient_accumulation_steps 8 \
        --learning_rate 2e-5 --bf16

Every RagTrainingArguments / TrainingArguments option is a flag (``--help`` lists them).
"""

import json
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from ragkern import RagTrainer, RagTrainingArguments


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "a local folder or a hub name"})
    data: str = field(
        metadata={"help": "JSONL of RAFT ({question, passages, answer}) or DAP ({text}) records"}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: full fine-tuning)"})


def main():
    script, args = HfArgumentParser((ScriptArguments, RagTrainingArguments)).parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, attn_implementation="ragkern")
    peft_config = None
    if script.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=script.lora_r, target_modules="all-linear")
    with open(script.data) as f:
        records = [json.loads(line) for line in f if line.strip()]
    trainer = RagTrainer(
        model=model, args=args, train_dataset=records, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()


if __name__ == "__main__":
    main()
