"""The training batch stream of the vision tasks as a grain iterator (resumable through get_state/set_state).

Batch `i` is a pure function of (data config, run seed, i): grain's random-access `MapDataset` over batch
indices, so a checkpoint stores only the next index and resuming reproduces the same batches. Every
process builds its own rows of each global batch (rows `process_index * b .. (process_index + 1) * b`),
so a multi-process run trains on exactly the single-process batches.
"""

from __future__ import annotations

import grain
import numpy as np

from k25.data.vision.dataset import VisionTextData

MAX_BATCHES = 2**40  # "endless": far more batches than any run takes


def make_vision_iterator(data: VisionTextData, *, seed: int, batch_size: int, process_index: int = 0,
                         process_count: int = 1) -> grain.DatasetIterator:
    """Host-local batches of `batch_size // process_count` rows: pixel_values (b, t, h, w, 588) float32,
    text_ids / text_mask / loss_mask (b, text_len) int32. Image batches have t=1, video batches t=4."""
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes.")
    local = batch_size // process_count

    def make_batch(index: int) -> dict[str, np.ndarray]:
        rows = range(process_index * local, (process_index + 1) * local)
        return data.collate([data.train_sample(seed, int(index), r) for r in rows])

    read = grain.ReadOptions(num_threads=data.cfg.read_threads, prefetch_buffer_size=2 * data.cfg.read_threads)
    return iter(grain.MapDataset.range(0, MAX_BATCHES).map(make_batch).to_iter_dataset(read))
