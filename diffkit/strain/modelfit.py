"""Physics-model refinement of NBED lattices: fit each pattern with its own simulated disks.

The networks find the disks and a lattice fit gives each pattern's origin and lattice vectors
to ~0.05 px per disk. What limits them at strongly dynamical conditions (thick crystals, large
convergence angles) is the contrast *inside* the disks (Pendellösung fringes that move with
thickness and tilt), which any centre estimator that does not know the crystal reads partly as
a displacement. :func:`refine_lattice_model` removes that: it fits every pattern with a model
of its disks rendered from the crystal's Bloch-wave disk-intensity table
(:class:`diffkit.strain.nbed.DiskIntensityTable`), so the interior contrast is explained by
thickness and tilt instead of by the disk positions.

Model of disk ``n`` (table beam ``g_n``, mrad) in pattern ``b``::

    counts(x) = a_bn * blur_sigma[U](x) + h_bn * blur_2.5px[U](x) + c_bn
    U(x)      = I_n(q(x), t) * aperture(x)
    position  = origin + L g_n                     (L: 2x2, px per mrad)
    q(x)      = D0^-1 (x - position) + tilt        (incident direction, mrad)
    aperture  = area of the pixel inside |D0^-1 (x - position)| < alpha   (straight-edge approximation)

with ``D0`` the reference map from mrad to px (the lattice of the reference region: detector
rotation, pixel size, and any distortion). Free per pattern: origin (2), ``L`` (4), thickness
``t`` (nm), tilt (2, mrad), convergence semi-angle ``alpha`` (mrad), blur ``sigma`` (px) and,
linear, per disk a scale ``a``, the amount ``h`` of a broad point-spread component (detector
tails) and a background ``c`` (so the fit does not rely on absolute intensities or on a known
PSF). The strained crystal's intensities come from the table's strain derivatives at the current
``L``. Poisson-weighted Levenberg-Marquardt with the linear parameters eliminated per disk; the
Jacobian uses the chain rule for the positions (all disks shifted at once) and forward
differences for the rest, batched over patterns. Thickness and tilt start from grid searches
on the brightest disks; patterns left with a high chi-square are restarted from a finer grid.

The fitted lattice vectors are returned in the caller's basis; thickness and tilt come out
too (they are by-products, as good as the table's physics).

This needs the crystal (material, zone axis, beam energy): the table is computed once
(minutes) and cached, see :func:`diffkit.strain.nbed.disk_intensity_table`.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as Fnn

from ..errors import BadInputError, MissingCalibrationError

__all__ = ["TableMatch", "match_table", "table_for_calibration", "refine_lattice_model"]

_N_NONLIN = 11  # cx, cy, L00, L01, L10, L11, t, tilt_x, tilt_y, alpha, sigma
HALO_PX = 2.5  # width (Gaussian sigma, px) of the broad detector-PSF component, amount fitted per disk


@dataclasses.dataclass
class TableMatch:
    """How the data's lattice basis relates to a disk-intensity table.

    Attributes
    ----------
    beams : (K,) int
        Table beam of each data disk (``-1``: not in the table).
    basis_mrad : (2, 2)
        The data basis expressed in the table's deflections (columns, mrad): ``G = L basis_mrad``.
    D0 : (2, 2)
        Reference map mrad -> px (``L`` of the guess lattice).
    origin_shift : (2,) int
        Index, in the data's indexing, of the undiffracted (000) disk (the data's origin disk
        can be another one when the detector missed the 000 disk).
    """

    beams: np.ndarray
    basis_mrad: np.ndarray
    D0: np.ndarray
    origin_shift: tuple = (0, 0)


def table_for_calibration(calibration, spec=None):
    """The cached disk-intensity table of the calibration's crystal (material, zone axis, kV)."""
    from ..sim.crystals import get_crystal
    from .nbed import NBEDTableSpec, disk_intensity_table

    if spec is None:
        missing = [n for n in ("material", "zone_axis", "beam_energy_kv") if not getattr(calibration, n, None)]
        if calibration is None or missing:
            raise MissingCalibrationError("refine='model' needs the crystal and beam energy in the calibration "
                                          f"(missing: {', '.join(missing) if calibration is not None else 'calibration'})")
        spec = NBEDTableSpec(crystal=get_crystal(calibration.material, calibration.zone_axis),
                             energy_kv=float(calibration.beam_energy_kv))
    return disk_intensity_table(spec)


def _reduced_basis_of(points):
    from .mapping import _basis_from_points

    return _basis_from_points(points, -np.linalg.norm(points, axis=1))


