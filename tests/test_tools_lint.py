"""``mla_passes.diagnostics.lint`` / ``mla-passes lint``: planted CUDA-graph breakers are
found (live graph and dumped text), clean graphs are clean."""

from __future__ import annotations

import json

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mla_passes.diagnostics.lint import (
    DYNAMIC_SHAPE,
    FAKE_SHAPE,
    HOST_SYNC,
    HOST_TRANSFER,
    CudaGraphLintError,
    CudaGraphLintPass,
    lint_graph,
    lint_path,
    lint_source,
)
from mla_passes import cli

_STATE = {"rows": 3}
_lib = torch.library.Library("mla_lint_test", "DEF")
_lib.define("stateful_rows(Tensor q) -> Tensor")
_lib.define("data_rows(Tensor q) -> Tensor")
_lib.impl("stateful_rows", lambda q: q[: _STATE["rows"]].clone(), "CompositeExplicitAutograd")
torch.library.register_fake("mla_lint_test::stateful_rows", lambda q: q.new_empty((_STATE["rows"], q.shape[1])),
                            lib=_lib)
_lib.impl("data_rows", lambda q: q[q[:, 0] > 0].clone(), "CompositeExplicitAutograd")


def _data_rows_fake(q):
    return q.new_empty((torch.library.get_ctx().new_dynamic_size(), q.shape[1]))


torch.library.register_fake("mla_lint_test::data_rows", _data_rows_fake, lib=_lib)


def _planted(x, mask, idx):
    a = torch.nonzero(x)
    b = torch.unique(x)
    c = torch.masked_select(x, mask)
    d = x[mask]
    e = x.sum().item()
    f = torch.ops.mla_lint_test.stateful_rows(x)
    g = torch.ops.mla_lint_test.data_rows(x)
    h = torch.repeat_interleave(idx)
    ok = x[idx] * 2 + torch.cos(x) + torch.repeat_interleave(idx, 2).sum()
    return a, b, c, d, e, f, g, h, ok


# node name -> (op, kind) every planted violation must produce
EXPECTED = {
    "nonzero": ("aten.nonzero.default", DYNAMIC_SHAPE),
    "_unique2": ("aten._unique2.default", DYNAMIC_SHAPE),
    "masked_select": ("aten.masked_select.default", DYNAMIC_SHAPE),
    "index": ("aten.index.Tensor", DYNAMIC_SHAPE),  # x[mask]; x[idx] (int) is index_1 and clean
    "_local_scalar_dense": ("aten._local_scalar_dense.default", HOST_SYNC),
    "stateful_rows": ("mla_lint_test.stateful_rows.default", FAKE_SHAPE),
    "data_rows": ("mla_lint_test.data_rows.default", FAKE_SHAPE),
    "repeat_interleave": ("aten.repeat_interleave.Tensor", DYNAMIC_SHAPE),
}


@pytest.fixture(scope="module")
def planted_gm():
    x = torch.randn(4, 4)
    _STATE["rows"] = 3
    gm = make_fx(_planted, tracing_mode="symbolic")(x, x > 0, torch.tensor([1, 2, 0, 1]))
    # The stateful fake now answers differently for the same inputs: it reads
    # state beyond its inputs (the invariant-1 bug, DESIGN §4.2).
    _STATE["rows"] = 2
    yield gm
    _STATE["rows"] = 3


def _by_node(findings):
    return {f.node: (f.op, f.kind) for f in findings}


def test_live_graph_finds_every_planted_violation(planted_gm):
    findings = lint_graph(planted_gm)
    assert _by_node(findings) == EXPECTED
    assert len(findings) == len(EXPECTED)
    for f in findings:
        assert f.node in str(f) and f.op in str(f)


def test_dumped_text_finds_violations_without_live_state(planted_gm):
    """The text has no fake impl to re-run: the stateful op (static shape 3) is
    the one violation only the live check can see."""
    src = planted_gm.print_readable(print_output=False)
    expected = {k: v for k, v in EXPECTED.items() if k != "stateful_rows"}
    assert _by_node(lint_source(src)) == expected


def test_item_and_tolist_in_dynamo_graph_are_host_syncs():
    """Dynamo-level graphs call methods (`x.item()`), not aten ops."""
    src = '''
class GraphModule(torch.nn.Module):
    def forward(self, L_x_: "f32[8]", L_m_: "b8[8]"):
        l_x_ = L_x_
        l_m_ = L_m_
        s: "f32[]" = l_x_.sum()
        v = s.item()
        lst = l_x_.tolist()
        sel: "f32[u0]" = l_x_[l_m_]
        ok: "f32[8]" = l_x_ * 2
        return (ok,)
'''
    found = _by_node(lint_source(src))
    assert found == {"v": ("Tensor.item", HOST_SYNC), "lst": ("Tensor.tolist", HOST_SYNC),
                     "sel": ("getitem", DYNAMIC_SHAPE)}


def _clean(x, idx, w):
    y = torch.index_select(x, 0, idx) @ w
    return torch.cat([y, y.sin()], dim=-1).to(torch.bfloat16), x[idx].sum(0)


def test_clean_graph_has_no_findings():
    args = (torch.randn(6, 4), torch.tensor([0, 2, 5]), torch.randn(4, 4))
    for mode in ("real", "symbolic"):
        gm = make_fx(_clean, tracing_mode=mode)(*args)
        assert lint_graph(gm) == []
        assert lint_source(gm.print_readable(print_output=False)) == []


