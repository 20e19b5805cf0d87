"""`resa serve` end to end: a real uvicorn server on 127.0.0.1 (a free port, a background thread)
over the default model on the CPU, driven by the official `openai` client and by raw httpx.

One server for the module; the tests run one after another against it, so the metrics and the
block count each test reads are its own. Reference outputs come from `Engine.generate_ids`, run
before the server starts (the engine is not shared across threads while it serves).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from resa.config import ResaConfig  # noqa: E402
from resa.engine import Engine  # noqa: E402
from resa.sampling import SamplingConfig  # noqa: E402
from resa.server import ServerSettings, create_app  # noqa: E402

KEY = "test-key"
NAME = "smol"
MAX_MODEL_LEN = 2048
BODY_LIMIT = 64 << 10
GREEDY_PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,",
                  "A long time ago, in a small village by the river, there lived an old baker who",
                  # Past min_blocks x block_size = 256 tokens: decoded sparsely (16 of 27 blocks).
                  " ".join(f"Room {i} has {i % 7} chairs." for i in range(48)) + " The room with the most chairs is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served():
    engine = Engine.load(device="cpu")
    tok = engine.tokenizer
    refs = {}
    for p in GREEDY_PROMPTS:
        ids = tok.encode(p)
        out = engine.generate_ids([ids], max_new_tokens=8, sampling=SamplingConfig(), resa=ResaConfig())
        refs[p] = (ids, out.token_ids[0])
    settings = ServerSettings(model_names=[NAME, "alias"], api_key=KEY, max_body_bytes=BODY_LIMIT, max_num_seqs=16,
                              max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=512, max_tokens=16)
    app = create_app(engine, settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, "the server to start")
    base = f"http://127.0.0.1:{port}"
    yield {"base": base, "app": app, "batcher": app.state.batcher, "tok": tok, "refs": refs,
           "client": openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)}
    server.should_exit = True
    thread.join(30)


def headers(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", headers=headers()).text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def idle(batcher) -> bool:
    return batcher.num_running == 0 and batcher.num_waiting == 0 and batcher.blocks_in_use() == 0


def stream_text(chunks, chat: bool) -> tuple[str, list]:
    text, finals = "", []
    for c in chunks:
        for ch in c.choices:
            piece = ch.delta.content if chat else ch.text
            text += piece or ""
            if ch.finish_reason is not None:
                finals.append(c)
    return text, finals


# ---- the basics -----------------------------------------------------------------------------------

def test_health_needs_no_key_and_models_lists_the_names(served):
    assert httpx.get(f"{served['base']}/health").json() == {"status": "ok"}
    assert [m.id for m in served["client"].models.list().data] == [NAME, "alias"]


def test_completion_greedy_matches_the_engine_and_usage_counts_tokens(served):
    client, tok = served["client"], served["tok"]
    prompt = GREEDY_PROMPTS[0]
    ids, ref = served["refs"][prompt]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert r.choices[0].text == tok.decode(ref)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    assert r.usage.total_tokens == len(ids) + len(ref)
    assert r.choices[0].finish_reason == ("length" if len(ref) == 8 else "stop")
    assert set(r.resa) >= {"kv_read_fraction", "rectifications", "cached_tokens"}
    # Token ids as the prompt, and the model's other name.
    r2 = client.completions.create(model="alias", prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == r.choices[0].text and r2.model == "alias"


def test_chat_streaming_and_not_agree_and_usage_counts_template_tokens(served):
    client, tok = served["client"], served["tok"]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
    prompt_ids = tok.encode(tok.apply_chat_template(messages))
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text, finals = stream_text(chunks, chat=True)
    assert text == r.choices[0].message.content
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    # max_completion_tokens is the chat name of max_tokens.
    r3 = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=3, temperature=0)
    assert r3.usage.completion_tokens <= 3


def test_completion_stream_equals_non_stream(served):
    client = served["client"]
    prompt = GREEDY_PROMPTS[3]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    text, finals = stream_text(chunks, chat=False)
    assert text == r.choices[0].text
    assert finals[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # One chunk per generated token (clients time tokens by them), then the finishing chunk.
    assert sum(c.choices[0].finish_reason is None for c in chunks) == r.usage.completion_tokens
    assert finals[-1].resa["kv_read_fraction"] == r.resa["kv_read_fraction"]


def test_resa_field_reaches_the_engine(served):
    """A prompt past min_blocks x block_size (256 tokens) is decoded sparsely by default; the
    request's resa object turns that into dense decoding, or rectifies every 4 tokens."""
    client, tok = served["client"], served["tok"]
    prompt = GREEDY_PROMPTS[-1]
    assert len(tok.encode(prompt)) > 400
    common = dict(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    dense = client.completions.create(**common, extra_body={"resa": {"mode": "dense"}})
    sparse = client.completions.create(**common, extra_body={"resa": {"mode": "resa", "active_ratio": 0.1,
                                                                      "rectify_every": 4}})
    assert dense.resa["mode"] == "dense" and dense.resa["kv_read_fraction"] == 1.0
    assert dense.resa["rectifications"] == 0
    assert sparse.resa["mode"] == "resa" and sparse.resa["kv_read_fraction"] < 0.9
    assert sparse.resa["rectifications"] >= 1 and set(sparse.resa["rectify_widths"]) == {4}
    # The same prompt again: its full blocks come from the prefix cache.
    assert sparse.resa["cached_tokens"] > 0
    # rectify_every "auto": the cadence starts at 32 and the response lists each window's f.
    auto = client.completions.create(**{**common, "max_tokens": 40},
                                     extra_body={"resa": {"active_ratio": 0.1, "rectify_every": "auto"},
                                                 "ignore_eos": True})
    assert auto.usage.completion_tokens == 40
    assert auto.resa["rectify_widths"] and auto.resa["rectify_widths"][0] == 32
    # mode "verify": the dense model's greedy tokens, with the drafts' statistics.
    dense40 = client.completions.create(**{**common, "max_tokens": 40}, extra_body={"resa": {"mode": "dense"},
                                                                                   "ignore_eos": True})
    ver = client.completions.create(**{**common, "max_tokens": 40}, extra_body={"resa": {"mode": "verify"},
                                                                               "ignore_eos": True})
    assert ver.choices[0].text == dense40.choices[0].text
    assert ver.resa["mode"] == "verify" and ver.resa["verify_windows"] > 0 and ver.resa["drafted"] > 0


def test_concurrent_greedy_requests_equal_engine_outputs(served):
    client, tok = served["client"], served["tok"]

    def one(i_prompt):
        i, prompt = i_prompt
        time.sleep(0.3 * i)  # staggered arrivals: requests join a running batch
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)

    with ThreadPoolExecutor(len(GREEDY_PROMPTS)) as ex:
        results = list(ex.map(one, enumerate(GREEDY_PROMPTS[::-1])))[::-1]
    for prompt, r in zip(GREEDY_PROMPTS, results):
        ids, ref = served["refs"][prompt]
        assert r.choices[0].text == tok.decode(ref), prompt
        assert r.usage.completion_tokens == len(ref)
    assert results[-1].resa["kv_read_fraction"] < 1