def match_table(table, G, hk, pixel_size_mrad: float | None = None, origin_shift=(0, 0)) -> TableMatch:
    """Relate the data lattice ``G`` (columns px) and disk indices ``hk`` (K, 2) to ``table``'s beams.

    Among integer changes of basis ``P`` (entries -1..1, det +-1), the one that makes the map
    ``L = G (B_t P)^-1`` closest to a rotation times a scale is chosen (proper rotations before
    mirrored ones); for crystals whose projection has the lattice's symmetry every such choice
    gives the same disk intensities.
    """
    g = np.asarray(table.g_mrad, float)
    Bt = _reduced_basis_of(g)
    ht = np.rint(np.linalg.solve(Bt, g.T).T).astype(int)
    lookup = {(int(a), int(b)): i for i, (a, b) in enumerate(ht)}
    G = np.asarray(G, float)
    best = None
    for e in itertools.product((-1, 0, 1), repeat=4):
        P = np.array(e, float).reshape(2, 2)
        if abs(abs(np.linalg.det(P)) - 1) > 1e-9:
            continue
        L = G @ np.linalg.inv(Bt @ P)
        s = np.linalg.svd(L, compute_uv=False)
        score = (s[0] / s[1] - 1) + (0.0 if np.linalg.det(L) > 0 else 1e-6)
        if best is None or score < best[0] - 1e-12:
            best = (score, P, L)
    score, P, L = best
    if score > 0.05:
        raise BadInputError(f"the disk lattice does not match the table's crystal ({table.spec.crystal.name} "
                            f"[{table.spec.crystal.zone}]): best map is {100 * score:.0f} % anisotropic")
    if pixel_size_mrad:
        scale = 1.0 / math.sqrt(abs(np.linalg.det(L)))
        if abs(scale / pixel_size_mrad - 1) > 0.1:
            raise BadInputError(f"the lattice spacing implies {scale:.3f} mrad/px, the calibration says "
                                f"{pixel_size_mrad:.3f}; wrong crystal, beam energy or pixel size?")
    sh = np.asarray(origin_shift, int).reshape(2)
    idx = np.rint((np.asarray(hk, float) - sh) @ P.T).astype(int)
    beams = np.array([lookup.get((int(a), int(b)), -1) for a, b in idx])
    return TableMatch(beams, Bt @ P, L, (int(sh[0]), int(sh[1])))


