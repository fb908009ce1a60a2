"""Convert between HF checkpoint directories and k25 run directories.

    python -m experiments.convert --from=HF_DIR --to=RUN_DIR     # any supported layout / quantization
    python -m experiments.convert --from=RUN_DIR --to=HF_DIR     # what transformers' save_pretrained writes

An HF directory (DeepseekV3 / Kimi-K2 / Kimi-K2.5; original or transformers layout; bf16, block-FP8 or INT4
pack-quantized weights, dequantized to --param_dtype) becomes a run directory (config.json + an orbax checkpoint
at step 0, see k25/train/rundir.py; the tokenizer and other side files under RUN_DIR/hf/) that
`experiments.run --config.init_from` and `experiments.serve --checkpoint` accept. A run directory (converted or
trained; its latest checkpoint) becomes an HF directory that `from_pretrained` loads (with the side files it was
converted with). A progress bar counts the tensors.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_FROM = flags.DEFINE_string("from", None, "Source: an HF checkpoint directory or a k25 run directory.")
_TO = flags.DEFINE_string("to", None, "Destination directory (must not hold checkpoints yet).")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "HF -> run: the weight dtype to store (dequantized "
                                   "weights are cast to it).")
_LAYOUT = flags.DEFINE_enum("layout", "transformers", ["transformers", "released"],
                            "run -> HF, K2.5 only: save_pretrained's tensor names or the release's spelling.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "run -> HF: the largest safetensors file, in GB.")


def convert(src: str, dst: str, param_dtype: str = "float32", layout: str = "transformers",
            max_shard_bytes: int = 5 << 30, progress: bool = True) -> str:
    """Convert `src` into `dst` (direction from what `src` is); returns "hf->run" or "run->hf"."""
    from k25 import hf
    from k25.train.rundir import HF_FILES, copy_side_files, is_run_dir, read_model_run, write_model_run

    if not os.path.isdir(src):
        raise FileNotFoundError(f"--from={src}: no such directory.")
    if is_run_dir(src):
        model = read_model_run(src)
        hf.save(model, dst, max_shard_bytes=max_shard_bytes, layout=layout, progress=progress)
        if os.path.isdir(os.path.join(src, HF_FILES)):  # the tokenizer etc. it was converted with
            copy_side_files(os.path.join(src, HF_FILES), dst)
        return "run->hf"
    if not os.path.exists(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"--from={src}: neither a run directory (checkpoints/) nor an HF directory "
                                "(config.json + *.safetensors).")
    model = hf.load(src, progress=progress, param_dtype=param_dtype)
    write_model_run(model, dst, source=src)
    return "hf->run"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    # Checked here, not with flags.mark_flags_as_required: that validator sits on the process-wide FLAGS and
    # would fail every other absl entry point imported into the same process (the test suite's workers).
    missing = [f"--{name}" for name, flag in (("from", _FROM), ("to", _TO)) if not flag.value]
    if missing:
        raise app.UsageError(f"{' and '.join(missing)} required: --from=SRC_DIR --to=DST_DIR.")
    direction = convert(_FROM.value, _TO.value, _PARAM_DTYPE.value, _LAYOUT.value, int(_SHARD_GB.value * 2**30))
    print(f"{direction}: {_FROM.value} -> {_TO.value}")


if __name__ == "__main__":
    sys.exit(app.run(main))
