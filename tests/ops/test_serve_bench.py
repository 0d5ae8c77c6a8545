"""ops.bench.serve: every level decodes exactly the tokens it asks for and the ratios are printed;
a llama.cpp interpreter that cannot start its server fails with its own error, not a hang."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from ops.bench.serve import llama_cpp_server, main, print_ratios

ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+[\d.]+$")


def test_each_level_decodes_clients_times_requests_times_max_tokens(capsys: pytest.CaptureFixture[str], one_torch_thread: None) -> None:
    main(["--model", "tiny", "--levels", "1,3", "--requests", "2", "--max-tokens", "5"])

    out = capsys.readouterr().out
    rows = {int(m[1]): int(m[2]) for line in out.splitlines() if (m := ROW.match(line))}
    assert rows == {1: 1 * 2 * 5, 3: 3 * 2 * 5}
    assert "kaizen serve (HF engine, continuous batching, serve.dtype auto)" in out and "llama.cpp" not in out


def test_ratios_compare_levels_and_servers_measured_in_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    def row(tok_s: float, p50: float) -> dict[str, float]:
        return {"tok_s": tok_s, "p50": p50}

    print_ratios({1: row(10.0, 1.0), 8: row(45.0, 1.5)}, {1: row(20.0, 0.5), 8: row(15.0, 4.0)})

    out = capsys.readouterr().out
    assert "8 clients / 1 client: 4.50x (meets the 4x target)" in out
    assert "kaizen / llama.cpp throughput at 1 client(s): 0.50x" in out
    assert "kaizen / llama.cpp throughput at 8 client(s): 3.00x (p50 1.50 s vs 4.00 s)" in out


def test_an_interpreter_without_llama_cpp_fails_with_its_error(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(SystemExit, match="llama.cpp's server exited.*No module named 'llama_cpp'"):
        with llama_cpp_server(sys.executable, gguf, threads=1):
            pass


def test_llama_cpp_compares_only_on_the_smollm2_gguf(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--llama-cpp", sys.executable])
    assert "use it with --model smollm2" in capsys.readouterr().err


def test_several_serve_dtypes_run_in_one_run_and_are_compared(capsys: pytest.CaptureFixture[str], one_torch_thread: None) -> None:
    main(["--model", "tiny", "--levels", "1,2", "--requests", "1", "--max-tokens", "4", "--dtypes", "auto,bfloat16"])

    out = capsys.readouterr().out
    assert "serve.dtype auto)" in out and "serve.dtype bfloat16)" in out
    assert re.search(r"bfloat16 / auto throughput at 1 client\(s\): [\d.]+x", out)
    assert re.search(r"bfloat16 / auto throughput at 2 client\(s\): [\d.]+x", out)
