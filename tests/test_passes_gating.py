"""Decode-bucket gating, prefill graphs untouched, uuid stability and sensitivity."""

from __future__ import annotations

import pytest

from conftest import make_pm, run_case
from mla_passes import MLAPassManager, PassConfig, compile_range
from mla_passes.pass_manager import TokenRange


def test_threshold_derivation():
    cfg = PassConfig(fuse_aiter_qk_rope_kvcache_mla=True)
    assert MLAPassManager(cfg, max_num_seqs=64, num_speculative_tokens=2).decode_max_tokens == 192
    assert MLAPassManager(cfg, max_num_seqs=64).decode_max_tokens == 64
    over = PassConfig(fuse_aiter_qk_rope_kvcache_mla=True, aiter_qk_rope_kvcache_fusion_max_token_num=7)
    assert MLAPassManager(over, max_num_seqs=64).decode_max_tokens == 7
    assert MLAPassManager(cfg).decode_max_tokens is None
    pm = MLAPassManager(cfg, max_num_seqs=64, num_speculative_tokens=1)
    assert pm.is_applicable_for_range(TokenRange(1, 128))
    assert not pm.is_applicable_for_range(TokenRange(1, 129))
    assert not MLAPassManager(PassConfig(), max_num_seqs=64).is_applicable_for_range(TokenRange(1, 2))


def test_aiter_flag_turns_on_prerequisite():
    assert PassConfig(fuse_aiter_qk_rope_kvcache_mla=True).fuse_rope_kvcache_cat_mla is True
    assert PassConfig().fuse_rope_kvcache_cat_mla is None
    with pytest.raises(ValueError, match="no_range_policy"):
        PassConfig(no_range_policy="maybe")


def test_prefill_range_graph_identical():
    """A graph outside the decode bucket comes out exactly as with the passes off."""
    pm = make_pm(max_num_seqs=4)
    with compile_range(TokenRange(5, 512)):
        res = run_case(pm, T=5)
    assert pm.matched_counts == {"mla_qk_rope_kvcache_fusion": 0, "mla_decode_q_prep_lift": 0}
    import torch
    torch._dynamo.reset()
    off = run_case(None, T=5, stack=res.stack)
    assert res.backend.graph_after == off.backend.graph_after == res.backend.graph_before


@pytest.mark.parametrize("policy,T,expect", [("infer", 5, 2), ("infer", 9, 0), ("apply", 9, 2), ("skip", 5, 0)])
def test_no_range_policy(policy, T, expect):
    pm = make_pm(max_num_seqs=8, no_range_policy=policy)
    run_case(pm, T=T)
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == expect


def test_uuid_stable_and_sensitive():
    a = make_pm(max_num_seqs=8)
    assert a.uuid() == make_pm(max_num_seqs=8).uuid() == a.uuid()
    assert a.uuid() != make_pm(max_num_seqs=16).uuid()
    assert a.uuid() != make_pm(max_num_seqs=8, backend="reference").uuid()
    assert a.uuid() != make_pm(max_num_seqs=8, fuse=False).uuid()
    assert a.uuid() != make_pm(max_num_seqs=8, no_range_policy="apply").uuid()
    with compile_range(4):
        in_range = a.uuid()
    assert in_range != a.uuid()


def test_uuid_tracks_pass_source(monkeypatch):
    """Editing a pass or pattern module changes the uuid."""
    import mla_passes.pass_manager as pmod

    a = make_pm(max_num_seqs=8)
    before = a.uuid()
    real = pmod._module_hash
    monkeypatch.setattr(pmod, "_module_hash",
                        lambda m: "edited" if m.__name__.endswith("patterns.rope") else real(m))
    assert a.uuid() != before


