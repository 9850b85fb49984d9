"""Bragg-disk detection in NBED patterns with the shipped neural networks.

Methods (``method=``)
---------------------
``"anchor-free"`` (default)
    :class:`~diffkit.strain.networks.AnchorFreeDiskNet` finds every disk in every pattern
    (objectness peaks; centre = anchor + soft-argmax offset, averaged over the neighbouring
    cells), then :class:`~diffkit.strain.networks.SubImageDiskNet` refines each centre in a
    24 x 24 px sub-image (``refine=True``).
``"subimage-cnn"``
    Seed 001's scheme: sub-images are cut at the positions predicted by a known lattice
    (``lattice=(G, origin, hk)``, e.g. the reference lattice of a scan) and the sub-image CNN
    measures each disk; the origin is first re-measured on the undiffracted disk, and disks
    that moved by more than a pixel are re-cut and measured again. Several times faster,
    for scans of one crystal orientation; :func:`diffkit.strain.map_strain` falls back to the
    anchor-free detector for patterns whose lattice fit fails.

Pixel coordinates are ``(x, y) = (column, row)``; the centre of pixel (0, 0) is (0, 0).
The networks are trained for disk radii of 3.5-8.5 px; with a calibration (convergence and
pixel size) larger disks are handled by summing ``n x n`` pixel blocks first.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInputError, ModelNotFoundError
from .networks import (AnchorFreeConfig, AnchorFreeDiskNet, SubImageConfig, SubImageDiskNet, fuse_batchnorm)

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "models" / "weights"
DEFAULT_MODEL = "disks_nbed"
MAX_RADIUS_PX = 8.5
MIN_RADIUS_PX = 3.5


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass
class DiskModels:
    """The two shipped networks, on one device, in inference mode, with their model card."""

    anchor_free: AnchorFreeDiskNet
    subimage: SubImageDiskNet
    card: dict
    device: torch.device
    source: str = ""  # the files' stem (path without suffix), so that dask workers can load the same model

    @property
    def subimage_size(self) -> int:
        return self.subimage.config.size

    @property
    def offset_gain(self) -> float:
        """Calibrated slope of the sub-image CNN's offsets vs the true offsets (model card).

        A network trained with a squared error shrinks its answers towards the sub-image
        centre (the posterior mean); dividing by the slope measured on held-out patterns removes
        that shrinkage, which would otherwise scale small displacements (e.g. 1 % strain) down.
        """
        return float(self.card.get("calibration", {}).get("subimage_offset_gain", 1.0))


_MODELS: dict = {}


def load_disk_models(name: str = DEFAULT_MODEL, weights_dir=None, device=None) -> DiskModels:
    """Load ``disks_<...>.safetensors`` + ``.json`` (no pickle; card schema, checksum and tensor shapes checked).

    Parameters
    ----------
    name : str
        Stem of the files in ``diffkit/models/weights`` (default ``"disks_nbed"``) or a path
        to either file.
    device : str or torch.device, optional
        Default CUDA when available, else CPU.
    """
    dev = torch.device(device) if device is not None else default_device()
    p = pathlib.Path(name)
    if p.suffix in (".json", ".safetensors"):
        stem = p.with_suffix("")
    else:
        stem = pathlib.Path(weights_dir) / name if weights_dir else WEIGHTS_DIR / name
    key = (str(stem), str(dev))
    if key in _MODELS:
        return _MODELS[key]
    card_path, w_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not card_path.exists() or not w_path.exists():
        have = sorted(x.stem for x in WEIGHTS_DIR.glob("disks_*.json"))
        raise ModelNotFoundError(f"no disk-detection model {str(stem)!r}; shipped: {have or 'none'}. "
                                 "Train one with diffkit.models.disks_training.train_disk_models().")
    from ..errors import ModelCardError
    from ..models.registry import read_card, read_weights

    card = read_card(card_path, "disks")  # schema and checksum checked; ModelCardError names the card
    af = AnchorFreeDiskNet(AnchorFreeConfig(**card["config"]["anchor_free"]))
    si = SubImageDiskNet(SubImageConfig(**card["config"]["subimage"]))
    expected = {f"af.{k}": tuple(v.shape) for k, v in af.state_dict().items()}
    expected.update({f"si.{k}": tuple(v.shape) for k, v in si.state_dict().items()})
    sd = read_weights(card, expected)
    try:
        af.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("af.")})
        si.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("si.")})
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ModelCardError(f"model card {str(card_path)!r}: its weights do not fit the card "
                             f"({str(exc).splitlines()[0][:200]})") from None
    af = fuse_batchnorm(af.eval()).to(dev)
    si = fuse_batchnorm(si.eval()).to(dev)
    m = DiskModels(af, si, card, dev, str(stem))
    _MODELS[key] = m
    return m


def _model_matches(card: dict, calibration, radius_px) -> bool:
    """Whether a specialised model's ``valid_for`` covers the calibration (material, zone axis,
    beam energy within 1 kV, convergence semi-angle and disk radius within the trained ranges)."""
    v = card.get("valid_for", {})
    if "material" not in v or calibration is None:
        return False
    if (calibration.material or "").lower() != v["material"].lower():
        return False
    if str(calibration.zone_axis or "").strip("[]") != str(v.get("zone_axis", "")):
        return False
    if calibration.beam_energy_kv is None or abs(calibration.beam_energy_kv - v["beam_energy_kv"]) > 1.0:
        return False
    a = calibration.convergence_mrad
    lo, hi = v["convergence_mrad"]
    if a is None or not lo <= a <= hi:
        return False
    r_lo, r_hi = v["disk_radius_px"]
    return radius_px is not None and r_lo <= radius_px <= r_hi


def select_disk_models(calibration=None, device=None, weights_dir=None) -> DiskModels:
    """The disk networks for a dataset: a model specialised for its crystal and optics when one
    is shipped, else the general one.

    A specialised model (``diffkit train disks --specialise``, e.g. ``disks_si001_200kv_2mrad``)
    is the general model's sub-image CNN fine-tuned on simulations of one crystal, zone axis,
    beam energy and convergence range; it measures disk centres in that crystal's dynamical
    disks with less bias. It is chosen when the calibration names the material and zone axis and
    its beam energy (kV), convergence semi-angle (mrad) and disk radius (px, after the binning
    of large disks) lie in the model card's ``valid_for`` ranges.

    Examples
    --------
    >>> from diffkit.calibration import Calibration
    >>> select_disk_models(Calibration(material="Si", zone_axis="001", beam_energy_kv=200,
    ...                                convergence_mrad=2.0, pixel_size_mrad=0.4)).card["id"]  # doctest: +SKIP
    'disks_si001_200kv_2mrad'
    """
    folder = pathlib.Path(weights_dir) if weights_dir else WEIGHTS_DIR
    r, nbin = _radius_and_binning(calibration, None)
    r = None if r is None else r / nbin
    from ..models.registry import model_cards

    for card in model_cards("disks", folder):  # broken cards are skipped with a warning
        if _model_matches(card, calibration, r):
            return load_disk_models(pathlib.Path(card["card_path"]).stem, weights_dir=folder, device=device)
    return load_disk_models(DEFAULT_MODEL, weights_dir=weights_dir, device=device)


@dataclasses.dataclass
class DiskDetections:
    """Disks found in a batch of B patterns (padded to K per pattern).

    Attributes
    ----------
    positions : (B, K, 2) float64, disk centres (x, y) px; NaN where not valid.
    score : (B, K) objectness probability (1 for lattice-predicted disks).
    radius_px : (B, K) disk radius (px).
    intensity : (B, K) background-subtracted counts in the disk's sub-image (fit weights).
    valid : (B, K) bool.
    refined : (B, K) bool, centre measured by the sub-image CNN.
    edge : (B, K) bool, disk too close to the detector edge for a full sub-image.
    status : (B,) int: 0 ok, 2 empty/blank/non-finite pattern, 4 no disk found.
    sigma_px : (B, K) standard error of the centre from the edge fit (px); NaN when not fitted.
    """

    positions: np.ndarray
    score: np.ndarray
    radius_px: np.ndarray
    intensity: np.ndarray
    valid: np.ndarray
    refined: np.ndarray
    edge: np.ndarray
    status: np.ndarray
    sigma_px: np.ndarray | None = None

    def __post_init__(self):
        if self.sigma_px is None:
            self.sigma_px = np.full(self.positions.shape[:2], np.nan)

    def __len__(self):
        return len(self.positions)

    def pattern(self, i: int) -> dict:
        """Valid disks of pattern ``i`` as a dict of arrays."""
        v = self.valid[i]
        return {f: getattr(self, f)[i][v] for f in ("positions", "score", "radius_px", "intensity", "refined", "edge",
                                                    "sigma_px")}

    @staticmethod
    def concatenate(items):
        K = max(d.positions.shape[1] for d in items)

        def pad(a, fill):
            if a.shape[1] == K:
                return a
            sh = list(a.shape)
            sh[1] = K - a.shape[1]
            return np.concatenate([a, np.full(sh, fill, a.dtype)], 1)

        fields = {"positions": np.nan, "score": 0.0, "radius_px": np.nan, "intensity": 0.0, "valid": False,
                  "refined": False, "edge": False, "sigma_px": np.nan}
        kw = {f: np.concatenate([pad(getattr(d, f), fill) for d in items]) for f, fill in fields.items()}
        kw["status"] = np.concatenate([d.status for d in items])
        return DiskDetections(**kw)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _as_tensor(patterns, device) -> tuple[torch.Tensor, np.ndarray]:
    """(B, H, W) float32 tensor with non-finite frames zeroed, and the per-pattern status."""
    x = patterns if torch.is_tensor(patterns) else torch.from_numpy(np.ascontiguousarray(np.asarray(patterns)))
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise BadInputError(f"patterns must be (H, W) or (B, H, W), got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)
    fin = torch.isfinite(x).all(dim=(1, 2))
    x = torch.where(torch.isfinite(x), x, torch.zeros((), device=x.device))
    mx = x.amax(dim=(1, 2))
    mn = x.amin(dim=(1, 2))
    bad = (~fin) | (mx <= 0) | (mx <= mn)
    status = np.where(bad.cpu().numpy(), 2, 0).astype(np.int8)
    return x, status


def _bin(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    B, H, W = x.shape
    Hn, Wn = H // n * n, W // n * n
    return F.avg_pool2d(x[:, None, :Hn, :Wn], n)[:, 0] * (n * n)


def crop_subimages(x: torch.Tensor, b_idx, centres, size: int = 24):
    """Cut ``size`` x ``size`` sub-images around approximate centres.

    The window of a centre ``(cx, cy)`` starts at ``(floor(cx) - size/2 + 1, floor(cy) - size/2 + 1)``,
    so its centre is ``(floor(cx) + 0.5, floor(cy) + 0.5)``: the sub-image CNN returns the
    disk centre relative to that point. Windows that leave the detector are zero-filled and
    flagged.

    Returns ``(crops (M, 1, S, S), window_centres (M, 2) float64, inside (M,) bool)``.
    """
    B, H, W = x.shape
    c = np.asarray(centres, float).reshape(-1, 2)
    fl = np.floor(c).astype(np.int64)
    o = fl - (size // 2 - 1)
    ar = np.arange(size)
    ix = o[:, 0, None] + ar
    iy = o[:, 1, None] + ar
    inside = (o[:, 0] >= 0) & (o[:, 1] >= 0) & (o[:, 0] + size <= W) & (o[:, 1] + size <= H)
    ixc, iyc = np.clip(ix, 0, W - 1), np.clip(iy, 0, H - 1)
    flat = (np.asarray(b_idx, np.int64)[:, None, None] * H + iyc[:, :, None]) * W + ixc[:, None, :]
    crops = x.reshape(-1)[torch.as_tensor(flat, device=x.device)]
    if not inside.all():
        okm = ((ix >= 0) & (ix < W))[:, None, :] & ((iy >= 0) & (iy < H))[:, :, None]
        crops = crops * torch.as_tensor(okm, device=x.device, dtype=crops.dtype)
    return crops[:, None], fl + 0.5, inside


def _crop_intensity(crops: torch.Tensor, offsets: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Background-subtracted counts inside radius + 1 px of the centre of each crop."""
    M, _, S, _ = crops.shape
    if M == 0:
        return np.zeros(0)
    ar = torch.arange(S, dtype=torch.float32, device=crops.device) - (S / 2 - 0.5)
    off = torch.as_tensor(offsets, dtype=torch.float32, device=crops.device)
    r = torch.as_tensor(radius, dtype=torch.float32, device=crops.device)
    dx = ar[None, None, :] - off[:, 0, None, None]
    dy = ar[None, :, None] - off[:, 1, None, None]
    inside = (dx**2 + dy**2) <= (r[:, None, None] + 1) ** 2
    border = torch.zeros(S, S, dtype=torch.bool, device=crops.device)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    c = crops[:, 0]
    bg = c[:, border].median(dim=1).values
    val = ((c - bg[:, None, None]) * inside).sum(dim=(1, 2))
    return val.clamp_min(1e-3).double().cpu().numpy()