def test_defaults_stop_strings_and_ignore_eos(served):
    client, tok = served["client"], served["tok"]
    prompt = GREEDY_PROMPTS[2]
    ref = tok.decode(served["refs"][prompt][1])
    stop = ref[len(ref) // 2:len(ref) // 2 + 2]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stop=stop)
    assert r.choices[0].text == ref[:ref.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stop=[stop, "zzz"],
                                            stream=True))
    assert stream_text(chunks, chat=False)[0] == r.choices[0].text
    # max_tokens left out: the server's default (16 here); ignore_eos runs through EOS.
    r = client.completions.create(model=NAME, prompt="Hi", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


# ---- load ---------------------------------------------------------------------------------------

def test_load_64_streams_from_16_clients(served):
    """Every request completes; a stream's text equals the non-streamed text of the same seed and
    prompt (checked for one request in four, each client's first: every prompt costs the CPU a
    prefill pass of its own); the metrics add up and every block is back in the pool."""
    client, base, batcher = served["client"], served["base"], served["batcher"]
    wait_until(lambda: idle(batcher), what="an idle batcher")
    tokens0 = metric(base, "resa_generation_tokens_total")
    prompt0 = metric(base, "resa_prompt_tokens_total")
    ttft0 = metric(base, "resa_time_to_first_token_seconds_count")
    prompts = [f"Story {i}: once upon a time" + " and then" * (i % 5) for i in range(64)]
    n = 6

    def streamed(i):
        chunks = list(client.completions.create(model=NAME, prompt=prompts[i], max_tokens=n, temperature=0.9,
                                                seed=1000 + i, stream=True, stream_options={"include_usage": True}))
        text, finals = stream_text(chunks, chat=False)
        assert len(finals) == 1 and chunks[-1].choices == [], i
        return text, finals[0].choices[0].finish_reason, chunks[-1].usage

    def plain(i):
        r = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=n, temperature=0.9, seed=1000 + i)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage

    twins = range(0, 64, 4)
    with ThreadPoolExecutor(16) as ex:
        streams = list(ex.map(streamed, range(64)))
        plains = dict(zip(twins, ex.map(plain, twins)))
    for i, s in enumerate(streams):
        assert s[1] in ("stop", "length") and 1 <= s[2].completion_tokens <= n, (i, s)
        assert s[1] == "stop" or s[2].completion_tokens == n, (i, s)
        if i in plains:
            p = plains[i]
            assert s[0] == p[0], (i, s[0], p[0])
            assert s[1] == p[1] and s[2].completion_tokens == p[2].completion_tokens, i
    assert len({s[0] for s in streams}) > 32  # sampling really differs between seeds
    answered = [s[2] for s in streams] + [p[2] for p in plains.values()]
    wait_until(lambda: idle(batcher), what="every block back in the pool")
    assert metric(base, "resa_generation_tokens_total") - tokens0 == sum(u.completion_tokens for u in answered)
    assert metric(base, "resa_prompt_tokens_total") - prompt0 == sum(u.prompt_tokens for u in answered)
    assert metric(base, "resa_time_to_first_token_seconds_count") - ttft0 == len(answered)
    assert metric(base, "resa_num_requests_running") == 0 and metric(base, "resa_kv_blocks_in_use") == 0


