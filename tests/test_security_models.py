"""Tampered model cards and weights: one clear ModelCardError naming the card; a broken card skips only itself."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffkit.errors import ModelCardError
from diffkit.models.registry import WEIGHTS_DIR, find_card, model_cards, read_card, validate_card
from diffkit.pacbed import load_predictor_file
from diffkit.strain.detect import load_disk_models, select_disk_models

PACBED = "pacbed_SrTiO3_001_200kV_13.6mrad"
DISKS = "disks_nbed"


def _copy(tmp_path, stem):
    for p in WEIGHTS_DIR.glob(stem + ".*"):
        shutil.copy(p, tmp_path / p.name)
    return tmp_path / f"{stem}.json"


def _edit(card_path, fn, rehash=True):
    card = json.loads(card_path.read_text())
    fn(card)
    if rehash:
        card["weights_sha256"] = hashlib.sha256(card_path.with_suffix(".safetensors").read_bytes()).hexdigest()
    card_path.write_text(json.dumps(card))


def _resave(card_path, fn):
    """Rewrite the weights through ``fn(state_dict)`` and update the card's checksum (a consistent forgery)."""
    w = card_path.with_suffix(".safetensors")
    sd = load_file(str(w))
    fn(sd)
    save_file(sd, str(w))
    _edit(card_path, lambda c: None)


def test_shipped_cards_validate_with_checksums():
    for kind in ("pacbed", "disks"):
        cards = model_cards(kind)
        assert len(cards) >= 2
        for c in cards:
            raw = (WEIGHTS_DIR / (c["card_path"].rsplit("/", 1)[-1][:-5] + ".safetensors")).read_bytes()
            assert hashlib.sha256(raw).hexdigest() == c["weights_sha256"]
            ref = (c.get("thin_rotation") or {}).get("reference")
            if ref:
                assert hashlib.sha256((WEIGHTS_DIR / ref["file"]).read_bytes()).hexdigest() == ref["sha256"]


def test_malformed_card_skips_only_itself(tmp_path):
    _copy(tmp_path, PACBED)
    (tmp_path / "pacbed_broken.json").write_text("{ not json")
    (tmp_path / "pacbed_wrongtype.json").write_text("[1, 2]")
    with pytest.warns(UserWarning, match="pacbed_broken.json"):
        cards = model_cards("pacbed", tmp_path)
    assert [c["id"] for c in cards] == [json.loads((tmp_path / f"{PACBED}.json").read_text())["id"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert find_card("SrTiO3", "001", 200, 13.6, weights_dir=tmp_path)["card_path"].endswith(f"{PACBED}.json")
    with pytest.raises(ModelCardError, match="pacbed_broken.json.*not valid JSON"):
        read_card(tmp_path / "pacbed_broken.json")


def test_broken_disk_card_does_not_break_model_selection(tmp_path):
    _copy(tmp_path, DISKS)
    _copy(tmp_path, "disks_si001_200kv_2mrad")
    (tmp_path / "disks_si001_200kv_2mrad.json").write_text('{"id": "x"')
    with pytest.warns(UserWarning, match="disks_si001_200kv_2mrad.json"):
        m = select_disk_models(None, device="cpu", weights_dir=tmp_path)
    assert m.card["id"] == DISKS


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["geometry"].update(n_px="96"), r"'geometry.n_px' must be an integer"),
    (lambda c: c["geometry"].update(n_px=40000), r"'geometry.n_px' = 40000 is outside"),
    (lambda c: c["geometry"].update(n_px=100), r"multiple of 16"),
    (lambda c: c.update(convergence_mrad=-3), r"'convergence_mrad' = -3 is outside"),
    (lambda c: c["ood"].update(threshold=float("nan")), r"ood.threshold"),
    (lambda c: c.pop("geometry"), r"'geometry' must be a mapping"),
    (lambda c: c["thin_rotation"]["reference"].pop("sha256"), r"thin_rotation.reference.sha256.*missing"),
    (lambda c: c["thin_rotation"]["reference"].update(file="../../../etc/passwd"), r"plain file name"),
    (lambda c: c["thin_rotation"]["reference"].update(file="/etc/passwd"), r"plain file name"),
])
def test_bad_pacbed_card_values(tmp_path, edit, match):
    card = _copy(tmp_path, PACBED)
    _edit(card, edit)
    t = time.perf_counter()
    with pytest.raises(ModelCardError, match=match) as err:
        load_predictor_file(card, device="cpu")
    assert str(card) in str(err.value) and time.perf_counter() - t < 2


