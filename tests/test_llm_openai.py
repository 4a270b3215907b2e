"""The `openai` backend against a local completions server on 127.0.0.1 (http.server in a thread)."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from nlrewrite_core.config import LLMConfig
from nlrewrite_core.llm import LLMError, Prompt, make_llm
from nlrewrite_core.simulate import llm_predictions

KEY = "sk-test-7Qx9ZpR2vLm4TnW8yKc3hJ5d"  # no 8-character piece of it occurs by chance


class Server:
    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[dict] = []
        self.auth: set[str] = set()
        self.fail: dict[str, list[int]] = {}  # prompt text -> statuses to answer first
        self.delay = 0.05
        self.hang = 0.0
        self.echo = None  # (prompt, k) -> completion choice, for requests with echo (prompt logprobs)
        self.echo_auth = False  # error bodies (and answers) echo the request's Authorization header


@pytest.fixture
def server():
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep the test output quiet
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                state.requests.append(body)
                state.auth.add(self.headers.get("Authorization", ""))
                queue = state.fail.get(body["prompt"], [])
                status = queue.pop(0) if queue else 200
            try:
                time.sleep(state.delay + state.hang)
                auth = self.headers.get("Authorization", "")
                if status != 200:
                    self.send_response(status)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    if state.echo_auth:  # an adversarial endpoint: the key straddles the 300th character, then cut
                        err = ("invalid request: " + "x" * 240 + " you sent Authorization: " + auth
                               + " | key as stored: " + auth[len("Bearer "):][:-2])
                        assert 280 < err.index(KEY) < 300
                        self.wfile.write(err.encode())
                    else:
                        self.wfile.write(b'{"error": "busy"}')
                    return
                n_in = len(body["prompt"].split())
                if body.get("echo") and state.echo is not None:
                    choice, n_out = state.echo(body["prompt"], body["logprobs"]), 1
                elif body.get("logprobs"):
                    digit = str(len(body["prompt"]) % 10)
                    top = {digit: -0.1, " 9": -3.0, "x": -4.0}
                    choice = {"text": digit, "logprobs": {"tokens": [digit], "top_logprobs": [top]}}
                    n_out = 1
                else:
                    choice = {"text": f"reasoning...\n[EXPLANATION]: answer to {n_in} words"
                                      + (f" (your header: {auth})" if state.echo_auth else "")}
                    n_out = 7
                data = json.dumps({"choices": [choice], "usage": {"prompt_tokens": n_in, "completion_tokens": n_out}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data.encode())
            finally:
                with state.lock:
                    state.in_flight -= 1

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _llm(server, monkeypatch, **kw):
    monkeypatch.setenv("NLR_TEST_KEY", KEY)
    cfg = LLMConfig(backend="openai", model="served-model", base_url=server.url, api_key_env="NLR_TEST_KEY",
                    backoff_s=0.01, **kw)
    return make_llm(cfg)


def test_concurrency_bound_tokens_and_key_header(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    llm = _llm(server, monkeypatch, max_concurrency=3)
    prompts = [Prompt("shared prefix ", f"number {i}") for i in range(20)]
    out = llm.generate(prompts, max_new_tokens=5)
    assert len(out) == 20 and all("[EXPLANATION]:" in o for o in out)
    assert 2 <= server.max_in_flight <= 3 and llm.max_in_flight <= 3
    assert server.auth == {f"Bearer {KEY}"}
    assert llm.usage.tokens_in == sum(len(p.text.split()) for p in prompts) and llm.usage.tokens_out == 7 * 20
    assert llm.last_tokens[0] == (4, 7)
    assert KEY not in caplog.text and KEY not in repr(llm.cfg) and KEY not in json.dumps(llm.usage.snapshot())


def test_429_and_500_are_retried(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    llm = _llm(server, monkeypatch, max_retries=3)
    server.fail = {"a": [429, 500], "b": [503]}
    tops = llm.top_logprobs(["a", "b", "c"], k=3)
    assert [max(t, key=t.get) for t in tops] == ["1", "1", "1"]
    assert len(server.requests) == 6 and llm.usage.retries == 3
    assert "retry" in caplog.text and KEY not in caplog.text


def test_exhausted_retries_and_client_errors_are_clear(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    llm = _llm(server, monkeypatch, max_retries=1)
    server.fail = {"a": [500, 500, 500]}
    with pytest.raises(LLMError, match=r"failed after 2 attempts: HTTP 500") as e:
        llm.generate(["a"])
    assert KEY not in str(e.value)
    server.fail = {"b": [401]}
    with pytest.raises(LLMError, match="HTTP 401") as e:
        llm.generate(["b"])
    assert KEY not in str(e.value) and KEY not in caplog.text


def test_timeouts_surface_as_clear_errors(server, monkeypatch):
    llm = _llm(server, monkeypatch, timeout_s=0.2, max_retries=1)
    server.hang = 1.0
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match=r"timed out after 0.2s") as e:
        llm.top_logprobs(["slow"])
    assert time.perf_counter() - t0 < 5 and KEY not in str(e.value)


def test_simulator_over_openai_and_no_key_in_artifacts(server, monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    from nlrewrite_core.manifest import StageWriter
    from nlrewrite_core.storage import Store

    llm = _llm(server, monkeypatch, max_concurrency=4)
    suffixes = ["Text: <<a>>", "Text: b <<c>>", "Text: dd <<e>>"]
    pred, failed = llm_predictions(np.array([3, 5]), ["expl one", "explanation two"], suffixes,
                                   np.array([10, 11, 12]), np.array([2.0, 4.0], np.float32), llm)
    assert len(pred) == 6 and len(failed) == 0
    p = pred.to_pylist()
    assert all(0 <= r["pred"] <= (2.0 if r["latent"] == 3 else 4.0) for r in p)
    store = Store(str(tmp_path / "store"))
    w = StageWriter(store, "simulate", "k" * 24, config=llm.cfg.model_dump(mode="json"), upstream={}, version="1")
    w.table("predictions", pred)
    w.finish(cost={"llm_backend": llm.backend, **llm.usage.since({})})
    for f in (tmp_path / "store").rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in caplog.text


# ---- the all-at-once simulator over prompt logprobs (echo) ---------------------------------------------------
def _echo_by(hf_llm, merge_at: str | None = None):
    """A completions server's echo answer computed by a real model (the tiny Llama): every prompt token with
    its character offset and the top logprobs at it, then one generated token. `merge_at`: the server's
    tokenizer merges the token starting at the first occurrence of this text with the one before it (a
    slot that is no token boundary there)."""
    import torch

    def echo(prompt: str, k: int) -> dict:
        enc = hf_llm.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        with torch.inference_mode():
            logits = hf_llm.model(input_ids=torch.tensor([ids])).logits[0]
        tops = hf_llm._top(logits, k)
        toks, starts, at = [prompt[a:b] for a, b in offs], [a for a, _ in offs], [None] + tops[:-1]
        if merge_at is not None:
            j = starts.index(prompt.index(merge_at))
            toks[j - 1] += toks.pop(j)
            starts.pop(j)
            at.pop(j)
        gen = max(tops[-1], key=tops[-1].get)
        return {"text": gen, "logprobs": {"tokens": toks + [gen], "text_offset": starts + [len(prompt)],
                                          "top_logprobs": at + [tops[-1]], "token_logprobs": [None] * (len(toks) + 1)}}
    return echo


def test_all_at_once_over_openai_prompt_logprobs_equals_transformers(server, monkeypatch, tmp_path_factory):
    """Slots found by character offset among a (real-model) server's echoed prompt tokens give the same
    distributions as the transformers backend's own slots; a slot the server's tokenizer merged away is a
    failed prediction (None), the other slots unaffected."""
    from llm_tiny import build_tiny_llama

    from nlrewrite_core.llm import prompts as P

    tiny = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    ref = make_llm(LLMConfig(model=str(tiny), device="cpu", dtype="float32", top_logprobs=8))
    sentences = [["The", " cat", " sat", "\n", "3", " é", "日本"], ["a", " dog\t", "12", ".\n"]]
    prompts = [P.all_at_once_prompt(e, s) for e in ("cats", "digits") for s in sentences]
    prompts.append(P.all_at_once_prompt("cats", sentences[0], [1, 6]))
    for p in prompts:  # this tokenizer puts a boundary at every slot of the whole text: same ids either way
        pre, suf, _ = ref.slot_ids(p)
        assert ref.tokenizer(p.text)["input_ids"] == pre + suf
    server.echo = _echo_by(ref)
    llm = _llm(server, monkeypatch, max_concurrency=2, top_logprobs=8)
    got, want = llm.slot_logprobs(prompts), ref.slot_logprobs(prompts)
    assert [len(x) for x in got] == [len(x) for x in want] == [len(p.slots) for p in prompts]
    for a_row, b_row in zip(got, want):
        for a, b in zip(a_row, b_row):
            assert set(a) == set(b) and max(abs(a[t] - b[t]) for t in a) < 1e-4
    assert all(r["echo"] is True and r["max_tokens"] == 1 for r in server.requests[-len(prompts):])
    server.echo = _echo_by(ref, merge_at="unknown\n sat")
    got = llm.slot_logprobs(prompts[:1])[0]
    assert got[1] is None and all(x is not None for i, x in enumerate(got) if i != 1)


# ---- no piece of the key anywhere (issue 12) ---------------------------------------------------------------
def leaks(text: str | bytes) -> list[str]:
    """Every 8-character piece of KEY found in text."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [KEY[i:i + 8] for i in range(len(KEY) - 7) if KEY[i:i + 8] in text]


