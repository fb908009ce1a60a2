"""MoonViT-3D against transformers' Kimi-K2.5 vision tower (random tiny weights, float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

from k25.hf_vision import vision_config_from_hf, vision_config_to_hf, vision_params_from_hf, vision_params_to_hf
from k25.model.config import tiny
from k25.model.moonvit import MoonViT, bicubic_matrix, resample_pos_table
from k25.model.vision_config import K25Config, MoonViTConfig, tiny_vision

VISION = {"patch_size": 14, "pos_emb_height": 8, "pos_emb_width": 8, "pos_emb_time": 4, "num_attention_heads": 2,
              "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48, "merge_kernel_size": [2, 2]}
TEXT = {"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
            "num_hidden_layers": 1, "first_k_dense_replace": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0}
TOL = 1e-5


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (biases and LayerNorm affines too), so no term can hide behind a 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_emb.position_embeddings"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 and ("norm" in name):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def towers():
    """(hf vision tower, k25 MoonViT) with identical random weights."""
    torch.manual_seed(0)
    hf_cfg = Kimi_K25Config(text_config=TEXT, vision_config=VISION, projection_hidden_size=32,
                            image_token_id=62, video_token_id=63)
    hf = Kimi_K25ForConditionalGeneration(hf_cfg).eval()
    randomize_(hf, 1)
    cfg = K25Config(text_config=tiny(vocab_size=64, hidden_size=32), projection_hidden_size=32,
                    vision_config=vision_config_from_hf(hf_cfg.vision_config.to_dict(), dtype="float32"))
    ours = nnx.eval_shape(lambda: MoonViT(cfg.vision_config, rngs=nnx.Rngs(0)))  # every value comes from HF
    state = nnx.state(ours)
    nnx.replace_by_pure_dict(state, vision_params_from_hf(hf.state_dict(), cfg)["vision_tower"])
    nnx.update(ours, state)
    return hf.model.vision_tower, ours


_forward = nnx.jit(lambda m, x, grids: m(x, grids), static_argnums=2)


def run_ours(model, pixels: np.ndarray, grids):
    """Jitted with the grid static, as training runs it (eager dispatch would compile every op separately)."""
    return _forward(model, jnp.asarray(pixels), tuple(map(tuple, grids)))


def random_pixels(grids, seed: int) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, 3, 14, 14)).astype(np.float32)


def run_hf(tower, pixels: np.ndarray, grids) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = tower(torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def run_hf_per_chunk(tower, pixels: np.ndarray, grids) -> tuple[np.ndarray, np.ndarray]:
    """Chunk by chunk: transformers cannot merge chunks of different lengths in one call."""
    hidden, pooled, start = [], [], 0
    for g in grids:
        n = g[0] * g[1] * g[2]
        h, p = run_hf(tower, pixels[start:start + n], [g])
        hidden.append(h)
        pooled.append(p)
        start += n
    return np.concatenate(hidden), np.concatenate(pooled)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("src,dst", [((8, 8), (4, 6)), ((8, 8), (20, 14)), ((5, 7), (9, 3)), ((64, 64), (1, 2))])
def test_bicubic_matches_torch_interpolate(src, dst):
    table = np.random.default_rng(0).standard_normal((*src, 5)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None], size=dst, mode="bicubic",
                                          align_corners=False)[0].permute(1, 2, 0).numpy()
    assert max_diff(resample_pos_table(jnp.asarray(table), *dst), ref) < 1e-5


def test_bicubic_rows_sum_to_one_and_identity():
    np.testing.assert_allclose(np.asarray(bicubic_matrix(13, 8)).sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(bicubic_matrix(8, 8)), np.eye(8, dtype=np.float32))


def test_images_packed_parity(towers):
    hf, ours = towers
    grids = [(1, 4, 6), (1, 10, 8), (1, 2, 2), (1, 8, 8), (1, 12, 4)]  # down-, up- and same-size tables
    px = random_pixels(grids, 0)
    ref_h, ref_p = run_hf(hf, px, grids)
    out = run_ours(ours, px, np.asarray(grids).tolist())
    assert out.pooled.shape == ref_p.shape
    assert max_diff(out.last_hidden_state, ref_h) < TOL
    assert max_diff(out.pooled, ref_p) < TOL


def test_video_chunks_same_length_one_call(towers):
    hf, ours = towers
    grids = [(4, 4, 6), (4, 2, 4)]  # equal t: transformers can pack these itself
    px = random_pixels(grids, 1)
    ref_h, ref_p = run_hf(hf, px, grids)
    out = run_ours(ours, px, grids)
    assert max_diff(out.last_hidden_state, ref_h) < TOL
    assert max_diff(out.pooled, ref_p) < TOL


def test_mixed_chunk_lengths_and_images(towers):
    hf, ours = towers
    grids = [(4, 4, 6), (2, 4, 6), (1, 6, 4), (3, 2, 2), (1, 2, 4)]  # a 6-frame video, an image, a 3-frame clip
    px = random_pixels(grids, 2)
    ref_h, ref_p = run_hf_per_chunk(hf, px, grids)
    out = run_ours(ours, px, grids)
    assert out.pooled.shape == (6 + 6 + 6 + 1 + 2, 4, 32)
    assert max_diff(out.last_hidden_state, ref_h) < TOL
    assert max_diff(out.pooled, ref_p) < TOL


def test_attention_is_block_diagonal(towers):
    _, ours = towers
    grids = [(2, 4, 4), (1, 4, 6)]
    px = random_pixels(grids, 3)
    a = run_ours(ours, px, grids).last_hidden_state
    px[32:] += 1.0  # change only the second chunk
    b = run_ours(ours, px, grids).last_hidden_state
    np.testing.assert_array_equal(np.asarray(a[:32]), np.asarray(b[:32]))
    assert max_diff(a[32:], b[32:]) > 1e-2


def test_grid_must_be_static(towers):
    _, ours = towers
    px = jnp.zeros((8, 3, 14, 14))
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda g: ours(px, g).pooled)(jnp.asarray([[2, 2, 2]]))


def test_bad_inputs_raise(towers):
    _, ours = towers
    with pytest.raises(ValueError, match="multiples of merge_kernel_size"):
        ours(jnp.zeros((15, 3, 14, 14)), [(1, 3, 5)])
    with pytest.raises(ValueError, match="pos_emb_time"):
        ours(jnp.zeros((5 * 4, 3, 14, 14)), [(5, 2, 2)])
    with pytest.raises(ValueError, match="patches"):
        ours(jnp.zeros((7, 3, 14, 14)), [(1, 2, 2)])


def test_config_validation_names_field_and_fix():
    with pytest.raises(ValueError, match="head_dim.*divisible by 4"):
        MoonViTConfig(hidden_size=40, num_attention_heads=4).validate()
    with pytest.raises(ValueError, match="hidden_act"):
        tiny_vision(hidden_act="relu6")
    with pytest.raises(ValueError, match="projection_hidden_size=16 must equal vision_config.hidden_size=32"):
        K25Config(text_config=tiny(), vision_config=tiny_vision(), projection_hidden_size=16).validate()
    with pytest.raises(ValueError, match="unknown field"):
        MoonViTConfig.from_dict({"hidden_size": 32, "depth": 3})
    cfg = K25Config(text_config=tiny(), vision_config=tiny_vision(), projection_hidden_size=32).validate()
    assert K25Config.from_dict(cfg.to_dict()) == cfg


def test_hf_conversion_round_trip(towers):
    hf_cfg = Kimi_K25Config(text_config=TEXT, vision_config=VISION, projection_hidden_size=32)
    vcfg = vision_config_from_hf(hf_cfg.vision_config.to_dict(), dtype="float32")
    assert vision_config_from_hf(vision_config_to_hf(vcfg), dtype="float32") == vcfg
    model = Kimi_K25ForConditionalGeneration(hf_cfg)
    randomize_(model, 5)
    cfg = K25Config(text_config=tiny(hidden_size=32), vision_config=vcfg, projection_hidden_size=32)
    sd = {k: v for k, v in model.state_dict().items() if ".vision_tower." in k or ".mm_projector." in k}
    back = vision_params_to_hf(vision_params_from_hf(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    with pytest.raises(ValueError, match="not consumed"):
        vision_params_from_hf(sd, cfg.replace(vision_config=vcfg.replace(num_hidden_layers=1)))
