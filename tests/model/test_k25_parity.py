"""K25Model logits against transformers' Kimi_K25ForConditionalGeneration (random tiny weights, float32, CPU),
the k25 model loaded by k25.hf.load from the files transformers' save_pretrained wrote (the original Moonshot
layout: fused wqkv with interleaved RoPE rows, `language_model.*`), and checkpoints in every K2.5 layout.

transformers 5.23 cannot encode a video whose chunks differ in frame count (its temporal merge concatenates
index tensors of different widths) and splits pooled video features by t*h*w/4 instead of h*w/4, so the
video reference is built chunk by chunk through its vision tower and projector and spliced into the text
model's input embeddings here.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from flax import nnx
from hf_synthetic import write_int4
from model_leaves import assert_same_leaves, leaves
from safetensors.torch import load_file, save_file
from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

from k25 import hf as k25_hf

IMG, VID = 250, 251  # placeholder ids inside the tiny vocab (real K2.5 ids lie past it; both are handled)
SEQ = 64  # one (2, SEQ) shape for every case but the __call__ one, so the text model compiles once
TOL = 1e-4
ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
TEXT = {"model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
            "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
            "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
            "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 0, "max_position_embeddings": 512, "rope_parameters": ROPE}
VISION = {"patch_size": 14, "pos_emb_height": 8, "pos_emb_width": 8, "pos_emb_time": 4, "num_attention_heads": 2,
              "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48, "merge_kernel_size": [2, 2]}


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """All weights random, biases, norm affines and the routing bias included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("pos_emb.position_embeddings"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 and "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.is_floating_point() and "rotary" not in name and "time_position" not in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny transformers K2.5 and the directory its own save_pretrained wrote (the original layout)."""
    torch.manual_seed(0)
    hf_cfg = Kimi_K25Config(text_config=TEXT, vision_config=VISION, projection_hidden_size=32,
                            image_token_id=IMG, video_token_id=VID, tie_word_embeddings=False)
    hf = Kimi_K25ForConditionalGeneration(hf_cfg).eval()
    randomize_(hf, 0)
    path = tmp_path_factory.mktemp("k25_saved")
    hf.save_pretrained(path)
    return hf, str(path)


@pytest.fixture(scope="module")
def models(reference):
    """(transformers model, k25 model loaded from the files transformers wrote)."""
    hf, path = reference
    ours = k25_hf.load(path)
    cfg = ours.cfg  # float32, lm_head untied as the top-level flag says
    assert (cfg.image_token_id, cfg.video_token_id, cfg.text_config.tie_word_embeddings) == (IMG, VID, False)
    return hf, ours


_embed = nnx.jit(lambda m, ids, px, g, pxv, gv: m.embed(ids, px, g, pxv, gv), static_argnums=(3, 5))
_text = nnx.jit(lambda m, e: m.language_model(inputs_embeds=e).logits)


def ours_logits(model, ids, pixel_values=None, image_grid=None, videos=None, video_grid=None) -> np.ndarray:
    """K25Model.embed (jitted per grid) then the text model (compiled once for SEQ): K25Model.__call__ in two jits."""
    px = None if pixel_values is None else jnp.asarray(pixel_values)
    pv = None if videos is None else jnp.asarray(videos)
    grid = None if image_grid is None else tuple(map(tuple, image_grid))
    vgrid = None if video_grid is None else tuple(map(tuple, video_grid))
    return np.asarray(_text(model, _embed(model, jnp.asarray(ids), px, grid, pv, vgrid)))


def prompt(rng, segments, batch=1) -> np.ndarray:
    """Text tokens with runs of placeholders: segments = [(placeholder id, count), ...] spread over `batch` rows."""
    ids = rng.integers(1, 240, (batch, SEQ))
    for row, rows in enumerate(np.array_split(np.arange(len(segments)), batch)):
        pos = 2
        for i in rows:
            tok, n = segments[i]
            ids[row, pos:pos + n] = tok
            pos += n + 3
        assert pos <= SEQ
    return ids


def pixels(grids, seed) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, 3, 14, 14)).astype(np.float32)


def hf_logits(hf, ids, pixel_values=None, grids=None) -> np.ndarray:
    kw = {}
    if pixel_values is not None:
        kw = {"pixel_values": torch.from_numpy(pixel_values), "image_grid_thw": torch.tensor(grids)}
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids), **kw).logits.numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_text_only(models):
    hf, ours = models
    ids = np.random.default_rng(0).integers(0, 256, (2, SEQ))
    assert max_diff(ours_logits(ours, ids), hf_logits(hf, ids)) <= TOL


def test_one_image_through_call(models):
    """The single-jit K25Model.__call__ path (the other cases split it into embed + text model jits)."""
    hf, ours = models
    grids = [[1, 6, 8]]
    ids = prompt(np.random.default_rng(1), [(IMG, 12)])
    px = pixels(grids, 1)
    call = nnx.jit(lambda m, i, x, g: m(i, pixel_values=x, image_grid_thw=g).logits, static_argnums=3)
    got = np.asarray(call(ours, jnp.asarray(ids), jnp.asarray(px), ((1, 6, 8),)))
    ref = hf_logits(hf, ids, px, grids)
    assert max_diff(got, ref) <= TOL


