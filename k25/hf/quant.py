"""Dequantize released quantized checkpoints on load: block-FP8 and compressed-tensors INT4 (pack-quantized).

`Dequantized(reader, quantization_config)` shows a checkpoint as its logical float tensors: a quantized
`X.weight` is read from its stored pieces and dequantized exactly in float32 (the caller casts to the
model's weight dtype); every other tensor passes through.

* Block-FP8 (`quant_method: "fp8"`, DeepSeek-V3 and Kimi-K2-Instruct): `X.weight` is float8_e4m3fn and
  `X.weight_scale_inv` (float32, shape ceil(out/bo) x ceil(in/bi) for `weight_block_size` [bo, bi]) holds
  one scale per block; W = float32(w8) * scale_inv[i // bo, j // bi] (partial edge blocks included).
* compressed-tensors `pack-quantized` (`quant_method: "compressed-tensors"`, Kimi-K2-Thinking and K2.5,
  routed experts only): `X.weight_packed` int32 (out, ceil(in * bits / 32)), `X.weight_scale`
  (out, in / group_size), `X.weight_shape` [out, in]. Values are signed ints stored with an offset of
  2^(bits-1), packed densely from the low bits of each little-endian int32 word (compressed-tensors'
  `pack_to_int32`); symmetric, so W = q * scale[i, j // group_size].
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

FP8_SUFFIX = "weight_scale_inv"
PACKED = ("weight_packed", "weight_scale", "weight_shape")


def quantization_config(hf: dict[str, Any]) -> dict[str, Any] | None:
    """The `quantization_config` of a config.json (top level, or K2.5's `text_config`), validated."""
    q = hf.get("quantization_config") or (hf.get("text_config") or {}).get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "fp8":
        block = q.get("weight_block_size")
        if not block or len(block) != 2:
            raise ValueError("config.json: quantization_config.weight_block_size must be [rows, cols] for "
                             f"quant_method 'fp8' (got {block!r}); per-tensor FP8 is not supported.")
        if q.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"config.json: quantization_config.fmt={q.get('fmt')!r}; only 'e4m3' is supported.")
        return q
    if method == "compressed-tensors":
        if q.get("format") != "pack-quantized":
            raise ValueError(f"config.json: compressed-tensors format {q.get('format')!r} is not supported; "
                             "k25 reads 'pack-quantized' (the INT4 Kimi-K2-Thinking / K2.5 format).")
        for name, group in (q.get("config_groups") or {}).items():
            _check_scheme(name, group.get("weights") or {})
        return q
    raise ValueError(f"config.json: quantization_config.quant_method={method!r} is not supported; k25 reads "
                     "'fp8' (block-FP8) and 'compressed-tensors' (pack-quantized INT4).")


def _check_scheme(name: str, w: dict[str, Any]) -> None:
    where = f"config.json: quantization_config.config_groups.{name}.weights"
    if w.get("type", "int") != "int":
        raise ValueError(f"{where}.type={w.get('type')!r}; pack-quantized weights must be 'int'.")
    if w.get("num_bits") not in (1, 2, 4, 8):
        raise ValueError(f"{where}.num_bits={w.get('num_bits')!r}; supported: 1, 2, 4, 8.")
    if not w.get("symmetric", True):
        raise ValueError(f"{where}.symmetric=false (zero points) is not supported; the Kimi checkpoints are "
                         "symmetric.")
    if w.get("strategy") not in ("group", "channel"):
        raise ValueError(f"{where}.strategy={w.get('strategy')!r}; supported: 'group', 'channel'.")
    if w.get("actorder"):
        raise ValueError(f"{where}.actorder={w.get('actorder')!r} (activation reordering) is not supported.")


