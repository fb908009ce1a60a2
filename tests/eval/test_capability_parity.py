"""The capability tasks compute the training stage's own numbers on a saved checkpoint.

Text: a tiny_lm smoke run is evaluated by `TextLMStage.evaluate` and by `inspect eval text_heldout --model
k25/RUN_DIR` (the sampler behind the k25 model API, raw prompts); metrics and every sample's greedy
continuation agree. Vision: a k25_joint smoke run is evaluated by the joint stage's teacher-forced held-out
scores and by `vision_heldout` through the sampler (images as media placeholders); the per-task exact metrics
agree, every prompt is the stage's row token for token, and every sampled token is the argmax (with the sampler's
logprob) of the stage's forward over the prompt and the tokens before it (a 2-step model misses nearly every
answer, so equal exact scores alone prove little). Long context: a long_context base smoke run is evaluated by the
lm stage's retrieval eval (teacher-forced: key digits and eos all argmax) and by `long_context_retrieval` through
the sampler; the retrieval and multi-key metrics and every probe's score agree, every prompt is the stage's probe
up to the answer, and every sampled token is the argmax of the plain forward (the smoke model retrieves nothing).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from inspect_ai import eval as inspect_eval
from inspect_ai.log import EvalSample

from k25.data.pipeline import make_eval_examples
from k25.data.preprocess import preprocess_images
from k25.eval.provider import run_stage
from k25.eval.tasks.config import load_config
from k25.eval.tasks.long_context import long_context_retrieval
from k25.eval.tasks.text import text_heldout
from k25.eval.tasks.vision import vision_heldout
from k25.serve.engine import decode_data_uri
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


@pytest.fixture(scope="module")
def joint_run_dir(tmp_path_factory) -> str:
    from experiments.k25_joint import get_config
    from k25.train import loop

    c = get_config("smoke")
    c.eval_per_task = 2  # held-out documents per task: the stage's per-task exact scores
    c.mesh.devices = 1
    d = str(tmp_path_factory.mktemp("k25_joint_smoke"))
    loop.train(c, d)
    return d


def leading_matches(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token sequences."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def completion_rows(samples: list[EvalSample]) -> dict[str, np.ndarray]:
    """A plain forward's inputs that predict every sampled token: one row per sample, its prompt and completion
    less the last token, right-padded (segment 0); `sampled` marks the completion's tokens among them."""
    metas = [s.output.metadata for s in samples]
    width = max(len(m["prompt_ids"]) + len(m["token_ids"]) for m in metas) - 1
    rows = {k: np.zeros((len(samples), width), np.int32) for k in ("input_ids", "positions", "segment_ids", "sampled")}
    for r, m in enumerate(metas):
        ids = m["prompt_ids"] + m["token_ids"]
        n = len(ids) - 1
        rows["input_ids"][r, :n], rows["positions"][r, :n], rows["segment_ids"][r, :n] = ids[:-1], np.arange(n), 1
        rows["sampled"][r, len(m["prompt_ids"]):n] = 1
    return rows


def assert_sampled_argmax(samples: list[EvalSample], logits: jax.Array, atol: float = 2e-4) -> None:
    """Every sampled token is the argmax of `logits` (the forward over `completion_rows(samples)`) at the
    position before it, and the sampler's logprob is that forward's log-softmax there."""
    argmax, logp = np.asarray(logits.argmax(-1)), np.asarray(jax.nn.log_softmax(logits, -1))
    for r, s in enumerate(samples):
        p, tokens = len(s.output.metadata["prompt_ids"]), np.asarray(s.output.metadata["token_ids"])
        at = np.arange(p - 1, p - 1 + len(tokens))
        np.testing.assert_array_equal(tokens, argmax[r, at], err_msg=s.id)
        np.testing.assert_allclose(s.output.metadata["logprobs"], logp[r, at, tokens], atol=atol, err_msg=s.id)


