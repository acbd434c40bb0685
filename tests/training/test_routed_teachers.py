"""Routed teachers (``teachers:``): one teacher per kind of example, chosen by a field of the record.

Checked by construction on tiny random models: every example routed to teacher A trains the student A alone
trains; half routed to A and half to B trains the student that one cache assembled from A's rows for the first half
and B's for the second trains; examples routed to no teacher train Target-SFT as DFT (their rows have no teacher).
Then the batch-level routing (rows back in batch order, the sub-batches a teacher is asked for and prefetches), the
statistics in the logs, ``summary.json`` and the model card, and the configuration's errors.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_same_weights, tiny_model, two_step_config

transformers = pytest.importorskip("transformers")

from targetsft.losses.validation import MISSING_ID  # noqa: E402
from targetsft.runtime.inputs import InputError  # noqa: E402
from targetsft.training.config import ConfigError  # noqa: E402
from targetsft.training.dataset import Collator, build_dataset  # noqa: E402
from targetsft.training.recipe import train  # noqa: E402
from targetsft.training.routed_teacher import RoutedTeacher, route_records  # noqa: E402
from targetsft.training.teacher_cache import TeacherCache, cache_teacher  # noqa: E402

K = 8
RECORDS = [
    {"prompt": f"What is {i} plus {3 * i}?", "completion": f" It is {4 * i}. " * (1 + i % 3), "domain": "math"}
    for i in range(4)
] + [
    {"prompt": f"Write code that prints {i}.", "completion": f" print({i})  # prints {i}", "domain": "code"}
    for i in range(4, 8)
]


def _teachers(*entries):
    return "teachers=" + json.dumps(list(entries))


def _cfg(setup, out, *extra, method="target_sft"):
    params = ("loss.params.eta=0.5",) if method == "target_sft" else ()
    return two_step_config(
        setup["student"],
        out,
        f"data.train={setup['data']}",
        "train.optim=sgd",
        "train.learning_rate=1.0",
        *params,
        *extra,
        method=method,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """The student, two teachers of other random weights (A, B), the training records (4 math, then 4 code) and
    each teacher's cache over them (k 8, one shard per half)."""
    root = tmp_path_factory.mktemp("routed")
    dirs = {"student": root / "student", "data": root / "data.jsonl"}
    tiny_llama.save_pretrained(dirs["student"])
    tiny_tokenizer.save_pretrained(dirs["student"])
    dirs["data"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    for name, seed in (("A", 11), ("B", 12)):
        folder = root / f"teacher-{name}"
        teacher = tiny_model("llama", len(tiny_tokenizer), seed=seed, tie_word_embeddings=True)
        with torch.no_grad():  # peaked distributions: the two teachers' top-k rows differ in earnest
            teacher.get_input_embeddings().weight.mul_(20.0)
        teacher.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        cache = root / f"cache-{name}"
        cfg = _cfg(dirs, root / "unused", f"teacher.cache={cache}")
        cache_teacher(cfg, cache, teacher=str(folder), k=K, batch_size=4, shard_examples=4)
        dirs[f"cache-{name}"], dirs[f"teacher-{name}"] = cache, folder
    return dirs


@pytest.fixture(scope="module")
def alone_a(setup, tmp_path_factory):
    """The final model of a run with teacher A's cache alone."""
    out = tmp_path_factory.mktemp("alone-a")
    return Path(train(_cfg(setup, out, f"teacher.cache={setup['cache-A']}"))["final_model"])


def _difference(a, b):
    """The largest difference between the weights of two model folders."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(Path(f) / "model.safetensors")) for f in (a, b))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _assembled_cache(setup, folder):
    """A cache of A's rows for examples 0-3 (A's first shard) and B's for 4-7 (B's second shard)."""
    shutil.copytree(setup["cache-A"], folder)
    (folder / "label_stats.json").unlink(missing_ok=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    b = json.loads((setup["cache-B"] / "manifest.json").read_text())
    assert [s["end"] for s in manifest["shards"]] == [4, 8]
    shutil.copyfile(setup["cache-B"] / b["shards"][1]["file"], folder / manifest["shards"][1]["file"])
    manifest["shards"][1] = b["shards"][1]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_every_example_routed_to_a_trains_what_a_alone_trains(setup, alone_a, tmp_path):
    routed = _teachers({"name": "A", "select": {"domain": ["math", "code"]}, "cache": str(setup["cache-A"])})
    summary = train(_cfg(setup, tmp_path / "routed", routed))
    assert_same_weights(alone_a, Path(summary["final_model"]))
    teachers = summary["teachers"]
    assert teachers["A"]["examples"] == 8 and teachers["none"]["examples"] == 0
    assert teachers["A"]["trained_examples"] == 8 and teachers["A"]["cache"] == str(setup["cache-A"])


def test_half_to_a_and_half_to_b_trains_what_the_assembled_cache_trains(setup, alone_a, tmp_path):
    mixed = _assembled_cache(setup, tmp_path / "cache-mixed")
    reference = train(_cfg(setup, tmp_path / "mixed", f"teacher.cache={mixed}"))
    routed = _teachers(
        {"name": "A", "select": {"domain": "math"}, "cache": str(setup["cache-A"])},
        {"name": "B", "select": {"domain": "code"}, "cache": str(setup["cache-B"])},
    )
    summary = train(_cfg(setup, tmp_path / "routed", routed))
    assert_same_weights(Path(reference["final_model"]), Path(summary["final_model"]))
    assert _difference(alone_a, Path(summary["final_model"])) > 1e-3  # B's rows made a difference

    # the statistics: per teacher in summary.json, per logging step in metrics.csv, one line in the model card
    teachers = json.loads((tmp_path / "routed" / "summary.json").read_text())["teachers"]
    items, _ = build_dataset(
        _cfg(setup, tmp_path / "x", routed), transformers.AutoTokenizer.from_pretrained(setup["student"])
    )
    rows = [sum(label != -100 for label in item["labels"][1:]) for item in items]
    assert teachers["A"]["examples"] == teachers["B"]["examples"] == 4
    assert (teachers["A"]["loss_rows"], teachers["B"]["loss_rows"]) == (sum(rows[:4]), sum(rows[4:]))
    assert teachers["none"] == {"examples": 0, "loss_rows": 0, "trained_examples": 0, "trained_loss_rows": 0}
    assert teachers["A"]["trained_loss_rows"] + teachers["B"]["trained_loss_rows"] == sum(rows)  # one epoch
    assert teachers["B"]["select"] == {"domain": "code"}
    with (tmp_path / "routed" / "metrics.csv").open() as f:
        logged = [r for r in csv.DictReader(f) if r.get("loss")]
    assert len(logged) == 2
    for row in logged:
        shares = [float(row[f"teacher_rows_{name}"]) for name in ("A", "B", "none")]
        assert abs(sum(shares) - 1.0) < 1e-6 and shares[2] == 0.0
    card = (tmp_path / "routed" / "final" / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("Teachers, routed per example"))
    assert f"A (cache {setup['cache-A']}; select" in line and f"{sum(rows[4:])} loss rows" in line
    assert "none: 0 examples, 0 loss rows" in line


def test_examples_routed_to_no_teacher_train_target_sft_as_dft(setup, alone_a, tmp_path):
    """No selector matches: every row has ids −1, where Target-SFT is DFT (γ = p(y), π̃ = sg p)."""
    routed = _teachers({"name": "A", "select": {"domain": "physics"}, "cache": str(setup["cache-A"])})
    summary = train(_cfg(setup, tmp_path / "routed", routed))
    dft = train(_cfg(setup, tmp_path / "dft", method="dft"))
    assert_same_weights(Path(dft["final_model"]), Path(summary["final_model"]))
    assert _difference(alone_a, Path(dft["final_model"])) > 1e-3  # with a teacher, Target-SFT is not DFT
    assert summary["teachers"]["none"]["examples"] == 8 and summary["teachers"]["A"]["examples"] == 0
    with (tmp_path / "routed" / "metrics.csv").open() as f:
        assert all(float(r["teacher_rows_none"]) == 1.0 for r in csv.DictReader(f) if r.get("loss"))


def test_the_documented_commands_build_each_cache_from_the_routed_config_and_train(setup, tmp_path):
    """``cache-teacher --config routed.yaml`` before its caches exist, once per teacher, then ``train``."""
    import yaml

    from targetsft.cli.main import main

    caches = {name: tmp_path / f"cache-{name}" for name in ("math", "code")}
    config = {
        "model": str(setup["student"]),
        "output_dir": str(tmp_path / "run"),
        "precision": "fp32",
        "data": {"train": str(setup["data"]), "max_length": 1024},
        "loss": {"method": "target_sft", "params": {"eta": 0.5}},
        "teachers": [
            {"name": "math", "select": {"domain": "math"}, "cache": str(caches["math"])},
            {"name": "code", "select": {"domain": ["code", "sql"]}, "cache": str(caches["code"])},
        ],
        "train": {"max_steps": 1, "per_device_train_batch_size": 8, "report_to": [], "disable_tqdm": True},
    }
    path = tmp_path / "routed.yaml"
    path.write_text(yaml.safe_dump(config))
    for name, teacher in (("math", "A"), ("code", "B")):
        args = ["cache-teacher", "--config", str(path), "--teacher", str(setup[f"teacher-{teacher}"])]
        assert main([*args, "--out", str(caches[name]), "--k", str(K), "--batch-size", "4"]) == 0
    assert main(["train", "--config", str(path)]) == 0
    teachers = json.loads((tmp_path / "run" / "summary.json").read_text())["teachers"]
    assert teachers["math"]["examples"] == teachers["code"]["examples"] == 4
    assert teachers["code"]["name"] == str(setup["teacher-B"])  # the cache's teacher


# ------------------------------------------------------------------------------------------------ batch level


def _batch(setup, tiny_tokenizer, tmp_path, order):
    routed = _teachers({"name": "A", "select": {"domain": "math"}, "cache": str(setup["cache-A"])})
    items, _ = build_dataset(_cfg(setup, tmp_path, routed), tiny_tokenizer)
    return items, Collator(tiny_tokenizer.pad_token_id)([items[i] for i in order])


class _Recording:
    """A top-k teacher of fixed rows (id ``example_index``, then the next ones) that records what it is asked."""

    temperature = 1.0
    shared_vocab_size = 50

    def __init__(self, k=K, temperature=1.0):
        self.k, self.temperature = k, temperature
        self.asked, self.prefetched = [], []

    def summary(self):
        return {"requests": len(self.asked)}

    def prefetch(self, batch):
        self.prefetched.append(batch["example_index"].tolist())

    def batch_rows(self, batch):
        self.asked.append(batch["example_index"].tolist())
        counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
        first = torch.cat([torch.full((n,), i) for i, n in zip(batch["example_index"].tolist(), counts)])
        ids = first[:, None] + torch.arange(self.k)
        return ids, torch.full(ids.shape, -3.0)


def test_rows_come_back_in_batch_order_and_unrouted_examples_get_no_teacher(setup, tiny_tokenizer, tmp_path):
    order = [5, 0, 6, 2]
    items, batch = _batch(setup, tiny_tokenizer, tmp_path, order)
    routes = [item["teacher_route"] for item in items]
    assert routes == ["A"] * 4 + [None] * 4
    cache = TeacherCache.open(setup["cache-A"])
    routed = RoutedTeacher({"A": cache}, routes)
    ids, lps = routed.batch_rows(batch)
    counts = [sum(label != -100 for label in items[i]["labels"][1:]) for i in order]
    start = 0
    for i, n in zip(order, counts):
        if routes[i] == "A":
            want_ids, want_lps = cache.example(i)
            assert torch.equal(ids[start : start + n], want_ids) and torch.equal(lps[start : start + n], want_lps)
        else:
            assert bool((ids[start : start + n] == MISSING_ID).all()) and bool(
                torch.isinf(lps[start : start + n]).all()
            )
        start += n
    assert start == ids.shape[0] and ids.shape[1] == K
    assert routed.take_shares() == {
        "rows_A": sum(counts[1::2]) / sum(counts),
        "rows_none": sum(counts[::2]) / sum(counts),
    }


def test_each_teacher_is_asked_and_prefetched_for_its_own_examples(setup, tiny_tokenizer, tmp_path):
    items, batch = _batch(setup, tiny_tokenizer, tmp_path, [4, 1, 7, 3, 0])
    a, b = _Recording(), _Recording()
    routed = RoutedTeacher({"A": a, "B": b}, ["A"] * 4 + ["B"] * 3 + [None])
    routed.prefetch(batch)
    ids, _ = routed.batch_rows(batch)
    assert a.prefetched == a.asked == [[1, 3, 0]] and b.prefetched == b.asked == [[4]]
    firsts = [int(i) for i in ids[:, 0].unique_consecutive()]  # each example's rows start at its own index
    assert firsts == [4, 1, MISSING_ID, 3, 0]
    assert routed.shared_vocab_size == 50 and routed.temperature == 1.0
    summary = routed.summary()
    assert summary["A"]["requests"] == 1 and summary["A"]["trained_examples"] == 3
    assert summary["none"]["trained_examples"] == 1 and "requests" not in summary["none"]


def test_teachers_of_another_k_or_temperature_are_refused():
    with pytest.raises(ValueError, match="same top-k per row.*'A': 8, 'B': 4"):
        RoutedTeacher({"A": _Recording(), "B": _Recording(k=4)}, ["A", "B"])
    with pytest.raises(ValueError, match="one temperature"):
        RoutedTeacher({"A": _Recording(), "B": _Recording(temperature=2.0)}, ["A", "B"])
    with pytest.raises(ValueError, match="routed to 'C'"):
        RoutedTeacher({"A": _Recording()}, ["A", "C"])


# ------------------------------------------------------------------------------------------------ configuration


def test_a_selector_field_no_record_has_is_refused(setup, tiny_tokenizer, tmp_path):
    routed = _teachers({"name": "A", "select": {"domian": "math"}, "cache": str(setup["cache-A"])})
    with pytest.raises(InputError, match="'A' selects on field 'domian', which no training record has.*domain"):
        build_dataset(_cfg(setup, tmp_path, routed), tiny_tokenizer)


def test_the_first_matching_selector_wins():
    class Entry:
        def __init__(self, name, select):
            self.name, self.select = name, select

    records = [{"d": "math", "lang": "en"}, {"d": "math", "lang": "fr"}, {"d": "code"}, {"d": 3}]
    teachers = [Entry("fr", {"d": "math", "lang": "fr"}), Entry("any", {"d": ["math", "code"]})]
    assert route_records(records, teachers) == ["any", "fr", "any", None]


ENTRY = {"name": "A", "select": {"domain": "math"}, "cache": "c"}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ([_teachers(ENTRY, {**ENTRY, "cache": "d"})], "the name 'A' is given twice"),
        ([_teachers({"name": "A", "select": {"domain": "math"}})], r"teachers\[0\] \(A\) has no teacher source"),
        ([_teachers({**ENTRY, "server": {"url": "http://x"}})], "has both cache and server"),
        ([_teachers({**ENTRY, "cache": None, "model": "m"})], "an online teacher.model is not routed"),
        ([_teachers({**ENTRY, "name": "none"})], "other than 'none'"),
        ([_teachers({**ENTRY, "select": {}})], "must be a mapping of a record field"),
        ([_teachers({**ENTRY, "select": {"domain": []}})], "a value or a non-empty list"),
        ([_teachers({**ENTRY, "selector": {}})], r"unknown key 'selector' in teachers\[0\]"),
        (["teachers={name: A}"], "teachers must be a list"),
        ([_teachers(ENTRY), "teacher.cache=c"], "give teachers or teacher.cache, not both"),
        ([_teachers(ENTRY), "loss.method=sft", "loss.params={}"], "'sft' does not use a teacher; remove teachers"),
        ([_teachers(ENTRY), "data.packing=true"], "set data.packing false"),
        ([_teachers(ENTRY), "data.eval=0.25"], "data.eval with teachers"),
        (
            [_teachers({**ENTRY, "cache": None, "server": {"url": "http://x"}}), "loss.params.temperature=2.0"],
            "temperature 1",
        ),
        ([_teachers({**ENTRY, "cache": None, "server": {"url": "ftp://x"}})], r"teachers\[0\].server.url must be"),
    ],
)
def test_config_errors(extra, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        two_step_config("m", tmp_path, "loss.params.eta=0.5", *extra)


def test_a_routed_config_parses_and_round_trips(tmp_path):
    from targetsft.training.config import RoutedTeacherConfig, TeacherServerConfig

    server = {"name": "code", "select": {"domain": "code"}, "server": {"url": "http://127.0.0.1:8000", "top_k": 8}}
    cfg = two_step_config("m", tmp_path, _teachers(ENTRY, server))
    assert cfg.teachers[0] == RoutedTeacherConfig(name="A", select={"domain": "math"}, cache="c")
    assert isinstance(cfg.teachers[1].server, TeacherServerConfig) and cfg.teachers[1].server.top_k == 8
    assert cfg.to_dict()["teachers"][1]["server"]["url"] == "http://127.0.0.1:8000"