class _DiskModel:
    """Batched renderer of disk windows (torch, float32)."""

    def __init__(self, table, beams, D0, device, halo_px: float = 0.0):
        self.dev = device
        self.halo_px = float(halo_px or 0.0)
        I = table.torch_intensity(device)  # (C, N, T, Q, Q)
        # (K, T, C, Q, Q): one gather per (disk, thickness) fetches all strain terms
        Ib = I[:, torch.as_tensor(beams, device=device)]  # (C, K, T, Q, Q)
        self.Q = Ib.shape[-1]
        self.C = Ib.shape[0]
        # (T, C, K*Q*Q): per thickness node, a matrix that strain coefficients multiply
        self.Im = Ib.permute(2, 0, 1, 3, 4).reshape(Ib.shape[2], Ib.shape[0], -1).contiguous()
        self.I0 = Ib[0].transpose(0, 1).contiguous()  # (T, K, Q, Q) unstrained
        self.strength = Ib[0].mean(dim=(1, 2, 3)).cpu().numpy()  # (K,) mean intensity of each disk
        self.g = torch.as_tensor(np.asarray(table.g_mrad, float)[beams], dtype=torch.float32, device=device)
        self.D0 = np.asarray(D0, float)
        self.D0inv = torch.as_tensor(np.linalg.inv(self.D0), dtype=torch.float32, device=device)
        self.s0 = float(math.sqrt(abs(np.linalg.det(self.D0))))
        self.tax = np.asarray(table.thickness_nm, float)
        self.qa = np.asarray(table.q_axis, float)

    def interiors(self, t, eps=None, slope: bool = True, disks=None):
        """Disk intensities (B, K, Q, Q) at thickness t (B,) for strain eps (B, 3) (None: unstrained) and d/dt."""
        tax = self.tax
        tf = (np.clip(t, tax[0], tax[-1]) - tax[0]) / (tax[1] - tax[0])
        i0 = np.clip(np.floor(tf).astype(np.int64), 0, len(tax) - 2)
        w = torch.as_tensor(tf - i0, dtype=torch.float32, device=self.dev)[:, None, None, None]
        i0t = torch.as_tensor(i0, device=self.dev)
        if eps is None:
            I0 = self.I0 if disks is None else self.I0[:, torch.as_tensor(disks, device=self.dev)]
            IA = I0[i0t]
            IB = I0[i0t + 1]
            return (IA * (1 - w) + IB * w).clamp_min(0), (self._slope(t) if slope else None)
        e = torch.as_tensor(eps, dtype=torch.float32, device=self.dev)
        C = self.C
        coef = [torch.ones(len(t), device=self.dev)]
        if C > 1:
            coef += [e[:, 0], e[:, 1], e[:, 2]]
        if C > 4:
            coef += [0.5 * e[:, 0] ** 2, 0.5 * e[:, 1] ** 2, 0.5 * e[:, 2] ** 2]
        if C > 7:
            coef += [e[:, 0] * e[:, 1], e[:, 0] * e[:, 2], e[:, 1] * e[:, 2]]
        cf = torch.stack(coef[:C], 1)  # (B, C)
        B = len(t)
        IA = torch.empty(B, self.Im.shape[-1], device=self.dev)
        IB = torch.empty_like(IA)
        for u in np.unique(i0):  # one small matrix product per thickness node
            idx = torch.as_tensor(np.nonzero(i0 == u)[0], device=self.dev)
            IA[idx] = cf[idx] @ self.Im[u]
            IB[idx] = cf[idx] @ self.Im[u + 1]
        IA = IA.view(B, -1, self.Q, self.Q)
        IB = IB.view(B, -1, self.Q, self.Q)
        Ik = IA * (1 - w) + IB * w
        return Ik.clamp_min(0), self._slope(t)

    def _slope(self, t):
        """dI/dt (unstrained) as a central difference over one table step: the interpolation is
        linear between nodes, and a one-sided slope at a node can point the fit the wrong way."""
        h = 0.5 * float(self.tax[1] - self.tax[0])
        lo = np.clip(t - h, self.tax[0], self.tax[-1])
        hi = np.clip(t + h, self.tax[0], self.tax[-1])
        a, _ = self.interiors(lo, slope=False)
        b, _ = self.interiors(hi, slope=False)
        return (b - a) / torch.as_tensor(np.maximum(hi - lo, 1e-9), dtype=torch.float32,
                                          device=self.dev)[:, None, None, None]

    def render(self, Ik, pos, win0, S, tilt, alpha, sigma, search: bool = False):
        """Windows (B, K, S, S): pos (B, K, 2) px, win0 (B, K, 2) window origins, tilt (B, 2) mrad,
        alpha (B,) mrad, sigma (B,) px; Ik (B, K, Q, Q)."""
        B, K = pos.shape[:2]
        ar = torch.arange(S, device=self.dev, dtype=torch.float32)
        ux = (win0[..., 0, None] - pos[..., 0, None] + ar)[:, :, None, :]  # (B, K, 1, S)
        uy = (win0[..., 1, None] - pos[..., 1, None] + ar)[:, :, :, None]  # (B, K, S, 1)
        Di = self.D0inv
        kx = Di[0, 0] * ux + Di[0, 1] * uy
        ky = Di[1, 0] * ux + Di[1, 1] * uy
        kr = torch.sqrt(kx**2 + ky**2)
        cover = _pixel_cover((alpha[:, None, None, None] - kr) * self.s0, ux, uy)
        qa0, qa1 = float(self.qa[0]), float(self.qa[-1])
        qx = kx + tilt[:, 0, None, None, None]
        qy = ky + tilt[:, 1, None, None, None]
        grid = torch.stack([(qx - qa0) / (qa1 - qa0) * 2 - 1, (qy - qa0) / (qa1 - qa0) * 2 - 1], -1)
        val = Fnn.grid_sample(Ik.reshape(B * K, 1, *Ik.shape[-2:]), grid.reshape(B * K, S, S, 2),
                              mode="bilinear", padding_mode="border", align_corners=True).view(B, K, S, S)
        u = val * cover
        core = _blur(u, sigma)
        if not self.halo_px or search:  # grid searches: the sharp component only
            return core[:, :, None]
        # a broad component of the detector's point-spread function (charge sharing, backscatter):
        # its amount per disk is a linear parameter, its width fixed
        return torch.stack([core, _blur(u, torch.full_like(sigma, self.halo_px), rad=int(math.ceil(3 * self.halo_px)))], 2)


def _pixel_cover(d, ux, uy):
    """Fraction of a unit pixel inside a straight edge at signed distance ``d`` (px, > 0 inside)
    whose normal is along the pixel's offset ``(ux, uy)`` from the disk centre.

    The projection of a uniform square on the normal is a trapezoid of widths |cos|, |sin|; its
    cumulative distribution is the area fraction (disk curvature neglected, < 1 % of a pixel at
    5 px radius).
    """
    r = torch.sqrt(ux**2 + uy**2).clamp_min(1e-6)
    ca, sb = (ux / r).abs(), (uy / r).abs()
    a = torch.maximum(ca, sb)
    b = torch.minimum(ca, sb).clamp_min(1e-4)
    x = (d + 0.5 * (a + b)).clamp(min=0.0)
    x = torch.minimum(x, a + b)
    lo = x * x / (2 * a * b)
    mid = (x - 0.5 * b) / a
    hi = 1 - (a + b - x) ** 2 / (2 * a * b)
    return torch.where(x < b, lo, torch.where(x <= a, mid, hi))


