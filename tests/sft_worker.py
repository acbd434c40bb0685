"""Run by tests/test_ddp.py under ``accelerate launch``: TargetSFTTrainer on TRL-prepared prompt/completion data.

python sft_worker.py MODEL OUTPUT_DIR PER_DEVICE_BATCH METHOD [TEACHER]
"""

import sys

import transformers
import trl
from datasets import Dataset

from targetsft.training.sft_trainer import TargetSFTTrainer

if __name__ == "__main__":
    model_dir, out, batch, method, *teacher_dir = sys.argv[1:]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir[0]) if teacher_dir else None
    rows = [{"prompt": f"What is {i} plus {i + 3}?", "completion": f" It is {2 * i + 3}."} for i in range(16)]
    args = trl.SFTConfig(
        out,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 autocast, whose rounding depends on the batch shape
        max_steps=3,
        per_device_train_batch_size=int(batch),
        learning_rate=5.0,
        optim="sgd",  # linear in the gradient: Adam would magnify float noise in near-zero gradients
        save_strategy="no",
        max_length=None,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    trainer = TargetSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        method=method,
        teacher_model=teacher,
    )
    trainer.train()
    trainer.save_model(f"{out}/final")
