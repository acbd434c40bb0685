"""A CPU dress rehearsal of ``experiments/gpu_paper_cell.yaml``: the very file, with its hub models replaced by tiny
random-weight Qwen2 models of the real shapes (a 151,936-row student, a 152,064-row instruct teacher, one tokenizer
of 151,665 tokens whose base and instruct releases differ in eos and chat template) and its data by a few local
records, run end to end: teacher cache build, training from the cache and with the online teacher, evaluation with
``prompt: boxed``. So the first GPU run of the cell is not its first run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

transformers = pytest.importorskip("transformers")
from conftest import tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QWEN_TOKENS, STUDENT_ROWS, TEACHER_ROWS = 151_665, 151_936, 152_064
BASE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
INSTRUCT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _qwen_like_tokenizer(eos: str, template: str):
    """A byte-level tokenizer with Qwen2.5's sizes: 151,643 ordinary tokens (the 256 bytes, then fillers no text
    produces) and 22 special tokens from id 151,643 on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(151_643 - len(vocab))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(19)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token="<|endoftext|>")
    tok.chat_template = template
    assert len(tok) == QWEN_TOKENS
    return tok


def _qwen2(rows: int, tok, seed: int):
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    small["num_key_value_heads"] = 1
    ids = dict(tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tiny_model("qwen2", rows, seed, **small, **ids)


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_cell")
    models = {}
    for name, rows, eos, template, seed in (
        ("Qwen/Qwen2.5-Math-1.5B", STUDENT_ROWS, "<|endoftext|>", BASE_TEMPLATE, 0),
        ("Qwen/Qwen2.5-Math-7B-Instruct", TEACHER_ROWS, "<|im_end|>", INSTRUCT_TEMPLATE, 1),
    ):
        folder = root / name.split("/")[-1]
        tok = _qwen_like_tokenizer(eos, template)
        _qwen2(rows, tok, seed).save_pretrained(folder)
        tok.save_pretrained(folder)
        models[name] = str(folder)
    train = root / "numina.jsonl"
    train.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {a} + {a + 3}?"},
                        {"role": "assistant", "content": f"{a} + {a + 3} = {2 * a + 3}. \\boxed{{{2 * a + 3}}}"},
                    ]
                }
            )
            + "\n"
            for a in range(10)
        )
    )
    math500 = root / "math500.jsonl"
    problems = [{"question": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(3)]
    math500.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return {"models": models, "train": str(train), "math500": str(math500), "root": root}


def _rehearsal_config(cell, out: Path) -> Path:
    """gpu_paper_cell.yaml with the hub ids mapped to the tiny models and the sizes cut to seconds."""
    exp = yaml.safe_load((ROOT / "experiments" / "gpu_paper_cell.yaml").read_text())
    hub = cell["models"]
    exp["output_dir"] = str(out)
    exp.pop("results_dir", None)
    exp["base"]["model"] = hub[exp["base"]["model"]]
    exp["base"]["precision"] = "fp32"
    exp["base"]["data"].update(train=cell["train"], size=8, max_length=256)
    exp["base"]["train"].update(
        max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1, report_to=[]
    )
    for group in exp["grid"]:
        teacher = group.get("teacher", {})
        if teacher.get("model") in hub:
            teacher.update(model=hub[teacher["model"]], dtype="float32")
    exp["teacher_cache_k"] = 16
    exp["gamma_probe"] = 2
    exp["eval"] = [
        {**spec, "set": cell["math500"], "samples": 2, "max_new_tokens": 6, "batch_size": 3, "dtype": "float32"}
        | {"engine": "compact"}
        for spec in exp["eval"]
    ]
    path = out.parent / "gpu_paper_cell.rehearsal.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_the_paper_cell_runs_end_to_end_with_the_real_shapes(cell, tmp_path):
    from targetsft.cli.main import main
    from targetsft.training.config import config_from_dict
    from targetsft.training.recipe import train
    from targetsft.training.teacher_cache import TeacherCache

    out = tmp_path / "cell"
    config = _rehearsal_config(cell, out)
    assert main(["experiment", "--config", str(config), "--no-progress"]) == 0
    runs = {p.name: p for p in (out / "runs").iterdir()}
    instruct = next(p for name, p in runs.items() if name.startswith("ts-math7b-instruct"))
    assert any(name.startswith("ts-self") for name in runs) and any(name.startswith("dft") for name in runs)
    for run in runs.values():
        assert (run / "DONE.json").is_file(), run.name
    results = (out / "results.csv").read_text()
    assert results.count("math500") >= 5  # the baseline and four runs, each scored with prompt: boxed

    summary = json.loads((instruct / "summary.json").read_text())
    cache = TeacherCache.open(summary["teacher"]["cache"])
    assert (cache.vocab_size, cache.shared_vocab_size) == (TEACHER_ROWS, QWEN_TOKENS)
    ids, _ = cache.rows(list(range(len(cache))))
    assert int(ids.max()) < QWEN_TOKENS
    note = summary["teacher"]["vocabulary"]["note"]
    assert "eos_token '<|im_end|>' (student '<|endoftext|>')" in note and "chat template" in note
    assert "embedding rows 152,064 (399 past the shared tokens" in note

    # the same run with the teacher online, one step
    run_config = json.loads((instruct / "run.json").read_text())["config"]
    run_config.update(output_dir=str(tmp_path / "online"))
    run_config["train"]["max_steps"] = 1
    online = train(config_from_dict(run_config))
    vocab = online["vocabulary"]["teacher"]
    assert (vocab["shared_vocab_size"], vocab["student_rows"], vocab["other_rows"]) == (
        QWEN_TOKENS,
        STUDENT_ROWS,
        TEACHER_ROWS,
    )
    assert online["steps"] == 1 and online["metrics"]["last_loss"] > 0