def _blur(v, sigma, rad: int = 3):
    """Separable Gaussian blur of windows (B, K, S, S) with a per-pattern sigma (px)."""
    u = torch.arange(-rad, rad + 1, device=v.device, dtype=v.dtype)
    k = torch.exp(-0.5 * u[None] ** 2 / sigma.clamp_min(0.05)[:, None] ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, 2rad+1)
    S = v.shape[-1]
    p = Fnn.pad(v, (rad, rad, 0, 0))
    v = sum(k[:, j, None, None, None] * p[..., j:j + S] for j in range(2 * rad + 1))
    p = Fnn.pad(v, (0, 0, rad, rad))
    return sum(k[:, j, None, None, None] * p[..., j:j + S, :] for j in range(2 * rad + 1))


def _design(V):
    """Linear design per disk: the model components (B, K, n, S, S) and a constant."""
    return torch.cat([V, torch.ones_like(V[:, :, :1])], 2)


def _linear_fit(V, data, w):
    """Per-disk weights of the model components and a background, by weighted least squares.

    ``V`` (B, K, n, S, S); returns the coefficients (B, K, n + 1) (last: background) and chi2 (B,).
    """
    X = _design(V)
    M = torch.einsum("bkiyx,bkjyx,bkyx->bkij", X, X, w).double()
    rhs = torch.einsum("bkiyx,bkyx,bkyx->bki", X, data, w).double()
    n = M.shape[-1]
    M = M + 1e-9 * torch.eye(n, dtype=M.dtype, device=M.device) * M.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(1e-30)
    coef = torch.linalg.solve(M, rhs[..., None])[..., 0].float()
    r = data - torch.einsum("bki,bkiyx->bkyx", coef, X)
    return coef, (w * r * r).sum((-3, -2, -1))


def _model_counts(V, coef):
    return torch.einsum("bki,bkiyx->bkyx", coef, _design(V))


def _eps_from_L(L, D0):
    """Symmetric strain (exx, eyy, exy) of the crystal from the lattice map L = D0 F^-T (B, 2, 2)."""
    F = np.swapaxes(np.linalg.solve(L, np.broadcast_to(D0, L.shape)), -1, -2)  # F = (L^-1 D0)^T
    return np.stack([F[:, 0, 0] - 1, F[:, 1, 1] - 1, 0.5 * (F[:, 0, 1] + F[:, 1, 0])], 1)


@dataclasses.dataclass
class _Params:
    """Nonlinear parameters of a batch of patterns (numpy, float64)."""

    c: np.ndarray  # (b, 2) origin px
    L: np.ndarray  # (b, 2, 2) px per mrad
    t: np.ndarray  # (b,) nm
    tilt: np.ndarray  # (b, 2) mrad, table frame
    alpha: np.ndarray  # (b,) mrad
    sigma: np.ndarray  # (b,) px

    def take(self, idx):
        return _Params(*(np.array(getattr(self, f.name)[idx]) for f in dataclasses.fields(self)))

    def put(self, idx, other):
        for f in dataclasses.fields(self):
            getattr(self, f.name)[idx] = getattr(other, f.name)

    def where(self, mask, other):
        """Self where ``mask`` is False, ``other`` where True."""
        out = self.take(slice(None))
        out.put(np.nonzero(mask)[0], other.take(np.nonzero(mask)[0]))
        return out