# --------------------------------------------------------------------------------------
# anchor-free detection
# --------------------------------------------------------------------------------------


def _decode(net: AnchorFreeDiskNet, obj, off, logr, threshold: float, max_disks: int):
    s = net.stride
    prob = torch.sigmoid(obj)
    B, h, w = prob.shape
    d = net.soft_argmax(off)  # (B, 2, h, w)
    ax = torch.arange(w, device=prob.device, dtype=torch.float32) * s + (s - 1) / 2
    ay = torch.arange(h, device=prob.device, dtype=torch.float32) * s + (s - 1) / 2
    cx = ax[None, None, :] + d[:, 0]
    cy = ay[None, :, None] + d[:, 1]
    # average each peak's prediction with its neighbours' (weighted by objectness)
    unf = lambda t: F.unfold(t[:, None], 3, padding=1).view(B, 9, h, w)  # noqa: E731
    pn, xn, yn, rn = unf(prob), unf(cx), unf(cy), unf(logr)
    close = ((xn - cx[:, None]) ** 2 + (yn - cy[:, None]) ** 2) < 1.5**2
    wgt = pn * close
    ws = wgt.sum(1).clamp_min(1e-12)
    mx = (wgt * xn).sum(1) / ws
    my = (wgt * yn).sum(1) / ws
    mr = torch.exp((wgt * rn).sum(1) / ws)
    peak = (prob == F.max_pool2d(prob[:, None], 3, 1, 1)[:, 0]) & (prob > threshold)
    return peak, prob, mx, my, mr


