"""Quantized checkpoints: block-FP8 (DeepSeek-V3 / Kimi-K2-Instruct) and compressed-tensors INT4 pack-quantized
(Kimi-K2-Thinking / K2.5) load to exactly the weights transformers dequantizes them to, and the same logits."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from flax import nnx
from hf_synthetic import write_fp8, write_int4

from k25 import hf
from k25.hf.quant import dequantize_fp8_block, unpack_int32
from k25.hf_vision import to_numpy

# every quantized matrix divides into 8x8 FP8 blocks (transformers' CPU dequantizer needs whole blocks) and the
# experts' inputs (64 and 32 wide) into INT4 groups of 32, the released group size
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
              num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
              v_head_dim=8, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, max_position_embeddings=128)
BLOCK, GROUP, SEQ = 8, 32, 24


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32")
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.is_floating_point():
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(path)
    return str(path)


def ids() -> np.ndarray:
    return np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (2, SEQ)).astype(np.int32)


def reference(path: str, qconfig):
    """transformers' own dequantizing load: (its k25-layout leaves, its logits)."""
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(path, quantization_config=qconfig,
                                                             dtype=torch.float32).eval()
    sd = ref.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())
    cfg = hf.config_from_hf(json.load(open(f"{path}/config.json")), dtype="float32")
    leaves = hf.text_params_from_hf(lambda k: to_numpy(sd[k]), sd.__contains__, cfg)
    with torch.no_grad():
        logits = ref(torch.tensor(ids(), dtype=torch.long)).logits.numpy()
    return leaves, logits


def assert_model_holds(model, want: dict) -> None:
    got = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model))))
    flat = dict(jax.tree_util.tree_leaves_with_path(want))
    assert set(got) == set(flat)
    for path, leaf in flat.items():
        np.testing.assert_array_equal(np.asarray(got[path]), leaf, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_matches_compressed_tensors(bits):
    rng = np.random.default_rng(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = rng.integers(lo, hi, (5, 37)).astype(np.int8)  # 37 columns: a partly filled last word
    packed = pack_to_int32(torch.from_numpy(q), bits).numpy()
    np.testing.assert_array_equal(unpack_int32(packed, bits, 37), q)
    np.testing.assert_array_equal(unpack_int32(packed, bits, 37),
                                  unpack_from_int32(torch.from_numpy(packed), bits, torch.Size([5, 37])).numpy())


def test_fp8_partial_edge_blocks_match_a_loop():
    """DeepSeek-V3's kv_a_proj_with_mqa (576 rows) ends in a half block; a plain loop over elements agrees."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((19, 37)).astype(ml_dtypes.float8_e4m3fn)
    s = rng.uniform(0.1, 2.0, (3, 5)).astype(np.float32)
    want = np.empty((19, 37), np.float32)
    for i in range(19):
        for j in range(37):
            want[i, j] = np.float32(w[i, j]) * s[i // 8, j // 8]
    np.testing.assert_array_equal(dequantize_fp8_block(w, s, (8, 8)), want)
    with pytest.raises(ValueError, match="weight_block_size"):
        dequantize_fp8_block(w, s[:2], (8, 8))


def test_block_fp8_checkpoint_matches_transformers(fp32_dir, tmp_path):
    write_fp8(fp32_dir, str(tmp_path), BLOCK)
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in hf.Reader(str(tmp_path))
    want, logits = reference(str(tmp_path), transformers.FineGrainedFP8Config(dequantize=True,
                                                                              weight_block_size=(BLOCK, BLOCK)))
    model = hf.load(str(tmp_path))
    assert_model_holds(model, want)
    np.testing.assert_allclose(np.asarray(model(ids()).logits), logits, atol=1e-4, rtol=0)


def test_int4_pack_quantized_checkpoint_matches_transformers(fp32_dir, tmp_path):
    write_int4(fp32_dir, str(tmp_path), GROUP, torch.float32)
    assert "model.layers.2.mlp.experts.7.down_proj.weight_packed" in hf.Reader(str(tmp_path))
    want, logits = reference(str(tmp_path), transformers.CompressedTensorsConfig(dequantize=True))
    model = hf.load(str(tmp_path))
    assert_model_holds(model, want)
    np.testing.assert_allclose(np.asarray(model(ids()).logits), logits, atol=1e-4, rtol=0)


def test_int4_bfloat16_scales_dequantize_exactly(fp32_dir, tmp_path):
    """Released scales are bfloat16: q * scale is exact in float32, and rounds once to a bfloat16 model."""
    write_int4(fp32_dir, str(tmp_path), GROUP, torch.bfloat16)
    r = hf.Reader(str(tmp_path))
    stem = "model.layers.1.mlp.experts.5.gate_proj."
    q = unpack_from_int32(torch.from_numpy(r.get(stem + "weight_packed")), 4, torch.Size([32, 64])).numpy()
    scale = r.get(stem + "weight_scale").astype(np.float64)
    exact = (q.reshape(32, 2, GROUP) * scale[..., None]).reshape(32, 64)
    for dtype in ("float32", "bfloat16"):
        model = hf.load(str(tmp_path), param_dtype=dtype)
        kernel = np.asarray(model.moe_layers.mlp.experts.gate_proj[...][0, 5])  # layer 1 = first MoE layer
        assert kernel.dtype == np.dtype(dtype if dtype == "float32" else ml_dtypes.bfloat16)
        np.testing.assert_array_equal(kernel.astype(np.float64), exact.T.astype(kernel.dtype).astype(np.float64))


def test_unsupported_quantization_is_refused_by_name(fp32_dir, tmp_path):
    write_int4(fp32_dir, str(tmp_path), GROUP)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="symmetric"):
        hf.load(str(tmp_path))
    cfg["quantization_config"] = {"quant_method": "awq"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method='awq'"):
        hf.load(str(tmp_path))
    del cfg["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no quantization_config"):
        hf.load(str(tmp_path))
