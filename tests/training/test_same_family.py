"""Teachers of the student's own family: a larger sibling whose lm_head has padding rows, an instruct release with
another eos and chat template, and packed batches. Each is checked by a case whose answer is known by construction:
a padded teacher trains exactly the student its unpadded self trains; a teacher that is a copy of the student gives
KD a zero gradient, packed or not."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import assert_same_weights, trl_batch_grads, two_step_config

transformers = pytest.importorskip("transformers")


from targetsft.training.dataset import build_dataset  # noqa: E402
from targetsft.training.recipe import train  # noqa: E402
from targetsft.training.teacher_cache import cache_teacher  # noqa: E402

PAD_ROWS = 128


def _tokenizer_variant(tokenizer, *, eos=None, template=None, swap=None):
    """A copy of ``tokenizer`` with another eos / chat template, or with the ids of two tokens swapped."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if swap is not None:
        vocab = backend["model"]["vocab"]
        a, b = swap
        vocab[a], vocab[b] = vocab[b], vocab[a]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(backend)),
        bos_token=tokenizer.bos_token,
        eos_token=eos or tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
    )
    tok.chat_template = template or tokenizer.chat_template
    return tok


INSTRUCT_TEMPLATE = (
    "{% for message in messages %}{{ '### ' + message['role'] + ':\n' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """student; teacher (another random model, same tokenizer); the same teacher with PAD_ROWS padding rows of
    large random weights; the teacher with an instruct tokenizer (eos <|endoftext|>, another template); a teacher
    whose tokenizer swaps two ids."""
    root = tmp_path_factory.mktemp("family")
    dirs = {name: root / name for name in ("student", "teacher", "padded", "instruct", "swapped")}
    tiny_llama.save_pretrained(dirs["student"])
    tiny_tokenizer.save_pretrained(dirs["student"])
    torch.manual_seed(11)
    teacher = transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config))
    for name in ("teacher", "instruct", "swapped"):
        teacher.save_pretrained(dirs[name])
    tiny_tokenizer.save_pretrained(dirs["teacher"])
    padded = copy.deepcopy(teacher)
    vocab = len(tiny_tokenizer)
    padded.resize_token_embeddings(vocab + PAD_ROWS, mean_resizing=False)
    with torch.no_grad():
        padded.get_input_embeddings().weight[vocab:] = torch.randn(PAD_ROWS, padded.config.hidden_size) * 3
    assert padded.get_output_embeddings().weight.shape[0] == vocab + PAD_ROWS
    padded.save_pretrained(dirs["padded"])
    tiny_tokenizer.save_pretrained(dirs["padded"])
    _tokenizer_variant(tiny_tokenizer, eos="<|endoftext|>", template=INSTRUCT_TEMPLATE).save_pretrained(
        dirs["instruct"]
    )
    tokens = sorted(tiny_tokenizer.get_vocab(), key=tiny_tokenizer.get_vocab().get)
    _tokenizer_variant(tiny_tokenizer, swap=(tokens[300], tokens[301])).save_pretrained(dirs["swapped"])
    dirs["swapped_tokens"] = (tokens[300], tokens[301])
    return dirs


def _cfg(family, out, *extra, method="target_sft"):
    return two_step_config(family["student"], out, "loss.params.eta=0.5", *extra, method=method)


def test_a_padded_teacher_trains_the_student_its_unpadded_self_trains(family, tmp_path, caplog):
    """Online: the teacher with 128 padding rows of large random weights gives the same final student (1e-5);
    the run says at start what differs and records it in summary.json."""
    caplog.set_level(logging.INFO, logger="targetsft")
    plain = train(_cfg(family, tmp_path / "plain", f"teacher.model={family['teacher']}"))
    padded = train(_cfg(family, tmp_path / "padded", f"teacher.model={family['padded']}"))
    assert_same_weights(Path(plain["final_model"]), Path(padded["final_model"]))
    assert "teacher: shares the student's" in caplog.text
    vocab = json.loads((tmp_path / "padded" / "summary.json").read_text())["vocabulary"]["teacher"]
    assert vocab["other_rows"] == vocab["student_rows"] + PAD_ROWS == vocab["shared_vocab_size"] + PAD_ROWS
    assert "embedding rows" in vocab["note"]
    same = json.loads((tmp_path / "plain" / "summary.json").read_text())["vocabulary"]["teacher"]
    assert same["differences"] == []


def test_a_padded_teachers_cache_equals_the_unpadded_teachers(family, tiny_tokenizer, tmp_path):
    """From a cache: the padded teacher stores no id past the shared vocabulary, its rows equal the unpadded
    teacher's, and the two caches train the same student."""
    from targetsft.training.teacher_cache import TeacherCache

    finals = []
    for name in ("teacher", "padded"):
        cache = tmp_path / f"cache-{name}"
        cfg = _cfg(family, tmp_path / f"run-{name}", f"teacher.cache={cache}")
        cache_teacher(cfg, cache, teacher=str(family[name]), k=16, batch_size=4)
        opened = TeacherCache.open(cache)
        assert opened.shared_vocab_size == len(tiny_tokenizer)
        ids, _ = opened.rows(list(range(len(opened))))
        assert int(ids.max()) < opened.shared_vocab_size
        finals.append(Path(train(cfg)["final_model"]))
    assert_same_weights(*finals)
    manifest = json.loads((tmp_path / "cache-padded" / "manifest.json").read_text())
    assert manifest["vocab_size"] == manifest["shared_vocab_size"] + PAD_ROWS
    assert "embedding rows" in manifest["teacher_vocabulary"]["note"]


def test_target_sft_trainer_with_a_padded_teacher(family, tiny_tokenizer, tmp_path):
    """TRL's trainer: the padded teacher's gradients equal the unpadded teacher's."""
    pytest.importorskip("trl")
    grads = []
    for name in ("teacher", "padded"):
        g, trainer = trl_batch_grads(family["student"], tiny_tokenizer, tmp_path / name, family[name])
        grads.append(g)
        assert trainer.vocab_notes[0]["other_rows"] == len(tiny_tokenizer) + (PAD_ROWS if name == "padded" else 0)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=0, atol=1e-7)


