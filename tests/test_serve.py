"""`lowrank-rlhf serve` as its users meet it: the official `openai` client against a live server on the loopback,
on a tiny-llama run (base, sft, policy and best)."""

import concurrent.futures
import json
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
    try:  # the server never outlives the tests, also when it fails to come up
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
    finally:
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


# ---- the feedback page ----------------------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")


def preference_lines(run: Path) -> list[dict]:
    path = run / "feedback" / "preferences.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium (.ci/run installs it)")
def test_a_person_judges_in_a_real_browser_and_the_pair_is_saved(server, served_run):
    from playwright.sync_api import sync_playwright

    before = len(preference_lines(served_run))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(f"{server}/feedback?key={KEY}")
            page.click("#draw")
            page.wait_for_function("document.getElementById('prompt').value.length > 0")
            prompt = page.input_value("#prompt")
            page.click("#ask")
            page.wait_for_function("document.getElementById('status').textContent != 'answering...'")
            assert page.text_content("#status") == "Which is better?", page.text_content("#status")
            shown_a = page.text_content("#answer-a")
            page.keyboard.press("1")  # A is better, from the keyboard
            page.wait_for_function("document.getElementById('status').textContent.startsWith('saved')")
            assert page.text_content("#status") == "saved (1 pair)"

            page.fill("#prompt", "Write one word.")
            page.click("#ask")
            page.wait_for_selector("#pick-tie:not([disabled])", timeout=120_000)  # its answers came
            page.fill("#better", "Hello.")
            page.click("#pick-tie")  # both bad, with a better answer typed in: it beats each of them
            page.wait_for_function("document.getElementById('status').textContent.startsWith('saved')")
            assert page.text_content("#status") == "saved (2 pairs)"
        finally:
            browser.close()
    lines = preference_lines(served_run)[before:]
    assert len(lines) == 3
    first = lines[0]
    assert first["kind"] == "human" and first["prompt"] == [{"role": "user", "content": prompt}]
    assert first["chosen"] == [{"role": "assistant", "content": shown_a}]
    assert {first["chosen_model"], first["rejected_model"]} == {"sft", "policy"}
    assert [line["chosen"][0]["content"] for line in lines[1:]] == ["Hello.", "Hello."]
    assert {line["rejected_model"] for line in lines[1:]} == {"sft", "policy"}


def test_judgements_from_two_clients_at_once_are_all_saved_whole(server, served_run):
    headers = {"Authorization": f"Bearer {KEY}"}

    def judge_one(i):
        pair = httpx.post(f"{server}/feedback/pair", json={"prompt": f"Question {i}?"}, headers=headers,
                          timeout=120).json()
        done = httpx.post(f"{server}/feedback/judge", json={"pair_id": pair["pair_id"], "choice": "ab"[i % 2]},
                          headers=headers, timeout=120)
        assert done.status_code == 200, done.text
        return pair["pair_id"]

    before = len(preference_lines(served_run))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(judge_one, range(10)))
    lines = preference_lines(served_run)[before:]  # every line parses: none torn or interleaved
    assert sorted(line["prompt"][0]["content"] for line in lines) == sorted(f"Question {i}?" for i in range(10))
    again = httpx.post(f"{server}/feedback/judge", json={"pair_id": "0" * 16, "choice": "a"}, headers=headers)
    assert again.status_code == 404 and "unknown or already judged" in again.json()["error"]["message"]


def test_the_feedback_file_trains_a_reward_model(served_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(served_run, run)
    feedback = run / "feedback" / "preferences.jsonl"
    if len(preference_lines(run)) < 4:
        pytest.skip("needs the judgements of the tests above")
    # mixed with the bundled pairs, as a person who has judged a few answers would train
    run_stages(load_recipe(TINY, [f"data.preferences={feedback},bundled:clickbait_preferences", "data.eval_fraction=0",
                                  "reward_model.max_steps=2"]), ["reward"], run, overwrite=True)
    assert (run / "reward" / "adapter_model.safetensors").is_file()


def test_a_line_cut_short_by_a_crash_is_dropped_when_the_file_is_opened_again(tmp_path):
    from lowrank_rlhf.serve.feedback import JsonLines

    path = tmp_path / "preferences.jsonl"
    lines = JsonLines(path)
    lines.append({"a": 1})
    lines.append({"b": 2})
    path.write_bytes(path.read_bytes() + b'{"c": 3, "cho')  # a crash mid-write
    JsonLines(path).append({"d": 4})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"b": 2}, {"d": 4}]


@pytest.mark.slow
def test_eight_clients_twenty_requests_each_mixed_streaming_get_no_server_error(server, served_run):
    headers = {"Authorization": f"Bearer {KEY}"}
    before = len(preference_lines(served_run))

    def client_session(c):
        statuses = []
        for r in range(20):
            body = {"model": ["policy", "sft", "base", "best"][(c + r) % 4], "max_tokens": 8, "temperature": 0.8,
                    "seed": r, "messages": [{"role": "user", "content": f"client {c} request {r}"}]}
            if r % 3 == 0:
                with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True},
                                  headers=headers, timeout=300) as response:
                    events = [line for line in response.iter_lines() if line.startswith("data: ")]
                    statuses.append(response.status_code)
                    assert events[-1] == "data: [DONE]"
            elif r % 7 == 0:
                pair = httpx.post(f"{server}/feedback/pair", json={"prompt": f"c{c} r{r}"}, headers=headers,
                                  timeout=300)
                judged = httpx.post(f"{server}/feedback/judge", json={"pair_id": pair.json()["pair_id"],
                                                                      "choice": "a"}, headers=headers, timeout=300)
                statuses += [pair.status_code, judged.status_code]
            else:
                statuses.append(httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers,
                                           timeout=300).status_code)
        return statuses

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = [s for session in pool.map(client_session, range(8)) for s in session]
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    lines = preference_lines(served_run)[before:]
    assert len(lines) == 8 * 2  # r = 7 and 14 per client, each line whole