class _FitContext:
    """Data windows and model of a batch; searches and Levenberg-Marquardt on subsets of it."""

    STEPS = dict(pos=0.02, t=0.25, tilt=0.01, alpha=0.005, sigma=0.01)
    SEARCH_DISKS = 5

    def __init__(self, model, data, ins, win0, S, g_mrad, D0, alpha0, q_lim, fit_optics=True):
        self.fit_optics = fit_optics
        self.m, self.data, self.ins, self.win0, self.S = model, data, ins, win0, S
        self.dev = model.dev
        self.g = torch.as_tensor(g_mrad, dtype=torch.float32, device=self.dev)
        self.D0, self.alpha0, self.q_lim = D0, alpha0, q_lim
        self.w0 = ins.float() / (data.clamp_min(0) + 1.0)

    def T(self, a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=self.dev)

    def positions(self, p):
        return self.T(p.c)[:, None, :] + torch.einsum("bij,kj->bki", self.T(p.L), self.g)

    def render(self, Ik, pos, idx, tilt, alpha, sigma, search: bool = False):
        return self.m.render(Ik, pos, self.win0[idx], self.S, self.T(tilt), self.T(alpha), self.T(sigma), search)

    def start(self, p, idx, t_grid, tilts, n_best=1, tilts2=None):
        """Grid search of (thickness, tilt) with unstrained intensities; ``n_best`` local thickness
        minima are then tried with each tilt of ``tilts2``."""
        b = len(idx)
        # the brightest disks only (the undiffracted beam and the first orders carry most of the
        # thickness and tilt information), sharp component only
        disks = np.sort(np.argsort(-self.m.strength)[:self.SEARCH_DISKS])
        dt = torch.as_tensor(disks, device=self.dev)
        data, w = self.data[idx][:, dt], self.w0[idx][:, dt]
        pos = self.positions(p)[:, dt]
        win0 = self.win0[idx][:, dt]
        T = self.T

        def interiors(t_):
            return self.m.interiors(t_, slope=False, disks=disks)[0]

        def render(Ik, tl):
            return self.m.render(Ik, pos, win0, self.S, T(tl), T(p.alpha), T(p.sigma), search=True)

        chi = np.empty((len(t_grid), len(tilts), b))
        for j, tj in enumerate(t_grid):
            Ik = interiors(np.full(b, tj))
            for i, tl in enumerate(tilts):
                chi[j, i] = _linear_fit(render(Ik, np.tile(tl, (b, 1))), data, w)[1].cpu().numpy()
        flat = chi.reshape(-1, b)
        if tilts2 is None or n_best < 1:
            k = np.argmin(flat, 0)
            p.t = np.asarray(t_grid, float)[k // len(tilts)]
            p.tilt = np.asarray(tilts, float)[k % len(tilts)]
            return p
        # local minima of chi2(t) (first tilt), best n_best of them
        c0 = chi[:, 0]
        lm = np.ones_like(c0, bool)
        lm[1:] &= c0[1:] <= c0[:-1]
        lm[:-1] &= c0[:-1] <= c0[1:]
        score = np.where(lm, c0, np.inf)
        cand = np.argsort(score, 0)[:n_best]  # (n_best, b)
        best = np.full(b, np.inf)
        bt = np.array(p.t)
        btl = np.array(p.tilt)
        tg = np.asarray(t_grid, float)
        step = float(tg[1] - tg[0]) if len(tg) > 1 else 1.0
        for r in range(cand.shape[0]):
            tj = tg[cand[r]]
            okr = np.isfinite(score[cand[r], np.arange(b)])
            # the chi2 basin can be narrower than the coarse step: refine t around each minimum
            fbest = np.full(b, np.inf)
            ft = tj.copy()
            for f in np.linspace(-0.6, 0.6, 7):
                tf = np.clip(tj + f * step, self.m.tax[0], self.m.tax[-1])
                v = render(interiors(tf), np.asarray(tilts, float)[np.zeros(b, int)])
                ch = _linear_fit(v, data, w)[1].cpu().numpy()
                m_ = ch < fbest
                fbest[m_] = ch[m_]
                ft[m_] = tf[m_]
            tj = ft
            Ik = interiors(tj)
            for tl in tilts2:
                ch = _linear_fit(render(Ik, np.tile(tl, (b, 1))), data, w)[1].cpu().numpy()
                m = okr & (ch < best)
                best[m] = ch[m]
                bt[m] = tj[m]
                btl[m] = tl
        p.t, p.tilt = bt, btl
        return p

    def evaluate(self, p, idx, w):
        eps = _eps_from_L(p.L, self.D0)
        Ik, dI = self.m.interiors(p.t, eps)
        pos = self.positions(p)
        v = self.render(Ik, pos, idx, p.tilt, p.alpha, p.sigma)
        coef, chi = _linear_fit(v, self.data[idx], w)
        return dict(Ik=Ik, dI=dI, pos=pos, v=v, coef=coef, chi=chi)

    def levenberg_marquardt(self, p, idx, iterations):
        """Fit ``p`` for patterns ``idx``; returns the parameters and the Poisson chi2 (b,)."""
        m, st = self.m, self.STEPS
        data, ins = self.data[idx], self.ins[idx]
        b = len(idx)
        w = self.w0[idx]
        cur = self.evaluate(p, idx, w)
        lam = np.full(b, 1e-2)
        tax = m.tax
        for it_ in range(iterations):
            v, Ik, pos = cur["v"], cur["Ik"], cur["pos"]
            w = ins.float() / _model_counts(v, cur["coef"]).clamp_min(0.5)  # Poisson weights from the model
            coef, chi = _linear_fit(v, data, w)
            cur.update(coef=coef, chi=chi)
            d = st["pos"]
            R = lambda Ik_=Ik, pos_=pos, tilt_=p.tilt, al_=p.alpha, sg_=p.sigma: self.render(  # noqa: E731
                Ik_, pos_, idx, tilt_, al_, sg_)
            nc = v.shape[2]
            cv = coef[:, :, :nc, None, None]
            D = lambda v2, h: ((v2 - v) * cv).sum(2) / h  # noqa: E731  d(model)/d(parameter)
            dpx = D(R(pos_=pos + self.T([d, 0.0])), d)
            dpy = D(R(pos_=pos + self.T([0.0, d])), d)
            gg = self.g[None, :, :, None, None]
            cols = [dpx, dpy, dpx * gg[:, :, 0], dpx * gg[:, :, 1], dpy * gg[:, :, 0], dpy * gg[:, :, 1],
                    D(R(Ik_=Ik + st["t"] * cur["dI"]), st["t"]),
                    D(R(tilt_=p.tilt + [st["tilt"], 0]), st["tilt"]),
                    D(R(tilt_=p.tilt + [0, st["tilt"]]), st["tilt"]),
                    D(R(al_=p.alpha + st["alpha"]), st["alpha"]) if self.fit_optics else None,
                    D(R(sg_=p.sigma + st["sigma"]), st["sigma"]) if self.fit_optics else None]
            cols = [c_ for c_ in cols if c_ is not None]
            Jn = torch.stack(cols, -1)  # (b, K, S, S, n_nonlinear)
            Xl = _design(v)
            r = data - torch.einsum("bki,bkiyx->bkyx", coef, Xl)
            # normal equations with the per-disk linear parameters eliminated (Schur complement)
            Jl = Xl.permute(0, 1, 3, 4, 2)  # (b, K, S, S, n_linear)
            nl = Jl.shape[-1]
            wJn = Jn * w[..., None]
            wJl = Jl * w[..., None]
            Nnn = torch.einsum("bkyxi,bkyxj->bij", wJn, Jn).double()
            Nnl = torch.einsum("bkyxi,bkyxj->bkij", wJn, Jl).double()
            Nll = torch.einsum("bkyxi,bkyxj->bkij", wJl, Jl).double()
            rn = torch.einsum("bkyxi,bkyx->bi", wJn, r).double()
            rl = torch.einsum("bkyxi,bkyx->bki", wJl, r).double()
            Nll = Nll + 1e-9 * torch.eye(nl, dtype=Nll.dtype, device=Nll.device) * Nll.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(1e-30)
            Linv = torch.linalg.inv(Nll)
            Sred = Nnn - torch.einsum("bkij,bkjl,bkml->bim", Nnl, Linv, Nnl)
            rred = rn - torch.einsum("bkij,bkjl,bkl->bi", Nnl, Linv, rl)
            dg = torch.diagonal(Sred, dim1=1, dim2=2).clamp_min(1e-12)
            lt = torch.as_tensor(lam, dtype=torch.float64, device=self.dev)
            A = Sred + torch.diag_embed(lt[:, None] * dg)
            step = np.nan_to_num(torch.linalg.lstsq(A, rred[..., None]).solution[..., 0].cpu().numpy())
            if not self.fit_optics:
                step = np.concatenate([step, np.zeros((b, 2))], 1)
            # trust region for the parameters with many local minima: thickness, tilt
            dt_max = 2.0 * float(tax[1] - tax[0])
            step[:, 6] = np.clip(step[:, 6], -dt_max, dt_max)
            step[:, 7:9] = np.clip(step[:, 7:9], -0.25, 0.25)
            q = _Params(p.c + step[:, 0:2], p.L + np.stack([step[:, 2:4], step[:, 4:6]], 1),
                        np.clip(p.t + step[:, 6], tax[0], tax[-1]), p.tilt + step[:, 7:9],
                        np.clip(p.alpha + step[:, 9], 0.5 * self.alpha0, 1.5 * self.alpha0),
                        np.clip(p.sigma + step[:, 10], 0.05, 1.2))
            tmax = np.maximum(self.q_lim - q.alpha - 1e-3, 0)
            tn = np.hypot(q.tilt[:, 0], q.tilt[:, 1])
            q.tilt = q.tilt * np.minimum(1, tmax / np.maximum(tn, 1e-12))[:, None]
            new = self.evaluate(q, idx, w)
            acc = (new["chi"] < cur["chi"]).cpu().numpy() & np.isfinite(new["chi"].cpu().numpy())
            gain = ((cur["chi"] - new["chi"]) / cur["chi"].clamp_min(1e-30)).cpu().numpy()
            lam = np.where(acc, np.maximum(lam / 3, 1e-5), np.minimum(lam * 10, 1e4))
            p = p.where(acc, q)
            A_ = torch.as_tensor(acc, device=self.dev)
            for k_ in cur:
                x_ = new[k_]
                cur[k_] = torch.where(A_.view(-1, *([1] * (x_.ndim - 1))), x_, cur[k_])
            if it_ >= 3 and np.all(np.where(acc, gain, 0.0) < 1e-5) and np.all(lam < 1.0):
                break  # converged: no pattern improves its chi2 by more than 1e-5
        # final chi2 with Poisson weights from the final model
        w = ins.float() / _model_counts(cur["v"], cur["coef"]).clamp_min(0.5)
        chi = _linear_fit(cur["v"], data, w)[1].cpu().numpy()
        return p, chi


def refine_lattice_model(patterns, G, origin, table, match: TableMatch, *, convergence_mrad: float,
                         iterations: int = 5, sigma0_px: float = 0.5, thickness0_nm=None, device=None,
                         window_px: int | None = None, retry: bool = True, blur_px: float | None = None,
                         halo_px: float | None = HALO_PX, min_beam_fraction: float = 0.002) -> dict:
    """Refine per-pattern lattices by fitting each pattern with simulated disks (see module docstring).

    Parameters
    ----------
    patterns : array (B, H, W)
        Detector counts (electrons; the Poisson weights assume counts).
    G : array (B, 2, 2)
        Lattice vectors (columns, px) from the network + lattice fit (NaN: pattern skipped).
    origin : array (B, 2)
        Origin (x, y) px.
    table : DiskIntensityTable
    match : TableMatch
        From :func:`match_table`.
    convergence_mrad : float
        Convergence semi-angle (mrad): fitted per pattern from this start, or fixed when
        ``blur_px`` is given.
    blur_px : float, optional
        Detector blur (Gaussian sigma, px). Given: convergence and blur are fixed (instrument
        constants, e.g. fitted on a few patterns first); None: both fitted per pattern.
    halo_px : float or None
        Width (Gaussian sigma, px) of a broad point-spread-function component whose amount is
        fitted per disk (detectors with charge sharing or backscatter tails); None or 0: a
        single Gaussian blur.
    iterations : int
        Levenberg-Marquardt iterations.
    sigma0_px : float
        Starting detector blur (px, fitted).
    thickness0_nm : array (B,), optional
        Starting thickness; default a grid search.
    min_beam_fraction : float
        Fit the table beams whose disks lie on the detector and carry at least this fraction
        of the elastic intensity (averaged over the table's directions and thicknesses).

    Returns
    -------
    dict of arrays: ``G (B, 2, 2)``, ``origin (B, 2)``, ``thickness_nm``, ``tilt_mrad (B, 2)``,
    ``convergence_mrad``, ``blur_px``, ``chi2_per_px`` (reduced Poisson chi-square; ~1 when the
    model explains the pattern), ``ok`` (B,) bool.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    x = torch.as_tensor(np.asarray(patterns), dtype=torch.float32, device=dev)
    if x.ndim != 3:
        raise BadInputError(f"patterns must be (B, H, W), got shape {tuple(x.shape)}")
    B, H, W = x.shape
    G = np.asarray(G, float).reshape(B, 2, 2)
    origin = np.asarray(origin, float).reshape(B, 2)
    out = {"G": G.copy(), "origin": origin.copy(), "thickness_nm": np.full(B, np.nan),
           "tilt_mrad": np.full((B, 2), np.nan), "convergence_mrad": np.full(B, np.nan),
           "blur_px": np.full(B, np.nan), "chi2_per_px": np.full(B, np.nan), "ok": np.zeros(B, bool)}
    good = np.all(np.isfinite(G), (1, 2)) & np.all(np.isfinite(origin), 1)
    if not good.any():
        return out
    gb = np.nonzero(good)[0]
    Bin = np.linalg.inv(match.basis_mrad)
    L = G[gb] @ Bin  # (b, 2, 2) px per mrad
    shift = np.asarray(match.origin_shift, float)
    c = origin[gb] + G[gb] @ shift  # the undiffracted beam
    nb = len(gb)
    s0 = float(math.sqrt(abs(np.linalg.det(match.D0))))
    r_px = convergence_mrad * s0
    S = window_px or int(2 * math.ceil(r_px + 3) + 1)
    # the disks to fit: every table beam whose window lies on the detector (median lattice) and that
    # carries at least min_beam_fraction of the elastic intensity (the table's mean over q and t)
    g_all = np.asarray(table.g_mrad, float)
    pm = np.median(c, 0) + g_all @ np.median(L, 0).T
    half = S // 2 + 1
    on = (pm[:, 0] >= half) & (pm[:, 0] <= W - 1 - half) & (pm[:, 1] >= half) & (pm[:, 1] <= H - 1 - half)
    strength = table.intensity.mean(axis=(1, 2, 3))
    beams = np.nonzero(on & (strength >= min_beam_fraction * strength.sum()))[0]
    K = len(beams)
    if K < 3:
        return out
    model = _DiskModel(table, beams, match.D0, dev, halo_px=halo_px)
    gm = g_all[beams]  # (K, 2)
    pos0 = c[:, None, :] + np.einsum("bij,kj->bki", L, gm)
    win0 = np.floor(pos0).astype(np.int64) - S // 2
    # data windows (out-of-detector pixels get zero weight)
    ar = np.arange(S)
    cols = win0[..., 0, None] + ar  # (b, K, S)
    rows = win0[..., 1, None] + ar
    inside = ((cols >= 0) & (cols < W))[:, :, None, :] & ((rows >= 0) & (rows < H))[:, :, :, None]
    bi = torch.as_tensor(gb, device=dev)[:, None, None, None]
    data = x[bi, torch.as_tensor(np.clip(rows, 0, H - 1), device=dev)[:, :, :, None],
             torch.as_tensor(np.clip(cols, 0, W - 1), device=dev)[:, :, None, :]]
    ins = torch.as_tensor(inside, device=dev)
    data = torch.where(ins, data, torch.zeros_like(data))
    finite = torch.isfinite(data)
    data = torch.where(finite, data, torch.zeros_like(data))
    ins = ins & finite
    win0t = torch.as_tensor(win0, dtype=torch.float32, device=dev)
    tax = model.tax
    q_lim = float(model.qa[-1])
    ctx = _FitContext(model, data, ins, win0t, S, gm, match.D0, float(convergence_mrad), q_lim,
                      fit_optics=blur_px is None)
    sigma0_px = sigma0_px if blur_px is None else float(blur_px)
    # ---- start: thickness at zero tilt (the three best local minima), then a 3 x 3 tilt grid
    p = _Params(c, L, np.full(nb, float(tax[len(tax) // 2])), np.zeros((nb, 2)),
                np.full(nb, float(convergence_mrad)), np.full(nb, float(sigma0_px)))
    t_grid = tax[::max(1, int(round(5.0 / (tax[1] - tax[0]))))]  # ~5 nm steps
    if thickness0_nm is None:
        tl = min(0.6, max(0.0, q_lim - 1.25 * convergence_mrad))
        p = ctx.start(p, np.arange(nb), t_grid, [(0.0, 0.0)], n_best=4,
                      tilts2=[(x_, y_) for x_ in (-tl, 0, tl) for y_ in (-tl, 0, tl)])
    else:
        p.t = np.asarray(thickness0_nm, float).reshape(B)[gb].copy()
    p, chi = ctx.levenberg_marquardt(p, np.arange(nb), iterations)
    npx = ins.float().sum((1, 2, 3)).cpu().numpy()
    dof = np.maximum(npx - (_N_NONLIN + (3 if halo_px else 2) * K), 1)
    red = chi / dof
    # ---- patterns the local search left in a wrong minimum: exhaustive start, fit again
    if retry and nb > 1:
        ref_ = np.nanmedian(red)
        redo = np.nonzero(~(red < 2.0 * ref_))[0]
        if len(redo):
            tl = min(1.0, max(0.0, q_lim - 1.25 * convergence_mrad))
            g5 = np.linspace(-tl, tl, 5)
            p2 = p.take(redo)
            p2.c, p2.L = c[redo].copy(), L[redo].copy()
            p2.alpha[:] = convergence_mrad
            p2.sigma[:] = sigma0_px
            p2 = ctx.start(p2, redo, t_grid, [(x_, y_) for x_ in g5 for y_ in g5], n_best=1)
            p2, chi2_ = ctx.levenberg_marquardt(p2, redo, iterations)
            better = chi2_ < chi[redo]
            p.put(redo[better], p2.take(np.nonzero(better)[0]))
            chi[redo[better]] = chi2_[better]
            red = chi / dof
    c, L, t, tilt, alpha, sigma = p.c, p.L, p.t, p.tilt, p.alpha, p.sigma
    out["G"][gb] = L @ match.basis_mrad
    out["origin"][gb] = c - out["G"][gb] @ shift
    out["thickness_nm"][gb] = t
    out["tilt_mrad"][gb] = tilt @ (match.D0 / s0).T  # detector axes
    out["convergence_mrad"][gb] = alpha
    out["blur_px"][gb] = sigma
    out["chi2_per_px"][gb] = red
    out["ok"][gb] = np.all(np.isfinite(L), (1, 2)) & (np.abs(out["origin"][gb] - origin[gb]).max(1) < 1.5)
    return out