def test_an_instruct_teacher_with_another_eos_and_template_trains(family, tmp_path, caplog):
    """A teacher whose tokenizer differs only in eos and chat template trains; its one-line note is printed and in
    summary.json; with teacher.prompt own_template it reads the prompt in its own template, then exactly the
    student's completion tokens."""
    caplog.set_level(logging.INFO, logger="targetsft")
    summary = train(
        _cfg(family, tmp_path / "run", f"teacher.model={family['instruct']}", "teacher.prompt=own_template")
    )
    assert summary["steps"] == 2
    note = json.loads((tmp_path / "run" / "summary.json").read_text())["vocabulary"]["teacher"]["note"]
    assert "eos_token '<|endoftext|>' (student '<|im_end|>')" in note and "chat template" in note
    assert note in caplog.text
    cfg = _cfg(family, tmp_path / "x", f"teacher.model={family['instruct']}", "teacher.prompt=own_template")
    tok = transformers.AutoTokenizer.from_pretrained(family["student"])
    items, _ = build_dataset(cfg, tok)
    teacher_tok = transformers.AutoTokenizer.from_pretrained(family["instruct"])
    first = items[0]
    start = next(i for i, label in enumerate(first["labels"]) if label != -100)
    t_start = next(i for i, label in enumerate(first["teacher_labels"]) if label != -100)
    assert first["teacher_input_ids"][t_start:] == first["input_ids"][start:]
    assert teacher_tok.decode(first["teacher_input_ids"][:t_start]).startswith("### user:\n")
    assert tok.decode(first["input_ids"][:start]).startswith("<|im_start|>system")


def test_a_teacher_whose_ids_differ_is_refused_naming_the_token(family, tmp_path):
    a, b = family["swapped_tokens"]
    with pytest.raises(ValueError, match=f"gives id 300 to {b!r}, the student's to {a!r}"):
        train(_cfg(family, tmp_path / "run", f"teacher.model={family['swapped']}"))


# --------------------------------------------------------------------------------------------------- packing