def test_several_images_of_different_shapes(models):
    hf, ours = models
    grids = [[1, 4, 6], [1, 10, 8], [1, 2, 2], [1, 12, 4]]  # 6, 20, 1 and 12 tokens over two rows
    ids = prompt(np.random.default_rng(2), [(IMG, 6), (IMG, 20), (IMG, 1), (IMG, 12)], batch=2)
    px = pixels(grids, 2)
    assert max_diff(ours_logits(ours, ids, px, grids), hf_logits(hf, ids, px, grids)) <= TOL


def test_video_with_short_last_chunk_and_images(models):
    """A 6-frame video (chunks of 4 + 2 frames) between two images; the reference is spliced by hand."""
    hf, ours = models
    image_grids = [[1, 4, 6], [1, 6, 4]]
    video_grids = [[4, 4, 4], [2, 4, 4]]
    ids = prompt(np.random.default_rng(3), [(IMG, 6), (VID, 4), (VID, 4), (IMG, 6)], batch=2)  # video spans rows
    px, pv = pixels(image_grids, 3), pixels(video_grids, 4)
    got = ours_logits(ours, ids, px, image_grids, pv, video_grids)

    model = hf.model
    with torch.no_grad():
        ids_t = torch.from_numpy(ids)
        embeds = model.get_input_embeddings()(torch.where((ids_t == IMG) | (ids_t == VID), 0, ids_t))
        img = torch.cat(model.get_image_features(torch.from_numpy(px), torch.tensor(image_grids)).pooler_output)
        chunks, start = [], 0
        for g in video_grids:
            n = g[0] * g[1] * g[2]
            pooled = model.vision_tower(torch.from_numpy(pv[start:start + n]), grid_thw=torch.tensor([g])).pooler_output
            chunks.append(model.mm_projector(pooled).squeeze(1))
            start += n
        embeds = embeds.masked_scatter((ids_t == IMG)[..., None], img)
        embeds = embeds.masked_scatter((ids_t == VID)[..., None], torch.cat(chunks))
        ref = hf(inputs_embeds=embeds).logits.numpy()
    assert max_diff(got, ref) <= TOL


def test_placeholder_count_mismatch_raises(models):
    _, ours = models
    ids = prompt(np.random.default_rng(5), [(IMG, 5)])
    with pytest.raises(ValueError, match="5 placeholder"):
        ours.embed(jnp.asarray(ids), jnp.asarray(pixels([[1, 2, 4]], 0)), [[1, 2, 4]])
    with pytest.raises(ValueError, match="grid_thw"):
        ours.embed(jnp.asarray(ids), jnp.asarray(pixels([[1, 2, 4]], 0)))


def test_checkpoint_round_trip_through_transformers(models, tmp_path):
    """k25.hf.save writes what transformers loads back bit for bit; k25.hf.load reads it into the same state."""
    hf, ours = models
    k25_hf.save(ours, str(tmp_path))
    reloaded = Kimi_K25ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    want, got = hf.state_dict(), reloaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k].numpy(), v.numpy(), err_msg=k)
    back = k25_hf.load(str(tmp_path))
    assert back.cfg == ours.cfg
    assert_same_leaves(ours, back)


def test_save_writes_what_save_pretrained_writes(reference, models, tmp_path):
    """Same tensor names (original layout, fused wqkv) and the same bits as transformers' own file."""
    _, path = reference
    _, ours = models
    k25_hf.save(ours, str(tmp_path))
    theirs, mine = k25_hf.Reader(path), k25_hf.Reader(str(tmp_path))
    assert set(theirs.keys()) == set(mine.keys())
    assert "vision_tower.encoder.blocks.1.wqkv.weight" in mine and "language_model.model.blocks.1.mlp.gate.weight" in mine
    for k in theirs.keys():
        np.testing.assert_array_equal(mine.get(k), theirs.get(k), err_msg=k)


def _rewrite(src: str, dst, rename) -> None:
    sd = load_file(f"{src}/model.safetensors")
    save_file({rename(k): v for k, v in sd.items()}, f"{dst}/model.safetensors", metadata={"format": "pt"})
    shutil.copy(f"{src}/config.json", f"{dst}/config.json")


def test_released_spelling_loads_in_both_tools(reference, models, tmp_path):
    """The release names three tensors differently from save_pretrained (language_model.model.layers.N,
    vision_tower.patch_embed.*, mm_projector.pre_norm.*); transformers and k25 read both alike."""
    hf, ours = models
    k25_hf.save(ours, str(tmp_path), layout="released")
    keys = set(k25_hf.Reader(str(tmp_path)).keys())
    assert {"language_model.model.layers.0.input_layernorm.weight", "vision_tower.patch_embed.proj.weight",
            "mm_projector.pre_norm.weight", "vision_tower.encoder.blocks.0.wqkv.weight"} <= keys
    reloaded = Kimi_K25ForConditionalGeneration.from_pretrained(str(tmp_path)).eval().state_dict()
    for k, v in hf.state_dict().items():
        np.testing.assert_array_equal(reloaded[k].numpy(), v.numpy(), err_msg=k)
    assert_same_leaves(ours, k25_hf.load(str(tmp_path)))