def _anchor_free(models: DiskModels, x: torch.Tensor, threshold: float, max_disks: int):
    net = models.anchor_free
    B, H, W = x.shape
    m = 2 * net.stride
    Hp, Wp = math.ceil(H / m) * m, math.ceil(W / m) * m
    xp = F.pad(x, (0, Wp - W, 0, Hp - H)) if (Hp, Wp) != (H, W) else x
    obj, off, logr = net(xp[:, None])
    peak, prob, mx, my, mr = _decode(net, obj, off, logr, threshold, max_disks)
    inside = (mx > -0.5) & (mx < W - 0.5) & (my > -0.5) & (my < H - 0.5)
    peak &= inside
    n = peak.sum(dim=(1, 2))
    K = int(min(max(int(n.max().item()) if B else 0, 1), max_disks))
    score = torch.where(peak, prob, torch.zeros((), device=prob.device)).flatten(1)
    top, idx = score.topk(min(K, score.shape[1]), dim=1)
    valid = top > 0
    g = lambda t: t.flatten(1).gather(1, idx)  # noqa: E731
    pos = torch.stack([g(mx), g(my)], -1)
    return pos.double().cpu().numpy(), top.cpu().numpy(), g(mr).cpu().numpy(), valid.cpu().numpy()


SUBIMAGE_TTA = 2


