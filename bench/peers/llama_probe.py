"""Does a llama-server binary serve? One real request against it, and what its build was.

Used by install_llama_cpp.sh after each build (a llama.cpp built with GGML_NATIVE on a CPU that lists AMX can
fault at `ldtilecfg` on its first matrix product when the OS does not grant the tile state) and by
`bench compare` (describe_exit, log_tail, read_build_info). Standard library only (and bench.harness, which is).

    python -m bench.peers.llama_probe probe --binary B --gguf G [--server-args="--no-repack"] \
        [--cmake-flags "..."] [--attempts FILE.jsonl]          # exit 0 when it answered, 1 when not
    python -m bench.peers.llama_probe record --binary B --attempts FILE.jsonl --source S   # -> B.build.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import free_port
from services import foreign_env

# A prompt of a few hundred tokens: prefill runs a real matrix product (not a batch-1 vector one).
PROBE_PROMPT = ("The quick brown fox jumps over the lazy dog. " * 40) + "Write one more sentence:"


def signal_name(returncode: int | None) -> str | None:
    """'SIGSEGV' for a process killed by signal 11 (returncode -11), None for one that exited or runs."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def describe_exit(returncode: int | None) -> str:
    """How a process ended, as a person would say it: 'killed by SIGSEGV (signal 11)', 'exit code 1'."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by {signal_name(returncode)} (signal {-returncode})"
    return f"exit code {returncode}"


def log_tail(path: Path | None, lines: int = 20) -> list[str]:
    if path is None:
        return []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def build_info_path(binary: Path) -> Path:
    """The build record install_llama_cpp.sh writes beside the binary."""
    return binary.with_name(binary.name + ".build.json")


def read_build_info(binary: Path) -> dict[str, Any] | None:
    try:
        return json.loads(build_info_path(binary).read_text())
    except (OSError, ValueError):
        return None


def probe(binary: Path, gguf: Path, server_args: list[str], timeout_s: float = 180.0,
          threads: int = 0) -> dict[str, Any]:
    """Start the server, wait for /health, send one completion, check it is still alive; then stop it."""
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", "2048", "-np", "1",
           "-t", str(threads or os.cpu_count() or 2), *server_args]
    result: dict[str, Any] = {"ok": False, "server_args": server_args, "command": shlex.join(cmd)}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-probe-") as tmp:
        log = Path(tmp) / "server.log"
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=foreign_env())
        try:
            result.update(_exercise(proc, port, t0 + timeout_s))
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            elif "exit" not in result:
                result.update(exit=describe_exit(proc.returncode), returncode=proc.returncode)
            result["log_tail"] = log_tail(log)
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def _exercise(proc: subprocess.Popen, port: int, deadline: float) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"

    def died(stage: str) -> dict[str, Any]:
        return {"stage": stage, "exit": describe_exit(proc.returncode), "returncode": proc.returncode}

    while True:  # /health answers 503 while the model loads
        if proc.poll() is not None:
            return died("start")
        if time.monotonic() > deadline:
            return {"stage": "start", "exit": "not healthy before the deadline", "returncode": None}
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            if r.status == 200:
                break
        time.sleep(0.3)
    body = json.dumps({"prompt": PROBE_PROMPT, "n_predict": 8, "temperature": 0.0}).encode()
    req = urllib.request.Request(f"{base}/completion", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=max(5.0, deadline - time.monotonic())) as r:
            reply = json.loads(r.read())
    except (OSError, ValueError) as exc:
        time.sleep(0.5)  # let a crashing server finish dying, so its exit is what we report
        if proc.poll() is not None:
            return died("request")
        return {"stage": "request", "exit": f"request failed: {exc}", "returncode": None}
    time.sleep(0.3)
    if proc.poll() is not None:
        return died("after request")
    text = reply.get("content", "")
    return {"ok": isinstance(text, str) and reply.get("tokens_predicted", 0) > 0, "stage": "served", "reply": text,
            "prompt_tokens": reply.get("tokens_evaluated")}


def cpu() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = sorted(x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "amx", "fma", "f16c",
                                                                                           "bmi2")))
    return {"model": model, "flags": flags}


def record(binary: Path, attempts: Path, source: str) -> dict[str, Any]:
    """Write <binary>.build.json: the cmake flags and server args of the attempt that served, and every attempt."""
    tries = [json.loads(line) for line in attempts.read_text().splitlines() if line.strip()]
    good = next((t for t in reversed(tries) if t["ok"]), None)
    if good is None:
        raise SystemExit(f"no attempt served; see {attempts}")
    flags, here = good.get("cmake_flags", []), cpu()
    # GGML_NATIVE (the default) compiles the AMX path in where the CPU lists AMX; --no-repack keeps it unused
    amx_compiled = "-DGGML_NATIVE=OFF" not in flags and "amx_int8" in here["flags"]
    info = {"binary": str(binary), "source": source, "cmake_flags": flags, "server_args": good["server_args"],
            "amx": amx_compiled and "--no-repack" not in good["server_args"],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": here, "attempts": tries}
    build_info_path(binary).write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="Start the binary, send one request; exit 0 when it answered.")
    p.add_argument("--binary", type=Path, required=True)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--server-args", default="", help="Extra llama-server flags, e.g. --no-repack.")
    p.add_argument("--cmake-flags", default="", help="The build's cmake flags, recorded with the attempt.")
    p.add_argument("--attempts", type=Path, help="Append this attempt as a JSON line here.")
    p.add_argument("--timeout", type=float, default=180.0)
    r = sub.add_parser("record", help="Write <binary>.build.json from the attempts.")
    r.add_argument("--binary", type=Path, required=True)
    r.add_argument("--attempts", type=Path, required=True)
    r.add_argument("--source", default="")
    args = ap.parse_args(argv)
    if args.cmd == "record":
        info = record(args.binary, args.attempts, args.source)
        print(f"recorded {build_info_path(args.binary)}: server args {info['server_args'] or 'none'}, "
              f"AMX {'on' if info['amx'] else 'off'}")
        return 0
    res = probe(args.binary, args.gguf, shlex.split(args.server_args), args.timeout)
    res["cmake_flags"] = shlex.split(args.cmake_flags)
    if args.attempts:
        with args.attempts.open("a") as f:
            f.write(json.dumps(res) + "\n")
    if res["ok"]:
        print(f"probe ok ({res['seconds']} s): {res['reply']!r}")
        return 0
    print(f"probe FAILED at {res.get('stage')}: {res.get('exit')}", file=sys.stderr)
    print("\n".join("  " + line for line in res["log_tail"][-8:]), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