def test_scrub_before_cut_and_bearer_values():
    from nlrewrite_core.redact import excerpt, scrub

    body = "x" * 290 + f"Authorization: Bearer {KEY}"  # the key straddles the 300th character
    assert leaks(excerpt(body, 300, [KEY])) == [] and excerpt(body, 300, [KEY]).endswith("...")
    assert leaks(scrub(f"key cut by the server: {KEY[2:-2]}", [KEY])) == []
    assert scrub("Authorization: Bearer abc.def-123 and api_key='zzz'", []) == "Authorization: Bearer *** and api_key='***'"
    assert scrub("an ordinary error", [KEY]) == "an ordinary error"


@pytest.fixture
def echoing_llm(server, monkeypatch):
    """(an openai-backend LLM with 2 retries on a server that echoes the key in its error bodies, a
    console: the library's log lines as any handler gets them; Prefect's own may not propagate)."""
    import io

    console = io.StringIO()
    handler = logging.StreamHandler(console)
    logger = logging.getLogger("nlrewrite_core")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    server.echo_auth = True
    try:
        yield _llm(server, monkeypatch, max_retries=2), console
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("status", [400, 500])
def test_key_echoed_in_error_body_never_surfaces(server, echoing_llm, caplog, capfd, status):
    llm, console = echoing_llm
    server.fail = {"p": [status] * 3}
    with pytest.raises(LLMError, match=f"HTTP {status}") as e:
        llm.generate(["p"])
    assert "invalid request" in str(e.value)  # the body's useful part is kept
    assert e.value.retryable is (status == 500)
    out, err = capfd.readouterr()
    for text in (str(e.value), repr(e.value), caplog.text, out, err, console.getvalue()):
        assert leaks(text) == [], text


