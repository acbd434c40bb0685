"""A teacher served by vLLM's OpenAI-compatible server (``teacher.server``).

The tests marked ``vllm`` start one real server (``python -m vllm.entrypoints.openai.api_server`` on the embedded
SmolLM2-135M-Instruct, float32, on 127.0.0.1; minutes to come up on two cores) for the module and stop it by its
process id (``TARGETSFT_TEST_VLLM_URL`` names one already up instead). By construction: the served teacher trains
the same student as a cache built by the vLLM engine from the same model, by ids and by text; a server that stops
mid-run stops the run with one line naming it, and ``--resume`` after it is back gives the weights of an
uninterrupted run. The client's errors and retries are tested against a small fake server without vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import assert_same_weights, two_step_config
from targetsft.training.served_teacher import ServedTeacher, TeacherServer, TeacherServerError
from targetsft.training.text_alignment import map_to_student, map_tokens, map_topk_to_student


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a fake server: canned answers, to test the client without vLLM ---------------------------------------------


class _Fake(BaseHTTPRequestHandler):
    script: list[tuple[int, dict]] = []  # answers to /v1/completions, in order (status, body)
    seen: list[dict] = []

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"data": [{"id": "fake-teacher", "max_model_len": 64}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).seen.append(body)
        if self.path == "/tokenize":
            self._send(200, {"tokens": [ord(c) % 7 for c in body["prompt"]]})
            return
        status, answer = type(self).script.pop(0) if type(self).script else (200, _answer(body["prompt"], 2))
        self._send(status, answer)


def _answer(prompt: list[int], k: int) -> dict:
    """prompt_logprobs as vLLM gives them: None first, then per token a dict of the top-k (and the token itself)."""
    rows = [None]
    for t in prompt[1:]:
        entry = {str(10 + j): {"logprob": -1.0 - j, "rank": j + 1} for j in range(k)}
        entry.setdefault(str(t), {"logprob": -20.0, "rank": 999})
        rows.append(entry)
    return {"choices": [{"prompt_logprobs": rows}]}


@pytest.fixture
def fake():
    _Fake.script, _Fake.seen = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_the_client_reads_prompt_logprobs_by_rank_and_retries_a_failed_request(fake):
    _Fake.script = [(503, {"error": "busy"}), (200, _answer([5, 6, 7, 8], 2))]
    server = TeacherServer(fake, backoff=0.0)
    assert server.model == "fake-teacher"  # the only one served
    rows = server.prompt_logprobs([5, 6, 7], 2)
    assert rows == [((10, 11), (-1.0, -2.0))] * 3  # the token's own entry (rank 999) is not in the top-k
    assert _Fake.seen[-1]["prompt"] == [5, 6, 7, 7]  # one token appended: the last position's row comes back too
    assert len(_Fake.seen) == 2  # the 503 was tried again


def test_an_unreachable_or_wrong_server_is_one_line_naming_it(fake):
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(TeacherServerError, match=f"teacher server {dead}: no answer .* after 2 tries"):
        TeacherServer(dead, retries=1, backoff=0.0)
    with pytest.raises(TeacherServerError, match="does not serve 'other'"):
        TeacherServer(fake, "other").max_model_len()
    _Fake.script = [(400, {"error": "prompt too long"})]
    with pytest.raises(TeacherServerError, match="HTTP 400.*prompt too long"):
        TeacherServer(fake).prompt_logprobs([1, 2], 2)
    tok = _CharTokenizer()
    with pytest.raises(TeacherServerError, match="tokenizes text otherwise"):
        ServedTeacher(TeacherServer(fake), k=2).check(tok)


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 5 for c in text]}


def test_serve_teacher_prints_the_server_command(capsys):
    from targetsft.cli.main import main

    args = ["serve-teacher", "loss.method=kd", "teacher.server.url=http://127.0.0.1:8011",
            f"teacher.server.model={MODEL}", "teacher.server.top_k=32", "--print-command",
            "--vllm-arg=--enforce-eager"]  # fmt: skip
    assert main(args) == 0
    line = capsys.readouterr().out.split()
    assert line[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(line[3::2], line[4::2]))
    assert flags["--served-model-name"] == MODEL and flags["--port"] == "8011" and flags["--max-logprobs"] == "32"
    assert flags["--host"] == "127.0.0.1" and Path(flags["--model"]).is_dir() and line[-1] == "--enforce-eager"
    assert main(["serve-teacher", "loss.method=kd", "teacher.cache=x", "--print-command"]) == 2  # no server section


def test_the_server_computes_on_every_allowed_core_without_cuda(monkeypatch):
    """On a CPU the server's environment binds vLLM's threads to this process's cores and reserves none (vLLM's
    default reserves one of them); settings the user made are kept."""
    from targetsft.cli.serve_teacher import server_environment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env = server_environment()
    cpus = sorted(os.sched_getaffinity(0))
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1" and str(cpus[-1]) in env["VLLM_CPU_OMP_THREADS_BIND"]
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU")
    assert server_environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_cli_names_an_unreachable_server_in_one_line(tmp_path, capsys):
    from targetsft.cli.main import main

    url = f"http://127.0.0.1:{_free_port()}"
    code = main(
        ["train", f"output_dir={tmp_path}", "loss.method=target_sft", f"teacher.server.url={url}",
         "teacher.server.retries=0", "data.size=4", "train.max_steps=1"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and url in err[0], err


def test_top_k_rows_map_to_the_student_as_the_logits_do(tiny_tokenizer):
    """:func:`map_topk_to_student` of the whole vocabulary's rows equals :func:`map_to_student` of the logits."""
    token_map = map_tokens(tiny_tokenizer, tiny_tokenizer)
    logits = torch.randn(5, len(tiny_tokenizer), generator=torch.Generator().manual_seed(0)) * 3
    lps, ids = logits.double().log_softmax(-1).sort(-1, descending=True)
    a_ids, a_lps, a_mass = map_to_student(logits, token_map, 16)
    b_ids, b_lps, b_mass = map_topk_to_student(ids, lps.float(), token_map, 16)
    assert torch.equal(a_ids, b_ids)
    torch.testing.assert_close(a_lps, b_lps, rtol=0, atol=1e-6)
    torch.testing.assert_close(a_mass, b_mass, rtol=0, atol=1e-6)