# ---- bad input ----------------------------------------------------------------------------------

BAD = [
    # (name, body bytes or JSON, extra headers, status, param)
    ("malformed JSON", b'{"prompt": "x", ', None, 400, None),
    ("empty body", b"", None, 400, None),
    ("not an object", [1, 2], None, 400, None),
    ("missing prompt", {"model": NAME, "max_tokens": 4}, None, 400, "prompt"),
    ("ill-typed prompt", {"prompt": 5}, None, 400, "prompt"),
    ("ill-typed max_tokens", {"prompt": "x", "max_tokens": "4"}, None, 400, "max_tokens"),
    ("ill-typed stream", {"prompt": "x", "stream": 1}, None, 400, "stream"),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ("max_tokens -3", {"prompt": "x", "max_tokens": -3}, None, 400, "max_tokens"),
    ("n 2", {"prompt": "x", "n": 2}, None, 400, "n"),
    ("unknown model", {"prompt": "x", "model": "gpt-4"}, None, 404, "model"),
    ("prompt too long", {"prompt": [1] * (MAX_MODEL_LEN + 1), "max_tokens": 1}, None, 400, "prompt"),
    ("prompt + max_tokens too long", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, None, 400, "prompt"),
    ("token id outside the vocabulary", {"prompt": [1, 10 ** 9]}, None, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, None, 400, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, None, 400, "prompt"),
    ("negative temperature", {"prompt": "x", "temperature": -1}, None, 400, "temperature"),
    ("empty stop string", {"prompt": "x", "stop": [""]}, None, 400, "stop"),
    ("bad resa value", {"prompt": "x", "resa": {"active_ratio": 0}}, None, 400, "resa"),
    ("unknown resa key", {"prompt": "x", "resa": {"activ_ratio": 0.2}}, None, 400, "resa"),
    ("logprobs", {"prompt": "x", "logprobs": 2}, None, 400, "logprobs"),
    ("wrong API key", {"prompt": "x"}, headers("nope"), 401, None),
    ("missing API key", {"prompt": "x"}, {}, 401, None),
    ("oversized body", {"prompt": "x" * (BODY_LIMIT + 10)}, None, 413, None),
]


@pytest.mark.parametrize("name,body,extra,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(served, name, body, extra, status, param):
    base = served["base"]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers() if extra is None else extra)}
    r = httpx.post(f"{base}/v1/completions", content=data, headers=hdrs, timeout=30)
    assert r.status_code == status, (name, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["param"] == param, err
    ok = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=headers(), timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 1


def test_chat_bad_input(served):
    base = served["base"]
    for body, status in [({"messages": []}, 400), ({"messages": [{"role": "user"}], "n": 3}, 400),
                         ({"messages": [{"role": "wizard", "content": "x"}]}, 400),
                         ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
                         ({"prompt": "x"}, 400)]:
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers())
        assert r.status_code == status and r.json()["error"]["message"], (body, r.text)


