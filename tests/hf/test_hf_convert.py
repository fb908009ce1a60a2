"""experiments.convert: HF directory -> k25 run directory -> HF directory, for K2 (plain and INT4) and K2.5."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_synthetic import write_int4
from model_leaves import assert_same_leaves

from experiments.convert import convert
from k25 import hf
from k25.train.rundir import load_model, read_model_run
from k25.train.vit_coca import load_parts

K2 = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
          num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
          v_head_dim=8, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
          num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=2.5, max_position_embeddings=128)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def randomize_(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif p.is_floating_point() and "rotary" not in name and "time_position" not in name:
                p.copy_(0.15 * torch.randn_like(p))


@pytest.fixture(scope="module")
def k2_dir(tmp_path_factory):
    ref = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**K2)).eval()
    randomize_(ref)
    path = tmp_path_factory.mktemp("k2_hf")
    ref.save_pretrained(path)
    return ref, str(path)


def test_command_hf_to_run_dir(k2_dir, tmp_path):
    """The CLI (with its progress bar); the run directory holds the model for init_from and for loaders."""
    _, src = k2_dir
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "experiments.convert", f"--from={src}", f"--to={run}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "hf->run" in out.stdout and "tensors" in out.stderr  # tqdm writes to stderr
    config = json.loads((run / "config.json").read_text())
    assert config["stage"] == "lm" and config["model"]["n_routed_experts"] == 4
    plain = hf.load(src)
    assert_same_leaves(plain, read_model_run(str(run)))
    assert_same_leaves(plain, load_model(str(run)))
    parts = load_parts(str(run), ("moe_layers", "embed_tokens"))  # what --config.init_from reads
    np.testing.assert_array_equal(parts["embed_tokens"]["params"]["embedding"],
                                  np.asarray(plain.embed_tokens.embedding[...]))
    np.testing.assert_array_equal(parts["moe_layers"]["buffers"]["mlp"]["bias"], np.asarray(plain.moe_layers.mlp.bias[...]))
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        convert(src, str(run), progress=False)


def test_run_dir_back_to_hf_gives_the_same_logits(k2_dir, tmp_path):
    ref, src = k2_dir
    assert convert(src, str(tmp_path / "run"), progress=False) == "hf->run"
    assert convert(str(tmp_path / "run"), str(tmp_path / "back"), progress=False) == "run->hf"
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    x = torch.tensor(np.random.default_rng(0).integers(0, K2["vocab_size"], (2, 16)))
    with torch.no_grad():
        np.testing.assert_allclose(back(x).logits.numpy(), ref(x).logits.numpy(), atol=1e-5, rtol=0)


def test_quantized_hf_to_run_dir(k2_dir, tmp_path):
    _, src = k2_dir
    write_int4(src, str(tmp_path / "int4"), 32)
    convert(str(tmp_path / "int4"), str(tmp_path / "run"), progress=False)
    assert_same_leaves(hf.load(str(tmp_path / "int4")), read_model_run(str(tmp_path / "run")))


def test_k25_both_directions(tmp_path):
    text = dict(K2, model_type="deepseek_v3", vocab_size=96)
    vision = {"patch_size": 14, "pos_emb_height": 4, "pos_emb_width": 4, "pos_emb_time": 2, "num_attention_heads": 2,
              "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24, "merge_kernel_size": [2, 2]}
    cfg = transformers.Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=16,
                                      image_token_id=90, video_token_id=91, tie_word_embeddings=False)
    ref = transformers.Kimi_K25ForConditionalGeneration(cfg).eval()
    randomize_(ref)
    ref.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "run"), progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["stage"] == "k25"
    assert_same_leaves(hf.load(str(tmp_path / "hf")), read_model_run(str(tmp_path / "run")))
    convert(str(tmp_path / "run"), str(tmp_path / "back"), progress=False)
    theirs, mine = hf.Reader(str(tmp_path / "hf")), hf.Reader(str(tmp_path / "back"))
    assert set(theirs.keys()) == set(mine.keys())
    for k in theirs.keys():
        np.testing.assert_array_equal(mine.get(k), theirs.get(k), err_msg=k)


def test_converted_run_dir_starts_an_lm_run(tmp_path):
    """`--config.init_from=<converted dir>`: the text LM stage builds its model from the converted weights."""
    from experiments.long_context import get_config
    from k25.model.config import K2Config
    from k25.model.decoder import K2Model
    from k25.train.pretrain import TextLMStage

    config = get_config("base,smoke")
    cfg = K2Config.from_dict(config.model.to_dict())
    _, state = hf.abstract_state(K2Model, cfg)
    rng = np.random.default_rng(5)
    model = hf.model_from_state(cfg, jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                                  nnx.to_pure_dict(state)))
    hf.save(model, str(tmp_path / "hf"))  # as if released: an HF directory
    convert(str(tmp_path / "hf"), str(tmp_path / "run"), progress=False)
    with config.unlocked():
        config.init_from = str(tmp_path / "run")
    stage = TextLMStage(config)
    built = jax.jit(lambda: nnx.to_pure_dict(nnx.state(stage.build_model(nnx.Rngs(0)))))()  # as Trainer.init_state
    assert_same_leaves(model, hf.model_from_state(cfg, built))


def test_converted_run_dir_is_servable_and_keeps_the_tokenizer(tmp_path):
    """`experiments.serve --checkpoint=<converted dir>` (k25/serve/load.py): the model, and the chat format
    of the tokenizer the HF directory came with; converting back restores the tokenizer files."""
    from chat_fixtures import random_model, write_synthetic_kimi_tokenizer

    from k25.data.chat import load_chat_format
    from k25.model.config import tiny
    from k25.serve.load import load_checkpoint

    (tmp_path / "hf").mkdir()
    n = write_synthetic_kimi_tokenizer(str(tmp_path / "hf"))
    model = random_model(tiny(vocab_size=n + 256, hidden_size=64, num_hidden_layers=2, n_routed_experts=4,
                              num_experts_per_tok=2, n_group=1, topk_group=1, dtype="float32"))
    hf.save(model, str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "run"), progress=False)
    served, chat = load_checkpoint(str(tmp_path / "run"))
    assert_same_leaves(model, served)
    assert chat.special_ids == load_chat_format(str(tmp_path / "hf")).special_ids
    convert(str(tmp_path / "run"), str(tmp_path / "back"), progress=False)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
