"""The kernel's arguments are described once (mla_passes/kernels/signature.py);
every function and record that repeats them keeps its names and order, and the
backend table's derived lists stay consistent (mla_passes/kernels/backends.py)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import mla_passes.kernels as kernels
from mla_passes import config
from mla_passes.kernels import backends, reference, validate
from mla_passes.kernels.signature import ARG_NAMES, ARGS
from mla_passes.testing.cases import DecodePrepCase, make_case


def _params(fn) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def test_thirteen_arguments_each_described():
    assert len(ARG_NAMES) == 13 and len(set(ARG_NAMES)) == 13
    assert all(a.shape and a.dtypes and a.meaning for a in ARGS)


def test_entry_point_and_check_take_the_described_arguments():
    assert _params(kernels.fused_decode_prep) == ARG_NAMES
    assert "backend" in inspect.signature(kernels.fused_decode_prep).parameters
    assert _params(validate.check_fused_decode_prep_args) == ARG_NAMES


def test_backends_take_the_described_arguments_then_dims():
    # the implementations are named by path in the table; reference needs no triton/aiter to load
    assert _params(backends.implementation("reference")) == ARG_NAMES + ("dims",)
    assert _params(reference.fused_decode_prep_reference) == ARG_NAMES + ("dims",)
    src = {b.name: b.impl for b in backends.TABLE}
    assert set(src) == set(backends.BACKENDS)
    # aiter_prep imports without aiter (aiter is imported when it runs)
    assert _params(backends.implementation("aiter")) == ARG_NAMES + ("dims",)


def test_test_case_holds_the_described_arguments():
    names = tuple(f.name for f in dataclasses.fields(DecodePrepCase))
    assert names == ARG_NAMES + ("meta",)
    case = make_case(2, 2, P=8, L=16, R=8)
    assert case.kernel_args() == tuple(getattr(case, n) for n in ARG_NAMES)


def test_table_derives_names_auto_order_and_choices():
    assert backends.BACKENDS == ("reference", "triton", "aiter")
    assert backends.AUTO_ORDER == ("aiter", "triton", "reference")
    assert backends.CHOICES == ("auto",) + backends.BACKENDS == config.BACKENDS
    assert kernels.BACKENDS == backends.BACKENDS


def test_every_fallback_chain_ends_at_an_always_available_backend():
    for row in backends.TABLE:
        seen = set()
        name = row.name
        while backends.BY_NAME[name].fallback is not None:
            assert name not in seen
            seen.add(name)
            name = backends.BY_NAME[name].fallback
            assert name in backends.BY_NAME
        assert backends.BY_NAME[name].available(torch.device("cpu"))
        assert backends.BY_NAME[name].available(torch.device("meta"))


@pytest.mark.parametrize("name", ["reference", "triton", "aiter"])
def test_first_available_on_cpu_is_reference(name):
    assert backends.first_available(name, torch.device("cpu")) == "reference"


def test_triton_backend_takes_the_described_arguments_then_dims():
    """Read from the source: triton_prep imports triton, absent on CPU machines."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(backends.__file__).with_name("triton_prep.py").read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for fn in ("fused_decode_prep_triton", "launch"):
        names = tuple(a.arg for a in funcs[fn].args.args)
        assert names[:14] == ARG_NAMES + ("dims",), fn
