"""PassConfig and MLAPassManager arguments: typed, validated, named errors (issue 11 item 13)."""

from __future__ import annotations

import pytest

from mla_passes import MLAPassManager, PassConfig
from mla_passes.config import PassConfigError


@pytest.mark.parametrize("kw,name", [
    (dict(fuse_aiter_qk_rope_kvcache_mla="no"), "fuse_aiter_qk_rope_kvcache_mla"),
    (dict(fuse_aiter_qk_rope_kvcache_mla=1), "fuse_aiter_qk_rope_kvcache_mla"),
    (dict(fuse_rope_kvcache_cat_mla="yes"), "fuse_rope_kvcache_cat_mla"),
    (dict(aiter_qk_rope_kvcache_fusion_max_token_num=True), "aiter_qk_rope_kvcache_fusion_max_token_num"),
    (dict(aiter_qk_rope_kvcache_fusion_max_token_num=0), "aiter_qk_rope_kvcache_fusion_max_token_num"),
    (dict(aiter_qk_rope_kvcache_fusion_max_token_num=-3), "aiter_qk_rope_kvcache_fusion_max_token_num"),
    (dict(aiter_qk_rope_kvcache_fusion_max_token_num=8.0), "aiter_qk_rope_kvcache_fusion_max_token_num"),
    (dict(aiter_qk_rope_kvcache_fusion_max_token_num="8"), "aiter_qk_rope_kvcache_fusion_max_token_num"),
    (dict(backend="cuda"), "backend"),
    (dict(backend=None), "backend"),
    (dict(lift_q_prep="false"), "lift_q_prep"),
    (dict(no_range_policy="maybe"), "no_range_policy"),
])
def test_pass_config_rejects_nonsense(kw, name):
    """'no' turned the passes on, True was read as a threshold of 1: each bad value is refused by name."""
    with pytest.raises(PassConfigError, match=name):
        PassConfig(**kw)


def test_pass_config_error_is_type_and_value_error():
    """Callers catching ValueError (or TypeError) still catch a config error."""
    with pytest.raises(ValueError):
        PassConfig(backend="x")
    with pytest.raises(TypeError):
        PassConfig(fuse_aiter_qk_rope_kvcache_mla="no")


@pytest.mark.parametrize("kw,name", [
    (dict(max_num_seqs=-4), "max_num_seqs"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_seqs=True), "max_num_seqs"),
    (dict(max_num_seqs=4.0), "max_num_seqs"),
    (dict(max_num_seqs=4, num_speculative_tokens=-1), "num_speculative_tokens"),
    (dict(max_num_seqs=4, num_speculative_tokens=None), "num_speculative_tokens"),
    (dict(max_num_seqs=4, num_speculative_tokens=False), "num_speculative_tokens"),
])
def test_pass_manager_rejects_bad_bucket(kw, name):
    """max_num_seqs=-4 gave a threshold of -4 and the passes silently never applied."""
    with pytest.raises(PassConfigError, match=name):
        MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), **kw)


def test_pass_manager_revalidates_assigned_fields():
    """A field assigned after construction is checked when the manager is built."""
    cfg = PassConfig(fuse_aiter_qk_rope_kvcache_mla=True)
    cfg.backend = "gpu"
    with pytest.raises(PassConfigError, match="backend"):
        MLAPassManager(cfg, max_num_seqs=4)
    with pytest.raises(PassConfigError, match="config"):
        MLAPassManager({"fuse_aiter_qk_rope_kvcache_mla": True})


def test_from_dict():
    """Unknown keys are named; known ones are checked like the constructor's."""
    assert PassConfig.from_dict({"fuse_aiter_qk_rope_kvcache_mla": True}).fuse_rope_kvcache_cat_mla is True
    with pytest.raises(PassConfigError, match="fuse_aiter_qk_rope_kvcache"):
        PassConfig.from_dict({"fuse_aiter_qk_rope_kvcache": True})
    with pytest.raises(PassConfigError, match="backend"):
        PassConfig.from_dict({"backend": 3})


def test_valid_values_accepted():
    """Every field at a valid non-default value is kept as given."""
    cfg = PassConfig(fuse_aiter_qk_rope_kvcache_mla=True, fuse_rope_kvcache_cat_mla=False,
                     aiter_qk_rope_kvcache_fusion_max_token_num=1, backend="reference", lift_q_prep=False,
                     no_range_policy="apply")
    pm = MLAPassManager(cfg, max_num_seqs=1, num_speculative_tokens=0)
    assert pm.decode_max_tokens == 1 and cfg.fuse_rope_kvcache_cat_mla is False
