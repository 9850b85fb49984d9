"""Registry of the models shipped inside diffkit, keyed by (material, zone, kV, alpha).

Weights are stored as safetensors (no pickle, nothing executed on load) next to a JSON
model card with the training data, seed, configuration and held-out accuracy.
"""
from __future__ import annotations

import json
import pathlib

from ..errors import ModelNotFoundError

WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"


def model_cards(kind: str = "pacbed", weights_dir=None) -> list[dict]:
    """All model cards of a kind (``"pacbed"`` or ``"disks"``), each with its ``weights_path``."""
    d = pathlib.Path(weights_dir) if weights_dir else WEIGHTS_DIR
    cards = []
    for p in sorted(d.glob(f"{kind}_*.json")):
        card = json.loads(p.read_text())
        card["weights_path"] = str(p.with_suffix(".safetensors"))
        card["card_path"] = str(p)
        cards.append(card)
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