def test_pass_wrapper_reports_and_strict_raises(planted_gm):
    p = CudaGraphLintPass()
    before = str(planted_gm.graph)
    p(planted_gm.graph)
    assert len(p.findings) == len(EXPECTED)
    assert str(planted_gm.graph) == before  # never rewrites
    with pytest.raises(CudaGraphLintError, match="nonzero"):
        CudaGraphLintPass(strict=True)(planted_gm.graph)
    assert CudaGraphLintPass().uuid() == CudaGraphLintPass().uuid() != CudaGraphLintPass(strict=True).uuid()


def test_cli_on_files_and_folder(tmp_path, planted_gm, capsys):
    bad = tmp_path / "dump" / "__compiled_fn_1.AFTER_POST_GRAD.0.py"
    bad.parent.mkdir()
    bad.write_text(planted_gm.print_readable(print_output=False))
    clean_gm = make_fx(_clean)(torch.randn(6, 4), torch.tensor([0, 2, 5]), torch.randn(4, 4))
    good = tmp_path / "clean.py"
    good.write_text(clean_gm.print_readable(print_output=False))

    assert cli.main(["lint", str(good)]) == 0
    assert "0 findings in 1 graph file" in capsys.readouterr().out

    assert cli.main(["lint", str(bad.parent)]) == 1
    out = capsys.readouterr().out
    assert "7 findings in 1 graph file" in out
    assert "nonzero: aten.nonzero.default: [dynamic-shape]" in out
    assert "_local_scalar_dense: aten._local_scalar_dense.default: [host-sync]" in out

    assert cli.main(["lint", "--json", str(bad)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["num_findings"] == 7
    assert {f["node"] for f in data["files"][str(bad)]} == set(EXPECTED) - {"stateful_rows"}

    assert cli.main(["lint", str(tmp_path / "missing.py")]) == 2
    assert lint_path(good) == {str(good): []}


# --- host transfers (issue 11 item 14) -------------------------------------------

def _transfers(x):
    a = x.cpu()                                    # device -> host
    b = x.to("cpu")                                # device -> host
    c = torch.tensor([1.0, 2.0]).to(x.device)      # a CPU constant copied to the device
    d = torch.histc(x, bins=10)                    # default range: min/max read back from the data
    ok_range = torch.histc(x, bins=10, min=-1.0, max=1.0)
    ok_dtype = x.to(torch.float16)                 # a copy that stays on the device
    ok_same = x.to("cuda:0", copy=True)            # an explicit device-to-same-device copy
    return a, b, c, d, ok_range, ok_dtype, ok_same


TRANSFERS = {
    "_to_copy": ("aten._to_copy.default", HOST_TRANSFER),
    "_to_copy_1": ("aten._to_copy.default", HOST_TRANSFER),
    "_to_copy_2": ("aten._to_copy.default", HOST_TRANSFER),
    "histc": ("aten.histc.default", HOST_SYNC),
}


@pytest.fixture(scope="module")
def transfers_gm():
    """The graph traced on fake CUDA tensors (no GPU needed): devices are in meta['val']."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, device="cuda")
    return make_fx(_transfers, tracing_mode="fake")(x)


def test_host_transfers_and_histc_default_range_are_found(transfers_gm):
    """x.cpu(), x.to('cpu'), a CPU constant copied to the device and histc's default range were not reported."""
    assert _by_node(lint_graph(transfers_gm)) == TRANSFERS


def test_host_transfers_found_in_dumped_text(transfers_gm):
    """Text with devices printed gives the live findings; without them, only what the text itself proves."""
    with_devices = transfers_gm.print_readable(print_output=False, include_device=True)
    assert _by_node(lint_source(with_devices)) == TRANSFERS
    # No device annotations: a copy *to* the host is still one; the constant's
    # copy to the device cannot be told from a same-device copy.
    plain = transfers_gm.print_readable(print_output=False)
    assert _by_node(lint_source(plain)) == {k: v for k, v in TRANSFERS.items() if k != "_to_copy_2"}


def test_copy_of_a_host_tensor_into_a_device_buffer():
    """copy/copy_ of a CPU tensor into a CUDA tensor is a transfer; a same-device copy is not."""
    src = '''
class GraphModule(torch.nn.Module):
    def forward(self, arg0_1: "f32[4][1]cuda:0", arg1_1: "f32[4][1]cpu", arg2_1: "f32[4][1]cuda:0"):
        copy: "f32[4][1]cuda:0" = torch.ops.aten.copy.default(arg0_1, arg1_1)
        copy_1: "f32[4][1]cuda:0" = torch.ops.aten.copy.default(arg0_1, arg2_1)
        copy_: "f32[4][1]cuda:0" = torch.ops.aten.copy_.default(arg2_1, copy_1)
        return (copy, copy_)
'''
    assert _by_node(lint_source(src)) == {"copy": ("aten.copy.default", HOST_TRANSFER)}


def test_dynamo_level_transfers():
    """Dynamo graphs call methods: l_x_.cpu(), l_x_.to('cpu'), torch.histc(l_x_) are findings; .to(dtype) is not."""
    src = '''
class GraphModule(torch.nn.Module):
    def forward(self, L_x_: "f32[8]"):
        l_x_ = L_x_
        a = l_x_.cpu()
        b = l_x_.to('cpu')
        h = torch.histc(l_x_, bins = 10)
        ok = l_x_.to(torch.float16)
        ok_h = torch.histc(l_x_, bins = 10, min = -1.0, max = 1.0)
        return (a, b, h, ok, ok_h)
'''
    assert _by_node(lint_source(src)) == {"a": ("Tensor.cpu", HOST_TRANSFER), "b": ("Tensor.to", HOST_TRANSFER),
                                          "h": ("torch.histc", HOST_SYNC)}
