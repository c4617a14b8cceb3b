"""Property (issue 26): a RoPE-like subgraph with one extra elementwise op
inserted somewhere (q's or k's input, cos, sin, an intermediate, q's or k's
output, or the positions q or k reads the table at) is fused only when the
compiled step equals eager on inputs that make the op bite (activations past
+-30, positions 0 and >= 1000, an inf); else the layer is refused and the
compiled step is eager's, bit for bit. An op that is the identity for every
input (``x * 1``, ``-(-x)``, a float32 round trip) must still fuse."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

import torch  # noqa: E402

from conftest import make_pm  # noqa: E402
from mla_passes.layers import local_layers  # noqa: E402
from mla_passes.testing.models import RopeLayer, build_decode_stack  # noqa: E402
from test_passes_rope_exact import FUSION, MAX_POS, compare, fusion_of  # noqa: E402

VALUE_OPS = {
    "clamp": lambda x: x.clamp(-30, 30),
    "nan_to_num": torch.nan_to_num,
    "where_finite": lambda x: torch.where(torch.isfinite(x), x, torch.zeros_like(x)),
    "maximum": lambda x: torch.maximum(x, torch.full_like(x, -30.0)),
    "relu": torch.relu,
    "abs": torch.abs,
    "times_one": lambda x: x * 1.0,
    "neg_neg": lambda x: -(-x),
    "f32_round_trip": lambda x: x.float().to(x.dtype),
}
IDENTITIES = {"times_one", "neg_neg", "f32_round_trip"}  # the same value for every input: must not cost the fusion
POSITION_OPS = {
    "clamp_min_1": lambda p: p.clamp(min=1),
    "zero_past_1000": lambda p: torch.where(p >= 1000, 0, p),
    "remainder": lambda p: p % MAX_POS,
}
VALUE_SITES = ("q_in", "k_in", "cos", "sin", "q_mid", "k_mid", "q_out", "k_out")
POSITION_SITES = ("q_pos", "k_pos")


def hooked_rope(style, hooks):
    """A RoPE (``"native"``: ``x1 * cos``, the registered form; ``"commuted"``: ``cos * x1``, which only
    the semantic check covers) with ``hooks[site]`` applied at ``site``; q and k each gather their own
    cos/sin rows."""

    def fn(positions, q_pe, k_pe, cos_sin_cache, is_neox):
        T = positions.shape[0]

        def h(site, v):
            return hooks[site](v) if site in hooks else v

        def rot(x_in, who):
            shape = x_in.shape
            cos, sin = cos_sin_cache.index_select(0, h(who + "_pos", positions)).chunk(2, dim=-1)
            cos, sin = h("cos", cos), h("sin", sin)
            x = h(who + "_in", x_in.view(T, -1, shape[-1]))
            c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
            x1, x2 = x.chunk(2, dim=-1) if is_neox else (x[..., ::2], x[..., 1::2])
            if style == "commuted":
                o1, o2 = c * x1 - s * x2, c * x2 + s * x1
            else:
                o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
            o1 = h(who + "_mid", o1)
            y = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)
            return h(who + "_out", y.reshape(shape))

        return rot(q_pe, "q"), rot(k_pe, "k")

    return fn


@example(style="native", is_neox=False, edit=("q_out", "clamp"))        # the activation clip
@example(style="commuted", is_neox=True, edit=("k_in", "nan_to_num"))   # an inf on k's side
@example(style="native", is_neox=True, edit=("k_pos", "clamp_min_1"))   # the mirror case of the positions edit
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(style=st.sampled_from(["native", "commuted"]), is_neox=st.booleans(),
       edit=st.one_of(st.tuples(st.sampled_from(VALUE_SITES), st.sampled_from(sorted(VALUE_OPS))),
                      st.tuples(st.sampled_from(POSITION_SITES), st.sampled_from(sorted(POSITION_OPS)))))
def test_fused_only_when_compiled_equals_eager_where_the_op_bites(style, is_neox, edit):
    torch._dynamo.reset()
    local_layers.clear()
    site, op = edit
    fn = (POSITION_OPS if site.endswith("_pos") else VALUE_OPS)[op]
    stack = build_decode_stack(1, H=2, hidden=64, is_neox=is_neox, max_pos=MAX_POS)
    module = RopeLayer(stack, hooked_rope(style, {site: fn}))
    pm = make_pm()
    # fused: equal to the RoPE's rounding on every input; refused: bit for bit (the step is eager's)
    compare(stack, module, pm, exact="unless fused")
    fused = pm.matched_counts[FUSION] == 1
    hypothesis.event("fused" if fused else "refused")
    hypothesis.event(f"{style} {site} {op}: {'fused' if fused else 'refused'}")
    if not fused:
        assert fusion_of(pm).refusals, "refused without a reason"
    if op in IDENTITIES and not site.endswith("_pos"):
        assert fused, (site, op, fusion_of(pm).refusals)
