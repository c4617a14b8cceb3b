"""``mla-passes dump``: run a script under depyf with (or without) our passes.

    mla-passes dump [--out DIR] [--passes on|off] -- SCRIPT [ARGS...]

runs SCRIPT (as ``__main__``, with ``sys.argv = [SCRIPT, *ARGS]``) inside
``depyf.prepare_debug(DIR)`` with an :class:`~mla_passes.MLAPassManager`
installed as Inductor's ``post_grad_custom_post_pass`` (``--passes on``) or no
custom pass at all (``--passes off``). DIR then holds depyf's files for every
compiled function, among them ``AFTER_POST_GRAD`` and, with the passes on, the
``mla_passes_before_<pass>`` / ``mla_passes_after_<pass>`` graphs each pass
logs, and the passes' records (``mla_passes_explain.<pid>.jsonl``, see
:mod:`mla_passes.records`): ``mla-passes report DIR`` reads them. Compare two
dumps with ``mla-passes diff``.

Inductor's and AOTAutograd's caches are turned off for the run: a cache hit
skips the post-grad passes and leaves no graphs to dump. A script that sets
``post_grad_custom_post_pass`` itself overrides ours.

A vLLM script: vLLM's config decides (its ``pass_config`` flag installs the
plugin's pass manager; ``--passes`` does not add a second one). vLLM
compiles in its engine-core process, which depyf in this process cannot
see, so the run sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine in
process) unless the environment sets it already, and says so. Records are
written by whichever pass manager runs, in any process: the run exports
``MLA_PASSES_EXPLAIN_DIR=DIR`` to child processes too, so the summary and
``mla-passes report`` count the plugin's manager as well as ours. A
``tensor_parallel_size > 1`` run still compiles in worker processes: their
records land in DIR, their graphs do not (use vLLM's ``debug_dump_path``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import shutil
import sys
import warnings
from pathlib import Path

from mla_passes.config import BACKENDS

from ..records import ENV_DIR, attach
from .argtypes import output_dir, positive_int
from .graph_files import collect_graph_files
from .report import read_records, summarize

HELP = "run a script under depyf.prepare_debug with the mla-passes pass manager on (or off), dumping every graph"


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=output_dir, default=None, metavar="DIR",
                        help="dump folder (default: ./mla_passes_dump_<on|off>)")
    parser.add_argument("--passes", choices=("on", "off"), default="on",
                        help="install the mla-passes pass manager (on) or no custom pass (off); default on")
    parser.add_argument("--clean", action="store_true", help="empty DIR first if it is not empty")
    parser.add_argument("--max-num-seqs", type=positive_int, default=256,
                        help="decode bucket of the pass manager: graphs of at most this many tokens are "
                             "rewritten (default 256, vLLM's default max_num_seqs)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="kernel backend for the fused op (default auto)")
    parser.add_argument("script", metavar="SCRIPT", help="the Python script to run (put `--` before it)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for SCRIPT")


def make_pass(passes: str, *, max_num_seqs: int | None = None, backend: str = "auto"):
    """The custom post-grad pass for ``--passes on|off`` (None for off): the
    pass manager (``.manager``), wrapped so that it leaves vLLM's graphs to
    vLLM's own config. What it did is in the records (:mod:`mla_passes.records`)."""
    if passes == "off":
        return None
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from mla_passes.config import PassConfig
    from mla_passes.pass_manager import MLAPassManager

    kwargs = {"fuse_aiter_qk_rope_kvcache_mla": True}
    if backend != "auto":
        kwargs["backend"] = backend
    manager = MLAPassManager(PassConfig(**kwargs), max_num_seqs=max_num_seqs)

    class _DumpPass(CustomGraphPass):
        def __init__(self):
            self.manager = manager

        def __call__(self, graph):
            if _is_vllm_graph(graph):
                return  # vLLM's own config decides (the plugin's manager); see the module docstring
            self.manager(graph)

        def uuid(self):
            return self.manager.uuid()

    return _DumpPass()


def _is_vllm_graph(graph) -> bool:
    """True for a graph that calls a ``vllm::`` op (directly or through
    ``auto_functionalized``): a vLLM model's graph."""
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if getattr(n.target, "namespace", None) == "vllm" or \
                (n.args and getattr(n.args[0], "namespace", None) == "vllm"):
            return True
    return False


def _vllm_runs() -> bool:
    """True once the script has loaded vLLM's compilation machinery."""
    return "vllm.compilation.decorators" in sys.modules


ENGINE_IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"