def dequantize_fp8_block(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float32 weight from a float8 (out, in) weight and its per-block inverse scales."""
    out, inp = w.shape
    bo, bi = block
    want = (-(-out // bo), -(-inp // bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, but a {out}x{inp} weight in "
                         f"{bo}x{bi} blocks needs {want}; check weight_block_size.")
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), bo, axis=0), bi, axis=1)[:out, :inp]
    return w.astype(np.float32) * s


def unpack_int32(packed: np.ndarray, num_bits: int, cols: int) -> np.ndarray:
    """Signed ints (rows, cols) from compressed-tensors' dense little-endian int32 packing (1, 2, 4 or 8 bits:
    widths that divide a byte, so element i sits at bit (i * bits) % 8 of byte (i * bits) // 8)."""
    rows = packed.shape[0]
    raw = np.ascontiguousarray(packed.astype("<i4")).view(np.uint8).reshape(rows, -1)
    per_byte, mask = 8 // num_bits, (1 << num_bits) - 1
    values = np.stack([(raw >> (num_bits * i)) & mask for i in range(per_byte)], axis=-1).reshape(rows, -1)
    return (values[:, :cols].astype(np.int16) - (1 << (num_bits - 1))).astype(np.int8)


def dequantize_packed(packed: np.ndarray, scale: np.ndarray, shape: np.ndarray, scheme: dict[str, Any]
                      ) -> np.ndarray:
    """float32 weight from compressed-tensors pack-quantized pieces (symmetric group / channel scales)."""
    out, inp = (int(x) for x in np.asarray(shape).reshape(-1))
    q = unpack_int32(packed, int(scheme["num_bits"]), inp).astype(np.float32)
    s = np.asarray(scale, np.float32)
    if scheme.get("strategy") == "group":
        g = int(scheme["group_size"])
        if s.shape != (out, -(-inp // g)):
            raise ValueError(f"weight_scale has shape {s.shape}, a {out}x{inp} weight in groups of {g} needs "
                             f"{(out, -(-inp // g))}; check group_size.")
        s = np.repeat(s, g, axis=1)[:, :inp]
    elif s.shape not in ((out, 1), (out,)):
        raise ValueError(f"weight_scale has shape {s.shape}; channel scales of a {out}x{inp} weight are ({out}, 1).")
    return q * s.reshape(out, -1)


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" or module == target or module.endswith("." + target)


class Dequantized:
    """A tensor view (keys / `in` / get / sources) that shows quantized weights as float32 `X.weight`."""

    def __init__(self, base, qcfg: dict[str, Any] | None):
        self.base, self.qcfg = base, qcfg
        self._map: dict[str, tuple[str, tuple[str, ...]]] = {}  # name -> (kind, source keys)
        keys = set(base.keys())
        for k in keys:
            if k.endswith(".weight_packed"):
                stem = k[: -len("weight_packed")]
                srcs = tuple(stem + s for s in PACKED)
                missing = [s for s in srcs if s not in keys]
                if missing:
                    raise ValueError(f"{k}: pack-quantized weight without {missing}.")
                self._map[stem + "weight"] = ("packed", srcs)
            elif k.endswith("." + FP8_SUFFIX):
                stem = k[: -len(FP8_SUFFIX)]
                if stem + "weight" not in keys:
                    raise ValueError(f"{k}: block-FP8 scale without its weight {stem}weight.")
                self._map[stem + "weight"] = ("fp8", (stem + "weight", k))
        consumed = {s for _, srcs in self._map.values() for s in srcs}
        for k in keys - consumed:
            self._map[k] = ("plain", (k,))
        kinds = {kind for kind, _ in self._map.values()} - {"plain"}
        if kinds and qcfg is None:
            raise ValueError(f"{getattr(base, 'path', 'checkpoint')}: holds quantized tensors ({sorted(kinds)}) but "
                             "config.json has no quantization_config.")
        want = {"fp8": "fp8", "packed": "compressed-tensors"}
        for kind in kinds:
            if qcfg["quant_method"] != want[kind]:
                raise ValueError(f"checkpoint holds {kind} tensors but quantization_config.quant_method is "
                                 f"{qcfg['quant_method']!r}.")

    def keys(self) -> Iterator[str]:
        return iter(self._map)

    def __contains__(self, key: str) -> bool:
        return key in self._map

    def sources(self, key: str) -> tuple[str, ...]:
        return tuple(s for k in self._map[key][1] for s in self.base.sources(k))

    def is_quantized(self, key: str) -> bool:
        return key in self._map and self._map[key][0] != "plain"

    def _scheme(self, module: str) -> dict[str, Any]:
        groups = list((self.qcfg.get("config_groups") or {}).values())
        for g in groups:
            if any(_matches(t, module) for t in g.get("targets", ["Linear"])):
                return g["weights"]
        raise ValueError(f"{module}: pack-quantized, but no quantization_config.config_groups target matches it.")

    def get(self, key: str) -> np.ndarray:
        if key not in self._map:
            raise KeyError(f"tensor {key!r} not found in the checkpoint.")
        kind, srcs = self._map[key]
        if kind == "fp8":
            w = self.base.get(srcs[0])
            return dequantize_fp8_block(w, self.base.get(srcs[1]), tuple(self.qcfg["weight_block_size"]))
        if kind == "packed":
            packed, scale, shape = (self.base.get(s) for s in srcs)
            return dequantize_packed(packed, scale, shape, self._scheme(key[: -len(".weight")]))
        x = self.base.get(key)
        return x if x.dtype.kind in "iub" else x.astype(np.float32)