def _subimage_tta(net, cs: torch.Tensor, n_views: int | None = None) -> torch.Tensor:
    """Sub-image CNN offsets averaged over mirror images of each sub-image (test-time symmetrisation).

    ``n_views`` 2: the sub-image and its 180-degree rotation (default); 4: also both single
    mirrors. The mirrored offsets are mapped back; averaging cancels the network's even-order
    errors (centre error -10 % with 2 views, a further -3 % with 4 at twice the cost).
    """
    n_views = n_views or SUBIMAGE_TTA
    n = len(cs)
    if n_views == 4:
        views = [cs, cs.flip(-1), cs.flip(-2), cs.flip(-1, -2)]
        signs = [[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]]
    else:
        views = [cs, cs.flip(-1, -2)]
        signs = [[1.0, 1.0], [-1.0, -1.0]]
    o = net(torch.cat(views))
    sx = torch.tensor(signs, device=cs.device, dtype=o.dtype)
    return (o.view(len(views), n, 2) * sx[:, None, :]).mean(0)


def _refine(models: DiskModels, x: torch.Tensor, b_idx, pos, radius, passes: int = 2):
    """Sub-image CNN refinement of centres ``pos`` (M, 2) in patterns ``b_idx``; returns pos, inside, intensity."""
    S = models.subimage_size
    pos = np.asarray(pos, float).copy()
    todo = np.arange(len(pos))
    inside_all = np.zeros(len(pos), bool)
    inten = np.zeros(len(pos))
    for p in range(passes):
        if len(todo) == 0:
            break
        crops, wc, inside = crop_subimages(x, b_idx[todo], pos[todo], S)
        sel = np.nonzero(inside)[0]
        if p == 0:
            inside_all[todo] = inside
        if len(sel) == 0:
            break
        cs = crops[torch.as_tensor(sel, device=x.device)]
        off = _subimage_tta(models.subimage, cs).double().cpu().numpy() / models.offset_gain
        new = wc[sel] + off
        moved = np.abs(np.floor(new) - np.floor(pos[todo[sel]])).max(1) > 0
        pos[todo[sel]] = new
        inten[todo[sel]] = _crop_intensity(cs, off, radius[todo[sel]])
        # re-cut where the centre left the window's central pixel (the CNN is most precise there)
        todo = todo[sel][moved | (np.abs(off).max(1) > 1.0)]
    return pos, inside_all, inten


