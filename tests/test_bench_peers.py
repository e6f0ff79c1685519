"""A peer that crashes, and a peer's build record: bench/peers/llama_probe.py (install_llama_cpp.sh's probe) and
`bench compare`'s crash report, against tests/fake_llama_server.py, a stand-in for llama.cpp's llama-server (a test
double of the peer only; bench compare itself, its client and its JSON are the real ones). No llama.cpp build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX512=ON", "-DGGML_AMX_INT8=OFF"]


def fake_binary(folder: Path, build: dict | None = None) -> Path:
    """An executable named llama-server that runs the stand-in (and its build record beside it, when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    binary = folder / "llama-server"
    binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_llama_server.py"}" "$@"\n')
    binary.chmod(0o755)
    if build is not None:
        (folder / "llama-server.build.json").write_text(json.dumps(build))
    return binary


def test_probe_tells_a_crash_from_a_server_that_answers(tmp_path: Path, monkeypatch) -> None:
    from bench.peers import llama_probe

    binary = fake_binary(tmp_path)
    monkeypatch.setenv("FAKE_LLAMA_CRASH", "always")
    crashed = llama_probe.probe(binary, tmp_path / "model.gguf", [], timeout_s=60)
    assert not crashed["ok"] and crashed["stage"] == "request", crashed
    assert crashed["returncode"] == -11 and crashed["exit"] == "killed by SIGSEGV (signal 11)"
    assert any("ldtilecfg" in line for line in crashed["log_tail"]), crashed["log_tail"]

    monkeypatch.setenv("FAKE_LLAMA_CRASH", "")
    served = llama_probe.probe(binary, tmp_path / "model.gguf", ["--no-repack"], timeout_s=60)
    assert served["ok"] and served["stage"] == "served" and served["reply"] == " fake", served
    assert any("--no-repack" in line for line in served["log_tail"])  # the server args reached the server

    attempts = tmp_path / "attempts.jsonl"
    attempts.write_text("".join(json.dumps({**r, "cmake_flags": CMAKE_FLAGS}) + "\n" for r in (crashed, served)))
    info = llama_probe.record(binary, attempts, "test")
    assert json.loads((tmp_path / "llama-server.build.json").read_text()) == info
    assert info["cmake_flags"] == CMAKE_FLAGS and info["server_args"] == ["--no-repack"]
    assert not info["amx"] and [a["ok"] for a in info["attempts"]] == [False, True]
    assert llama_probe.read_build_info(binary) == info


def test_compare_reports_a_crashed_peer_with_its_signal_log_and_build(tmp_path: Path) -> None:
    build = {"cmake_flags": CMAKE_FLAGS, "server_args": ["--fake-arg"], "source": "test"}
    binary = fake_binary(tmp_path / "peers", build)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.cli", "compare", "--systems", "llama.cpp", "--workloads", "story,long",
           "--requests", "2", "--concurrency", "1,2", "--min-tokens", "2", "--max-tokens", "3", "--fixed-tokens", "3",
           "--long-tokens", "200",
           "--llama-server", str(binary), "--out-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FAKE_LLAMA_CRASH": "np=2"}  # serves c=1, dies at c=2
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "compare.json").read_text())
    assert report["failed"] == {} and report["skipped"] == {}, report
    crash = report["crashed"]["llama.cpp"]
    assert crash["signal"] == "SIGSEGV" and crash["returncode"] == -11, crash
    assert crash["workload"] == "story" and crash["concurrency"] == 2 and crash["phase"] == "warm-up", crash
    assert any("ldtilecfg" in line for line in crash["log_tail"]), crash["log_tail"]
    assert any("--fake-arg" in line for line in crash["log_tail"])  # the build record's server args were used
    rows = {(r["workload"], r["concurrency"]): r for r in report["results"]}
    assert list(rows) == [("story", 1), ("long", 1)]  # c=1 kept
    assert 2 * 150 <= rows[("long", 1)]["extra"]["prompt_tokens"] <= 2 * 210 and rows[("long", 1)]["output_tokens"] == 6
    assert rows[("long", 1)]["extra"]["prompt_tok_s"] > 0
    peer = report["peers"]["llama.cpp"]
    assert peer["build"]["cmake_flags"] == CMAKE_FLAGS and peer["server_args"] == ["--fake-arg"]
    assert "version: 0 (fake)" in peer["version"]

    table = proc.stdout[proc.stdout.rindex("system "):]  # the final table and what follows it
    assert "CRASHED" in table and "SIGSEGV" in table and "ldtilecfg" in table, table
    assert "CRASHED" in (out / "compare.md").read_text()


def test_a_peer_starts_without_tokenmills_openmp_wait_policy(tmp_path: Path) -> None:
    """services/__init__.py makes tokenmill's own OpenMP threads sleep when idle (its kernels have their own pool);
    a peer (llama.cpp, vLLM: OpenMP programs that spin) gets the environment as it was before: passive, llama.cpp
    served 2.7x fewer tokens/s."""
    import services
    from bench.systems import OpenAIHTTP

    peer = OpenAIHTTP()
    peer._spawn(["sh", "-c", 'echo "policy=${OMP_WAIT_POLICY:-unset}"'], tmp_path / "peer.log")
    assert peer.proc is not None and peer.proc.wait(10) == 0
    if services.OMP_POLICY_SET_HERE:
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    want = "unset" if services.OMP_POLICY_SET_HERE else os.environ.get("OMP_WAIT_POLICY", "unset")
    assert (tmp_path / "peer.log").read_text().strip() == f"policy={want}"
