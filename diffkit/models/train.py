"""Train, evaluate and package a PACBED model (``diffkit train pacbed``).

Writes ``<out_dir>/pacbed_<material>_<zone>_<kV>kV_<alpha>mrad.safetensors`` and a JSON
model card with the library, the training configuration and seed, and the held-out
accuracy table produced by :mod:`diffkit.models.pacbed_eval`.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import pathlib
import platform
import time

import numpy as np
import torch

from .. import __version__
from ..sim.crystals import get_crystal
from ..sim.pacbed import LibrarySpec, build_pacbed_library
from .pacbed_eval import evaluate, make_test_set
from .pacbed_training import (THIN_MEASURE_MARGIN_NM, LibrarySampler, TrainConfig, calibrate_on_pipeline,
                              calibrate_temperature, feature_statistics, thin_reference_patterns, thin_rotation_ring,
                              train_align_net, train_measure_net, train_thin_measure_net)
from .registry import WEIGHTS_DIR, write_card


def default_spec(material="SrTiO3", zone="001", energy_kv=200.0, convergence_mrad=13.6, smoke=False) -> LibrarySpec:
    """The library the shipped models use (a tiny one when ``smoke``)."""
    crystal = get_crystal(material, zone)
    t_max = 120.0 if convergence_mrad < 16 else 80.0
    if smoke:
        return LibrarySpec(crystal=crystal, energy_kv=energy_kv, convergence_mrad=convergence_mrad,
                           thickness_nm=tuple(np.arange(2.0, 12.01, 0.5)), tilt_max_mrad=0.6, n_px=32, g_max=1.2)
    return LibrarySpec(crystal=crystal, energy_kv=energy_kv, convergence_mrad=convergence_mrad,
                       thickness_nm=tuple(np.round(np.arange(1.0, t_max + 0.01, 0.5), 3)))


def model_stem(material, zone, energy_kv, convergence_mrad) -> str:
    return f"pacbed_{material}_{zone}_{energy_kv:g}kV_{convergence_mrad:g}mrad"


def train_pacbed(material="SrTiO3", zone="001", energy_kv=200.0, convergence_mrad=13.6, out_dir=None,
                 config: TrainConfig | None = None, smoke=False, n_test=2000, cache_dir=None, device=None, log=print):
    """Build/load the library, train both networks, calibrate, evaluate on held-out data, save.

    Returns the path of the model card.
    """
    from safetensors.torch import save_file

    cfg = config or (TrainConfig(measure_steps=30, align_steps=20, batch_size=32, thin_measure_steps=10) if smoke else TrainConfig())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = pathlib.Path(out_dir) if out_dir else WEIGHTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = default_spec(material, zone, energy_kv, convergence_mrad, smoke=smoke)
    t0 = time.perf_counter()
    lib = build_pacbed_library(spec, cache_dir=cache_dir, progress=not smoke)
    th = np.asarray(lib["thickness_nm"].values)
    train_t = training_thicknesses(lib, cfg)
    sampler = LibrarySampler(lib, train_t)
    log(f"library {lib.attrs['spec_key']}: {lib['pattern'].shape}, training thicknesses {len(train_t)}")
    t_lib = time.perf_counter() - t0
    align = train_align_net(sampler, cfg, device=device, log=log)
    measure = train_measure_net(sampler, cfg, device=device, log=log)
    temps = calibrate_temperature(measure, sampler, cfg, n=512 if smoke else 2048, device=device)
    mu, icov, thr = feature_statistics(measure, sampler, cfg, n=512 if smoke else 4096, device=device)
    thin, thin_card = _thin_measure_stage(measure, lib, train_t, cfg, device, log)
    t_train = time.perf_counter() - t0 - t_lib
    stem = model_stem(material, zone, energy_kv, convergence_mrad)
    sd = {f"align.{k}": v.detach().cpu().contiguous() for k, v in align.state_dict().items()}
    sd.update({f"measure.{k}": v.detach().cpu().contiguous() for k, v in measure.state_dict().items()})
    if thin is not None:
        sd.update({f"thin_measure.{k}": v.detach().cpu().contiguous() for k, v in thin.state_dict().items()})
    sd["ood.mu"] = mu.contiguous()
    sd["ood.icov"] = icov.contiguous()
    weights = out_dir / f"{stem}.safetensors"
    save_file(sd, str(weights))
    card = {
        "id": f"{stem}-{lib.attrs['spec_key'][:8]}-s{cfg.seed}",
        "kind": "pacbed",
        "material": material, "zone_axis": zone, "beam_energy_kv": energy_kv, "convergence_mrad": convergence_mrad,
        "geometry": {"n_px": int(spec.n_px), "disk_radius_px": float(spec.disk_radius_px),
                     "pixel_size_mrad": float(spec.pixel_size_mrad)},
        "training_data": {
            "library_spec_key": lib.attrs["spec_key"], "method": lib.attrs["method"],
            "thickness_range_nm": [float(th.min()), float(th.max())],
            "training_thicknesses": f"{len(train_t)} values every {cfg.train_thickness_step_nm} nm, linearly interpolated between them",
            "held_out_thicknesses": "the half-nm library thicknesses (never used in training)",
            "tilt_grid_mrad": f"0 to {float(lib['tilt_x_mrad'].max()):.3f} in steps of {lib.attrs['fine_step_mrad']:.4f}, all signs via the 4mm symmetry",
            "n_beams": int(lib.attrs["n_beams"]), "g_max_inv_A": spec.g_max, "absorption_ratio": float(lib.attrs["absorption_ratio"]),
            "tds": bool(spec.tds),
        },
        "augmentations": {"measure": dataclasses.asdict(cfg.measure_ranges), "align": dataclasses.asdict(cfg.align_ranges)},
        "training": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("measure_ranges", "align_ranges")},
        "calibration_temperatures": {"thickness": temps[0], "tilt": temps[1]},
        "ood": {"method": "Mahalanobis distance of the 192-d backbone features", "threshold": thr, "quantile": 0.995},
        "seconds": {"library": round(t_lib, 1), "training": round(t_train, 1)},
        "device": str(device), "torch": torch.__version__, "diffkit": __version__, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "smoke": bool(smoke),
    }
    if thin_card:
        card["thin_measure"] = thin_card
    card_path = out_dir / f"{stem}.json"
    write_card(card_path, card)
    recalibrate(card_path, lib=lib, config=cfg, n=512 if smoke else 4096, device=device)
    evaluate_packaged(card_path, lib, n_test=n_test, device=device, log=log)
    return card_path


def training_thicknesses(lib, cfg: TrainConfig) -> np.ndarray:
    """The library thicknesses (nm) training uses: those on the ``cfg.train_thickness_step_nm`` grid."""
    th = np.asarray(lib["thickness_nm"].values)
    return th[np.abs(th / cfg.train_thickness_step_nm - np.round(th / cfg.train_thickness_step_nm)) < 1e-6]


def card_library(card: dict, cache_dir=None):
    """The simulation library a model card was trained on (built or loaded from the cache)."""
    return build_pacbed_library(default_spec(card["material"], card["zone_axis"], card["beam_energy_kv"],
                                             card["convergence_mrad"], smoke=card.get("smoke", False)),
                                cache_dir=cache_dir, progress=False)


def evaluate_packaged(card_path, lib, n_test: int = 2000, device=None, log=print) -> dict:
    """Held-out evaluation of the packaged files, exactly as users load them; the table (and the command
    that reproduces it) is written into the model card. Returns the table."""
    from ..pacbed.predictor import _CACHE, load_predictor_file

    card_path = pathlib.Path(card_path)
    card = json.loads(card_path.read_text())
    _CACHE.clear()
    pred = load_predictor_file(card_path, device=device)
    rep, _ = evaluate(pred, make_test_set(lib, n=200 if card.get("smoke") else n_test))
    rep["command"] = f"diffkit evaluate pacbed --convergence {card['convergence_mrad']:g} --n {n_test}"
    card["held_out"] = rep
    write_card(card_path, card)
    log(json.dumps({k: v for k, v in rep.items() if not isinstance(v, dict)}, indent=1))
    return rep


def _thin_measure_stage(measure, lib, train_t, cfg: TrainConfig, device, log):
    """Fine-tune the thin-pattern measurement network (none when ``cfg.thin_measure_steps`` is 0 or the
    library has too few thin thicknesses): (network, model-card entry)."""
    thin_t = train_t[train_t <= cfg.thin_measure_max_nm]
    if cfg.thin_measure_steps <= 0 or len(thin_t) < 3:
        return None, None
    t0 = time.perf_counter()
    net = train_thin_measure_net(measure, LibrarySampler(lib, thin_t), cfg, device=device, log=log)
    entry = {"below_nm": float(min(thin_t.max(), cfg.thin_measure_max_nm) - THIN_MEASURE_MARGIN_NM),
             "training_thickness_nm": [float(thin_t.min()), float(thin_t.max())],
             "steps": cfg.thin_measure_steps, "lr": cfg.thin_measure_lr, "seed": cfg.seed + 17,
             "residual_scale": cfg.thin_measure_residual_scale, "seconds": round(time.perf_counter() - t0, 1),
             "note": "the measurement network fine-tuned on thin crystals; gives the tilt of patterns the general "
                     "network finds thinner than below_nm (thickness, features and OOD stay the general network's)"}
    return net, entry


def train_thin_measure(card_path, config: TrainConfig | None = None, n_test: int = 2000, cache_dir=None, device=None,
                       log=print):
    """Add (or redo) the thin-pattern measurement network of a packaged model from its own measurement
    network, then recalibrate it end to end and re-evaluate it on the held-out set (``diffkit train
    pacbed-thin``). Returns the model card path."""
    from safetensors.torch import load_file, save_file

    from ..pacbed.networks import MeasureNet

    from ..errors import ModelNotFoundError

    card_path = pathlib.Path(card_path)
    if not card_path.exists():
        raise ModelNotFoundError(f"no packaged PACBED model at {card_path}: train one first (diffkit train pacbed)")
    card = json.loads(card_path.read_text())
    cfg = config or TrainConfig(seed=card["training"]["seed"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lib = card_library(card, cache_dir)
    train_t = training_thicknesses(lib, cfg)
    weights = card_path.with_suffix(".safetensors")
    sd = load_file(str(weights))
    base = MeasureNet.from_state_dict(sd, "measure.", n_px=card["geometry"]["n_px"])
    thin, entry = _thin_measure_stage(base.to(device), lib, train_t, cfg, device, log)
    if thin is None:
        raise ValueError("no thin-pattern network: thin_measure_steps is 0 or the library has too few thin thicknesses")
    sd = {k: v for k, v in sd.items() if not k.startswith("thin_measure.")}
    sd.update({f"thin_measure.{k}": v.detach().cpu().contiguous() for k, v in thin.state_dict().items()})
    save_file(sd, str(weights))
    card["thin_measure"] = entry
    card["training"].update({k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("thin_measure")})
    write_card(card_path, card)
    recalibrate(card_path, lib=lib, config=cfg, n=512 if card.get("smoke") else 4096, device=device)
    evaluate_packaged(card_path, lib, n_test=n_test, device=device, log=log)
    return card_path


def recalibrate(card_path, lib=None, config: TrainConfig | None = None, n: int = 4096, device=None, cache_dir=None):
    """End-to-end calibration of a packaged model (temperatures and OOD pattern statistics),
    written into its weights and model card. See
    :func:`~diffkit.models.pacbed_training.calibrate_on_pipeline`."""
    from safetensors.torch import load_file, save_file

    from ..pacbed.predictor import _CACHE, load_predictor_file

    card_path = pathlib.Path(card_path)
    card = json.loads(card_path.read_text())
    cfg = config or TrainConfig(seed=card["training"]["seed"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if lib is None:
        lib = card_library(card, cache_dir)
    train_t = training_thicknesses(lib, cfg)
    _CACHE.clear()
    pred = load_predictor_file(card_path, device=device)
    thin = thin_rotation_ring(lib, card["material"], card["zone_axis"], card["beam_energy_kv"], card["convergence_mrad"])
    reference = ref_lib = None
    if thin:
        # zero-tilt library patterns of thin crystals, shipped next to the weights, for the thin-pattern
        # geometry refinement (a few hundred kB)
        from ..pacbed.lsf import LsfLibrary

        ref_pats, ref_t = thin_reference_patterns(lib)
        step = float(lib.attrs["fine_step_mrad"])
        ref_lib = LsfLibrary.zero_tilt(ref_pats, ref_t, pixel_size_mrad=pred.pixel_size_mrad,
                                       disk_radius_px=pred.disk_radius_px, convergence_mrad=pred.convergence_mrad,
                                       tilt_step_mrad=step, device=device)
        reference = {"file": card_path.stem + ".thin_reference.safetensors",
                     "thickness_nm": [float(ref_t.min()), float(ref_t.max())], "n_patterns": int(len(ref_t)),
                     "tilt_step_mrad": step, "smooth_px": ref_lib.smooth_px,
                     "library_key": str(lib.attrs.get("spec_key", "")),
                     "note": "zero-tilt library patterns (library frame) the geometry of thin patterns is refined "
                             "against by least squares (PacbedPredictor.refine_thin_geometry)"}
    (temps, bands), table, rotation, thin, size_bias = calibrate_on_pipeline(pred, LibrarySampler(lib, train_t), cfg, n=n,
                                                                  device=device, thin_rule=thin,
                                                                  thin_reference=ref_lib)
    if thin and reference:
        ref_path = card_path.with_name(reference["file"])
        save_file({"patterns": torch.from_numpy(ref_pats), "thickness_nm": torch.from_numpy(ref_t)}, str(ref_path))
        reference["sha256"] = hashlib.sha256(ref_path.read_bytes()).hexdigest()
        thin["reference"] = reference
    weights = card_path.with_suffix(".safetensors")
    sd = load_file(str(weights))
    sd["measure.temperature"] = torch.tensor(temps, dtype=torch.float32)
    if "thin_measure.temperature" in sd:
        sd["thin_measure.temperature"] = torch.tensor(temps, dtype=torch.float32)
    save_file(sd, str(weights))
    card["calibration_temperatures"] = {"thickness": temps[0], "tilt": temps[1],
                                        "method": "68 % / 95 % interval coverage, raw frames through the full pipeline",
                                        "n": n, "bands": bands}
    card["ood"]["pattern_statistics"] = table
    card["rotation_uncertainty"] = rotation
    card["size_bias"] = size_bias
    if thin:
        card["thin_rotation"] = thin
    else:
        card.pop("thin_rotation", None)
    card["resolution_floor"] = {
        # thickness labels are continuous in training (patterns interpolated between library thicknesses)
        # and the temperatures are fitted on continuous thicknesses: no floor (a bin-width floor of
        # 0.144 nm made the 68 % interval cover 85 % of continuous held-out thicknesses)
        "thickness_nm": 0.0,
        "tilt_mrad": float(lib.attrs["fine_step_mrad"]) / np.sqrt(12),
        "note": "added in quadrature to the network's standard deviations and intervals: tilt labels lie on "
                "the library's tilt grid, so a tilt between grid points is known no better than one step "
                "(thickness labels are continuous: no thickness floor)",
    }
    card["ood"]["checks"] = ["Mahalanobis distance of backbone features", "pattern statistics per thickness band",
                             "vacuum (no intensity outside the disk)", "disk size vs calibration"]
    card.pop("weights_path", None)
    card.pop("card_path", None)
    write_card(card_path, card)
    _CACHE.clear()
    return temps, table