@pytest.mark.slow  # a smoke joint run, the stage's eval, a teacher-forced forward and the sampler's decode
def test_vision_heldout_equals_joint_stage_eval(joint_run_dir: str, tmp_path) -> None:
    """The joint stage scores a held-out image document as exact when the answer and eos are all argmax given
    the true prefix, which is when greedy decoding reproduces it; `vision_heldout` decodes the same images and
    prompts with the sampler. Metrics, prompts, pixels and sampled tokens are compared."""
    from k25.serve.load import load_run

    cfg = load_config(joint_run_dir)
    assert run_stage(joint_run_dir) == "k25"
    stage = make_stage(cfg)
    model, _ = load_run(joint_run_dir)
    want = stage.evaluate(model)

    # teacher-forced logits through the stage's held-out batch (one document per row)
    raw, row_tasks = stage.task_eval.batch()
    embeds = model.embed(raw["input_ids"], raw["pixel_values"], raw["image_grid_thw"])
    logits = model.language_model(inputs_embeds=embeds, positions=raw["positions"],
                                  segment_ids=raw["segment_ids"]).logits
    argmax = np.asarray(logits.argmax(-1))
    rows = {f"{t}-{row_tasks[:r].count(t)}": r for r, t in enumerate(row_tasks)}  # vision_heldout's sample ids
    pixel_end = np.cumsum(np.prod(raw["image_grid_thw"], -1))  # image rows come first, one image each

    task = vision_heldout(config=joint_run_dir)
    log = inspect_eval(task, model=f"k25/{joint_run_dir}", model_args={"max_slots": 8, "max_len": 160},
                       log_dir=str(tmp_path), display="none")[0]
    assert log.status == "success", log.error
    got = {k: v.value for k, v in log.results.scores[0].metrics.items()}
    image_tasks = sorted(cfg.data.image_tasks)
    assert {t: got[f"{t}_exact"] for t in image_tasks} == {t: want[f"eval/{t}_exact"] for t in image_tasks}

    inputs = {s.id: s.input[0].content for s in task.dataset}
    samples = sorted(log.samples, key=lambda s: rows[s.id])
    assert sorted(inputs) == [s.id for s in samples] == [k for k, r in rows.items() if row_tasks[r] in image_tasks]
    for s in samples:
        r = rows[s.id]
        pos = np.flatnonzero(raw["loss_mask"][r])  # positions predicting the answer tokens and eos
        answer = raw["targets"][r, pos]
        meta = s.output.metadata
        # the sampler's prompt is the stage's row up to the answer: bos, placeholders, prompt text
        assert meta["prompt_ids"] == raw["input_ids"][r, : pos[0] + 1].tolist(), s.id
        # and its image is the stage's pixels (PNG round trip, the model's patch size and merge)
        image = decode_data_uri(inputs[s.id][0].image, s.id)
        start = pixel_end[r - 1] if r else 0
        np.testing.assert_array_equal(preprocess_images([image])["pixel_values"].reshape(pixel_end[r] - start, -1),
                                      raw["pixel_values"][start:pixel_end[r]])
        # the stage's exact score is the sampler's: greedy follows the answer as far as teacher forcing does
        tokens = np.asarray(meta["token_ids"])
        k = leading_matches(argmax[r, pos], answer)
        assert leading_matches(tokens, answer) == k, s.id
        assert s.scores["vision_scorer"].value["exact"] == float(k == len(answer)), s.id

    # every sampled token is the argmax of the stage's forward over the prompt and the tokens sampled before it
    # (the whole greedy completion, not only up to the first miss), with the sampler's logprob. Sampled tokens
    # are embedded as text, as the sampler's decode does: an untrained model does sample the <|media|> id, which
    # the model's `embed` would take for an image slot.
    own = completion_rows(samples)
    sampled = own["sampled"] > 0
    n_px = pixel_end[len(samples) - 1]
    embeds = model.embed(np.where(sampled, 0, own["input_ids"]), raw["pixel_values"][:n_px],
                         raw["image_grid_thw"][: len(samples)])
    embeds = jnp.where(sampled[..., None], model.language_model.embed(own["input_ids"]), embeds)
    assert_sampled_argmax(samples, model.language_model(inputs_embeds=embeds, positions=own["positions"],
                                                        segment_ids=own["segment_ids"]).logits)
    assert len(samples) == len(image_tasks) * cfg.eval_per_task


