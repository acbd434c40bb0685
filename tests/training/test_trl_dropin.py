"""``TargetSFTTrainer`` as a drop-in for TRL's ``SFTTrainer``: everything around the loss behaves as TRL's does,
checked against TRL itself on the same tiny model and data (float32, SGD, CPU)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from conftest import SUM_ROWS, save_model, tiny_model  # noqa: E402
from targetsft.training.trl_trainer import TargetSFTTrainer  # noqa: E402

ROWS = SUM_ROWS * 2  # 16 prompt/completion examples


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """The tiny student and a random teacher of the same tokenizer, saved as model folders."""
    root = tmp_path_factory.mktemp("dropin")
    student = save_model(root / "student", tiny_llama, tiny_tokenizer)
    teacher = tiny_model("llama", len(tiny_tokenizer), seed=7, tie_word_embeddings=True)
    return student, save_model(root / "teacher", teacher, tiny_tokenizer)


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


def _args(out, cls=None, **overrides):
    fields = dict(
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=None,
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=5e-2,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return (cls or trl.SFTConfig)(str(out), **{**fields, **overrides})


def _trainer(model, tokenizer, args, rows=ROWS, cls=TargetSFTTrainer, **kwargs):
    """``cls`` (``TargetSFTTrainer`` or TRL's ``SFTTrainer``) on ``model`` and prompt/completion ``rows``, which TRL
    tokenizes."""
    return cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **kwargs)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _plain_stage(model, out):
    """A second stage by plain ``transformers.Trainer`` (2 SGD steps on fixed-length token rows); the weights after."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (8, 12), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = transformers.TrainingArguments(
        str(out), report_to=[], use_cpu=True, max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
        optim="sgd", lr_scheduler_type="constant", save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return _weights(model), [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_the_model_is_a_plain_transformers_model_after_training(dirs, tiny_tokenizer, tmp_path):
    """After a Target-SFT stage with a teacher, a plain Trainer on the same model object trains exactly as on a
    fresh copy of the same weights, and the model's own forward returns logits in train mode."""
    student, teacher = dirs
    model = _load(student)
    _trainer(
        model,
        tiny_tokenizer,
        _args(tmp_path / "a"),
        method="target_sft",
        method_params={"eta": 0.5},
        teacher_model=_load(teacher),
    ).train()
    fresh = transformers.AutoModelForCausalLM.from_config(model.config)
    fresh.load_state_dict(model.state_dict())

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.train(), fresh.train()
    out, ref = model(input_ids=ids, labels=ids), fresh(input_ids=ids, labels=ids)
    assert out.logits is not None and torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)

    (w1, l1), (w2, l2) = _plain_stage(model, tmp_path / "b"), _plain_stage(fresh, tmp_path / "c")
    assert l1 == l2
    _assert_same(w1, w2, atol=0)


@pytest.mark.parametrize(
    ("setting", "method", "params"),
    [
        ({}, "sft", {}),
        ({"loss_type": "dft"}, "dft", {}),
        ({"label_smoothing_factor": 0.1}, "label_smoothing", {"epsilon": 0.1}),
    ],
)
def test_sftconfig_loss_settings_train_trls_loss(setting, method, params, dirs, tiny_tokenizer, tmp_path):
    """``loss_type="dft"`` and ``label_smoothing_factor`` with the method unset train TRL's loss (weights after two
    steps equal to TRL's own run), the same as naming the method, and TRL's extra-forward warning is not shown; a
    method that contradicts them is refused."""
    student, _ = dirs
    runs = {}
    for name, cls, extra in (
        ("trl", trl.SFTTrainer, {}),
        ("ours", TargetSFTTrainer, {}),
        ("named", TargetSFTTrainer, {"method": method, "method_params": params}),
    ):
        model = _load(student)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _trainer(
                model,
                tiny_tokenizer,
                _args(tmp_path / name, **setting),
                cls=cls,
                **extra,
            )
        if cls is TargetSFTTrainer:
            assert not [w for w in caught if "label_smoothing_factor" in str(w.message)]
        trainer.train()
        runs[name] = (_weights(model), [h["loss"] for h in trainer.state.log_history if "loss" in h])
    _assert_same(runs["ours"][0], runs["trl"][0], atol=2e-6)
    _assert_same(runs["ours"][0], runs["named"][0], atol=0)
    if method != "dft":  # TRL logs −Σ Q log p here too; for DFT it logs sg(p)·NLL (the same gradient)
        np.testing.assert_allclose(runs["ours"][1], runs["trl"][1], rtol=1e-5)
    if not setting:
        return
    with pytest.raises(ValueError, match="leave method unset"):
        _trainer(
            _load(student),
            tiny_tokenizer,
            _args(tmp_path / "x", **setting),
            method="sft",
        )


def _token_accuracy(pred):
    preds, labels = pred.predictions[:, :-1], pred.label_ids[:, 1:]
    keep = labels != -100
    return {"acc": float((preds[keep] == labels[keep]).mean())}


def test_evaluation_and_prediction_give_trls_logits_and_metrics(dirs, tiny_tokenizer, tmp_path):
    """``compute_metrics`` with ``preprocess_logits_for_metrics`` reports TRL's ``eval_acc`` and ``eval_loss``;
    ``predict`` returns TRL's logits; a loss-only evaluation never runs the lm_head."""
    student, _ = dirs
    results = {}
    for cls in (trl.SFTTrainer, TargetSFTTrainer):
        model = _load(student)
        calls = []
        model.lm_head.register_forward_hook(lambda *a: calls.append(1))
        kwargs = dict(
            args=_args(tmp_path / cls.__name__),
            train_dataset=Dataset.from_list(ROWS),
            eval_dataset=Dataset.from_list(ROWS[:6]),
            processing_class=tiny_tokenizer,
        )
        plain = cls(model=model, **kwargs)
        loss_only = plain.evaluate()
        lm_head_runs = len(calls)
        metrics = cls(
            model=model,
            compute_metrics=_token_accuracy,
            preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
            **kwargs,
        ).evaluate()
        predicted = plain.predict(plain.eval_dataset)  # TRL tokenized it
        results[cls] = (loss_only, lm_head_runs, metrics, predicted)
    (l_trl, _, m_trl, p_trl), (l_ours, head_runs, m_ours, p_ours) = results.values()
    assert head_runs == 0  # the fused loss: no lm_head, no [tokens, V] logits
    assert l_ours["eval_loss"] == pytest.approx(l_trl["eval_loss"], rel=1e-6)
    assert m_ours["eval_acc"] == m_trl["eval_acc"] and "eval_acc" in m_ours
    assert m_ours["eval_loss"] == pytest.approx(m_trl["eval_loss"], rel=1e-6)
    assert p_ours.predictions.shape == p_trl.predictions.shape == (6, p_trl.label_ids.shape[1], len(tiny_tokenizer))
    np.testing.assert_allclose(p_ours.predictions, p_trl.predictions, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(p_ours.label_ids, p_trl.label_ids)


def test_misconfigurations_are_refused_at_construction_naming_the_argument(dirs, tiny_tokenizer, tmp_path):
    student, teacher = dirs

    def build(**kwargs):
        return _trainer(
            _load(student),
            tiny_tokenizer,
            kwargs.pop("args", _args(tmp_path / "x")),
            **kwargs,
        )

    for method in ("target_sft", "kd", "hybrid_kd"):
        with pytest.raises(ValueError, match="give teacher_model"):
            build(method=method)
    with pytest.raises(ValueError, match="give ref_model"):
        build(method="asft")
    with pytest.raises(ValueError, match="does not use a teacher: drop teacher_model"):
        build(method="dft", teacher_model=_load(teacher))
    with pytest.raises(ValueError, match="does not use a reference model: drop ref_model"):
        build(method="sft", ref_model=_load(teacher))
    with pytest.raises(ValueError, match="cannot load teacher_model '.*no-model-here'"):
        build(method="kd", teacher_model=str(tmp_path / "no-model-here"))
    with pytest.raises(ValueError, match="two different losses"):
        build(args=_args(tmp_path / "y", loss_type="dft", label_smoothing_factor=0.1))
    with pytest.raises(ValueError, match="'token_weights' column"):
        build(method="weighted")


def test_a_teacher_given_by_path_is_loaded_in_the_students_dtype(dirs, tiny_tokenizer, tmp_path):
    """``teacher_model="path"`` trains exactly as the loaded teacher does (GKDTrainer accepts a path too)."""
    student, teacher = dirs
    runs = []
    for given in (str(teacher), _load(teacher)):
        model = _load(student)
        trainer = _trainer(
            model,
            tiny_tokenizer,
            _args(tmp_path / f"r{len(runs)}"),
            method="target_sft",
            teacher_model=given,
        )
        trainer.train()
        runs.append(_weights(model))
    _assert_same(runs[0], runs[1], atol=0)
    loaded = trainer.fused_forward.defaults["teacher"].model
    assert next(loaded.parameters()).dtype == torch.float32


def test_target_sft_config_carries_what_the_loose_keywords_did(dirs, tiny_tokenizer, tmp_path):
    """``TargetSFTConfig(method=, method_params=, teacher_model_name_or_path=)`` trains exactly as the deprecated
    trainer keywords (Δw = 0); the keywords warn, the config does not; a keyword contradicting it is refused."""
    from targetsft.training.trl_trainer import TargetSFTConfig

    student, teacher = dirs
    target = {"method": "target_sft", "method_params": {"eta": 0.5}}
    model = _load(student)
    with pytest.warns(DeprecationWarning, match=r"TargetSFTTrainer\(method=\.\.\., method_params=\.\.\."):
        _trainer(model, tiny_tokenizer, _args(tmp_path / "a"), teacher_model=_load(teacher), **target).train()
    by_keywords = _weights(model)
    model = _load(student)
    config = _args(tmp_path / "b", TargetSFTConfig, teacher_model_name_or_path=str(teacher), **target)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        trainer = _trainer(model, tiny_tokenizer, config)
    trainer.train()
    _assert_same(by_keywords, _weights(model), atol=0)
    assert trainer.fused_forward.defaults["teacher"].model is not None  # loaded from teacher_model_name_or_path
    with pytest.raises(ValueError, match="method is 'target_sft' in TargetSFTConfig but 'kd' as a keyword"):
        _trainer(_load(student), tiny_tokenizer, config, method="kd")


def test_proximal_sft_gets_its_policy_snapshot(dirs, tiny_tokenizer, tmp_path):
    """``proximal_sft`` with no ``ref_model`` takes π_old as a refreshed copy of the student, as target-sft train."""
    student, _ = dirs
    model = _load(student)
    start = _weights(model)
    trainer = _trainer(
        model,
        tiny_tokenizer,
        _args(tmp_path / "p"),
        method="proximal_sft",
        method_params={"refresh": 1},
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(np.isfinite(h["loss"]) for h in logs)
    # refreshed right before the second optimizer step: the weights after the first, neither the start nor the end
    pi_old = _weights(trainer.fused_forward.defaults["ref"].model)
    key = "model.embed_tokens.weight"
    assert not torch.equal(pi_old[key], start[key]) and not torch.equal(pi_old[key], _weights(model)[key])


def _weighted_rows():
    return [{**r, "weight": 0.5 if i % 2 else 1.0} for i, r in enumerate(ROWS)]


def test_token_weights_reach_weighted_through_trls_data_path(dirs, tiny_tokenizer, tmp_path):
    """A per-example ``weight`` column reaches ``weighted`` (γ = the weight, π̃ = sg π_θ): weight 1 everywhere trains
    exactly as ``sft``; per-example weights equal the same weights given per token (``token_weights``)."""
    student, _ = dirs

    def run(name, rows, method):
        model = _load(student)
        _trainer(
            model,
            tiny_tokenizer,
            _args(tmp_path / name),
            rows=rows,
            method=method,
        ).train()
        return _weights(model)

    ones = [{**r, "weight": 1.0} for r in ROWS]
    _assert_same(run("ones", ones, "weighted"), run("sft", ROWS, "sft"), atol=1e-7)
    per_example = _weighted_rows()
    per_token = []
    for r in per_example:
        n = len(tiny_tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1  # TRL appends the eos
        per_token.append({"prompt": r["prompt"], "completion": r["completion"], "token_weights": [r["weight"]] * n})
    a, b = run("per_example", per_example, "weighted"), run("per_token", per_token, "weighted")
    _assert_same(a, b, atol=0)
    with pytest.raises(AssertionError):
        _assert_same(a, run("ones2", ones, "weighted"), atol=1e-7)  # the weights do change the update


def test_torch_compile_trains_as_eager(dirs, tiny_tokenizer, tmp_path):
    """``torch_compile=True`` (inductor on the CPU) trains Target-SFT with a teacher to the eager run's weights."""
    student, teacher = dirs
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _load(student)
        trainer = _trainer(
            model,
            tiny_tokenizer,
            _args(tmp_path / f"c{compiled}", torch_compile=compiled, max_steps=3),
            method="target_sft",
            teacher_model=_load(teacher),
        )
        trainer.train()
        runs.append((_weights(model), [h["loss"] for h in trainer.state.log_history if "loss" in h]))
        if compiled:  # the decoder ran as compiled graphs; the one break is the loss, run eagerly by design
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
            breaks = torch._dynamo.utils.counters["graph_break"]
            assert breaks and all("target_loss_on_hidden" in reason for reason in breaks), dict(breaks)
    torch._dynamo.reset()
    _assert_same(runs[1][0], runs[0][0], atol=1e-5)
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-5)
