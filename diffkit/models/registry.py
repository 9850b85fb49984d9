"""Registry of the models shipped inside diffkit, keyed by (material, zone, kV, alpha).

Weights are stored as safetensors (no pickle, nothing executed on load) next to a JSON
model card with the training data, seed, configuration and held-out accuracy.

Every card is checked against a schema (:func:`validate_card`: types, ranges, names of the
files it points to) and every file it names carries a SHA-256 checksum in the card
(``weights_sha256``; ``thin_rotation.reference.sha256``); the tensors are checked against the
shapes the card's architecture needs before anything is loaded (:func:`read_weights`). Any
problem is one :class:`~diffkit.errors.ModelCardError` naming the card; a broken card in the
weights folder is skipped (with a warning) and never hides the others.
"""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import re
import warnings

from ..errors import ModelCardError, ModelNotFoundError

WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"

#: largest card (bytes) and weights file (bytes) read
MAX_CARD_BYTES = 4 * 2**20
MAX_WEIGHTS_BYTES = 512 * 2**20
_SHA = re.compile(r"^[0-9a-f]{64}$")
_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,200}$")


# --------------------------------------------------------------------------- schema

def _fail(path, msg) -> ModelCardError:
    return ModelCardError(f"model card {str(path)!r}: {msg}")


def _num(card, key, path, lo=None, hi=None, where=None, integer=False, required=True, lo_open=False):
    """The number ``card[key]`` within [lo, hi] (``lo_open``: lo excluded), else :class:`ModelCardError`."""
    name = where or key
    if key not in card or card[key] is None:
        if required:
            raise _fail(path, f"'{name}' is missing")
        return None
    v = card[key]
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise _fail(path, f"'{name}' must be {'an integer' if integer else 'a number'}, got {type(v).__name__}")
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise _fail(path, f"'{name}' = {v!r} is outside {rng}")
    return v


def _str(card, key, path, where=None, required=True):
    v = card.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip() or len(v) > 200:
        raise _fail(path, f"'{where or key}' must be a non-empty string")
    return v


def _dict(card, key, path, where=None, required=True) -> dict | None:
    v = card.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, dict):
        raise _fail(path, f"'{where or key}' must be a mapping")
    return v


def _nums(v, path, where, n=None, lo=None):
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise _fail(path, f"'{where}' must be a list of {n or 'some'} numbers")
    for i, x in enumerate(v):
        _num({"x": x}, "x", path, lo=lo, where=f"{where}[{i}]")
    return v


def _sha(d, key, path, where):
    v = d.get(key)
    if not isinstance(v, str) or not _SHA.match(v):
        raise _fail(path, f"'{where}' (SHA-256 of the file, 64 hex digits) is missing or malformed; every file a "
                          "card names needs its checksum")
    return v


def _file_name(d, key, path, where):
    v = d.get(key)
    if not isinstance(v, str) or not _FILE.match(v) or ".." in v:
        raise _fail(path, f"'{where}' must be a plain file name next to the card (no folders), got {v!r}")
    return v


