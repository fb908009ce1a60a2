"""YaRN frequencies and scales against transformers' own implementation."""

import numpy as np
import pytest

from k25.model.config import RopeScaling
from k25.model.rope import inv_freq_and_attention_factor, softmax_scale

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("factor, mscale, mscale_all_dim", [(32.0, 1.0, 1.0), (4.0, 0.707, 1.0), (8.0, 1.0, 0.0)])
def test_yarn_matches_transformers(factor, mscale, mscale_all_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim, "rope_theta": 50000.0}
    cfg = transformers.DeepseekV3Config(rope_parameters=rope, max_position_embeddings=131072)
    inv_ref, attn_ref = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    ours, attn = inv_freq_and_attention_factor(64, 50000.0, RopeScaling(
        type="yarn", factor=factor, original_max_position_embeddings=4096, mscale=mscale,
        mscale_all_dim=mscale_all_dim))
    np.testing.assert_allclose(ours, inv_ref.numpy(), rtol=1e-6)
    assert attn == pytest.approx(attn_ref)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    assert softmax_scale(192, RopeScaling(type="yarn", factor=factor, mscale=mscale,
                                          mscale_all_dim=mscale_all_dim)) == pytest.approx(
        yarn_apply_mscale(dict(rope, rope_type="yarn"), 192**-0.5))