# --- a real vLLM server --------------------------------------------------------------------------------------------


MODEL = "smollm2-135m-instruct"  # the embedded model, served under this name


def _start_server(url: str) -> subprocess.Popen:
    """``target-sft serve-teacher``'s command for the embedded model at ``url`` (float32, eager), in a process
    group of its own."""
    from targetsft.cli.serve_teacher import server_command, server_environment
    from targetsft.training.config import load_config

    cfg = load_config(None, ["loss.method=target_sft", f"teacher.server.url={url}", f"teacher.server.model={MODEL}",
                             "teacher.dtype=float32"])  # fmt: skip
    env = {**server_environment(), "VLLM_CPU_KVCACHE_SPACE": "1"}  # a 1 GiB KV cache: room beside the student
    command = server_command(cfg, ["--enforce-eager"])
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)


@pytest.fixture(scope="module")
def vllm_url(need_vllm):
    if os.environ.get("TARGETSFT_TEST_VLLM_URL"):  # a server of the embedded model already up (as started below)
        yield os.environ["TARGETSFT_TEST_VLLM_URL"]
        return
    url = f"http://127.0.0.1:{_free_port()}"
    proc = _start_server(url)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                TeacherServer(url, retries=0, timeout=5).models()
                break
            except TeacherServerError:
                if time.monotonic() > deadline:
                    pytest.fail("the vLLM server did not come up in 15 minutes")
                time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and its engine process
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _cfg(out, *extra):
    from targetsft.runtime.models import resolve_model

    return two_step_config(
        resolve_model(None), out, "train.optim=sgd", "train.per_device_train_batch_size=2", "data.max_length=256",
        *extra,
    )  # fmt: skip


