"""k25.hf against transformers' DeepseekV3ForCausalLM: load, save, and logits parity in float32."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from k25 import hf  # noqa: E402

SEQ = 40  # past original_max_position_embeddings=16, so YaRN's interpolated frequencies are exercised

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_attention_heads=3,
            num_key_value_heads=3, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
            routed_scaling_factor=2.827, max_position_embeddings=256,
            rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, rope_theta=50000.0)

CASES = {
    "qlora_groups": dict(q_lora_rank=24, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2),
    "plain_q_two_dense": dict(q_lora_rank=None, num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=12,
                              n_shared_experts=2, num_experts_per_tok=4, n_group=3, topk_group=2,
                              norm_topk_prob=False),
    "no_dense_no_groups": dict(q_lora_rank=24, num_hidden_layers=2, first_k_dense_replace=0, n_routed_experts=6,
                               n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1),
    "rotate_half_layout": dict(q_lora_rank=24, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8,
                               n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                               rope_interleave=False),
}


def make_reference(case: str, seed: int = 0):
    cfg = transformers.DeepseekV3Config(**BASE, **CASES[case])
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))  # non-zero: it must change the choice but not the weights
    return model


def ids(vocab: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, SEQ)).astype(np.int32)


_logits = nnx.jit(lambda m, x: m(x).logits)  # one compile instead of op-by-op dispatch


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(x, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_matches_transformers(case, tmp_path):
    ref = make_reference(case)
    ref.save_pretrained(tmp_path)
    model = hf.load(str(tmp_path))
    x = ids(ref.config.vocab_size)
    ours = np.asarray(_logits(model, x))
    theirs = torch_logits(ref, x)
    assert ours.shape == theirs.shape == (2, SEQ, ref.config.vocab_size)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["qlora_groups", "plain_q_two_dense"])
def test_save_roundtrip_through_transformers(case, tmp_path):
    ref = make_reference(case)
    ref.save_pretrained(tmp_path / "ref")
    model = hf.load(str(tmp_path / "ref"))
    # small shards force the sharded layout with an index
    hf.save(model, str(tmp_path / "out"), max_shard_bytes=200_000)
    assert os.path.exists(tmp_path / "out" / hf.SAFETENSORS_INDEX)
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    x = ids(ref.config.vocab_size, seed=3)
    np.testing.assert_allclose(torch_logits(back, x), torch_logits(ref, x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(_logits(hf.load(str(tmp_path / "out")), x)), torch_logits(ref, x),
                               atol=1e-4, rtol=0)


def test_released_config_form_matches_transformers5_form(tmp_path):
    """config.json with `rope_scaling` + `rope_theta` (released checkpoints) and with `rope_parameters`."""
    ref = make_reference("qlora_groups")
    ref.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    released = dict(written)
    rope = dict(released.pop("rope_parameters"))
    released["rope_theta"] = rope.pop("rope_theta")
    released["rope_scaling"] = rope
    assert hf.config_from_hf(written) == hf.config_from_hf(released)


def test_bad_checkpoint_names_the_tensor(tmp_path):
    ref = make_reference("qlora_groups")
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 12
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="kv_a_proj_with_mqa|kv_b_proj|kv_a_layernorm"):
        hf.load(str(tmp_path))


def test_extra_tensors_are_named_and_mtp_layers_skipped(tmp_path):
    """DeepSeek-V3 ships a multi-token-prediction layer after the last one (num_nextn_predict_layers): skipped,
    as transformers does. Any other tensor nothing takes is an error that names it."""
    from safetensors.torch import load_file, save_file

    ref = make_reference("no_dense_no_groups")
    ref.save_pretrained(tmp_path / "ref")
    sd = load_file(str(tmp_path / "ref" / "model.safetensors"))
    cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    plain = hf.load(str(tmp_path / "ref"))
    (tmp_path / "mtp").mkdir()
    mtp = dict(sd, **{"model.layers.2.eh_proj.weight": torch.zeros(48, 96),
                      "model.layers.2.self_attn.kv_b_proj.weight": torch.zeros(54, 16)})
    save_file(mtp, str(tmp_path / "mtp" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "mtp" / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=1)))
    loaded = hf.load(str(tmp_path / "mtp"))
    for a, b in zip(jax.tree.leaves(nnx.state(plain)), jax.tree.leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "mtp" / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=0)))
    with pytest.raises(ValueError, match=r"could not place checkpoint tensor\(s\) model\.layers\.2\.eh_proj\.weight"):
        hf.load(str(tmp_path / "mtp"))
    # tied embeddings: a stored lm_head is not used (transformers ties it to the embeddings)
    (tmp_path / "ref" / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)))
    assert "lm_head.weight" in hf.Reader(str(tmp_path / "ref"))
    assert hf.load(str(tmp_path / "ref")).cfg.tie_word_embeddings