def _one_sgd_step(student_dir, tokenizer, tmp_path, *, method, teacher, packing, params=None):
    """The weights after one SGD step at rate 1 of TargetSFTTrainer, and the weights before it."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from targetsft.training.trl_trainer import TargetSFTTrainer

    rows = [
        {"prompt": f"Q{i}: what is {i} plus {3 * i}?", "completion": f" It is {4 * i}. " * (1 + i % 3)}
        for i in range(8)
    ]
    model = transformers.AutoModelForCausalLM.from_pretrained(student_dir, attn_implementation="sdpa")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = TargetSFTTrainer(
        model=model,
        args=trl.SFTConfig(
            str(tmp_path / f"{method}-{packing}"),
            report_to=[],
            use_cpu=True,
            max_steps=1,
            per_device_train_batch_size=8,
            learning_rate=1.0,
            lr_scheduler_type="constant",
            optim="sgd",
            bf16=False,
            max_length=256 if packing else None,
            packing=packing,
            save_strategy="no",
            disable_tqdm=True,
            gradient_checkpointing=False,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        method=method,
        method_params=params or {},
        teacher_model=teacher,
    )
    if packing:
        batch = next(iter(trainer.get_train_dataloader()))
        assert "position_ids" in batch and batch["input_ids"].shape[0] == 1  # several examples in one row
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, before


@pytest.mark.parametrize("packing", [False, True])
def test_kd_against_a_copy_of_the_student_moves_nothing_packed_or_not(family, tiny_tokenizer, tmp_path, packing):
    """KD's gradient is p − π_T = 0 when the teacher is the student itself and sees the student's very contexts:
    under TRL's packing the teacher gets the packed sequences' boundaries (position ids), so one SGD step at rate 1
    leaves the weights where they were."""
    teacher = transformers.AutoModelForCausalLM.from_pretrained(family["student"], attn_implementation="sdpa")
    after, before = _one_sgd_step(
        family["student"], tiny_tokenizer, tmp_path, method="kd", teacher=teacher, packing=packing
    )
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved < 1e-6, moved


@pytest.mark.parametrize("packing", [False, True])
def test_target_sft_at_eta_1_against_a_copy_equals_dft_packed_or_not(family, tiny_tokenizer, tmp_path, packing):
    teacher = transformers.AutoModelForCausalLM.from_pretrained(family["student"], attn_implementation="sdpa")
    ours, _ = _one_sgd_step(
        family["student"],
        tiny_tokenizer,
        tmp_path,
        method="target_sft",
        teacher=teacher,
        packing=packing,
        params={"eta": 1.0},
    )
    dft, _ = _one_sgd_step(
        family["student"], tiny_tokenizer, tmp_path / "dft", method="dft", teacher=None, packing=packing
    )
    for k in dft:
        torch.testing.assert_close(ours[k], dft[k], rtol=0, atol=1e-5, msg=k)


def test_a_teacher_cache_under_packing_is_refused(family, tiny_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from targetsft.training.trl_trainer import TargetSFTTrainer

    with pytest.raises(ValueError, match="packing merges away"):
        TargetSFTTrainer(
            model=transformers.AutoModelForCausalLM.from_pretrained(family["student"]),
            args=trl.SFTConfig(str(tmp_path), report_to=[], use_cpu=True, packing=True, max_length=64),
            train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b"}]),
            processing_class=tiny_tokenizer,
            method="kd",
            teacher_cache=object(),
        )


@pytest.mark.parametrize("teacher", ["online", "cache"])
def test_packed_training_equals_padded_training(family, tiny_tokenizer, tmp_path, teacher):
    """``data.packing``: the batch's examples end to end in one row, each attending only to itself, so training
    packed ends with the padded run's weights (1e-5), with an online teacher and from a teacher cache."""
    extra = [f"teacher.model={family['teacher']}"]
    if teacher == "cache":
        cache = tmp_path / "cache"
        cache_teacher(
            _cfg(family, tmp_path / "c", f"teacher.cache={cache}"), cache, teacher=str(family["teacher"]), k=8
        )
        extra = [f"teacher.cache={cache}"]
    finals = [Path(train(_cfg(family, tmp_path / f"p{p}", *extra, f"data.packing={p}"))["final_model"]) for p in (0, 1)]
    assert_same_weights(*finals)


def test_packed_batches_are_one_row_with_restarting_positions(tiny_tokenizer):
    from targetsft.training.dataset import Collator

    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "example_index": 0},
        {"input_ids": [8, 9], "labels": [8, 9], "example_index": 1},  # a label at position 0: never a target
    ]
    batch = Collator(tiny_tokenizer.pad_token_id, packing=True)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 7 does not predict 8 across examples
    assert batch["example_index"].tolist() == [0, 1] and "attention_mask" not in batch
    with pytest.raises(ValueError, match="prompt of its own"):
        Collator(0, packing=True)([{**features[0], "teacher_input_ids": [1], "teacher_labels": [1]}])


def test_target_loss_gives_a_packed_batchs_boundaries_to_the_teacher(tiny_llama, tiny_tokenizer):
    """``TargetLoss`` (the logits-level hook) under a packed batch: KD against a copy of the student has a zero
    gradient only if the teacher attends within each example as the student does (position ids restarting)."""
    import targetsft

    student, teacher = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    loss_fn = targetsft.TargetLoss("kd", teacher=teacher).bind(student, tiny_tokenizer, tiny_tokenizer)
    lengths = [7, 5, 9]
    ids = torch.randint(0, len(tiny_tokenizer), (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)] = -100  # no token predicts across examples
    out = student(input_ids=ids, position_ids=positions)
    loss_fn(out, labels).backward()
    largest = max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None)
    assert largest < 1e-8, largest