def test_fx_graph_cache_sees_layer_state(tmp_path, monkeypatch):
    """FX graph cache ON: the fp8-q rewrite was served to the same model with a bf16 q (ValueError on out_dtype)."""
    import torch
    import torch._inductor.config as ic

    from conftest import CaseResult, assert_close_case, run_both
    from mla_passes.testing.models import build_decode_stack, set_step

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    st = build_decode_stack(1, H=4, hidden=64, q_fp8=True)
    pm = make_pm(max_num_seqs=8)
    uuids = []
    with ic.patch(post_grad_custom_post_pass=pm, fx_graph_cache=True, fx_graph_remote_cache=False,
                  autotune_local_cache=False):
        for q_fp8 in (True, False, True):
            if not q_fp8:
                for s in st.states.values():
                    s.q_scale = None
            else:
                for s in st.states.values():
                    s.q_scale = torch.tensor([0.07])
            torch._dynamo.reset()
            uuids.append(pm.uuid())
            compiled = torch.compile(st.module, fullgraph=True)
            pos, h = st.make_inputs(4, seed=9)
            set_step(st, 4, seed=2)
            eager, ref_caches, out, _ = run_both(st, compiled, pos, h)
            assert_close_case(CaseResult(st, None, pm, eager, out, ref_caches, st.snapshot_caches()))
    assert uuids[0] != uuids[1] and uuids[0] == uuids[2]


def test_vllm_pass_context_without_context(monkeypatch):
    """vLLM 0.32's get_pass_context() asserts when no context is set: that reads as no range, not a crash."""
    import sys
    import types

    from mla_passes import gating

    mod = types.ModuleType("vllm.compilation.passes.inductor_pass")

    def get_pass_context():
        assert False, "no pass context"

    mod.get_pass_context = get_pass_context
    monkeypatch.setitem(sys.modules, "vllm.compilation.passes.inductor_pass", mod)
    assert gating.vllm_compile_range() is None
    assert gating.current_compile_range() is None
    mod.get_pass_context = lambda: types.SimpleNamespace(compile_range=TokenRange(1, 16))
    assert gating.current_compile_range() == TokenRange(1, 16)
    with compile_range(4):  # the innermost explicit block wins
        assert gating.current_compile_range() == TokenRange(4, 4)


def test_vllm_pass_context_real():
    """Through vLLM's own pass_context(): the manager gates by the range vLLM compiles for."""
    ip = pytest.importorskip("vllm.compilation.passes.inductor_pass")
    from vllm.config.utils import Range

    from mla_passes import gating

    assert gating.vllm_compile_range() is None  # no context set: vLLM asserts, we read None
    pm = make_pm(max_num_seqs=8)
    with ip.pass_context(Range(1, 8)):
        assert gating.current_compile_range() == Range(1, 8)
        ok, why = pm._decide(None)
        assert ok, why
    with ip.pass_context(Range(9, 64)):
        ok, why = pm._decide(None)
        assert not ok and "outside" in why


def test_passes_expose_the_managers_gate():
    """Each pass answers is_applicable_for_range from the manager's one gate."""
    pm = make_pm(max_num_seqs=8, num_speculative_tokens=1)
    assert pm.decode_max_tokens == 16
    for p in pm.passes:
        assert p.gate is pm.gate
        assert p.is_applicable_for_range(TokenRange(1, 16))
        assert not p.is_applicable_for_range(TokenRange(1, 17))
    from mla_passes.gating import decode_threshold

    assert decode_threshold(8, 1) == 16 and decode_threshold(8, 0, override=3) == 3
    assert decode_threshold(None) is None


def test_compile_range_is_per_thread():
    """compile_range was process-wide: a thread compiling the decode range was gated, and its cache key built,
    with the prefill range another thread had opened at the same time (and the first to leave popped the other's)."""
    import threading

    from mla_passes import gating

    pm = make_pm(max_num_seqs=8)
    with compile_range(4):
        want_decode = (pm.uuid(), pm._decide(None))
    with compile_range(TokenRange(9, 512)):
        want_prefill = (pm.uuid(), pm._decide(None))
    assert want_decode[0] != want_prefill[0] and want_decode[1][0] and not want_prefill[1][0]

    both_open, first_left = threading.Barrier(2), threading.Event()
    seen, errors = {}, []

    def compile_in(name, r, leave_first):
        try:
            with compile_range(r):
                both_open.wait(timeout=30)  # both blocks are open now
                seen[name] = (pm.uuid(), pm._decide(None))
                if leave_first:
                    return
                first_left.wait(timeout=30)  # the other thread has left its block
                seen[name + " after"] = gating.current_compile_range()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            if leave_first:
                first_left.set()

    threads = [threading.Thread(target=compile_in, args=("decode", 4, False)),
               threading.Thread(target=compile_in, args=("prefill", TokenRange(9, 512), True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert seen["decode"] == want_decode
    assert seen["prefill"] == want_prefill
    assert seen["decode after"] == TokenRange(4, 4)
    assert gating.current_compile_range() is None  # nothing leaked into the main thread
