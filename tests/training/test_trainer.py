"""``target-sft train`` end to end on a tiny random Llama: every method learns, checkpoints reload, resume is
exact, the config is strict, and ``TargetLoss`` inside TRL's SFTTrainer gives the trainer's gradients."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import save_model  # noqa: E402
from targetsft.training.config import ConfigError, load_config  # noqa: E402
from targetsft.training.dataset import Collator, build_dataset  # noqa: E402
from targetsft.training.recipe import TargetTrainer, train  # noqa: E402


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """The tiny student and a second random model (a teacher with the same tokenizer), saved as HF folders."""
    root = tmp_path_factory.mktemp("models")
    student = save_model(root / "student", tiny_llama, tiny_tokenizer)
    torch.manual_seed(123)
    teacher = transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config))
    return student, save_model(root / "teacher", teacher, tiny_tokenizer)


def _cfg(model_dirs, out, method, *extra):
    student, teacher = model_dirs
    overrides = [
        f"model={student}",
        f"output_dir={out}",
        "data.size=8",
        "data.max_length=1024",
        "train.max_steps=8",
        "train.per_device_train_batch_size=8",
        "train.learning_rate=3e-3",
        "train.warmup_steps=0",
        "train.logging_steps=1",
        "train.save_steps=4",
        "train.report_to=[]",
        "train.bf16=false",
        "train.disable_tqdm=true",
        f"loss.method={method}",
        *extra,
    ]
    cached = any(o.startswith("teacher.cache=") for o in extra)
    if method in ("kd", "hybrid_kd", "target_sft", "confidence_kd", "guided_kd") and not cached:
        overrides.append(f"teacher.model={teacher}")
    return load_config(None, overrides)


def _losses(out: Path) -> list[float]:
    with (out / "metrics.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


METHOD_PARAMS = {
    "profit": ["loss.params.tau=0.0001"],  # a random model gives every label p ≈ 1/V: keep them all trusted
    "asft": ["loss.params.lam=0.001"],
}
TRAINABLE = [
    "sft",
    "label_smoothing",
    "dft",
    "beyond_log",
    "profit",
    "eaft",
    "asft",
    "sft_kl",
    "kd",
    "hybrid_kd",
    "target_sft",
    "confidence_smoothing",
    "self_smoothing",
    "confidence_kd",
    "guided_kd",
    "proximal_sft",
    "gem",
]


@pytest.mark.parametrize("method", TRAINABLE)
def test_every_method_trains_and_the_model_reloads(method, model_dirs, tmp_path):
    """8 steps on 8 examples: the method's own loss falls, stats are logged, the final model reloads."""
    out = tmp_path / method
    summary = train(_cfg(model_dirs, out, method, *METHOD_PARAMS.get(method, [])))
    losses = _losses(out)
    assert len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    final = Path(summary["final_model"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert (final / "README.md").read_text().count(method) >= 1
    assert (out / "checkpoint-8").is_dir()
    with (out / "metrics.csv").open() as f:
        row = next(csv.DictReader(f))
    for key in ("gamma", "p_label", "nll", "residual_entropy", "learning_rate", "tokens_per_second"):
        assert key in row
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(reloaded(input_ids=ids).logits).all()


def test_lora_and_privileged_teacher(model_dirs, tmp_path):
    """LoRA (merged into the saved model) with a teacher that sees the answer in its prompt."""
    out = tmp_path / "lora"
    cfg = _cfg(model_dirs, out, "hybrid_kd", "lora.r=8", "teacher.prompt=answer_hint", "train.learning_rate=3e-2")
    summary = train(cfg)
    losses = _losses(out)
    assert sum(losses[-2:]) < sum(losses[:2])
    saved = transformers.AutoModelForCausalLM.from_pretrained(summary["final_model"])
    assert not any("lora" in n for n, _ in saved.named_parameters())


def test_privileged_teacher_rows_align(model_dirs, tiny_tokenizer):
    """teacher_input_ids = a longer prompt + exactly the student's completion tokens."""
    cfg = _cfg(model_dirs, "unused", "target_sft", "teacher.prompt=answer_hint")
    items, counts = build_dataset(cfg, tiny_tokenizer)
    assert counts["kept"] == 8
    for item in items:
        student = [t for t in item["labels"] if t != -100]
        teacher = [t for t in item["teacher_labels"] if t != -100]
        assert student == teacher
        assert len(item["teacher_input_ids"]) > len(item["input_ids"])
        assert "correct final answer" in tiny_tokenizer.decode(item["teacher_input_ids"])


def test_label_noise_in_the_training_data(model_dirs, tiny_tokenizer):
    """data.label_noise corrupts exactly that fraction of the examples; the privileged teacher is told the noisy
    answer (the data is wrong, not only its text)."""
    clean, counts = build_dataset(
        _cfg(model_dirs, "unused", "target_sft", "teacher.prompt=answer_hint"), tiny_tokenizer
    )
    cfg = _cfg(model_dirs, "unused", "target_sft", "teacher.prompt=answer_hint", "data.label_noise=0.25")
    noisy, noisy_counts = build_dataset(cfg, tiny_tokenizer)
    assert counts.get("corrupted") is None and noisy_counts["corrupted"] == 2
    changed = [i for i, (a, b) in enumerate(zip(clean, noisy)) if a["labels"] != b["labels"]]
    assert len(changed) == 2
    for i in changed:
        assert clean[i]["teacher_input_ids"] != noisy[i]["teacher_input_ids"]
        assert "####" in tiny_tokenizer.decode([t for t in noisy[i]["labels"] if t != -100])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize(
    "method,sampling,extra",
    [
        ("sft", "random", ()),
        ("target_sft", "random", ()),
        ("target_sft", "group_by_length", ()),
        ("proximal_sft", "random", ("loss.params.refresh=2", "loss.params.epsilon=0.05")),  # π_old restored
        ("proximal_sft", "random", ("loss.params.refresh=2", "loss.params.epsilon=0.05", "lora.r=4")),  # its adapters
    ],
)
def test_resume_is_exact(method, sampling, extra, model_dirs, tmp_path):
    """Stopped after the step-3 checkpoint (mid-epoch) and resumed, a run ends with the same weights as an
    uninterrupted one (also with batches of similar lengths, whose sampler draws from the restored random state,
    and with proximal_sft, whose π_old of step 2 comes back from the checkpoint)."""
    options = (
        *extra,
        "train.lr_scheduler_type=linear",
        "train.per_device_train_batch_size=2",  # 4 batches per epoch: their order matters
        "train.save_steps=3",  # the checkpoint falls inside the first epoch
        f"train.train_sampling_strategy={sampling}",
    )
    full = tmp_path / "full"
    train(_cfg(model_dirs, full, method, *options))
    part = tmp_path / "part"
    cfg = _cfg(model_dirs, part, method, *options)
    train(cfg, callbacks=[_StopAt(3)])
    assert (part / "checkpoint-3").is_dir() and not (part / "checkpoint-6").exists()
    train(cfg, resume=True)
    if "lora.r=4" in extra:  # π_old's checkpoint holds what the student trains: the adapters, not the frozen base
        from safetensors.torch import load_file

        kept = load_file(sorted(part.glob("checkpoint-*/pi_old.safetensors"))[-1])
        assert kept and all("lora_" in name for name in kept)
    a, b = _weights(full / "final"), _weights(part / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(part) == pytest.approx(_losses(full), abs=0, rel=0)


def test_policy_snapshot_refreshes_pi_old_and_survives_a_checkpoint(tmp_path):
    """π_old takes the student's weights right before every refresh-th optimizer step, and a checkpoint restores
    the π_old it had, not the current student."""
    from types import SimpleNamespace

    from targetsft.training.callbacks import PolicySnapshot

    torch.manual_seed(0)
    student, pi_old = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    snap = PolicySnapshot(student, pi_old, refresh=2)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=0, is_world_process_zero=True)
    seen = []
    for step in range(4):
        state.global_step = step
        snap.on_pre_optimizer_step(args, state, None)
        seen.append(torch.equal(pi_old.weight, student.weight))
        with torch.no_grad():
            student.weight.add_(1.0)  # the optimizer step
    assert seen == [True, False, True, False]  # copied before steps 0 and 2 only
    state.global_step = 3
    (tmp_path / "checkpoint-3").mkdir()
    snap.on_save(args, state, None)
    kept = pi_old.weight.detach().clone()
    with torch.no_grad():
        pi_old.weight.zero_()
    snap.on_train_begin(args, state, None)
    assert torch.equal(pi_old.weight, kept) and not torch.equal(pi_old.weight, student.weight)
    # what the student does not train (a LoRA base) is neither copied nor saved; a file without π_old's trained
    # weights is refused
    student.bias.requires_grad_(False)
    with torch.no_grad():
        student.bias.fill_(5.0)
    snap = PolicySnapshot(student, pi_old, refresh=1)
    snap.on_pre_optimizer_step(args, state, None)
    assert torch.equal(pi_old.weight, student.weight) and not torch.equal(pi_old.bias, student.bias)
    snap.on_save(args, state, None)
    from safetensors.torch import load_file, save_file

    assert set(load_file(tmp_path / "checkpoint-3" / PolicySnapshot.FILE)) == {"weight"}
    save_file({"bias": pi_old.bias.detach()}, str(tmp_path / "checkpoint-3" / PolicySnapshot.FILE))
    with pytest.raises(ValueError, match=r"lacks π_old's trained weights \['weight'\]"):
        snap.on_train_begin(args, state, None)


def test_proximal_sft_config_checks():
    for section in ("reference.model=other", "reference.dtype=bfloat16"):
        with pytest.raises(ConfigError, match="π_old, an exact copy of the student"):
            load_config(None, ["loss.method=proximal_sft", section])
    assert load_config(None, ["loss.method=proximal_sft", "lora.r=4"]).lora.r == 4  # π_old: the adapters' copy
    with pytest.raises(ConfigError, match="refresh"):
        load_config(None, ["loss.method=proximal_sft", "loss.params.refresh=0"])


def test_a_snapshot_reference_is_the_methods_declaration_not_its_name(model_dirs, tmp_path):
    """proximal_sft's π_old (a copy of the student refreshed every `refresh` steps) is declared by its spec, and
    `refresh` is the trainer's parameter, not the loss's: a method of another name with that declaration gets the
    same config checks and the same π_old in training."""
    import dataclasses

    from targetsft.losses.methods import METHODS, get_method, register_method

    spec = get_method("proximal_sft")
    assert spec.ref_model == "snapshot" and set(spec.trainer_params) == {"refresh"} and "refresh" not in spec.params
    assert spec.defaults == {"epsilon": 0.2, "scale": "target", "refresh": 1}
    assert spec.split_params({"epsilon": 0.1, "refresh": 3}) == ({"epsilon": 0.1}, {"refresh": 3})
    with pytest.raises(ValueError, match="unknown parameter.*refresh.*read by the trainer"):
        spec.target(refresh=2)
    with pytest.raises(ValueError, match="refresh"):
        dataclasses.replace(spec, name="no_refresh", trainer_params={})
    assert {m.ref_model for name, m in METHODS.items() if name != "proximal_sft"} == {"frozen"}
    register_method(dataclasses.replace(spec, name="pi_old_probe"))
    try:
        with pytest.raises(ConfigError, match="pi_old_probe's reference is π_old, an exact copy of the student"):
            load_config(None, ["loss.method=pi_old_probe", "reference.model=other"])
        with pytest.raises(ConfigError, match="refresh"):
            load_config(None, ["loss.method=pi_old_probe", "loss.params.refresh=0"])
        out = tmp_path / "probe"
        cfg = _cfg(model_dirs, out, "pi_old_probe", "loss.params.refresh=2", "train.max_steps=2", "train.save_steps=2")
        summary = train(cfg)
        assert summary["steps"] == 2 and (out / "checkpoint-2" / "pi_old.safetensors").is_file()
        assert '"refresh": 2' in (out / "final" / "README.md").read_text()
    finally:
        METHODS.pop("pi_old_probe")


def test_config_is_strict(tmp_path):
    (tmp_path / "c.yaml").write_text("loss:\n  method: dft\n  parms: {}\n")
    with pytest.raises(ConfigError, match="parms.*did you mean 'params'"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="unknown key 'lerning_rate'.*learning_rate"):
        load_config(None, ["train.lerning_rate=1e-5"])
    with pytest.raises(ConfigError, match="unknown parameter.*'etta'.*valid: eta"):
        load_config(None, ["loss.method=target_sft", "loss.params.etta=0.3", "teacher.model=x"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(None, ["loss.method=kd"])
    with pytest.raises(ValueError, match="unknown method 'sftt'"):
        load_config(None, ["loss.method=sftt"])
    with pytest.raises(ConfigError, match="eta' must be in \\[0, 1\\]"):
        load_config(None, ["loss.method=target_sft", "loss.params.eta=2", "teacher.model=x"])
    with pytest.raises(ConfigError, match="output_dir"):
        load_config(None, ["train.output_dir=x"])
    with pytest.raises(ConfigError, match=r"data.label_noise must be a fraction in \[0, 1\], got 1.5"):
        load_config(None, ["data.label_noise=1.5"])
    with pytest.raises(ConfigError, match="data.noise_kind must be one of"):
        load_config(None, ["data.label_noise=0.2", "data.noise_kind=sign"])
    cfg = load_config(None, ["train.learning_rate=1e-5", "loss.method=dft"])
    assert cfg.training_arguments()["learning_rate"] == 1e-5


def test_shipped_configs_are_valid():
    """Every YAML in configs/ loads and checks (teachers are paths, so only the schema is exercised)."""
    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["dft", "target_sft"])
def test_target_loss_in_trl_sft_trainer_matches_target_trainer(method, model_dirs, tiny_tokenizer, tmp_path):
    """One batch: gradients of TRL's SFTTrainer with compute_loss_func=TargetLoss equal TargetTrainer's."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    import targetsft

    student, teacher_dir = model_dirs
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir) if method == "target_sft" else None
    cfg = _cfg(model_dirs, tmp_path / "x", method)
    items, _ = build_dataset(cfg, tiny_tokenizer)
    batch = Collator(tiny_tokenizer.pad_token_id)(items[:4])
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    params = {"eta": 0.5} if method == "target_sft" else {}

    ours = transformers.AutoModelForCausalLM.from_pretrained(student)
    trainer = TargetTrainer(
        model=ours,
        args=transformers.TrainingArguments(str(tmp_path / "a"), report_to=[], use_cpu=True),
        train_dataset=Dataset.from_list(items),
        data_collator=Collator(tiny_tokenizer.pad_token_id),
        method=method,
        method_params=params,
        teacher_model=teacher,
    )
    ours.train()
    trainer.compute_loss(ours, dict(batch), num_items_in_batch=n_items).backward()

    theirs = transformers.AutoModelForCausalLM.from_pretrained(student)
    loss_fn = targetsft.TargetLoss(method, teacher=teacher, **params).bind(theirs)
    sft = trl.SFTTrainer(
        model=theirs,
        args=trl.SFTConfig(str(tmp_path / "b"), report_to=[], use_cpu=True, max_length=None),
        train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b"}]),
        processing_class=tiny_tokenizer,
        compute_loss_func=loss_fn,
    )
    theirs.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    full_logits = []
    theirs.lm_head.register_forward_hook(lambda module, args, out: full_logits.append(out.shape))
    sft.compute_loss(theirs, inputs, num_items_in_batch=n_items).backward()
    assert full_logits  # the compute_loss_func hook runs the lm_head on every position
    g1, g2 = _grads(ours), _grads(theirs)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)

    # the subclass: the same gradients through the fused path, and the lm_head module never runs
    from targetsft.training.trl_trainer import TargetSFTTrainer

    fused = transformers.AutoModelForCausalLM.from_pretrained(student)
    head_calls = []
    fused.lm_head.register_forward_hook(lambda module, args, out: head_calls.append(out.shape))
    sub = TargetSFTTrainer(
        model=fused,
        args=trl.SFTConfig(str(tmp_path / "c"), report_to=[], use_cpu=True, max_length=None, bf16=False),
        train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b"}]),
        processing_class=tiny_tokenizer,
        method=method,
        method_params=params,
        teacher_model=teacher,
    )
    fused.train()
    sub.compute_loss(fused, dict(inputs), num_items_in_batch=n_items).backward()
    g3 = _grads(fused)
    assert g3.keys() == g1.keys() and head_calls == []
    for k in g1:
        torch.testing.assert_close(g3[k], g1[k], rtol=1e-5, atol=1e-7)


def test_target_sft_trainer_trains_on_trl_data(model_dirs, tiny_tokenizer, tmp_path):
    """TargetSFTTrainer end to end on a prompt/completion dataset that TRL tokenizes and masks itself: the loss
    falls, the target statistics are logged, no [tokens, V] logits are built (the lm_head never runs in training)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from targetsft.training.trl_trainer import TargetSFTTrainer

    student, _ = model_dirs
    model = transformers.AutoModelForCausalLM.from_pretrained(student)
    head_calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_calls.append(out.shape))
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(16)]
    trainer = TargetSFTTrainer(
        model=model,
        args=trl.SFTConfig(
            str(tmp_path / "out"),
            report_to=[],
            use_cpu=True,
            max_steps=6,
            per_device_train_batch_size=4,
            learning_rate=5e-3,
            logging_steps=1,
            save_strategy="no",
            max_length=None,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
        method="dft",
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6 and all(0 < h["gamma"] < 1 for h in logs)
    assert logs[-1]["nll"] < logs[0]["nll"]
    assert head_calls == []


def test_cache_teacher_cli_then_train_from_cache(model_dirs, tmp_path):
    """`target-sft cache-teacher` on the config's data, then KD from the cache: the first-step loss equals the
    online teacher's (k = V, fp16 log-probs), training lowers it, and other data is refused."""
    from targetsft.cli import main

    student, teacher = model_dirs
    vocab = transformers.AutoConfig.from_pretrained(student).vocab_size
    cache = tmp_path / "cache"
    common = [f"model={student}", "data.size=8", "data.max_length=1024", "loss.method=kd", f"teacher.cache={cache}"]
    rc = main(["cache-teacher", *common, "--teacher", str(teacher), "--k", str(vocab), "--batch-size", "4"])
    assert rc == 0 and (cache / "manifest.json").exists()
    out_cache, out_online = tmp_path / "from_cache", tmp_path / "online"
    train(_cfg(model_dirs, out_cache, "kd", f"teacher.cache={cache}"))
    train(_cfg(model_dirs, out_online, "kd"))
    cached, online = _losses(out_cache), _losses(out_online)
    assert cached[0] == pytest.approx(online[0], rel=1e-3)
    assert sum(cached[-2:]) < sum(cached[:2])
    with pytest.raises(ValueError, match="(?i)dataset"):
        train(_cfg(model_dirs, tmp_path / "bad", "kd", f"teacher.cache={cache}", "data.size=6"))


def _weighted_data(path: Path, tokenizer, make) -> Path:
    """8 records of prompt/completion, each with what ``make(record, n_completion_tokens)`` adds."""
    import json

    from targetsft.data.sft import tokenize_record

    lines = []
    for i in range(8):
        record = {"prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} = {2 * i}.\n#### {2 * i}"}
        n = sum(label != -100 for label in tokenize_record(tokenizer, record, 1 << 30)["labels"])
        lines.append(json.dumps({**record, **make(i, n)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_token_weights_from_the_data_align_with_the_labels(model_dirs, tiny_tokenizer, tmp_path):
    """Per-token weights in the records land on exactly the supervised tokens, in order, and stay aligned with the
    labels after padding and the shift the fused loss applies."""
    data = _weighted_data(
        tmp_path / "w.jsonl", tiny_tokenizer, lambda i, n: {"token_weights": [(k + 1) / n for k in range(n)]}
    )
    cfg = _cfg(model_dirs, tmp_path / "out", "weighted", f"data.train={data}")
    items, _ = build_dataset(cfg, tiny_tokenizer)
    for item in items:
        supervised = [w for w, label in zip(item["token_weights"], item["labels"]) if label != -100]
        n = len(supervised)
        assert supervised == pytest.approx([(k + 1) / n for k in range(n)])
        assert all(w == 0 for w, label in zip(item["token_weights"], item["labels"]) if label == -100)
    batch = Collator(tiny_tokenizer.pad_token_id)(items[:4])
    shifted_w = torch.nn.functional.pad(batch["token_weights"][:, 1:], (0, 1))
    shifted_y = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    assert torch.equal(shifted_w > 0, shifted_y != -100)


def test_weighted_methods_train_from_the_data(model_dirs, tiny_tokenizer, tmp_path):
    """`weighted` with weight 1 on every record is SFT exactly; `critical` with every flag 0 leaves the model as it
    was (Q = p: no update)."""
    ones = _weighted_data(tmp_path / "ones.jsonl", tiny_tokenizer, lambda i, n: {"weight": 1.0})
    zeros = _weighted_data(tmp_path / "zeros.jsonl", tiny_tokenizer, lambda i, n: {"token_weights": [0] * n})
    train(_cfg(model_dirs, tmp_path / "w", "weighted", f"data.train={ones}"))
    train(_cfg(model_dirs, tmp_path / "sft", "sft", f"data.train={ones}"))
    a, b = _weights(tmp_path / "w" / "final"), _weights(tmp_path / "sft" / "final")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    train(_cfg(model_dirs, tmp_path / "c", "critical", f"data.train={zeros}"))
    c, start = _weights(tmp_path / "c" / "final"), _weights(model_dirs[0])
    assert all(torch.equal(c[k], start[k]) for k in start)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda i, n: {"token_weights": [0.5] * (n - 1)},
            r"record 0: token_weights must hold one value per completion",
        ),
        (
            lambda i, n: {"token_weights": [0.5] * n} if i < 3 else {},
            r"record 3: method 'weighted' needs token_weights",
        ),
        (lambda i, n: {"token_weights": [1.5] + [0.5] * (n - 1)}, r"record 0: .*in \[0, 1\], got 1.5"),
        (lambda i, n: {"weight": float("nan")}, r"record 0: .*got nan"),
        (lambda i, n: {"weight": 0.5, "token_weights": [0.5] * n}, r"not both"),
    ],
)
def test_bad_token_weights_name_the_record(make, message, model_dirs, tiny_tokenizer, tmp_path):
    from targetsft.runtime.inputs import InputError

    data = _weighted_data(tmp_path / "bad.jsonl", tiny_tokenizer, make)
    with pytest.raises(InputError, match=message):
        build_dataset(_cfg(model_dirs, tmp_path / "out", "weighted", f"data.train={data}"), tiny_tokenizer)
