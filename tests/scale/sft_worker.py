"""Run by tests/scale/test_ddp.py and tests/scale/test_scale_out.py under ``accelerate launch``: TargetSFTTrainer
on TRL-prepared prompt/completion data, the student and teacher loaded by ``from_pretrained`` as a TRL user loads
them.

python sft_worker.py MODEL OUTPUT_DIR PER_DEVICE_BATCH METHOD [TEACHER]

``TARGETSFT_TEST_FSDP_ON_CPU=1``: FSDP on CPU processes, as in ddp_worker.py.
"""

import os
import sys

import transformers
import trl
from datasets import Dataset

from targetsft.training.trl_trainer import TargetSFTTrainer

if __name__ == "__main__":
    fsdp_on_cpu = os.environ.get("TARGETSFT_TEST_FSDP_ON_CPU") == "1"
    if fsdp_on_cpu:
        from ddp_worker import _fsdp_on_cpu

        _fsdp_on_cpu()
    model_dir, out, batch, method, *teacher_dir = sys.argv[1:]
    args = trl.SFTConfig(
        out,
        report_to=[],
        use_cpu=not fsdp_on_cpu,
        bf16=False,  # TRL's default is bf16 autocast, whose rounding depends on the batch shape
        max_steps=3,
        per_device_train_batch_size=int(batch),
        learning_rate=5.0,
        optim="sgd",  # linear in the gradient: Adam would magnify float noise in near-zero gradients
        save_strategy="no",
        gradient_checkpointing=False,  # TRL's default is on; fsdp.yaml checkpoints by FSDP's own, and both is refused
        max_length=None,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    # loaded after the config, as TRL's scripts do: the process group exists by now, so under FSDP with
    # cpu_ram_efficient_loading from_pretrained leaves the weights empty off rank 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir[0]) if teacher_dir else None
    rows = [{"prompt": f"What is {i} plus {i + 3}?", "completion": f" It is {2 * i + 3}."} for i in range(16)]
    trainer = TargetSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        method=method,
        teacher_model=teacher,
    )
    trainer.train()
    if trainer.is_fsdp_enabled:  # fsdp.yaml saves sharded checkpoints; the final model is saved whole, as documented
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(f"{out}/final")
    # no trainer.accelerator.end_training(): TargetSFTTrainer ends the process group at exit, so the launch exits 0
