"""DEP: balancing, planning, and gradients equal to end-to-end backprop of the plain K25Model (8 fake devices)."""

import jax
import numpy as np
import pytest
from dep_batch import IMAGE_GRIDS, VIDEO_GRIDS, raw_batch, tiny_k25, tiny_model

from k25.parallel.dep import dep_value_and_grad, end_to_end_value_and_grad, reference_loss_fn
from k25.parallel.dep_plan import assign_by_rows, assign_chunks, balanced_plan, pack_bins, plan_vision, rows_plan
from k25.parallel.mesh import make_mesh
from k25.train.multimodal import device_put_batch, multimodal_lm_loss, prepare_batch

MESH = {"pp": 1, "dp": 2, "ep": 4}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_same(value_and_grads, ref, tol=1e-5):
    (loss, aux), grads = value_and_grads
    (ref_loss, ref_aux), ref_grads = ref
    assert rel_err(loss, ref_loss) < tol
    assert float(aux["num_tokens"]) == float(ref_aux["num_tokens"])
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    errs = {jax.tree_util.keystr(p): rel_err(g, r) for (p, g), r in
            zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads))}
    worst = max(errs, key=errs.get)
    assert errs[worst] < tol, (worst, errs[worst])
    for part in ("vision_tower", "mm_projector", "language_model"):  # every part really gets a gradient
        assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(grads[part])), part


# ------------------------------------------------------------------------------------- host side
def test_assign_chunks_greedy_by_patch_count():
    counts = [80, 64, 48, 36, 24, 8, 4, 64, 32]
    out = assign_chunks(counts, 4)
    assert sorted(i for d in out for i in d) == list(range(len(counts)))
    loads = [sum(counts[i] for i in d) for d in out]
    assert max(loads) == 96 and min(loads) >= 80  # total 360 over 4: mean 90
    assert assign_chunks([5], 3) == [[0], [], []]
    with pytest.raises(ValueError, match="n_devices"):
        assign_chunks([1], 0)
    with pytest.raises(ValueError, match="patch_counts"):
        assign_chunks([3, 0], 2)


def test_assign_by_rows_uses_pipeline_stage_zero():
    # 8 rows over dp*ep = 2 blocks of 4 rows; pp = 2 stages: devices 2, 3 (stage 1) get nothing
    assert assign_by_rows([0, 3, 4, 7, 5], 8, {"pp": 2, "dp": 2, "ep": 1}) == [[0, 1], [2, 3, 4], [], []]
    with pytest.raises(ValueError, match="batch_size"):
        assign_by_rows([0], 6, {"dp": 4})


def test_pack_bins_first_fit_decreasing():
    assert pack_bins([80, 24, 64, 4, 36], 100) == [[0, 3], [2, 4], [1]]
    with pytest.raises(ValueError, match="bin_size=50"):
        pack_bins([80], 50)


def test_plan_balances_and_validates():
    cfg = tiny_k25()
    raw = raw_batch(cfg)
    dep, rows = balanced_plan(raw, cfg, 8), rows_plan(raw, cfg, MESH)
    total = sum(t * h * w for t, h, w in IMAGE_GRIDS + VIDEO_GRIDS)
    assert sum(dep.patches_per_device) == sum(rows.patches_per_device) == total
    assert dep.balance < rows.balance
    assert dep.balance == pytest.approx(80 / (total / 8))  # the largest image alone sets the max
    src = dep.arrays["media_src"]
    assert (src >= 0).sum() == ((raw["input_ids"] == 250) | (raw["input_ids"] == 251)).sum()
    assert len(np.unique(src[src >= 0])) == (src >= 0).sum()  # each encoder output row used once
    with pytest.raises(ValueError, match="patch_budget=10"):
        plan_vision(raw, cfg, dep.assignment, patch_budget=10)
    with pytest.raises(ValueError, match="image placeholder"):
        balanced_plan({**raw, "input_ids": np.where(raw["input_ids"] == 250, 0, raw["input_ids"])}, cfg, 8)
    with pytest.raises(ValueError, match="pixel_values"):
        balanced_plan({k: v for k, v in raw.items() if k != "pixel_values"}, cfg, 8)
    with pytest.raises(ValueError, match="multiple of bin_size"):
        plan_vision(raw, cfg, dep.assignment, bin_size=96, patch_budget=200)
    binned = rows_plan(raw, cfg, MESH, bin_size=80)
    assert binned.arrays["vision/patches"].shape[1:3] == (2, 80)  # row 3 holds 48 + 36 + 8 patches
    with pytest.raises(ValueError, match="exactly once"):
        plan_vision(raw, cfg, [[0], [1]])


# ------------------------------------------------------------------------------------ gradients
@pytest.fixture(scope="module")
def setup():
    cfg = tiny_k25()
    model_def, params, buffers = tiny_model(cfg)
    raw = raw_batch(cfg)
    ref_fn = reference_loss_fn(multimodal_lm_loss)
    grids = {k: raw[k] for k in ("image_grid_thw", "video_grid_thw")}
    arrays = {k: v for k, v in raw.items() if k not in grids}
    ref = jax.jit(jax.value_and_grad(lambda p, b: ref_fn(model_def.merge(p, buffers), {**b, **grids}),
                                     has_aux=True))(params, arrays)
    return cfg, model_def, params, buffers, raw, ref


@pytest.mark.parametrize("dep,bin_size", [(True, None), (False, None), (False, 80)])
def test_dep_and_end_to_end_match_plain_backprop(setup, dep, bin_size):
    """DEP (balanced over 8 devices, three phases) and its dep=False twin (row-local, one value_and_grad; one
    bin per device, or bins of 80 patches so that some devices run two) give the plain K25Model's loss and
    gradients to 1e-5 relative, for every parameter."""
    cfg, model_def, params, buffers, raw, ref = setup
    mesh = make_mesh(MESH)
    batch, (plan,) = prepare_batch(raw, cfg, mesh, dep=dep, bin_size=bin_size)
    assert len(plan.assignment) == 8
    fn = dep_value_and_grad if dep else end_to_end_value_and_grad
    with jax.set_mesh(mesh):  # the MoE takes its expert-parallel path, as in training
        out = jax.jit(lambda p, b, x: fn(model_def, p, b, x, multimodal_lm_loss, mesh))(
            params, buffers, device_put_batch(batch, mesh))
    assert_same(out, ref)


def test_dep_rejects_a_plan_for_another_mesh(setup):
    cfg, model_def, params, buffers, raw, _ = setup
    batch, _ = prepare_batch(raw, cfg, make_mesh({"pp": 1, "dp": 8, "ep": 1}), dep=True)
    small = make_mesh({"pp": 1, "dp": 4, "ep": 1, "devices": 4})
    with pytest.raises(ValueError, match="planned for 8 devices"):
        dep_value_and_grad(model_def, params, buffers, batch, multimodal_lm_loss, small)
    with pytest.raises(ValueError, match="media_src"):
        dep_value_and_grad(model_def, params, buffers, {k: v for k, v in batch.items() if k != "media_src"},
                           multimodal_lm_loss, make_mesh({"pp": 1, "dp": 8, "ep": 1}))
