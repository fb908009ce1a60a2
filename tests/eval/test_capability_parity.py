"""The capability tasks compute the training stage's own numbers on a saved checkpoint: a tiny_lm smoke run is
evaluated by `TextLMStage.evaluate` and by `inspect eval text_heldout --model k25/RUN_DIR` (the sampler behind
the k25 model API, raw prompts); metrics and every sample's greedy continuation agree."""

import pytest
from flax import nnx
from inspect_ai import eval as inspect_eval

from k25.data.pipeline import make_eval_examples
from k25.eval.provider import run_stage
from k25.eval.tasks.config import load_config
from k25.eval.tasks.text import text_heldout
from k25.train.generate import greedy_decode
from k25.train.stage import make_stage


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from experiments.tiny_lm import get_config
    from k25.train import loop

    c = get_config("smoke")
    c.eval_examples = 4
    c.mesh.devices = 1  # the tests' 8 fake devices: a one-device run
    c.model.vocab_size = 288  # room for the chat format's special tokens (the chat-path test below)
    d = str(tmp_path_factory.mktemp("tiny_lm_smoke"))
    loop.train(c, d)
    return d


@pytest.mark.slow  # a smoke training run, then two evals of it (each compiles its decode)
def test_text_heldout_equals_stage_eval(run_dir, tmp_path):
    from k25.serve.load import load_run

    cfg = load_config(run_dir)
    stage = make_stage(cfg)
    model, _ = load_run(run_dir)
    want = stage.evaluate(model)

    # the stage's greedy continuations, sample by sample (what evaluate scores)
    tok = stage.tokenizer
    graphdef, state = nnx.split(model)
    preds = {}
    for task, examples in make_eval_examples(cfg.data, tok, cfg.eval_examples).items():
        out = greedy_decode(lambda ids: nnx.merge(graphdef, state)(ids).logits, [e["prompt_ids"] for e in examples],
                            cfg.eval_max_new_tokens, tok.pad_id, tok.eos_id)
        preds.update({f"{task}-{i}": tok.decode(p) for i, p in enumerate(out)})

    assert run_stage(run_dir) == "lm"
    log = inspect_eval(text_heldout(config=run_dir), model=f"k25/{run_dir}",
                       model_args={"max_slots": 8, "max_len": 128}, log_dir=str(tmp_path), display="none")[0]
    assert log.status == "success", log.error
    got = {k: v.value for k, v in log.results.scores[0].metrics.items()}
    assert got == {k.removeprefix("eval/"): v for k, v in want.items()}
    assert len(log.samples) == len(preds) == 3 * cfg.eval_examples
    for s in log.samples:
        assert s.output.completion == preds[s.id], s.id
        assert s.output.metadata["prompt_ids"][0] == tok.bos_id  # raw prompt: bos + prompt, no chat template


@pytest.mark.slow
def test_k25_model_api_chat_path_in_process(run_dir, tmp_path):
    """The same checkpoint through the sampler and the Kimi chat format (SamplerClient), in process: a safety
    task with a system prompt and tools (agentic probes) runs, and the sampler's token ids come back."""
    from k25.eval.safety.tasks import agentic_alignment, over_refusal

    logs = inspect_eval([over_refusal(), agentic_alignment(max_turns=2)], model=f"k25/{run_dir}",
                        model_args={"prompt_format": "chat", "max_slots": 4, "max_len": 1024}, limit=2,
                        log_dir=str(tmp_path), display="none", max_tokens=16)
    for log in logs:
        assert log.status == "success", log.error
        for s in log.samples:
            assert s.scores["safety_scorer"].value in (0.0, 1.0)
            meta = s.output.metadata
            assert meta["token_ids"] and len(meta["logprobs"]) == len(meta["token_ids"]) <= 16
