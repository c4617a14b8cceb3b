"""The checks a fusion plan passes before the rewrite
(:mod:`mla_passes.passes.fusion`; DESIGN §4.6, the end of "Plan" and
"Check"): the kernel's own argument rules asked about the planned operands,
and the proof that the in-place calls are safe. Each refuses through the
pass (``pass_.refuse``) and returns False.
"""

from __future__ import annotations

import contextlib

import torch
from torch.fx import Node

from .. import fx
from ..kernels import validate
from ..patterns import casts
from .fusion_plan import FusionPlan


def kernel_rules(pass_, plan: FusionPlan, where: str) -> bool:
    """The kernel's own argument rules (:mod:`mla_passes.kernels.validate`,
    one source for both) asked at compile time about the operands the
    fused op will get, so that a graph the kernel refuses at run time is
    not rewritten. A bf16/fp16 ``k_scale`` (``model.half()`` of a float32
    buffer) has an exact float32 copy: the plan passes that instead."""
    q = fx.val(plan.q_orig)
    k_scale = fx.val(plan.k_scale)
    if (isinstance(k_scale, torch.Tensor) and k_scale.is_floating_point() and k_scale.dtype != torch.float32
            and casts.holds(torch.float32, k_scale.dtype)):
        plan.k_scale_f32 = True
        mode = getattr(k_scale, "fake_mode", None)
        with mode if mode is not None else contextlib.nullcontext():
            k_scale = k_scale.to(torch.float32)
    operands = (q, fx.val(plan.kv_c), fx.val(plan.k_in), fx.val(plan.positions), fx.val(plan.cos_sin_cache))
    if not all(isinstance(v, torch.Tensor) for v in operands + (k_scale,)):
        pass_.refuse(where, "an operand of the fused op has no tensor value in the graph")
        return False
    problem = validate.graph_operand_problem(*operands, plan.is_neox, plan.kv_cache_dtype, k_scale,
                                             P=plan.P, R=plan.R)
    if problem is None and isinstance(plan.q_scale, torch.Tensor):
        problem = validate.scale_problem("q_scale", plan.q_scale, q.device, optional=True)
    if problem is not None:
        pass_.refuse(where, "the kernel would refuse the layer's operands: %s", validate.problem_text(problem))
        return False
    return True


def in_place_safe(pass_, plan: FusionPlan, where: str) -> bool:
    """Every input exists before the fusion point; every value the rewrite
    replaces by a view of the rotated memory has that view's dtype; no
    reader of the memory the fused op rotates runs after it expecting
    unrotated values."""
    at = plan.insert_before
    for inp in (plan.q_orig, plan.k_in, plan.kv_c, plan.positions, plan.cos_sin_cache, plan.k_scale):
        if not isinstance(inp, Node) or not inp < at:
            pass_.refuse(where, "input %s is not a graph value defined before the fusion point", inp)
            return False
    for n, base in plan.root_value_nodes:
        if not base < at:
            pass_.refuse(where, "mutated base %s is defined after the fusion point", base.name)
            return False
    if not same_dtypes(pass_, plan, where):
        return False
    going = set(plan.dead) | plan.cone | {plan.attn.node, plan.update.node}
    going |= set(plan.q_value_nodes) | {n for n, _ in plan.root_value_nodes}
    for target in (fx.Region.of(plan.q_orig).slice_last(plan.P, plan.P + plan.R), fx.Region.of(plan.k_in)):
        root = target.root
        if root.op == "placeholder":
            pass_.refuse(where, "would rotate graph input %s in place", root.name)
            return False
        shared = fx.aliases(root)
        alias_set = set(shared)
        for a in shared:
            r = False  # Region.of(a), computed at the first reader that needs it
            for u in a.users:
                if u in going or u in alias_set or u < at:
                    continue
                if u.op == "output":
                    pass_.refuse(where, "rotated memory %s is a graph output", a.name)
                    return False
                if r is False:
                    r = fx.Region.of(a)
                if r is not None and r.disjoint_columns(target):
                    continue
                pass_.refuse(where, "%s reads %s after the fusion point", u.name, a.name)
                return False
    return True

def same_dtypes(pass_, plan: FusionPlan, where: str) -> bool:
    """The rewrite replaces rotated values by views of the rotated q / k
    memory: refuse when a kept reader would get another dtype (an fp32
    RoPE result rounded to the model dtype is not the same value)."""
    k_dtype, q_dtype = fx.val(plan.k_in).dtype, fx.val(plan.q_orig).dtype
    keep = set(plan.dead) | set(plan.q_value_nodes) | plan.cone
    checks = [(n, k_dtype) for n in plan.k_value_nodes if set(n.users) - {plan.update.node}]
    checks.append((plan.attn.arg("k_pe"), k_dtype))
    checks += [(n, q_dtype) for n in plan.q_pe_value_nodes if set(n.users) - keep]
    for n, dtype in checks:
        v = fx.val(n)
        if not isinstance(v, torch.Tensor) or v.dtype != dtype:
            pass_.refuse(where, "%s holds a rotated value as %s; after the rewrite it would be %s", n,
                        getattr(v, "dtype", v), dtype)
            return False
    return True