def _polish(models, x, b_idx, pos, radius, inten):
    """Edge-model fit of every disk (see :mod:`diffkit.strain.diskfit`): radius and edge width from
    the brightest disk of each pattern, then each disk's centre with those fixed.

    Returns ``pos (M, 2), sigma (M,), ok (M,)``.
    """
    from .diskfit import fit_disks

    S = models.subimage_size
    pos = np.asarray(pos, float).copy()
    M = len(pos)
    sig = np.full(M, np.nan)
    ok = np.zeros(M, bool)
    if M == 0:
        return pos, sig, ok
    crops, wc, inside = crop_subimages(x, b_idx, pos, S)
    c0 = pos - wc + (S / 2 - 0.5)
    # 1) brightest disk of each pattern: radius and edge width free
    order = np.lexsort((-inten, b_idx))
    first = order[np.r_[True, b_idx[order][1:] != b_idx[order][:-1]]]
    first = first[inside[first]]
    r_pat = {}
    if len(first):
        t = torch.as_tensor(first, device=x.device)
        c, r, s, okf, sg = fit_disks(crops[t], c0[first], radius[first], 0.8, fit_radius=True)
        for j, i in enumerate(first):
            if okf[j]:
                r_pat[int(b_idx[i])] = (r[j], s[j])
    # 2) every disk with that pattern's radius and edge width
    rr = np.array([r_pat.get(int(b), (radius[i], 0.8))[0] for i, b in enumerate(b_idx)])
    ss = np.array([r_pat.get(int(b), (radius[i], 0.8))[1] for i, b in enumerate(b_idx)])
    sel = np.nonzero(inside)[0]
    if len(sel):
        t = torch.as_tensor(sel, device=x.device)
        c, _, _, oks, sg = fit_disks(crops[t], c0[sel], rr[sel], ss[sel], fit_radius=False)
        good = oks & (np.abs(c - c0[sel]).max(1) < 1.5)
        pos[sel[good]] = c[good] + wc[sel[good]] - (S / 2 - 0.5)
        sig[sel[good]] = sg[good]
        ok[sel[good]] = True
    return pos, sig, ok


