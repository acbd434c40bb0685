"""Sharded training equals one process: FSDP2 and DeepSpeed ZeRO-2/3, launched with the shipped accelerate configs
(``configs/accelerate/{fsdp,zero2,zero3}.yaml``) as a user would, on 2 CPU processes over gloo.

Each case trains the tiny model 3 steps with the same global batch (2 × 2 against 1 × 4) and compares the final
weights to 1e-5: full fine-tuning with a tied and an untied head, LoRA, and Target-SFT with an online teacher and
with a cached one; SFT+KL with the default reference; and TRL's trainer with the fused loss (``TargetSFTTrainer``,
run by a TRL user's script, ``tests/scale/sft_worker.py``). Under ZeRO-3 the student's lm_head weight is partitioned
(the fused loss gathers it) and the online teacher is sharded too; the summary says which engine ran and whether the
weights were sharded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
SFT_WORKER = Path(__file__).with_name("sft_worker.py")
CONFIGS = ROOT / "configs" / "accelerate"
ENGINES = {"fsdp2": "fsdp.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}
CASES = [
    ("fsdp2", "tied"),
    ("fsdp2", "untied"),
    ("fsdp2", "lora"),
    ("fsdp2", "teacher"),
    ("fsdp2", "cache"),
    ("fsdp2", "reference"),
    ("zero2", "teacher"),
    ("zero3", "tied"),
    ("zero3", "untied"),
    ("zero3", "lora"),
    ("zero3", "teacher"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """The tied student, an untied one, a teacher (same vocabulary) and a top-k cache of that teacher."""
    from targetsft.training.config import load_config
    from targetsft.training.teacher_cache import cache_teacher

    root = tmp_path_factory.mktemp("scale_out")
    paths = {}
    untied = transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config))
    untied.config.tie_word_embeddings = False
    torch.manual_seed(3)
    untied = transformers.LlamaForCausalLM(untied.config)
    torch.manual_seed(7)
    teacher = transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config))
    for name, model in (("tied", tiny_llama), ("untied", untied), ("teacher", teacher)):
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tiny_tokenizer.save_pretrained(paths[name])
    paths["cache"] = root / "cache"
    cache_teacher(load_config(None, _common(paths, "tied")), paths["cache"], teacher=str(paths["teacher"]), k=16)
    return paths


def _common(paths: dict[str, Path], variant: str) -> list[str]:
    student = paths["untied" if variant == "untied" else "tied"]
    overrides = [
        f"model={student}",
        "data.size=16",
        "data.max_length=1024",
        "train.max_steps=3",
        f"train.learning_rate={1e-2 if variant == 'lora' else 1e-3}",
        "train.warmup_steps=0",
        "precision=fp32",
        "train.report_to=[]",
        "train.save_steps=100",
        "train.disable_tqdm=true",
        "train.dataloader_drop_last=true",
        "loss.method=" + {"teacher": "target_sft", "cache": "target_sft", "reference": "sft_kl"}.get(variant, "sft"),
    ]
    if variant == "teacher":
        overrides.append(f"teacher.model={paths['teacher']}")
    if variant == "cache":
        overrides.append(f"teacher.cache={paths['cache']}")
    if variant == "lora":
        overrides += ["lora.r=4", "lora.dropout=0"]  # no dropout: its random masks differ between the launches
    return overrides


def _launch(engine: str | None, worker: Path, args: list[str], cwd: Path) -> None:
    """``worker`` with ``args`` in one plain process (``engine`` None) or in two under the shipped config."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, str(worker), *args]
    if engine is not None:
        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        cmd = [accelerate, "launch", "--config_file", str(CONFIGS / ENGINES[engine])]
        cmd += ["--num_processes", "2", "--mixed_precision", "no", str(worker), *args]
        if engine == "fsdp2":
            env["TARGETSFT_TEST_FSDP_ON_CPU"] = "1"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _run(engine: str | None, overrides: list[str], cwd: Path) -> dict:
    batch = "train.per_device_train_batch_size=" + ("4" if engine is None else "2")
    use_cpu = ["train.use_cpu=false"] if engine == "fsdp2" else []
    _launch(engine, WORKER, [*overrides, batch, *use_cpu], cwd)
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    return json.loads((Path(out) / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_process(models, tmp_path_factory):
    """The single-process reference of each variant, run once."""
    done: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in done:
            out = tmp_path_factory.mktemp(f"one_{variant}")
            if variant == "trl":
                _launch(None, SFT_WORKER, _trl_args(models, out, 4), out)
            else:
                _run(None, [*_common(models, variant), f"output_dir={out}"], out)
            done[variant] = out / "final"
        return done[variant]

    return get


def _trl_args(paths: dict[str, Path], out: Path, batch: int) -> list[str]:
    """tests/scale/sft_worker.py's arguments: the untied student and the online teacher, Target-SFT."""
    return [str(paths["untied"]), str(out), str(batch), "target_sft", str(paths["teacher"])]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()


def _assert_trained_alike(one: Path, two: Path, start: Path) -> None:
    """The final weights ``two`` equal ``one`` to 1e-5, and training did move them away from ``start``."""
    one_w, two_w, start_w = _weights(one), _weights(two), _weights(start)
    assert one_w.keys() == two_w.keys() == start_w.keys()
    assert max((one_w[k] - start_w[k]).abs().max().item() for k in one_w) > 1e-4  # training did change the weights
    for k in one_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize(("engine", "variant"), CASES, ids=[f"{e}-{v}" for e, v in CASES])
def test_sharded_equals_one_process(engine, variant, models, one_process, tmp_path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    summary = _run(engine, [*_common(models, variant), f"output_dir={tmp_path}"], tmp_path)
    expected_type = {"fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[engine]
    assert summary["distributed"] == {"type": expected_type, "processes": 2, "sharded": engine != "zero2"}
    _assert_trained_alike(one_process(variant), tmp_path / "final", models["untied" if variant == "untied" else "tied"])


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_target_sft_trainer_sharded_equals_one_process(engine, models, one_process, tmp_path):
    """TRL's SFTTrainer with the fused loss and an online teacher, both loaded by a plain ``from_pretrained`` in
    the user's script: under FSDP2 (``cpu_ram_efficient_loading`` leaves the teacher empty off rank 0 until the
    trainer places it) and ZeRO-3 (the lm_head partitioned) the weights are one process's."""
    pytest.importorskip("trl")
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    _launch(engine, SFT_WORKER, _trl_args(models, tmp_path, 2), tmp_path)
    _assert_trained_alike(one_process("trl"), tmp_path / "final", models["untied"])


def _untied(tiny_llama) -> transformers.LlamaForCausalLM:
    config = copy.deepcopy(tiny_llama.config)
    config.tie_word_embeddings = False
    torch.manual_seed(3)
    return transformers.LlamaForCausalLM(config)


def test_partitioned_lm_head_is_gathered_for_the_fused_loss(tiny_llama, monkeypatch):
    """A ZeRO-3-partitioned lm_head (its data an empty shard, as after ``deepspeed.initialize``) is gathered for
    the loss: loss and weight gradient equal the unpartitioned model's, and the weight is partitioned again after."""
    deepspeed = pytest.importorskip("deepspeed")
    from targetsft.losses.fused import fused_target_loss
    from targetsft.training.fused_forward import causal_lm_target_loss, hidden_states

    model = _untied(tiny_llama)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    expected = causal_lm_target_loss(model, ids, labels, method="dft")
    expected.backward()
    expected_grad = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)

    weight = model.lm_head.weight
    full = weight.data
    weight.data, weight.ds_numel = torch.empty(0), full.numel()
    with pytest.raises(ValueError, match=r"got shape \(0,\)"):  # what a bare read of the weight meets
        fused_target_loss(hidden_states(model, ids), weight, labels)
    calls = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        calls.append((list(params), modifier_rank))
        for p in params:
            p.data = full
        yield
        for p in params:
            p.data = torch.empty(0)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gathered)
    loss = causal_lm_target_loss(model, ids, labels, method="dft")
    assert weight.numel() == 0  # partitioned again once the loss is computed
    weight.data = full  # as DeepSpeed re-gathers an external parameter in backward (register_head_with_zero3)
    loss.backward()
    assert len(calls) == 1 and calls[0][0] == [weight] and calls[0][1] is None  # read-only, the head alone
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(weight.grad, expected_grad, rtol=0, atol=1e-6)
    weight.data = torch.empty(0)
    with pytest.raises(ValueError, match="reduction='none'"):
        causal_lm_target_loss(model, ids, labels, method="dft", reduction="none")


def test_a_teacher_that_does_not_fit_is_refused_with_the_ways_out(tiny_llama, monkeypatch):
    from targetsft.training.fused_forward import place_frozen

    free = 1000
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 10**9))
    teacher = copy.deepcopy(tiny_llama)
    with pytest.raises(ValueError, match=r"teacher needs .* GB on cuda.*bfloat16.*sharded.*device_map.*teacher\.cache"):
        place_frozen(teacher, torch.device("cuda"), "teacher")
    assert teacher.lm_head.weight.device.type == "cpu" and not teacher.training  # nothing moved


