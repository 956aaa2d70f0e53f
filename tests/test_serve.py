"""`lowrank-rlhf serve` as its users meet it: the official `openai` client against a live server on the loopback,
on a tiny-llama run (base, sft, policy and best)."""

import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest

from lowrank_rlhf.cli import main
from lowrank_rlhf.config import load_recipe
from lowrank_rlhf.pipeline import run_stages

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")
KEY = "test-key"
QUESTION = "Is this headline clickbait? Headline: You will not believe these cats"



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """A finished tiny run; trained with sockets refused, as every stage must run offline (conftest's rule, here
    only for training: the tests themselves talk HTTP on the loopback)."""
    run = tmp_path_factory.mktemp("serve") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse_connections)
        train(run)
    assert (run / "best" / "policy" / "adapter_config.json").is_file()
    return run


def refuse_connections(*args, **kwargs):
    raise AssertionError("a stage tried to reach the network")


def train(run: Path) -> None:
    run_stages(load_recipe(TINY, ["ppo.eval_steps=1", "data.eval_prompts=bundled:clickbait_validation",
                                  "rewards.eval_functions=[lowrank_rlhf.rewards:clickbait_accuracy]"]),
               ["sft", "reward", "ppo"], run)


@pytest.fixture(scope="module")
def server(served_run):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowrank_rlhf", "serve", str(served_run), "--port", str(port),
                             "--api-key", KEY, "--max-tokens", "32"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the server did not come up in 180 s"
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, model: str, **kwargs) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=8, **kwargs)
    return reply.choices[0].message.content


def test_models_lists_base_sft_policy_and_best(client):
    assert sorted(m.id for m in client.models.list().data) == ["base", "best", "policy", "sft"]


@pytest.mark.parametrize("model", ["policy", "sft", "base"])
def test_greedy_answers_equal_generates(client, served_run, capsys, model):
    assert main(["generate", str(served_run), "--prompt", QUESTION, "--role", model, "--max-new-tokens", "8"]) == 0
    expected = capsys.readouterr().out.rstrip("\n")
    assert chat(client, model) == expected


def test_best_and_policy_share_one_slot_and_each_answers_as_itself(client, served_run, tmp_path, capsys):
    # a twin run whose final policy IS RUN/best: its answers are what the "best" model must say
    twin = tmp_path / "twin"
    shutil.copytree(served_run, twin)
    shutil.rmtree(twin / "policy")
    shutil.copytree(served_run / "best" / "policy", twin / "policy")
    assert main(["generate", str(twin), "--prompt", QUESTION, "--max-new-tokens", "8"]) == 0
    best_expected = capsys.readouterr().out.rstrip("\n")
    policy_first = chat(client, "policy")
    assert chat(client, "best") == best_expected
    assert chat(client, "policy") == policy_first  # the final policy came back


def test_streaming_concatenates_to_the_same_text_and_reports_usage(client):
    full = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0, max_tokens=12)
    pieces = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=12, stream=True)
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_completions_sampling_is_seeded_and_stop_strings_cut(client):
    def sample(seed):
        return client.completions.create(model="sft", prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text
    assert sample(3) == sample(3)
    text = sample(4)
    if len(text) > 2:
        stop = text[2]
        cut = client.completions.create(model="sft", prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                        top_p=0.9, seed=4, stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_concurrent_clients_all_get_their_answers(client):
    expected = chat(client, "policy")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: chat(client, "policy"), range(6)))
    assert answers == [expected] * 6


@pytest.mark.parametrize("request_kwargs,status,words", [
    ({"model": "gpt-4"}, 404, "does not exist; available: base, sft, policy, best"),
    ({"max_tokens": 100000}, 400, "max_tokens: 100000 is out of range; allowed range: [1, 32]"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "maximum context length is 1024 tokens"),
    ({"temperature": 5}, 400, "temperature"),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(client, request_kwargs, status, words):
    kwargs = {"model": "policy", "messages": [{"role": "user", "content": "hi"}], **request_kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**kwargs)
    assert err.value.status_code == status
    assert words in err.value.body["message"]
    assert chat(client, "sft")  # still serving


def test_malformed_json_and_a_wrong_key_are_refused(server):
    bad = httpx.post(f"{server}/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    wrong = httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def test_a_client_that_leaves_mid_stream_frees_the_server(server, client):
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "policy", "messages": [{"role": "user", "content": QUESTION}],
                            "max_tokens": 32, "temperature": 1.0, "stream": True}, timeout=60) as response:
        next(response.iter_lines())  # the first event, then hang up
    started = time.time()
    assert chat(client, "policy")
    assert time.time() - started < 60