def normalise_refine(refine, allowed):
    """``refine`` with ``True`` -> ``"cnn"`` and ``False``/``"none"`` -> ``None``, checked against ``allowed``."""
    if refine is True:
        refine = "cnn"
    if refine in (False, "none"):
        refine = None
    if refine not in allowed:
        raise BadInputError(f"refine must be one of {tuple(allowed)}, got {refine!r}")
    return refine


def _radius_and_binning(calibration, radius_px):
    r = None
    if radius_px is not None:
        r = float(radius_px)
    elif calibration is not None and calibration.convergence_mrad and calibration.pixel_size_mrad:
        r = calibration.convergence_mrad / calibration.pixel_size_mrad
    n = 1 if r is None else max(1, int(math.ceil(r / MAX_RADIUS_PX - 1e-9)))
    return r, n


@torch.inference_mode()
def detect_disks(patterns, calibration=None, method: str = "anchor-free", *, refine="cnn",
                 lattice=None, threshold: float = 0.6, max_disks: int = 64, radius_px: float | None = None,
                 models: DiskModels | None = None, batch: int = 256, device=None) -> DiskDetections:
    """Find Bragg-disk centres in NBED patterns.

    Parameters
    ----------
    patterns : array or tensor (B, H, W) or (H, W)
        Detector counts (any gain). Non-finite or blank frames get status 2 and no disks.
    calibration : diffkit.calibration.Calibration, optional
        With ``convergence_mrad`` and ``pixel_size_mrad`` the disk radius (px) is known; disks
        larger than 8.5 px radius are then detected on binned patterns (positions are always
        returned in unbinned px).
    method : {"anchor-free", "subimage-cnn"}
        See the module docstring.
    refine : {"cnn", "fit", None}
        ``"cnn"`` (default): refine the anchor-free centres with the sub-image CNN; ``"fit"``:
        then polish them with the edge-model fit of :mod:`diffkit.strain.diskfit` (gives a
        standard error per disk; better than the CNN only for nearly uniform disks, and ~5x
        slower); ``None``: anchor-free centres only. (``True`` means ``"cnn"``.) For
        ``"subimage-cnn"``, ``None`` behaves like ``"cnn"``.
    lattice : tuple (G (2, 2), origin (2,), hk (K, 2))
        For ``"subimage-cnn"``: lattice (columns px) and the disk indices to measure.
    threshold : float
        Objectness threshold of the anchor-free detector.
    max_disks : int
        At most this many disks per pattern (highest objectness first).
    radius_px : float, optional
        Disk radius (px) if known (overrides the calibration).
    models : DiskModels, optional
        Default :func:`load_disk_models`.
    batch : int
        Patterns per network call.

    Returns
    -------
    DiskDetections
    """
    if method not in ("anchor-free", "subimage-cnn"):
        raise BadInputError(f"method must be 'anchor-free' or 'subimage-cnn', got {method!r}")
    refine = normalise_refine(refine, ("fit", "cnn", None))
    models = models or select_disk_models(calibration, device=device)
    dev = models.device
    r_cal, nbin = _radius_and_binning(calibration, radius_px)
    n_all = len(patterns) if np.ndim(patterns) == 3 else 1
    outs = []
    for s in range(0, n_all, batch):
        chunk = patterns[s:s + batch] if n_all > 1 or np.ndim(patterns) == 3 else patterns
        x, status = _as_tensor(chunk, dev)
        xb = _bin(x, nbin)
        if method == "anchor-free":
            outs.append(_detect_af(models, x, xb, nbin, status, threshold, max_disks, refine, r_cal))
        else:
            if lattice is None:
                raise BadInputError("method='subimage-cnn' needs lattice=(G, origin, hk), e.g. from a reference pattern")
            outs.append(_detect_lattice(models, x, xb, nbin, status, lattice, r_cal, refine))
    return DiskDetections.concatenate(outs)