def test_placement_keys(tmp_path):
    from targetsft.training.config import ConfigError, load_config

    assert load_config(None, ["teacher.placement=sharded"]).teacher.placement == "sharded"
    with pytest.raises(ConfigError, match="teacher.placement must be one of"):
        load_config(None, ["teacher.placement=everywhere"])
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(None, ["reference.placement=sharded", "reference.device_map=cuda:1"])


def test_sharded_placement_needs_zero3(tmp_path, tiny_llama, tiny_tokenizer):
    from targetsft.training.recipe import TargetTrainer

    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="placement 'sharded' needs DeepSpeed ZeRO-3"):
        TargetTrainer(
            model=copy.deepcopy(tiny_llama),
            args=args,
            method="kd",
            teacher_model=copy.deepcopy(tiny_llama),
            teacher_placement="sharded",
        )


def test_auto_placement_under_zero3_shards_unless_the_teacher_has_a_device_map(tiny_llama, monkeypatch):
    from types import SimpleNamespace

    from targetsft.training import loss_mixin
    from targetsft.training.fused_forward import KEEP_DEVICE

    sharded = []
    monkeypatch.setattr(loss_mixin, "shard_frozen", lambda model, config: sharded.append(model) or model)
    plugin = SimpleNamespace(zero_stage=3, deepspeed_config={"zero_optimization": {"stage": 3}})
    trainer = SimpleNamespace(
        is_deepspeed_enabled=True,
        is_fsdp_enabled=False,
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        args=SimpleNamespace(device=torch.device("cpu")),
    )
    teacher = copy.deepcopy(tiny_llama)
    assert loss_mixin.FusedLossMixin._place(trainer, teacher, "auto", "teacher") is teacher
    assert sharded == [teacher]
    own = copy.deepcopy(tiny_llama)
    setattr(own, KEEP_DEVICE, True)
    assert loss_mixin.FusedLossMixin._place(trainer, own, "auto", "teacher") is own
    assert sharded == [teacher] and not own.training  # replicated where its device_map put it
    assert loss_mixin.FusedLossMixin._place(trainer, copy.deepcopy(tiny_llama), "replicated", "teacher")
    assert len(sharded) == 1