def test_key_echoed_in_an_answer_is_masked(server, monkeypatch, tmp_path):
    import pyarrow as pa

    from nlrewrite_core.llm.prompts import parse_explanation
    from nlrewrite_core.manifest import StageWriter
    from nlrewrite_core.storage import Store

    llm = _llm(server, monkeypatch)
    server.echo_auth = True
    answers = llm.generate(["q", "r"])
    assert all("[EXPLANATION]" in a for a in answers) and leaks("".join(answers)) == []
    store = Store(str(tmp_path / "store"))  # the answers as an explain stage would store them
    w = StageWriter(store, "explain", "e" * 24, config=llm.cfg.model_dump(mode="json"), upstream={}, version="1")
    w.table("explanations", pa.table({"explanation": [parse_explanation(a)[0] for a in answers]}))
    w.finish(cost={"llm_backend": llm.backend, **llm.usage.since({})})
    files = [f for f in (tmp_path / "store").rglob("*") if f.is_file()]
    assert files and all(leaks(f.read_bytes()) == [] for f in files)


def test_unreachable_endpoint_one_line_per_failure_kind(monkeypatch, caplog):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NLR_TEST_KEY", KEY)
    llm = make_llm(LLMConfig(backend="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1",
                             api_key_env="NLR_TEST_KEY", backoff_s=0.01, max_retries=3, max_concurrency=4))
    caplog.set_level(logging.INFO, logger="nlrewrite_core")
    with pytest.raises(LLMError, match=r"failed after 4 attempts: connection error \(ConnectError\)") as e:
        llm.generate([f"prompt {i}" for i in range(200)])
    assert e.value.retryable and "failures in this call: connection error (ConnectError) x" in str(e.value)
    lines = [r for r in caplog.records if r.name.startswith("nlrewrite_core.llm")]
    assert len(lines) == 1 and "connection error" in lines[0].getMessage()


@pytest.mark.parametrize("status", [400, 500])
def test_key_never_reaches_the_prefect_database(prefect_server, server, echoing_llm, status):
    """A flow whose task calls an endpoint that echoes the key in its error bodies (a 400; a 500, retried
    by the backend and by Prefect, then failed): the remote text reaches the console, the flow/task
    states, logs and events of the Prefect database, and no piece of the key does."""
    import glob
    import os

    from prefect import flow, task
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    llm, console = echoing_llm
    server.fail = {"leak-probe": [status] * 10}

    @task(name="leaky_llm_call", retries=1, retry_delay_seconds=0)
    def call() -> list[str]:
        return llm.generate(["leak-probe"])

    @flow(name="leak-probe-flow")
    def probe() -> list[str]:
        return call()

    state = probe(return_state=True)
    assert state.is_failed() and leaks(state.message or "") == []
    APILogWorker.instance().drain()  # send the buffered logs and events to the server now
    EventsWorker.drain_all()
    db = PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1]
    deadline = time.time() + 60
    while True:  # wait until the server has persisted the run's logs and its failure event
        blob = b"".join(open(f, "rb").read() for f in glob.glob(db + "*") if os.path.isfile(f))
        expected = [b"invalid request", b"prefect.flow-run.Failed"] + ([b"retrying with backoff"] if status == 500 else [])
        if all(e in blob for e in expected) or time.time() > deadline:
            break
        time.sleep(1)
    assert all(e in blob for e in expected)
    assert leaks(blob) == []
    # (Prefect's console shows these same lines and state messages; it is not captured here, because a
    # capture fixture's stream, once closed, would stay Prefect's console for the rest of the session.)
    assert ("retrying with backoff" in console.getvalue()) == (status == 500)
    assert leaks(console.getvalue()) == []
