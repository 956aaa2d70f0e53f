"""How fast `serve` starts and answers, against `generate` doing the same work in-process.

    python scripts/serve_bench.py RUN --out docs/benchmarks/serve-smollm2-cpu

Starts `lowrank-rlhf serve RUN` (the model cache already built), times until /v1/models answers; then times greedy
requests of --tokens new tokens through the official openai client, against `commands.inference.answer` on the
same prompt in this process (the work `generate` does after loading); the median of --repeats each.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "Write a short story about a cat who learns to read."  # an answer longer than --tokens: the same work


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import openai
    import torch

    from lowrank_rlhf.commands.inference import answer, load_run, run_recipe

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lowrank_rlhf", "serve", args.run, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            time.sleep(0.1)
    startup = time.perf_counter() - started
    try:
        served, served_tokens = [], []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            reply = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": QUESTION}],
                                                   max_tokens=args.tokens, temperature=0)
            served.append(time.perf_counter() - t)
            served_tokens.append(reply.usage.completion_tokens)
    finally:
        proc.terminate()
        proc.wait(30)
    model = load_run(Path(args.run))
    cfg = run_recipe(Path(args.run))
    direct = []
    for _ in range(args.repeats + 1):
        t = time.perf_counter()
        answer(model, [QUESTION], max_new_tokens=args.tokens, max_length=cfg.model.max_length)
        direct.append(time.perf_counter() - t)
    result = {"run": args.run, "model": cfg.model.name, "startup_s": round(startup, 2), "tokens": args.tokens,
              "served_tokens": served_tokens[1:], "serve_request_median_s": round(statistics.median(served[1:]), 3),
              "generate_median_s": round(statistics.median(direct[1:]), 3), "date": time.strftime("%Y-%m-%d"),
              "command": "python scripts/serve_bench.py " + " ".join(sys.argv[1:])}
    result["ratio"] = round(result["serve_request_median_s"] / result["generate_median_s"], 2)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    header = ("| serve startup (until /v1/models answers) | serve: greedy request, median | generate's work, median "
              "| ratio |\n|---|---|---|---|\n")
    row = (f"| {result['startup_s']} s | {result['serve_request_median_s']} s ({served_tokens[-1]} tokens) | "
           f"{result['generate_median_s']} s | {result['ratio']}x |\n")
    out.with_suffix(".md").write_text(f"# serve on {cfg.model.name}: startup and a greedy request\n\n"
                                      f"`{result['command']}` ({result['date']}, CPU, one thread)\n\n{header}{row}")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
