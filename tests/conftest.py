"""Shared pytest fixtures."""

from __future__ import annotations

from random import Random

import pytest

# SmolLM2-Instruct's ChatML template (with its default system turn), so tokenization tests see the real layout.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus(n: int = 400) -> list[str]:
    rng = Random(0)
    names = ["Natalia", "James", "Emily", "Sophia", "Liam", "Olivia", "Mia", "Noah"]
    things = ["apples", "clips", "shrimp", "marbles", "books", "cookies", "tickets", "balloons"]
    verbs = ["sold", "bought", "found", "baked", "gave away", "collected"]
    out = [
        "Solve it step by step and end your answer with '#### <number>'.",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "system user assistant",
    ]
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        name, thing, verb = rng.choice(names), rng.choice(things), rng.choice(verbs)
        out.append(
            f"{name} {verb} {a} {thing} in April, and half as many in May. How many {thing} did {name} {verb}?\n"
            f"{name} {verb} {a}/2 = {a / 2:g} {thing} in May.\n{a} + {b} = {a + b}\n#### {a + b}"
        )
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small byte-level BPE tokenizer trained offline (≈600 tokens), SmolLM2-like: bos ``<|im_start|>``,
    eos = pad ``<|im_end|>``, unk ``<|endoftext|>``, ChatML chat template. Any text round-trips (byte level)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_config(arch: str = "llama", vocab_size: int = 53, **overrides):
    """A transformers config of a 2-layer causal LM (hidden 32, 4 heads, FFN 64) with ``vocab_size`` rows:
    ``arch`` ``llama`` or ``qwen2``; ``overrides`` replace any field (one place for every test's tiny model)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return cls(**{**fields, **overrides})


def tiny_model(arch: str = "llama", vocab_size: int = 53, seed: int = 0, **overrides):
    """:func:`tiny_config`'s model, randomly initialised from ``seed``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **overrides))


def save_model(folder, model, tokenizer):
    """``model`` and ``tokenizer`` saved together as a transformers model folder (what a user's path points to)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """A randomly initialised 2-layer LlamaForCausalLM (hidden 32, 4 heads, tied embeddings) matching
    ``tiny_tokenizer``. Session-scoped and shared: tests that change its weights should ``copy.deepcopy`` it."""
    return tiny_model(
        "llama",
        len(tiny_tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )


@pytest.fixture
def capability(monkeypatch):
    """``set(cpu_bf16=..., cuda=None | "bf16" | "fp16")`` forces what the machine answers."""
    import torch

    from targetsft.runtime import precision as P

    P._warn_slow.cache_clear()

    def set_(cpu_bf16: bool = False, cuda: str | None = None) -> None:
        monkeypatch.setattr(P, "_cpu_native", lambda name: cpu_bf16 if name == "bf16" else False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda == "bf16")

    yield set_
    P._warn_slow.cache_clear()


def two_step_config(model, out, *extra, method: str = "target_sft"):
    """A training config of ``model`` for a comparison of two runs: 2 float32 steps of 4 of 8 gsm-train records at
    rate 3e-3, a log line per step, no checkpoint; ``extra`` overrides (``key=value``) come last."""
    from targetsft.training.config import load_config

    return load_config(
        None,
        [
            f"model={model}",
            f"output_dir={out}",
            "data.size=8",
            "data.max_length=1024",
            "train.max_steps=2",
            "train.per_device_train_batch_size=4",
            "train.learning_rate=3e-3",
            "train.warmup_steps=0",
            "train.logging_steps=1",
            "train.save_steps=100",
            "train.report_to=[]",
            "train.disable_tqdm=true",
            "precision=fp32",
            f"loss.method={method}",
            *extra,
        ],
    )


def assert_same_weights(a, b, atol: float = 1e-5) -> None:
    """The ``model.safetensors`` of folders ``a`` and ``b`` hold the same tensors to ``atol``."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    wa, wb = (load_file(str(Path(f) / "model.safetensors")) for f in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


SUM_ROWS = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(8)]


def trl_batch_grads(student_dir, tokenizer, out, teacher_dir, **kwargs):
    """``TargetSFTTrainer`` (Target-SFT, η 0.5) on :data:`SUM_ROWS` with the teacher at ``teacher_dir``: the
    student's gradients of one batch, and the trainer; ``kwargs`` go to the trainer."""
    import transformers
    import trl
    from datasets import Dataset

    from targetsft.training.trl_trainer import TargetSFTTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(student_dir)
    trainer = TargetSFTTrainer(
        model=model,
        args=trl.SFTConfig(str(out), report_to=[], use_cpu=True, max_length=None, bf16=False),
        train_dataset=Dataset.from_list(SUM_ROWS),
        processing_class=tokenizer,
        method="target_sft",
        method_params={"eta": 0.5},
        teacher_model=transformers.AutoModelForCausalLM.from_pretrained(teacher_dir),
        **kwargs,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trainer.compute_loss(model, dict(batch), num_items_in_batch=int((batch["labels"] != -100).sum())).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, trainer


@pytest.fixture(scope="session")
def need_vllm() -> None:
    """vLLM imports here; else the test fails, unless ``setup.sh`` recorded why it cannot be installed on this
    machine (the file ``.venv/vllm-unavailable``): then it is skipped with that reason."""
    import sys
    from pathlib import Path

    from targetsft.runtime.vllm_engine import vllm_unavailable

    reason = vllm_unavailable()
    if reason is None:
        return
    marker = Path(sys.prefix) / "vllm-unavailable"
    if marker.is_file():
        pytest.skip(f"vLLM unavailable on this machine (setup.sh): {marker.read_text().strip()}")
    pytest.fail(f"{reason}; setup.sh installs it (or records in {marker} why it cannot)")
