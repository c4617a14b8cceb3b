"""What each supported vLLM release looks like to mla-passes, one table per release.

A :class:`VllmTable` holds, for one ``major.minor`` release, the names of
vLLM's MLA ops by role (the roles of :mod:`mla_passes.op_handles`), the
modules that register them, their schemas (argument names, types, alias
marks, defaults), and the attention arguments the prepped-q path does not
model (a call that sets one is left alone). A release's table differs from
the one before it only where vLLM changed (0.34: one optional attention
argument). The rest of the package reads these tables:

* the version gate (:data:`SUPPORTED_VLLM`, :mod:`mla_passes.vllm.compat`);
* the ops the passes match (:func:`op_names`, :mod:`mla_passes.op_handles`)
  and the ones the plugin finds in ``splitting_ops`` (:func:`qualified_names`);
* the attention check (:data:`UNSUPPORTED_ATTENTION_ARGS`,
  :mod:`mla_passes.passes.attention`);
* the stand-ins' schemas (:mod:`mla_passes.testing.standins`);
* where vLLM keeps its pass context and ``InductorPass``
  (:data:`INDUCTOR_PASS_MODULES`, :mod:`mla_passes.gating`).

Supporting the next release: add its table to :data:`TABLES` (the pyproject
``vllm`` extra follows, ``tests/test_readme.py`` checks it), then run
``tests/test_vllm_tables.py`` here and ``tools/check_vllm_version.sh X.Y.Z``
against the release. Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

NAMESPACE = "vllm"

# Where vLLM keeps ``get_pass_context`` and ``InductorPass``, newest first
# (``vllm.compilation.passes`` in every supported release; the older module
# kept for builds that predate it).
INDUCTOR_PASS_MODULES = ("vllm.compilation.passes.inductor_pass", "vllm.compilation.inductor_pass")


@dataclass(frozen=True)
class VllmTable:
    """One vLLM release: its MLA ops by role and the attention arguments the passes refuse."""

    version: tuple[int, int]
    ops: dict  # role -> op name in the ``vllm`` namespace
    op_modules: dict  # role -> the vLLM module that registers the op
    schemas: dict  # role -> "(arguments) -> returns"; ``{layer_name}`` stands for the layer-name type
    unsupported_attention_args: tuple  # set in a call: the call is left alone

    def schema(self, role: str, layer_name_type: str) -> str:
        """The schema of the ``role`` op with the layer-name type spelled ``layer_name_type``."""
        return self.schemas[role].format(layer_name=layer_name_type)

    def qualified_name(self, role: str) -> str:
        """``vllm::name``, as vLLM's ``splitting_ops`` lists the op."""
        return f"{NAMESPACE}::{self.ops[role]}"


_MLA_ATTENTION_MODULE = "vllm.model_executor.layers.attention.mla_attention"

V0_32 = VllmTable(
    version=(0, 32),
    ops={
        "attention": "unified_mla_attention_with_output",
        "kv_cache_update": "unified_mla_kv_cache_update",
        "fused_rope": "fused_rope_unified_mla_kv_cache_update",
    },
    op_modules={
        "attention": _MLA_ATTENTION_MODULE,
        "kv_cache_update": _MLA_ATTENTION_MODULE,
        "fused_rope": "vllm.compilation.passes.fusion.mla_rope_kvcache_cat_fusion",
    },
    schemas={
        "attention": (
            "(Tensor q, Tensor kv_c_normed, Tensor k_pe, Tensor(a3!) output, {layer_name} layer_name, "
            "Tensor? output_scale=None, Tensor(a6!)? output_block_scale=None, Tensor? kv_cache_dummy_dep=None, "
            "SymInt? quant_group_size=None, bool? quant_scale_ue8m0=None, bool? quant_col_major=None, "
            "bool? quant_tma_aligned=None, Tensor? q_dcp_replicated=None) -> ()"),
        "kv_cache_update": (
            "(Tensor kv_c_normed, Tensor k_pe, {layer_name} layer_name, str kv_cache_dtype, Tensor k_scale) "
            "-> Tensor"),
        "fused_rope": (
            "(Tensor positions, Tensor(a1!) q_pe, Tensor(a2!) k_pe, Tensor kv_c, Tensor cos_sin_cache, "
            "bool is_neox, str kv_cache_dtype, Tensor kv_cache_scale, {layer_name} layer_name) -> Tensor"),
    },
    # output quantization and decode context parallelism (DCP)
    unsupported_attention_args=("output_scale", "output_block_scale", "quant_group_size", "q_dcp_replicated"),
)

V0_33 = replace(V0_32, version=(0, 33))

# 0.34: the attention op takes a decode q the model code already prepared
# (MLAAttention.prepare_mqa_query, which also writes the cache then).
V0_34 = replace(
    V0_33, version=(0, 34),
    schemas={**V0_33.schemas,
             "attention": V0_33.schemas["attention"].replace(") -> ()", ", Tensor? mqa_q_prepared=None) -> ()")},
    unsupported_attention_args=V0_33.unsupported_attention_args + ("mqa_q_prepared",),
)

TABLES = {t.version: t for t in (V0_32, V0_33, V0_34)}

# The releases whose MLA layer, ops and config classes the vllm subpackage was
# checked against (pyproject's `vllm` extra pins the same range).
SUPPORTED_VLLM = tuple(TABLES)

# Every argument some supported release's attention takes and the prepped-q path
# does not model, in the order they are checked (a release without one simply
# lacks the argument).
UNSUPPORTED_ATTENTION_ARGS = tuple(dict.fromkeys(a for t in TABLES.values() for a in t.unsupported_attention_args))

# Why, where a reason is more than "argument set".
ATTENTION_ARG_WHY = {"mqa_q_prepared": "the model code prepares the decode q itself (vLLM's prepare_mqa_query)"}


def op_names(role: str) -> tuple[tuple[str, str], ...]:
    """``(namespace, name)`` of the ``role`` op across the supported releases (one name today)."""
    return tuple(dict.fromkeys((NAMESPACE, t.ops[role]) for t in TABLES.values()))


def qualified_names(role: str) -> tuple[str, ...]:
    """``vllm::name`` of the ``role`` op across the supported releases."""
    return tuple(f"{ns}::{name}" for ns, name in op_names(role))