def test_weights_checksum_is_mandatory(tmp_path):
    card = _copy(tmp_path, PACBED)
    _edit(card, lambda c: c.pop("weights_sha256"), rehash=False)
    with pytest.raises(ModelCardError, match=r"weights_sha256.*missing"):
        load_predictor_file(card, device="cpu")


def test_truncated_weights_fail_the_checksum(tmp_path):
    card = _copy(tmp_path, PACBED)
    w = card.with_suffix(".safetensors")
    w.write_bytes(w.read_bytes()[:100_000])
    with pytest.raises(ModelCardError, match="does not match the card's checksum") as err:
        load_predictor_file(card, device="cpu")
    assert str(card) in str(err.value)


def test_truncated_weights_with_matching_checksum(tmp_path):
    card = _copy(tmp_path, PACBED)
    w = card.with_suffix(".safetensors")
    w.write_bytes(w.read_bytes()[:100_000])
    _edit(card, lambda c: None)
    with pytest.raises(ModelCardError, match="could not be read as safetensors"):
        load_predictor_file(card, device="cpu")


@pytest.mark.parametrize("forge,match", [
    (lambda sd: sd.pop("measure.tilt_x_head.weight"), r"missing tensor\(s\) \['measure.tilt_x_head.weight'\]"),
    (lambda sd: sd.update({"align.backbone.fc.1.weight": torch.zeros(128, 3)}), r"'align.backbone.fc.1.weight' has shape \(128, 3\)"),
    (lambda sd: sd.update({"ood.icov": torch.zeros(5)}), r"'ood.icov' has shape \(5,\)"),
    (lambda sd: sd.update({"extra": torch.zeros(1)}), r"unexpected tensor\(s\) \['extra'\]"),
])
def test_forged_pacbed_weights(tmp_path, forge, match):
    card = _copy(tmp_path, PACBED)
    _resave(card, forge)
    with pytest.raises(ModelCardError, match=match) as err:
        load_predictor_file(card, device="cpu")
    assert str(card) in str(err.value)


def test_forged_thin_reference(tmp_path):
    card = _copy(tmp_path, PACBED)
    ref = tmp_path / f"{PACBED}.thin_reference.safetensors"
    save_file({"patterns": torch.zeros(3, 96, 96), "thickness_nm": torch.zeros(4)}, str(ref))
    _edit(card, lambda c: c["thin_rotation"]["reference"].update(sha256=hashlib.sha256(ref.read_bytes()).hexdigest()))
    pred = load_predictor_file(card, device="cpu")
    with pytest.raises(ModelCardError, match=r"thin-pattern reference.*'thickness_nm' has shape \(4,\)"):
        pred.thin_reference()
    ref.write_bytes(b"not the file the card names")
    pred._thin_reference = None
    with pytest.raises(ModelCardError, match="checksum"):
        pred.thin_reference()


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["config"]["anchor_free"].update(width="16"), r"config.anchor_free.width' must be an integer"),
    (lambda c: c["config"]["subimage"].update(size=10**6), r"config.subimage.size' = 1000000 is outside"),
    (lambda c: c["config"]["anchor_free"].update(evil=1), r"unknown key"),
    (lambda c: c.update(kind="pacbed"), r"'kind' must be 'disks'"),
])
def test_bad_disk_cards(tmp_path, edit, match):
    card = _copy(tmp_path, DISKS)
    _edit(card, edit)
    with pytest.raises(ModelCardError, match=match) as err:
        load_disk_models(str(card), device="cpu")
    assert str(card) in str(err.value)


def test_forged_disk_weights(tmp_path):
    card = _copy(tmp_path, DISKS)
    _resave(card, lambda sd: sd.update({"si.features.2.1.bias": torch.zeros(7)}))
    with pytest.raises(ModelCardError, match=r"'si.features.2.1.bias' has shape \(7,\)"):
        load_disk_models(str(card), device="cpu")


def test_validate_card_accepts_shipped_and_names_path():
    card = json.loads((WEIGHTS_DIR / f"{PACBED}.json").read_text())
    assert validate_card(card, "x.json", "pacbed") is card
    with pytest.raises(ModelCardError, match="'x.json'.*'kind' must be 'disks'"):
        validate_card(card, "x.json", "disks")