def validate_card(card, path="<card>", kind: str | None = None) -> dict:
    """Check a parsed model card (types, ranges, checksums, file names); return it or raise
    :class:`~diffkit.errors.ModelCardError` naming ``path``."""
    if not isinstance(card, dict):
        raise _fail(path, f"is not a JSON object (got {type(card).__name__})")
    _str(card, "id", path)
    k = card.get("kind")
    if k not in ("pacbed", "disks") or (kind is not None and k != kind):
        raise _fail(path, f"'kind' must be {kind!r}" if kind else "'kind' must be 'pacbed' or 'disks'")
    _sha(card, "weights_sha256", path, "weights_sha256")
    if k == "pacbed":
        _str(card, "material", path)
        _str(card, "zone_axis", path)
        _num(card, "beam_energy_kv", path, 1.0, 3000.0)
        _num(card, "convergence_mrad", path, 0.0, 200.0, lo_open=True)
        g = _dict(card, "geometry", path)
        n = _num(g, "n_px", path, 32, 512, where="geometry.n_px", integer=True)
        if n % 16:
            raise _fail(path, f"'geometry.n_px' = {n} must be a multiple of 16")
        _num(g, "disk_radius_px", path, 0.0, n / 2, where="geometry.disk_radius_px", lo_open=True)
        _num(g, "pixel_size_mrad", path, 0.0, 100.0, where="geometry.pixel_size_mrad", lo_open=True)
        ood = _dict(card, "ood", path)
        _num(ood, "threshold", path, 0.0, 1e9, where="ood.threshold", lo_open=True)
        _dict(ood, "pattern_statistics", path, "ood.pattern_statistics", required=False)
        ct = _dict(card, "calibration_temperatures", path, required=False)
        if ct is not None:
            for t in ("thickness", "tilt"):
                _num(ct, t, path, 0.0, 1e3, where=f"calibration_temperatures.{t}", lo_open=True)
            b = _dict(ct, "bands", path, "calibration_temperatures.bands", required=False)
            if b is not None:
                edges = _nums(b.get("edges_nm"), path, "calibration_temperatures.bands.edges_nm", lo=0)
                for t in ("thickness", "tilt"):
                    _nums(b.get(t), path, f"calibration_temperatures.bands.{t}", n=len(edges) - 1, lo=1e-12)
        rf = _dict(card, "resolution_floor", path, required=False)
        if rf is not None:
            for t in ("thickness_nm", "tilt_mrad"):
                _num(rf, t, path, 0.0, 1e3, where=f"resolution_floor.{t}", required=False)
        tr = _dict(card, "thin_rotation", path, required=False)
        if tr is not None:
            _nums(tr.get("ring_mrad"), path, "thin_rotation.ring_mrad", n=2, lo=0)
            if tr.get("sign") not in (1, -1, 1.0, -1.0) or isinstance(tr.get("sign"), bool):
                raise _fail(path, "'thin_rotation.sign' must be 1 or -1")
            _num(tr, "below_nm", path, 0.0, 1e4, where="thin_rotation.below_nm")
            ref = _dict(tr, "reference", path, "thin_rotation.reference", required=False)
            if ref is not None:
                _file_name(ref, "file", path, "thin_rotation.reference.file")
                _sha(ref, "sha256", path, "thin_rotation.reference.sha256")
                _num(ref, "tilt_step_mrad", path, 0.0, 100.0, where="thin_rotation.reference.tilt_step_mrad",
                     lo_open=True)
                _num(ref, "smooth_px", path, 0.0, 100.0, where="thin_rotation.reference.smooth_px", required=False)
        tm = _dict(card, "thin_measure", path, required=False)
        if tm is not None:
            _num(tm, "below_nm", path, 0.0, 1e4, where="thin_measure.below_nm")
        for key in ("rotation_uncertainty", "size_bias", "held_out"):
            _dict(card, key, path, required=False)
    else:
        cfg = _dict(card, "config", path)
        af = _dict(cfg, "anchor_free", path, "config.anchor_free")
        si = _dict(cfg, "subimage", path, "config.subimage")
        for d, name, keys in ((af, "anchor_free", {"pool": (1, 16, True), "n_bins": (2, 256, True),
                                                   "offset_range": (0.0, 64.0, False), "width": (1, 256, True)}),
                              (si, "subimage", {"size": (8, 128, True), "width": (1, 256, True)})):
            extra = sorted(set(d) - set(keys))
            if extra:
                raise _fail(path, f"'config.{name}' has unknown key(s) {extra}")
            for key, (lo, hi, integer) in keys.items():
                _num(d, key, path, lo, hi, where=f"config.{name}.{key}", integer=integer, required=False,
                     lo_open=not integer)
        _dict(card, "valid_for", path, required=False)
        cal = _dict(card, "calibration", path, required=False)
        if cal is not None:
            _num(cal, "subimage_offset_gain", path, 0.0, 10.0, where="calibration.subimage_offset_gain",
                 required=False, lo_open=True)
    return card


def read_card(path, kind: str | None = None) -> dict:
    """Read and validate the card at ``path``; adds ``card_path`` and ``weights_path`` (same stem)."""
    p = pathlib.Path(path)
    try:
        raw = p.read_bytes() if p.stat().st_size <= MAX_CARD_BYTES else None
    except FileNotFoundError:
        raise ModelNotFoundError(f"model card {str(p)!r} not found") from None
    except OSError as exc:
        raise _fail(p, f"cannot be read ({exc.strerror or exc})") from None
    if raw is None:
        raise _fail(p, f"is larger than {MAX_CARD_BYTES // 2**20} MiB")
    try:
        card = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _fail(p, "is not UTF-8 text") from None
    except ValueError as exc:
        raise _fail(p, f"is not valid JSON (line {getattr(exc, 'lineno', '?')}, column {getattr(exc, 'colno', '?')})") \
            from None
    validate_card(card, p, kind)
    card["weights_path"] = str(p.with_suffix(".safetensors"))
    card["card_path"] = str(p)
    return card


