"""safetensors files of an HF checkpoint directory: lazy one-tensor-at-a-time reads, sharded writes.

Tensors are read with safetensors' `safe_open` (memory-mapped: only the requested tensor is read). Its numpy
backend cannot return float8 tensors (block-FP8 checkpoints store weights as F8_E4M3), so those are read
from the file's own header offsets as raw bytes and viewed as `ml_dtypes` float8: the format is a u64
header length, a JSON header with each tensor's dtype, shape and byte offsets, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


class Reader:
    """The tensors of a checkpoint directory (single file or sharded with an index), read on demand.

    `on_read(key, array)` (optional) is called with every array handed out, e.g. to account host memory.
    """

    def __init__(self, path: str, on_read=None):
        from safetensors import safe_open

        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a directory (expected config.json + *.safetensors).")
        index = os.path.join(path, SAFETENSORS_INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no *.safetensors files and no {SAFETENSORS_INDEX}.")
            weight_map = {}
            for fn in files:
                with safe_open(os.path.join(path, fn), "np") as f:
                    weight_map.update({k: fn for k in f.keys()})
        self.path, self.weight_map, self._open, self.on_read = path, weight_map, safe_open, on_read
        self._headers: dict[str, tuple[int, dict]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def keys(self) -> Iterator[str]:
        return iter(self.weight_map)

    def sources(self, key: str) -> tuple[str, ...]:
        return (key,)

    def _header(self, fn: str) -> tuple[int, dict]:
        if fn not in self._headers:
            with open(os.path.join(self.path, fn), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[fn] = (8 + n, json.loads(f.read(n)))
        return self._headers[fn]

    def dtype(self, key: str) -> str:
        """The safetensors dtype string of a tensor (e.g. 'BF16', 'F8_E4M3', 'I32')."""
        return self._header(self._file(key))[1][key]["dtype"]

    def _file(self, key: str) -> str:
        if key not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {key!r} not found in the checkpoint.")
        return self.weight_map[key]

    def get(self, key: str) -> np.ndarray:
        """The tensor as stored (bfloat16 / float8 as ml_dtypes types)."""
        fn = self._file(key)
        start, header = self._header(fn)
        meta = header[key]
        if meta["dtype"] in _RAW_DTYPES:
            begin, end = meta["data_offsets"]
            raw = np.fromfile(os.path.join(self.path, fn), dtype=np.uint8, count=end - begin, offset=start + begin)
            arr = raw.view(_RAW_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        else:
            with self._open(os.path.join(self.path, fn), "np") as f:
                arr = f.get_tensor(key)
        if self.on_read is not None:
            self.on_read(key, arr)
        return arr


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], path: str, max_shard_bytes: int = 5 << 30,
                      dtype: str = "float32") -> None:
    """Write tensors to `path`, one file if it fits in max_shard_bytes, else shards plus an index."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = 0
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    for key, arr in tensors:
        arr = np.ascontiguousarray(np.asarray(arr).astype(np_dtype))
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
        total += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in shard})
    with open(os.path.join(path, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
