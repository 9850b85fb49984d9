"""Independent PACBED test sets from frozen-phonon multislice (physics no network was trained on).

Each tilt of a test set is one multislice run (:mod:`diffkit.sim.multislice`) with its own
phonon seed and its own Debye-Waller factors (each site's B drawn within ±``b_jitter`` of the
crystal's value), so the set differs from the Bloch-wave training library in its physics
(no ``U' = kappa U``, no ZOLZ approximation, thermal diffuse scattering from the phonons
themselves), in its Debye-Waller values and in every random draw. Thicknesses are whole unit
cells drawn uniformly over the range; the patterns are binned onto the library's pixel grid and
put on raw detector frames with the held-out detector draws of
:func:`diffkit.models.pacbed_eval.render_test_set`. The file is a plain ``.npz`` (no pickle)
with the truths and a JSON record of every setting; every finished tilt is cached, so an
interrupted build resumes.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from .crystals import get_crystal
from .multislice import MultisliceSpec, build_multislice_pacbeds, to_pixel_grid

TESTSET_FORMAT = "diffkit-pacbed-testset-v1"


@dataclasses.dataclass(frozen=True)
class MultisliceTestSetSpec:
    """Settings of a multislice PACBED test set (units: nm, mrad, Å, kV).

    The default seeds (9xxxxx) are used by no training run.
    """

    material: str = "SrTiO3"
    zone: str = "001"
    energy_kv: float = 200.0
    convergence_mrad: float = 13.6
    thickness_nm: tuple = (2.0, 118.0)
    tilt_max_mrad: float = 3.5
    n_tilts: int = 5
    thicknesses_per_tilt: int = 8
    b_jitter: float = 0.2
    cells: int = 6
    sampling_A: float = 0.09
    n_phonons: int = 4
    scan_per_cell: int | None = None
    seed: int = 910001
    out_px: int = 128
    pixel_ratio: float = 0.7

    def library_grid(self):
        """(n_px, pixel_size_mrad, disk_radius_px) of the Bloch library this set is rendered like."""
        from .pacbed import LibrarySpec

        ls = LibrarySpec(crystal=get_crystal(self.material, self.zone), energy_kv=self.energy_kv,
                         convergence_mrad=self.convergence_mrad, thickness_nm=(1.0,))
        return ls.n_px, ls.pixel_size_mrad, ls.disk_radius_px


def _tilt_draws(spec: MultisliceTestSetSpec):
    """Per tilt: (tilt (x, y) mrad, per-site B factors, phonon seed); reproducible from ``spec.seed``."""
    rng = np.random.default_rng(spec.seed)
    crystal = get_crystal(spec.material, spec.zone)
    out = []
    for i in range(spec.n_tilts):
        r = spec.tilt_max_mrad * np.sqrt(rng.uniform(0, 1))
        phi = rng.uniform(0, 2 * np.pi)
        scale = rng.uniform(1 - spec.b_jitter, 1 + spec.b_jitter, len(crystal.sites))
        out.append(((float(r * np.cos(phi)), float(r * np.sin(phi))), crystal.scaled_debye_waller(scale),
                    int(spec.seed * 100 + i)))
    return out


def build_multislice_testset(spec: MultisliceTestSetSpec, out=None, cache_dir=None, progress: bool = True,
                             device=None) -> dict:
    """Build (or resume) a multislice test set; returns the test-set dict and writes ``out`` (.npz) if given.

    The dict has the keys of :func:`diffkit.models.pacbed_eval.make_test_set` (raw frames and truths)
    plus ``clean`` (noise-free patterns on the library grid), ``tilt_index`` and ``meta`` (JSON text).
    """
    from ..models.pacbed_eval import render_test_set

    n_px, px, radius = spec.library_grid()
    rng = np.random.default_rng(spec.seed + 1)
    t_lo, t_hi = spec.thickness_nm
    clean, t_all, tx_all, ty_all, idx, record = [], [], [], [], [], []
    for i, (tilt, crystal, pseed) in enumerate(_tilt_draws(spec)):
        ms = MultisliceSpec(crystal=crystal, energy_kv=spec.energy_kv, convergence_mrad=spec.convergence_mrad,
                            cells=(spec.cells, spec.cells), sampling_A=spec.sampling_A, n_phonons=spec.n_phonons,
                            phonon_seed=pseed, scan_per_cell=spec.scan_per_cell,
                            max_angle_mrad=n_px * px / 2 * 1.05)
        want = np.sort(rng.uniform(t_lo, t_hi, spec.thicknesses_per_tilt))
        lib = build_multislice_pacbeds(ms, [tilt], want, cache_dir=cache_dir, progress=progress, device=device)
        pats = to_pixel_grid(lib["pattern"].values[0], lib.ky_mrad.values, lib.kx_mrad.values, n_px, px)
        clean.append(pats)
        t_all.append(lib.thickness_nm.values)
        tx_all.append(np.full(len(pats), tilt[0]))
        ty_all.append(np.full(len(pats), tilt[1]))
        idx.append(np.full(len(pats), i))
        record.append({"tilt_mrad": tilt, "b_iso": {f"{s.symbol}{j}": s.b_iso for j, s in enumerate(crystal.sites)},
                       "phonon_seed": pseed, "multislice_key": ms.key()})
    clean = np.concatenate(clean).astype(np.float32)
    test = render_test_set(clean, np.concatenate(t_all), np.concatenate(tx_all), np.concatenate(ty_all), rng,
                           spec.seed + 2, radius, px, spec.out_px, spec.pixel_ratio)
    test["clean"] = clean
    test["tilt_index"] = np.concatenate(idx)
    test["meta"] = json.dumps({"format": TESTSET_FORMAT, "physics": "multislice", "spec": dataclasses.asdict(spec),
                               "library_pixel_size_mrad": px, "tilts": record})
    if out is not None:
        save_testset(test, out)
    return test


def save_testset(test: dict, path) -> pathlib.Path:
    """Write a test-set dict as a pickle-free ``.npz``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in test.items() if k != "meta"}
    np.savez_compressed(path, meta=np.asarray(test.get("meta", "{}")), **arrays)
    return path


def load_testset(path) -> dict:
    """Read a test set written by :func:`save_testset`; clear errors for missing or foreign files."""
    from ..errors import BadInputError

    path = pathlib.Path(path)
    if not path.is_file():
        raise BadInputError(f"test set {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            test = {k: z[k] for k in z.files}
    except Exception as e:  # a truncated or foreign file
        raise BadInputError(f"{path} is not a readable diffkit test set ({type(e).__name__}: {e})") from None
    meta = json.loads(str(test.pop("meta", "{}")))
    if meta.get("format") != TESTSET_FORMAT:
        raise BadInputError(f"{path} is not a diffkit PACBED test set (format {meta.get('format')!r})")
    need = ("patterns", "thickness_nm", "tilt_x_mrad", "tilt_y_mrad", "rotation_deg", "center_y_px",
            "center_x_px", "disk_radius_px", "dose")
    missing = [k for k in need if k not in test]
    if missing:
        raise BadInputError(f"test set {path} lacks {missing}")
    test["pixel_size_mrad"] = float(test["pixel_size_mrad"])
    test["meta"] = meta
    return test