@pytest.mark.vllm
def test_a_served_teacher_trains_as_the_vllm_engines_cache_by_ids_and_by_text(vllm_url, tmp_path):
    """2 SGD steps from the served teacher (top-64, by ids; and by text with the student's own tokenizer, where
    every boundary meets) end at the weights of 2 steps from a top-64 cache built by the vLLM engine (1e-5); so do
    2 steps from caches that ``cache-teacher`` builds from the server, by ids and by text."""
    from targetsft.runtime.models import resolve_model
    from targetsft.training.recipe import cache_teacher, train

    served = [f"teacher.server.url={vllm_url}", f"teacher.server.model={MODEL}"]
    text = ["teacher.align=text", "teacher.align_top_k=64"]
    engine_cache = tmp_path / "engine-cache"
    cfg = _cfg(tmp_path / "c", f"teacher.model={resolve_model(None)}")
    cache_teacher(cfg, engine_cache, k=64, engine="vllm", precision="fp32")
    reference = Path(train(_cfg(tmp_path / "from-engine-cache", f"teacher.cache={engine_cache}"))["final_model"])
    runs = {
        "served": _cfg(tmp_path / "served", *served),
        "served-text": _cfg(tmp_path / "served-text", *served, *text),
    }
    for name, extra in (("ids", []), ("text", text)):
        cache = tmp_path / f"server-cache-{name}"
        cache_teacher(_cfg(tmp_path / f"c-{name}", *served, *extra), cache, k=64)
        runs[f"server-cache-{name}"] = _cfg(tmp_path / f"from-server-cache-{name}", f"teacher.cache={cache}", *extra)
    for run_cfg in runs.values():
        assert_same_weights(reference, Path(train(run_cfg)["final_model"]))
    summary = json.loads((tmp_path / "served-text" / "summary.json").read_text())
    assert summary["teacher"]["url"] == vllm_url and summary["teacher"]["requests"] > 0
    assert summary["teacher_alignment"]["aligned_positions"] == 1.0
    manifest = json.loads((tmp_path / "server-cache-text" / "manifest.json").read_text())
    assert manifest["build"]["engine"] == "server" and manifest["align"] == "text"
    assert manifest["alignment"]["aligned_positions"] == 1.0 and "aligned_mass_topk" in manifest["alignment"]


class _Proxy:
    """A forwarding HTTP server in front of the vLLM server, stopped and started again by the test (the teacher's
    server going away mid-run and coming back)."""

    def __init__(self, target: str) -> None:
        self.target, self.port, self.httpd = target, _free_port(), None

    def start(self) -> None:
        import requests

        target = self.target

        class Forward(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                answer = requests.request(
                    method, target + self.path, data=body, headers={"content-type": "application/json"}
                )
                self.send_response(answer.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Forward)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.vllm
def test_a_server_lost_mid_run_stops_it_and_resume_gives_the_uninterrupted_weights(vllm_url, tmp_path):
    from transformers import TrainerCallback

    from targetsft.training.recipe import train

    proxy = _Proxy(vllm_url)
    proxy.start()

    class StopServer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                proxy.stop()

    steps = ["train.max_steps=4", "train.save_steps=1", "teacher.server.retries=1"]
    cfg = _cfg(tmp_path / "cut", f"teacher.server.url=http://127.0.0.1:{proxy.port}", *steps)
    with pytest.raises(TeacherServerError, match=rf"127\.0\.0\.1:{proxy.port}.*training step 3"):
        train(cfg, callbacks=[StopServer()])
    proxy.start()
    resumed = train(cfg, resume=True)
    proxy.stop()
    whole = train(_cfg(tmp_path / "whole", f"teacher.server.url={vllm_url}", *steps))
    assert_same_weights(Path(whole["final_model"]), Path(resumed["final_model"]))


def test_trl_reads_a_served_teacher_for_each_examples_own_sequence(fake, tiny_tokenizer, tiny_llama, tmp_path):
    """``TargetSFTTrainer(teacher=ServedTeacher(...))``: each request is one example's sequence as TRL tokenized it
    (its padding dropped), the requests of a batch start when it is collated, and the run trains."""
    import copy

    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from targetsft.training.trl_trainer import TargetSFTTrainer

    rows = [{"prompt": f"What is {i} + {i}?", "completion": f" {2 * i}"} for i in range(1, 5)]
    teacher = ServedTeacher(TeacherServer(fake), k=2, shared_vocab_size=len(tiny_tokenizer))
    args = trl.SFTConfig(str(tmp_path), report_to=[], use_cpu=True, max_steps=1, per_device_train_batch_size=4,
                         save_strategy="no", disable_tqdm=True, optim="sgd", learning_rate=1e-2)  # fmt: skip
    trainer = TargetSFTTrainer(
        model=copy.deepcopy(tiny_llama), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer, method="target_sft", teacher=teacher,
    )  # fmt: skip
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    sent = sorted(tuple(b["prompt"][:-1]) for b in _Fake.seen if "prompt_logprobs" in b)
    expected = sorted(tuple(x["input_ids"]) for x in trainer.train_dataset)
    assert sent == expected and teacher.requests == 4
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