def _detect_af(models, x, xb, nbin, status, threshold, max_disks, refine, r_cal):
    pos, score, rad, valid = _anchor_free(models, xb, threshold, max_disks)
    pos = (pos + 0.5) * nbin - 0.5  # binned px -> px
    rad = rad * nbin
    if r_cal is not None:
        rad = np.full_like(rad, r_cal)
    valid &= (status == 0)[:, None]
    b, k = np.nonzero(valid)
    refined = np.zeros(valid.shape, bool)
    edge = np.zeros(valid.shape, bool)
    inten = np.zeros(valid.shape)
    sigma = np.full(valid.shape, np.nan)
    if len(b):
        if refine:
            p, inside, it = _refine(models, xb, b, (pos[b, k] + 0.5) / nbin - 0.5, rad[b, k] / nbin)
            if refine == "fit":
                p2, sg, okp = _polish(models, xb, b, p, rad[b, k] / nbin, it)
                p = np.where(okp[:, None], p2, p)
                sigma[b, k] = sg * nbin
            p = (p + 0.5) * nbin - 0.5
            pos[b[inside], k[inside]] = p[inside]
            refined[b[inside], k[inside]] = True
            edge[b, k] = ~inside
            inten[b, k] = it
            if (~inside).any():
                bo, ko = b[~inside], k[~inside]
                crops, wc, _ = crop_subimages(xb, bo, (pos[bo, ko] + 0.5) / nbin - 0.5, models.subimage_size)
                inten[bo, ko] = _crop_intensity(crops, (pos[bo, ko] + 0.5) / nbin - 0.5 - wc, rad[bo, ko] / nbin)
        else:
            crops, wc, inside = crop_subimages(xb, b, (pos[b, k] + 0.5) / nbin - 0.5, models.subimage_size)
            edge[b, k] = ~inside
            inten[b, k] = _crop_intensity(crops, (pos[b, k] + 0.5) / nbin - 0.5 - wc, rad[b, k] / nbin)
    pos[~valid] = np.nan
    st = status.copy()
    st[(st == 0) & (valid.sum(1) == 0)] = 4
    return DiskDetections(pos, np.where(valid, score, 0.0), np.where(valid, rad, np.nan), inten, valid, refined,
                          edge, st, sigma)


def _detect_lattice(models, x, xb, nbin, status, lattice, r_cal, refine="cnn"):
    G, origin, hk = lattice
    G = np.asarray(G, float)
    hk = np.asarray(hk, int).reshape(-1, 2)
    B = len(x)
    r = r_cal if r_cal is not None else 5.0
    to_b = lambda p: (p + 0.5) / nbin - 0.5  # noqa: E731
    from_b = lambda p: (p + 0.5) * nbin - 0.5  # noqa: E731
    # 1) origin per pattern: measure the (0, 0) disk
    o = np.broadcast_to(np.asarray(origin, float), (B, 2)).copy()
    bidx = np.arange(B)
    for _ in range(2):
        p, inside, _ = _refine(models, xb, bidx, to_b(o), np.full(B, r / nbin), passes=1)
        o = np.where(inside[:, None], from_b(p), o)
    # 2) every disk at its predicted position
    pred = o[:, None, :] + np.einsum("ij,kj->ki", G, hk)[None]  # (B, K, 2)
    K = len(hk)
    b = np.repeat(np.arange(B), K)
    k = np.tile(np.arange(K), B)
    p, inside, it = _refine(models, xb, b, to_b(pred[b, k]), np.full(len(b), r / nbin), passes=2)
    sigma = np.full(len(b), np.nan)
    if refine == "fit":
        p2, sg, okp = _polish(models, xb, b, p, np.full(len(b), r / nbin), it)
        p = np.where(okp[:, None], p2, p)
        sigma = sg * nbin
    pos = from_b(p).reshape(B, K, 2)
    inside = inside.reshape(B, K)
    onchip = ((pred[..., 0] >= 0) & (pred[..., 0] <= x.shape[2] - 1) & (pred[..., 1] >= 0)
              & (pred[..., 1] <= x.shape[1] - 1))
    valid = inside & onchip & (status == 0)[:, None]
    pos[~valid] = np.nan
    st = status.copy()
    st[(st == 0) & (valid.sum(1) == 0)] = 4
    return DiskDetections(pos, valid.astype(float), np.where(valid, r, np.nan), it.reshape(B, K) * valid, valid,
                          valid.copy(), ~inside & onchip, st, np.where(valid, sigma.reshape(B, K), np.nan))
