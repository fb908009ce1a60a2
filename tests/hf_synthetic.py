"""Synthetic quantized checkpoints in the released formats, written with torch / compressed-tensors (not k25).

* block-FP8 as DeepSeek-V3 / Kimi-K2-Instruct publish it: every Linear weight of the decoder layers except the
  router stored float8_e4m3fn with a float32 `weight_scale_inv` per block (amax / 448 per block).
* INT4 pack-quantized as Kimi-K2-Thinking / K2.5 publish it (compressed-tensors): routed experts only,
  symmetric int4 in groups along the input dimension, packed by compressed-tensors' own `pack_to_int32`.
"""

from __future__ import annotations

import json
import os
import re

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors.torch import load_file, save_file

# the released Kimi-K2-Thinking quantization_config, with the group size as a parameter
INT4_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]


def int4_config(group_size: int, ignore: list[str] | None = None) -> dict:
    return {"config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                          "targets": ["Linear"],
                                          "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                                                      "group_size": group_size, "num_bits": 4, "observer": "minmax",
                                                      "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                                                      "type": "int"}}},
            "format": "pack-quantized", "ignore": ignore or INT4_IGNORE, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def fp8_config(block: int) -> dict:
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [block, block]}


def _read(src: str) -> tuple[dict[str, torch.Tensor], dict]:
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    sd: dict[str, torch.Tensor] = {}
    for fn in files:
        sd.update(load_file(os.path.join(src, fn)))
    return sd, cfg


def _write(dst: str, sd: dict[str, torch.Tensor], cfg: dict) -> None:
    os.makedirs(dst, exist_ok=True)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def fp8_block_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = w.shape
    no, ni = -(-out // block), -(-inp // block)
    pad = torch.zeros(no * block, ni * block)
    pad[:out, :inp] = w.float()
    blocks = pad.view(no, block, ni, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(no * block, ni * block)[:out, :inp]
    return q.contiguous(), scale.float()


def write_fp8(src: str, dst: str, block: int) -> None:
    """Copy an fp32 DeepseekV3 directory written by save_pretrained as a block-FP8 checkpoint."""
    sd, cfg = _read(src)
    out = {}
    for k, w in sd.items():
        if re.search(r"layers\.\d+\.", k) and k.endswith("proj.weight") and w.ndim == 2:
            out[k], out[k[: -len("weight")] + "weight_scale_inv"] = fp8_block_quantize(w, block)
        else:
            out[k] = w
    cfg["quantization_config"] = fp8_config(block)
    _write(dst, out, cfg)


def int4_quantize(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out, inp = w.shape
    g = w.float().view(out, inp // group, group)
    scale = (g.abs().amax(-1) / 7.5).clamp(min=1e-8).to(scale_dtype)
    q = torch.clamp(torch.round(g / scale.float()[..., None]), -8, 7).to(torch.int8).view(out, inp)
    return {"weight_packed": pack_to_int32(q, 4), "weight_scale": scale,
            "weight_shape": torch.tensor([out, inp], dtype=torch.int64)}


def write_int4(src: str, dst: str, group: int, scale_dtype: torch.dtype = torch.float32,
               text_config: bool = False) -> None:
    """Copy a DeepseekV3 (or K2.5) directory with its routed experts INT4 pack-quantized (compressed-tensors).
    `text_config` puts quantization_config where the K2.5 release has it."""
    sd, cfg = _read(src)
    out = {}
    for k, w in sd.items():
        if re.search(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$", k):
            stem = k[: -len("weight")]
            out.update({stem + n: t for n, t in int4_quantize(w, group, scale_dtype).items()})
        else:
            out[k] = w
    q = int4_config(group)
    if text_config:
        q["ignore"] = q["ignore"] + ["re:.*vision_tower.*", "re:.*mm_projector.*"]
        cfg["text_config"]["quantization_config"] = q
    else:
        cfg["quantization_config"] = q
    _write(dst, out, cfg)