@contextlib.contextmanager
def _environment(out: Path):
    """Export the record folder (inherited by child processes) and keep
    vLLM's engine in this process unless the user chose otherwise."""
    saved = {k: os.environ.get(k) for k in (ENV_DIR, ENGINE_IN_PROCESS)}
    os.environ[ENV_DIR] = str(out.resolve())
    engine_set_here = ENGINE_IN_PROCESS not in os.environ
    if engine_set_here:
        os.environ[ENGINE_IN_PROCESS] = "0"
    try:
        yield engine_set_here
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare_out_dir(out: Path, clean: bool) -> str | None:
    """Make ``out`` an empty folder; an error message if it is not empty and
    ``clean`` is off (depyf appends to a non-empty folder: stale graphs would mix in)."""
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a folder"
    try:
        if out.is_dir() and any(out.iterdir()):
            if not clean:
                return f"{out} is not empty (depyf would mix old and new graphs); pass --clean to empty it"
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a parent folder should be, no permission, ...
        return f"cannot make {out} an empty folder: {e.strerror or e}"
    return None


@contextlib.contextmanager
def dumping(out: str | os.PathLike, custom_pass):
    """``depyf.prepare_debug(out)`` with ``custom_pass`` as the post-grad custom
    pass and the compile caches off."""
    import depyf
    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*(You are trying to debug|force disabled by).*")
        stack.enter_context(inductor_config.patch(
            post_grad_custom_post_pass=custom_pass, fx_graph_cache=False))
        stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        stack.enter_context(depyf.prepare_debug(str(out)))
        yield


def graph_files(out: str | os.PathLike) -> list[Path]:
    return sorted(collect_graph_files(out).values())


def run(args) -> int:
    script_args = list(args.script_args)
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    script = Path(args.script)
    if not script.is_file():
        print(f"mla-passes dump: error: argument SCRIPT: {script}: no such file", file=sys.stderr)
        return 2
    out = Path(args.out or f"mla_passes_dump_{args.passes}")
    err = prepare_out_dir(out, args.clean)
    if err:
        print(f"mla-passes dump: error: argument --out: {err}", file=sys.stderr)
        return 2
    custom_pass = make_pass(args.passes, max_num_seqs=args.max_num_seqs, backend=args.backend)
    if custom_pass is not None:
        attach(custom_pass.manager, out.resolve(), source="mla-passes dump")

    old_argv, old_path0 = sys.argv, sys.path[0] if sys.path else None
    sys.argv = [str(script), *script_args]
    sys.path.insert(0, str(script.resolve().parent))
    rc = 0
    try:
        with _environment(out) as engine_set_here, dumping(out, custom_pass):
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        if sys.path and sys.path[0] == str(script.resolve().parent) and sys.path[0] != old_path0:
            sys.path.pop(0)

    files = graph_files(out)
    ours = [p for p in files if ".mla_passes_" in p.name]
    print(f"mla-passes dump: {len(files)} graph files in {out}/ (passes {args.passes})")
    if _vllm_runs():
        engine = os.environ.get(ENGINE_IN_PROCESS)
        if engine_set_here:
            print(f"  vLLM: ran its engine in this process ({ENGINE_IN_PROCESS}=0, set by mla-passes dump) "
                  "so its compile is dumped; its pass_config decides whether the passes run")
        elif engine not in ("0", "false", "False"):
            print(f"  vLLM: {ENGINE_IN_PROCESS}={engine} in the environment: the engine compiled in another "
                  "process; its graphs are not in this dump, its records are")
    if custom_pass is not None or _vllm_runs():
        print("  " + summary_line(out))
    if ours:
        print(f"  {len(ours)} before/after graphs of our passes: {out}/*.mla_passes_*.py")
    if rc:
        print(f"mla-passes dump: {script} exited with status {rc}", file=sys.stderr)
    return rc


def summary_line(out) -> str:
    """What the recorded pass-manager calls in ``out`` did, whichever manager
    (ours, the vLLM plugin's, any process) made them."""
    records = read_records(out, warn=lambda msg: print(f"mla-passes dump: {msg}", file=sys.stderr))
    s = summarize(records)
    graphs = s["graphs"]
    ran = sum(1 for r in records if r.get("kind") == "graph" and r["decision"].get("ran"))
    counts: dict[str, int] = {}
    for r in records:
        if r.get("kind") == "graph":
            for k, v in r.get("matched_counts", {}).items():
                counts[k] = counts.get(k, 0) + v
    matches = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
    line = (f"pass manager called on {graphs} graph{'' if graphs == 1 else 's'}, ran on {ran}; matches: {matches}")
    if s["layers"]:
        t = s["totals"]
        line += (f"; {len(s['layers'])} layer(s): {t.get('fused', 0)} fused, {t.get('lifted', 0)} lifted, "
                 f"{t.get('left alone', 0)} left alone")
    else:
        line += f"; no MLA layer seen: {s['cause']}"
    return line + f" (details: mla-passes report {out})"