def test_openai_client_sees_the_errors(served):
    client = served["client"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_full_queue_and_shutting_down_get_503(served):
    base, batcher, server = served["base"], served["batcher"], served["app"].state.server
    body = {"prompt": "x", "max_tokens": 1}
    batcher.max_waiting, saved = 0, batcher.max_waiting
    try:
        r = httpx.post(f"{base}/v1/completions", json=body, headers=headers())
    finally:
        batcher.max_waiting = saved
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    server.draining = True
    try:
        r = httpx.post(f"{base}/v1/completions", json=body, headers=headers())
        health = httpx.get(f"{base}/health")
    finally:
        server.draining = False
    assert r.status_code == 503 and health.status_code == 503
    assert httpx.post(f"{base}/v1/completions", json=body, headers=headers()).status_code == 200


def test_unknown_path_and_method(served):
    base = served["base"]
    r = httpx.get(f"{base}/v1/nothing", headers=headers())
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{base}/v1/completions", headers=headers())
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(f"{base}/metrics").status_code == 401  # the key guards /metrics too


# ---- disconnects --------------------------------------------------------------------------------

def test_client_leaving_a_stream_cancels_its_request(served):
    base, batcher = served["base"], served["batcher"]
    wait_until(lambda: idle(batcher), what="an idle batcher")
    body = {"prompt": "Count slowly from one to a thousand:", "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{base}/v1/completions", json=body, headers=headers()) as r:
            assert r.status_code == 200
            first = next(r.iter_lines())
            assert first.startswith("data: ")
            assert batcher.num_running == 1
    # Decoding 1000 tokens takes far longer than this wait: only a cancel ends it in time.
    wait_until(lambda: idle(batcher), 15, "the cancelled request to free its blocks")


def test_client_leaving_a_plain_request_cancels_it(served):
    base, batcher = served["base"], served["batcher"]
    wait_until(lambda: idle(batcher), what="an idle batcher")
    body = {"prompt": "Count slowly from one to a thousand:", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, headers=headers(), timeout=1.5)
    wait_until(lambda: idle(batcher), 15, "the cancelled request to free its blocks")
    # And the server still answers.
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                      headers=headers()).status_code == 200


def test_access_log_has_one_line_per_request(served, caplog):
    caplog.set_level("INFO", logger="resa.server.access")
    served["client"].completions.create(model=NAME, prompt="Hi", max_tokens=3, temperature=0)
    httpx.get(f"{served['base']}/health")
    wait_until(lambda: len(caplog.records) >= 2, 5, "the log lines")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "resa.server.access"]
    post = next(x for x in lines if x["path"] == "/v1/completions")
    assert post["method"] == "POST" and post["status"] == 200 and post["duration_ms"] > 0
    assert post["prompt_tokens"] > 0 and 1 <= post["completion_tokens"] <= 3
    assert any(x["path"] == "/health" and x["status"] == 200 for x in lines)


# ---- the command --------------------------------------------------------------------------------

def test_resa_serve_drains_on_sigterm_and_exits_0():
    """`resa serve` as a process: SIGTERM while a stream runs lets it finish, then exits 0."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "resa", "serve", "--device", "cpu", "--port", str(port),
                             "--max-num-seqs", "2", "--max-model-len", "512", "--shutdown-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_until(up, 90, "resa serve to start")
        body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            events.extend(lines)
        data = [e[6:] for e in events if e.startswith("data: ")]
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["usage"]["completion_tokens"] == 24
        assert proc.wait(60) == 0
        out = proc.stdout.read()
        assert '"path": "/v1/completions", "status": 200' in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("argv,words", [
    (["--port", "70000"], "--port"), (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--random-weights", "gpt-9"], "known shape"), (["--max-body-bytes", "-1"], "--max-body-bytes"),
    (["--active-ratio", "0"], "active_ratio"),
    (["--tokenizer", "x.gguf"], "goes with --random-weights"),
    (["--random-weights", "qwen2.5-0.5b", "--tokenizer", "/no/such/folder"], "does not exist")])
def test_serve_flags_are_checked_before_loading(argv, words, capsys, monkeypatch):
    from resa import cli
    import resa.engine

    monkeypatch.setattr(resa.engine.Engine, "load", lambda *a, **k: pytest.fail("loaded a model"))
    assert cli.main(["serve", *argv]) == 2
    assert words in capsys.readouterr().err


def test_bench_serve_times_every_token_of_every_request(served):
    """`resa bench serve` against the live server: every request completes with one timed chunk
    per generated token, and the report's counts add up."""
    import argparse

    from resa.bench import serve as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--url", served["base"], "--api-key", KEY, "--num-requests", "3", "--rate", "inf",
                         "--prompt-lens", "20", "60", "--output-len", "5", "--mode", "dense", "--seed", "3"])
    rep = bench.report(args, *asyncio.run(bench._run(args)))
    assert rep["failed"] == 0 and rep["requests"] == 3
    for r in rep["per_request"]:
        assert len(r["token_times"]) == r["completion_tokens"] == 5 and r["ttft"] > 0
    assert sum(g["requests"] for g in rep["by_prompt_len"].values()) == 3
    assert rep["kv_read_fraction"] == 1.0  # dense, as requested per request
    wait_until(lambda: idle(served["batcher"]), 30, "the batcher to be idle")