def test_transformers_in_memory_names_load_the_same(models, tmp_path):
    """transformers' in-memory state dict (split q/k/v in rotate-half order, fused gate_up_proj experts)."""
    hf, ours = models
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    hf.config.to_json_file(str(tmp_path / "config.json"))
    assert "model.vision_tower.layers.0.attn.q_proj.weight" in k25_hf.Reader(str(tmp_path))
    assert_same_leaves(ours, k25_hf.load(str(tmp_path)))


def test_unknown_layout_names_the_tensors(reference, tmp_path):
    _, path = reference
    _rewrite(path, tmp_path, lambda k: k.replace("wqkv", "qkv_fused"))
    with pytest.raises(ValueError, match=r"vision_tower\.encoder\.blocks\.0\.qkv_fused\.weight"):
        k25_hf.load(str(tmp_path))
    with pytest.raises(ValueError, match=r"lacks tensor.*attn\.q_proj"):
        k25_hf.load(str(tmp_path))


def test_int4_experts_in_the_released_k25_format(reference, models, tmp_path):
    """K2.5's routed experts as released: INT4 pack-quantized, quantization_config inside text_config."""
    _, path = reference
    _, ours = models
    write_int4(path, str(tmp_path), 32, torch.bfloat16, text_config=True)
    back = k25_hf.load(str(tmp_path))
    r = k25_hf.Reader(str(tmp_path))
    for name in ("gate_proj", "up_proj", "down_proj"):
        stem = f"language_model.model.blocks.1.mlp.experts.6.{name}."
        shape = torch.Size([int(x) for x in r.get(stem + "weight_shape")])
        q = unpack_from_int32(torch.from_numpy(r.get(stem + "weight_packed")), 4, shape).numpy()
        exact = (q.reshape(shape[0], -1, 32) * r.get(stem + "weight_scale").astype(np.float32)[..., None])
        got = np.asarray(getattr(back.language_model.moe_layers.mlp.experts, name)[...][0, 6])
        np.testing.assert_array_equal(got, exact.reshape(shape).T)
    la, lb = leaves(ours), leaves(back)
    for path_, leaf in la.items():
        if "experts" not in jax.tree_util.keystr(path_):
            np.testing.assert_array_equal(np.asarray(lb[path_]), np.asarray(leaf))


def test_released_config_spelling(reference, models, tmp_path):
    """The release's config.json is written for Moonshot's own code (vt_* / init_pos_emb_* vision keys,
    mm_hidden_size, projector_ln_eps, media_placeholder_token_id, text model_type kimi_k2 with rope_scaling)."""
    from k25.hf_vision import k25_config_from_hf

    _, path = reference
    written = json.load(open(f"{path}/config.json"))
    v = written["vision_config"]
    released = {k: w for k, w in written.items() if k not in ("image_token_id", "projection_hidden_size",
                                                              "projection_layer_norm_eps", "vision_config")}
    released["media_placeholder_token_id"] = written["image_token_id"]
    released["vision_config"] = {
        "vt_hidden_size": v["hidden_size"], "vt_intermediate_size": v["intermediate_size"],
        "vt_num_attention_heads": v["num_attention_heads"], "vt_num_hidden_layers": v["num_hidden_layers"],
        "init_pos_emb_height": v["pos_emb_height"], "init_pos_emb_width": v["pos_emb_width"],
        "init_pos_emb_time": v["pos_emb_time"], "patch_size": v["patch_size"],
        "merge_kernel_size": v["merge_kernel_size"], "merge_type": "sd2_tpool", "pos_emb_type": "divided_fixed",
        "video_attn_type": "spatial_temporal", "mm_projector_type": "patchmerger",
        "mm_hidden_size": written["projection_hidden_size"], "projector_ln_eps": written["projection_layer_norm_eps"],
        "text_hidden_size": written["text_config"]["hidden_size"], "projector_hidden_act": "gelu"}
    text = dict(written["text_config"], model_type="kimi_k2")
    rope = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    released["text_config"] = text
    assert k25_config_from_hf(released) == k25_config_from_hf(written)
    _, ours = models  # and the whole release: its config spelling over its tensor names
    k25_hf.save(ours, str(tmp_path), layout="released")
    (tmp_path / "config.json").write_text(json.dumps(released))
    assert_same_leaves(ours, k25_hf.load(str(tmp_path)))
    released["vision_config"]["merge_type"] = "sd2"
    with pytest.raises(ValueError, match="merge_type"):
        k25_config_from_hf(released)