def write_card(card_path, card: dict) -> pathlib.Path:
    """Write a card, with ``weights_sha256`` of the weights next to it (same stem)."""
    p = pathlib.Path(card_path)
    card = {k: v for k, v in card.items() if k not in ("weights_path", "card_path", "fingerprint")}
    w = p.with_suffix(".safetensors")
    if w.exists():
        card["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    p.write_text(json.dumps(card, indent=1))
    return p


# --------------------------------------------------------------------------- files named by a card

def read_checked_file(card: dict, path, sha256: str, what: str) -> bytes:
    """Bytes of a file a card names, after checking its size and SHA-256."""
    p = pathlib.Path(path)
    cp = card.get("card_path", card.get("id", "<card>"))
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise _fail(cp, f"its {what} {p.name!r} is missing") from None
    if size > MAX_WEIGHTS_BYTES:
        raise _fail(cp, f"its {what} {p.name!r} is larger than {MAX_WEIGHTS_BYTES // 2**20} MiB")
    raw = p.read_bytes()
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise _fail(cp, f"its {what} {p.name!r} does not match the card's checksum (truncated, replaced or "
                        "tampered with)")
    return raw


def read_weights(card: dict, expected: dict | None = None, path=None, sha256: str | None = None,
                 what: str = "weights") -> dict:
    """The card's tensors (``{name: torch.Tensor}``) after the checksum and, when ``expected``
    (``{name: shape}``) is given, a check that exactly those tensors with those shapes are there."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    raw = read_checked_file(card, path or card["weights_path"], sha256 or card["weights_sha256"], what)
    cp = card.get("card_path", card.get("id", "<card>"))
    try:
        sd = load(raw)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise _fail(cp, f"its {what} could not be read as safetensors ({type(exc).__name__})") from None
    if expected is not None:
        check_tensors(sd, expected, cp, what)
    return sd


def check_tensors(sd: dict, expected: dict, card_path, what: str = "weights") -> None:
    """Raise :class:`ModelCardError` unless ``sd`` holds exactly the tensors of ``expected`` ({name: shape})."""
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected tensor(s) {extra[:3]}{' ...' if len(extra) > 3 else ''}")
        for k in wrong[:3]:
            parts.append(f"tensor {k!r} has shape {tuple(sd[k].shape)}, the card's architecture needs "
                         f"{tuple(expected[k])}")
        raise _fail(card_path, f"its {what} do not fit the card: " + "; ".join(parts))


# --------------------------------------------------------------------------- registry

def model_cards(kind: str = "pacbed", weights_dir=None) -> list[dict]:
    """All valid model cards of a kind (``"pacbed"`` or ``"disks"``), each with its ``weights_path``.
    Broken cards are skipped with a warning naming them."""
    d = pathlib.Path(weights_dir) if weights_dir else WEIGHTS_DIR
    cards = []
    for p in sorted(d.glob(f"{kind}_*.json")):
        try:
            cards.append(read_card(p, kind))
        except (ModelCardError, ModelNotFoundError) as exc:
            warnings.warn(f"skipping {exc}", stacklevel=2)
    return cards


def find_card(material: str, zone: str, energy_kv: float, convergence_mrad: float, kind: str = "pacbed",
              alpha_tolerance_mrad: float = 0.6, kv_tolerance: float = 1.0, weights_dir=None) -> dict:
    """Card of the shipped model for these conditions, or :class:`ModelNotFoundError` listing what exists."""
    zone = str(zone).strip("[] ")
    cards = model_cards(kind, weights_dir)
    for c in cards:
        if (c["material"].lower() == str(material).lower() and c["zone_axis"] == zone
                and abs(c["beam_energy_kv"] - energy_kv) <= kv_tolerance
                and abs(c["convergence_mrad"] - convergence_mrad) <= alpha_tolerance_mrad):
            return c
    have = ", ".join(f"{c['material']} [{c['zone_axis']}] {c['beam_energy_kv']:g} kV {c['convergence_mrad']:g} mrad" for c in cards) or "none"
    raise ModelNotFoundError(
        f"no {kind} model for {material} [{zone}] at {energy_kv:g} kV, {convergence_mrad:g} mrad; shipped: {have}. "
        "Train one with `diffkit train pacbed --material ... --convergence ...`."
    )
