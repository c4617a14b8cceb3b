"""The per-release tables of :mod:`mla_passes.vllm.tables`, checked without vLLM.

A release's table differs from the one before it only by trailing optional
attention arguments that the passes refuse when set; the stand-ins copy the
table they name; every argument a table calls unsupported is refused by the
attention check. Whether a table matches the real release is
``tests/test_vllm_patches.py``, run against each installed vLLM.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx import Graph

from mla_passes import fx
from mla_passes.op_handles import ROLES
from mla_passes.ops import LAYER_NAME_TYPE
from mla_passes.passes.attention import check_attention
from mla_passes.testing import standins
from mla_passes.vllm import tables

VERSIONS = sorted(tables.TABLES)


def _schema(table: tables.VllmTable, role: str):
    return torch._C.parse_schema(f"{tables.NAMESPACE}::{table.ops[role]}{table.schema(role, LAYER_NAME_TYPE)}")


def _args(schema) -> list[tuple]:
    return [(a.name, str(a.type), None if a.alias_info is None else a.alias_info.is_write,
             repr(a.default_value) if a.has_default_value() else None) for a in schema.arguments]


def test_supported_releases_are_the_tables():
    assert tables.SUPPORTED_VLLM == tuple(VERSIONS) == ((0, 32), (0, 33), (0, 34))
    for v, t in tables.TABLES.items():
        assert t.version == v


@pytest.mark.parametrize("version", VERSIONS)
def test_table_complete_and_parses(version):
    t = tables.TABLES[version]
    for role in ROLES:
        assert set(t.ops) == set(t.op_modules) == set(t.schemas) == set(ROLES)
        s = _schema(t, role)
        assert [a.name for a in s.arguments if a.name == "layer_name"] == ["layer_name"], str(s)
    names = [a[0] for a in _args(_schema(t, "attention"))]
    assert set(t.unsupported_attention_args) <= set(names), t.unsupported_attention_args


@pytest.mark.parametrize("before,after", list(zip(VERSIONS, VERSIONS[1:])))
def test_a_release_differs_only_by_trailing_refused_arguments(before, after):
    """Same ops and schemas, except arguments appended at the end of the
    attention: optional, read-only, default None, refused when set."""
    a, b = tables.TABLES[before], tables.TABLES[after]
    assert a.ops == b.ops and a.op_modules == b.op_modules
    for role in ROLES:
        old, new = _args(_schema(a, role)), _args(_schema(b, role))
        assert new[:len(old)] == old, role
        for name, typ, write, default in new[len(old):]:
            assert role == "attention" and write is None and default == "None", (role, name)
            assert name in b.unsupported_attention_args and name not in a.unsupported_attention_args
    assert b.unsupported_attention_args[:len(a.unsupported_attention_args)] == a.unsupported_attention_args


def test_op_names_one_per_role():
    for role in ROLES:
        assert tables.op_names(role) == ((tables.NAMESPACE, tables.V0_32.ops[role]),)


@pytest.mark.parametrize("role", ROLES)
def test_standins_copy_their_table(role):
    op = {"attention": standins.attention_with_output, "kv_cache_update": standins.kv_cache_update,
          "fused_rope": standins.fused_rope_kv_cache_update}[role]
    assert op._schema.name == f"{standins.NAMESPACE}::{standins.SCHEMAS_OF.ops[role]}"
    assert _args(op._schema) == _args(_schema(standins.SCHEMAS_OF, role))


_libs: dict = {}


def _attention_op(version):
    """The attention op with ``version``'s schema, in a test namespace."""
    if version not in _libs:
        ns = "mla_passes_table_%d_%d" % version
        t = tables.TABLES[version]
        lib = torch.library.Library(ns, "DEF")
        lib.define(t.ops["attention"] + t.schema("attention", LAYER_NAME_TYPE))
        _libs[version] = (lib, getattr(getattr(torch.ops, ns), t.ops["attention"]).default)
    return _libs[version][1]


@pytest.mark.parametrize("version,arg", [(v, a) for v in VERSIONS for a in tables.TABLES[v].unsupported_attention_args])
def test_every_unsupported_argument_is_refused(version, arg):
    op = _attention_op(version)
    g = Graph()
    q, kv_c, k_pe, out, ln, x = (g.placeholder(n) for n in ("q", "kv_c", "k_pe", "out", "ln", "x"))
    g.call_function(op, (q, kv_c, k_pe, out, ln), {arg: x})
    (call,) = fx.find_op_calls(g, {op})
    why = check_attention(call)
    assert why is not None and why.startswith(f"argument {arg!r} is set"), why


def _arg_names_read_by_the_passes() -> set[str]:
    """Every ``.arg("name")`` the passes and patterns read off a node by argument name."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    names = set()
    for path in [*(root / "mla_passes" / "passes").glob("*.py"), root / "mla_passes" / "fx.py", *(root / "patterns").glob("*.py")]:
        names.update(re.findall(r'\.arg\("([a-z_]+)"', path.read_text()))
    return names


@pytest.mark.parametrize("version", VERSIONS)
def test_argument_names_the_passes_read_are_in_every_table(version):
    """The passes read vLLM's op arguments by name; each such name is an argument of some op of
    every supported release (a release that renamed one needs its table and the code changed)."""
    names = _arg_names_read_by_the_passes()
    assert {"kv_c_normed", "k_pe", "layer_name", "cos_sin_cache"} <= names  # the scan sees the code
    from mla_passes import ops

    ours = {a.name for op in (ops.decode_q_prep_op, ops.fused_decode_prep_op, ops.attention_with_prepped_q_op)
            for a in op._schema.arguments}  # arguments of our own ops, read the same way
    table = tables.TABLES[version]
    in_table = {a[0] for role in ROLES for a in _args(_schema(table, role))}
    missing = names - in_table - ours
    assert not missing, f"vLLM {version}: the passes read {sorted(missing)}, which no op of its table takes"
