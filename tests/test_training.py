"""A tiny end-to-end training run: library -> train -> calibrate -> package -> load -> evaluate."""
import json

import numpy as np
import pytest
import torch

from diffkit.models.pacbed_training import LibrarySampler
from diffkit.models.train import train_pacbed
from diffkit.pacbed import load_predictor_file


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    cache = tmp_path_factory.mktemp("cache")
    return train_pacbed(out_dir=out, smoke=True, cache_dir=cache, log=lambda *a: None), cache


def test_smoke_training_packages_a_loadable_model(smoke_model):
    card_path, _ = smoke_model
    card = json.loads(card_path.read_text())
    assert card["smoke"] is True and card["training"]["seed"] == 20261122
    assert set(card["held_out"]) >= {"thickness_within_1nm", "tilt_within_0.25mrad", "thickness_coverage_68"}
    pred = load_predictor_file(card_path, device="cpu")
    x = np.random.default_rng(0).poisson(50, (3, 48, 48)).astype(np.float32)
    res = pred.predict_batch(x)
    assert res["thickness_nm"].shape == (3,)
    assert np.all((res["thickness_nm"] >= 2) & (res["thickness_nm"] <= 12))
    # the thin-pattern reference is packaged next to the weights and loads without pickle
    ref = card["thin_rotation"]["reference"]
    assert (card_path.parent / ref["file"]).exists() and pred.thin_refine
    lib = pred.thin_reference()
    assert lib.n_tilt == 1 and lib.thickness_nm.min() == ref["thickness_nm"][0]
    # the thin-pattern measurement network is trained, packaged and loaded with its calibrated temperature
    assert card["thin_measure"]["steps"] == card["training"]["thin_measure_steps"] > 0
    assert pred.thin_measure_net is not None and pred.use_thin_measure
    assert torch.equal(pred.thin_measure_net.temperature, pred.measure_net.temperature)


def test_sampler_symmetry_ops_transform_labels(smoke_model):
    """Mirroring a pattern flips the sign of the tilt along that axis; transposing swaps them."""
    import xarray as xr

    _, cache = smoke_model
    lib = xr.open_zarr(next(cache.rglob("*.zarr")))
    s = LibrarySampler(lib)
    pats, t, tx, ty = s.draw(400, np.random.default_rng(1), interpolate=False)
    assert (tx < 0).any() and (ty < 0).any()
    # the quadrant balance of the zero-order disk follows the signed tilt of a strongly tilted pattern
    n = pats.shape[-1]
    c = (n - 1) / 2
    xx = np.arange(n) - c
    big = np.abs(tx) > 0.4
    bal = (pats[big] * np.sign(xx)[None, None, :]).sum(axis=(1, 2))
    agree = np.sign(bal) == np.sign(tx[big])
    assert agree.mean() > 0.9 or agree.mean() < 0.1  # consistent sign convention either way


def test_thin_network_can_be_redone_on_a_packaged_model(smoke_model, tmp_path):
    """``diffkit train pacbed-thin``: the thin-crystal network is fine-tuned again from the packaged
    measurement network, the model recalibrated and re-evaluated, and the weights reload safely."""
    import shutil

    from safetensors.torch import load_file

    from diffkit.models.pacbed_training import TrainConfig
    from diffkit.models.train import train_thin_measure

    card_path, cache = smoke_model
    for f in card_path.parent.iterdir():  # a copy: the other tests keep the fixture's model
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / card_path.name
    before = load_file(str(path.with_suffix(".safetensors")))
    cfg = TrainConfig(seed=json.loads(path.read_text())["training"]["seed"], batch_size=16, thin_measure_steps=3,
                      thin_measure_lr=1e-2)
    train_thin_measure(path, config=cfg, cache_dir=cache, device="cpu", n_test=200, log=lambda *a: None)
    card = json.loads(path.read_text())
    after = load_file(str(path.with_suffix(".safetensors")))
    assert card["thin_measure"]["steps"] == 3 and card["held_out"]["n"] == 200
    # only the thin-crystal network changed; the general networks are untouched
    assert not torch.equal(after["thin_measure.backbone.conv.0.0.weight"], before["thin_measure.backbone.conv.0.0.weight"])
    for k in ("measure.backbone.conv.0.0.weight", "align.backbone.conv.0.0.weight"):
        assert torch.equal(after[k], before[k])
    pred = load_predictor_file(path, device="cpu")
    assert pred.thin_measure_net is not None
    assert pred.predict_batch(np.random.default_rng(0).poisson(50, (2, 48, 48)).astype(np.float32))["thickness_nm"].shape == (2,)


def test_thin_network_needs_a_packaged_model_and_test_sets_need_patterns(tmp_path):
    from diffkit.errors import BadInputError, ModelNotFoundError
    from diffkit.models.pacbed_eval import make_test_set
    from diffkit.models.train import train_thin_measure

    with pytest.raises(ModelNotFoundError, match="train one first"):
        train_thin_measure(tmp_path / "pacbed_missing.json")
    with pytest.raises(BadInputError, match="at least one pattern"):
        make_test_set(None, n=0)