@pytest.fixture(scope="module")
def long_context_run_dir(tmp_path_factory) -> str:
    from experiments.long_context import get_config
    from k25.train import loop

    c = get_config("base,smoke")  # retrieval grid: depths 0 and 1, one probe per cell, 3-key multi-key probes
    c.retrieval_eval.lengths = [128, 256]
    c.mesh.devices = 1
    d = str(tmp_path_factory.mktemp("long_context_smoke"))
    loop.train(c, d)
    return d


@pytest.mark.slow  # a smoke long-context run, the stage's retrieval eval, a teacher-forced forward, the sampler
def test_long_context_retrieval_equals_stage_eval(long_context_run_dir: str, tmp_path) -> None:
    """The lm stage scores a probe as retrieved when the key's digits and eos are all argmax given the true
    prefix; `long_context_retrieval` decodes the same probes greedily with the sampler and asks for the key and a
    stop. Metrics, prompts, per-probe scores and every sampled token are compared."""
    from k25.serve.load import load_run

    d = long_context_run_dir
    cfg = load_config(d)
    assert run_stage(d) == "lm"
    stage = make_stage(cfg)
    model, _ = load_run(d)
    want = {k: v for k, v in stage.evaluate(model).items() if k.startswith(("eval/retrieval_at_", "eval/multikey_at_"))}
    assert len(want) == len(cfg.retrieval_eval.lengths) * (2 + len(cfg.retrieval_eval.depths))

    # the stage's probes (one length per batch, in the task's sample order) and their teacher-forced argmax
    probes, argmax, answers = [], [], []
    for n in cfg.retrieval_eval.lengths:
        ids, answer, _ = stage.retrieval.probes(n)
        logits = model(ids, positions=np.broadcast_to(np.arange(n, dtype=np.int32), ids.shape),
                       segment_ids=np.ones_like(ids)).logits
        probes += list(ids)
        argmax += list(np.asarray(logits.argmax(-1)))
        answers += list(answer)

    task = long_context_retrieval(config=d)
    log = inspect_eval(task, model=f"k25/{d}", model_args={"max_slots": 8, "max_len": max(cfg.retrieval_eval.lengths)},
                       log_dir=str(tmp_path), display="none")[0]
    assert log.status == "success", log.error
    got = {k: v.value for k, v in log.results.scores[0].metrics.items()}
    assert got == {k.removeprefix("eval/"): v for k, v in want.items()}

    rows = {s.id: r for r, s in enumerate(task.dataset)}
    samples = sorted(log.samples, key=lambda s: rows[s.id])
    assert [s.id for s in samples] == list(rows) and len(rows) == len(probes)
    for s in samples:
        r = rows[s.id]
        pos = np.flatnonzero(answers[r])  # positions predicting the key's digits and eos
        meta = s.output.metadata
        # the sampler's prompt is the stage's probe up to the answer: bos, haystack, question
        assert meta["prompt_ids"] == probes[r][: pos[0] + 1].tolist(), s.id
        # greedy follows the key and eos as far as teacher forcing does; retrieved iff all of them are argmax
        target = probes[r][pos + 1]
        k = leading_matches(argmax[r][pos], target)
        assert leading_matches(np.asarray(meta["token_ids"]), target) == k, s.id
        assert s.scores["retrieval_scorer"].value == float(k == len(pos)), s.id

    # every sampled token is the argmax of the plain forward over the prompt and the tokens sampled before it
    # (a 3-step model retrieves nothing, so equal scores alone prove little), with the sampler's logprob
    own = completion_rows(samples)
    assert_sampled_argmax(samples, model(own["input_ids"], positions=own["positions"],
                                         segment_ids=own["segment_ids"]).logits)
