"""Sub-pixel polishing of disk centres by a batched least-squares fit of a disk model.

Model of the counts in a sub-image around one disk (pixel centres ``p``):

    m(p) = b + A(p) * E(|p - c|),   E(d) = Phi((r - d) / s)

``E`` is the probe aperture (radius ``r``) with an edge of width ``s`` (Gaussian: source
size, detector blur and pixel size together), ``A`` the interior intensity near the edge
(angular harmonics up to ``harmonics`` about the start centre, each with a radial slope:
the dynamical contrast varies along the rim), ``b`` a constant background. The
centre ``c`` is set by the edge alone, so the interior contrast does not pull it (unlike
centroids or template correlation). The parameters ``(c, r, s, A, b)`` are fitted by
Levenberg-Marquardt with Poisson weights (iteratively re-weighted), all disks of all
patterns at once in torch; only the edge zone ``r - 3 <= |p - c0| <= r + 3 s + 1.5`` is used
(the interior is irrelevant to the centre, neighbouring disks are excluded). Start values
come from the networks. The returned standard errors make inverse-variance weights for the
lattice fit: disks whose rim is dark (strong dynamical contrast) get little weight.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def fit_disks(crops: torch.Tensor, centre0, radius0, edge0=0.8, iterations: int = 8,
              fit_radius: bool = True, damping: float = 1e-3, harmonics: int = 4, inner_px: float = 3.0,
              valid=None):
    """Fit disk centres in sub-images.

    Parameters
    ----------
    crops : tensor (M, 1, S, S) or (M, S, S)
        Counts.
    centre0 : array (M, 2)
        Start centres (x, y) in sub-image px (pixel (0, 0) centre at (0, 0)).
    radius0 : array (M,)
        Start (or known) disk radii (px).
    edge0 : float or array (M,)
        Start (or known) edge width ``s`` (px).
    iterations : int
        Levenberg-Marquardt iterations.
    fit_radius : bool
        Fit radius and edge width too (else keep ``radius0`` and ``edge0``: with part of a disk
        edge dark, centre and radius are correlated, so a radius known from the calibration or
        from the brightest disk of the pattern makes the centre much better defined).
    harmonics : int
        Angular harmonics of the interior intensity near the edge.
    inner_px : float
        Only pixels outside ``r - inner_px`` are used (the edge zone).

    Returns
    -------
    centre (M, 2) float64, radius (M,), edge (M,), ok (M,) bool (converged to a sensible disk),
    sigma (M,) float64: the fit's statistical standard error of each centre coordinate (px).
    """
    x = crops[:, 0] if crops.ndim == 4 else crops
    x = x.to(torch.float64)
    M, S, _ = x.shape
    dev = x.device
    if M == 0:
        z = np.zeros(0)
        return np.zeros((0, 2)), z, z, z.astype(bool), z
    ar = torch.arange(S, dtype=torch.float64, device=dev)
    px = ar[None, None, :].expand(M, S, S)
    py = ar[None, :, None].expand(M, S, S)
    c = torch.as_tensor(np.asarray(centre0, float), device=dev).clone()
    r = torch.as_tensor(np.broadcast_to(np.asarray(radius0, float), (M,)).copy(), device=dev)
    s = torch.as_tensor(np.broadcast_to(np.asarray(edge0, float), (M,)).copy(), device=dev)
    r_start = r.clone()
    c_start = c.clone()
    # region: pixels near the disk
    d0 = torch.sqrt((px - c[:, 0, None, None]) ** 2 + (py - c[:, 1, None, None]) ** 2)
    region = (d0 <= (r[:, None, None] + 3 * s[:, None, None] + 1.5)).to(torch.float64)
    if valid is not None:
        region = region * valid.reshape(M, S, S).to(torch.float64)
    # interior: angular harmonics (about the start centre) times (1, radial offset from the start edge)
    phi = torch.atan2(py - c[:, 1, None, None], px - c[:, 0, None, None])
    rho = (d0 - r[:, None, None]) / r[:, None, None]
    ang = [torch.ones_like(phi)]
    for n in range(1, harmonics + 1):
        ang += [torch.cos(n * phi), torch.sin(n * phi)]
    basis = torch.stack(ang + [a * rho for a in ang], -1)  # (M,S,S,NB)
    region = region * (d0 >= (r[:, None, None] - inner_px)).to(torch.float64)
    sq2 = math.sqrt(2.0)
    inv_sqrt2pi = 1.0 / math.sqrt(2 * math.pi)

    def edge(cc, rr, ss):
        dx = px - cc[:, 0, None, None]
        dy = py - cc[:, 1, None, None]
        d = torch.sqrt(dx * dx + dy * dy).clamp_min(1e-9)
        t = (rr[:, None, None] - d) / ss[:, None, None]
        E = 0.5 * torch.erfc(-t / sq2)
        phi = torch.exp(-0.5 * t * t) * inv_sqrt2pi / ss[:, None, None]
        return E, phi, dx / d, dy / d, t

    # initial linear parameters for the current geometry
    w = region.clone()

    NB = basis.shape[-1]

    def linear(E, wgt):
        cols = torch.cat([basis * E[..., None], torch.ones_like(E)[..., None]], -1).reshape(M, S * S, NB + 1)
        ww = wgt.reshape(M, S * S, 1)
        N = cols.transpose(1, 2) @ (cols * ww) + 1e-9 * torch.eye(NB + 1, device=dev, dtype=torch.float64)
        rhs = cols.transpose(1, 2) @ (x.reshape(M, S * S, 1) * ww)
        return torch.linalg.solve(N, rhs)[..., 0]  # (M, 7)

    E, *_ = edge(c, r, s)
    lin = linear(E, w)
    n_nl = 4 if fit_radius else 2
    lam = torch.full((M,), damping, dtype=torch.float64, device=dev)
    for it in range(iterations):
        E, phi, ex, ey, t = edge(c, r, s)
        A = (basis * lin[:, None, None, :NB]).sum(-1)
        m = A * E + lin[:, None, None, NB]
        res = x - m
        # Poisson weights from the current model (after the first iteration)
        if it >= 1:
            w = region / m.clamp_min(1.0)
        # Jacobian: nonlinear (cx, cy, r, s) then linear (6 interior + background)
        dE_dcx = phi * ex  # dE/dd = -phi; dd/dcx = -ex
        dE_dcy = phi * ey
        dE_dr = phi
        dE_ds = -phi * t
        Jn = [A * dE_dcx, A * dE_dcy] + ([A * dE_dr, A * dE_ds] if fit_radius else [])
        J = torch.cat([torch.stack(Jn, -1), basis * E[..., None], torch.ones_like(E)[..., None]], -1)
        P = J.shape[-1]
        Jf = J.reshape(M, S * S, P)
        Hreg = 1e-9 * torch.eye(P, device=dev, dtype=torch.float64)
        wf = w.reshape(M, S * S, 1)
        H = Jf.transpose(1, 2) @ (Jf * wf) + Hreg
        g = Jf.transpose(1, 2) @ (res.reshape(M, S * S, 1) * wf)
        Hd = H + lam[:, None, None] * torch.diag_embed(torch.diagonal(H, dim1=1, dim2=2) + 1e-12)
        step = torch.linalg.solve(Hd, g)[..., 0]
        c = c + step[:, :2]
        if fit_radius:
            r = (r + step[:, 2]).clamp(0.5 * r_start, 1.5 * r_start)
            s = (s + step[:, 3]).clamp(0.2, 3.0)
        lin = lin + step[:, n_nl:]
    # statistical uncertainty of the centre from the last normal matrix (Poisson weights)
    try:
        cov = torch.linalg.inv(H + 1e-12 * torch.eye(H.shape[-1], dtype=H.dtype, device=dev))
        sig = torch.sqrt(torch.clamp(0.5 * (cov[:, 0, 0] + cov[:, 1, 1]), min=0)).cpu().numpy()
    except Exception:  # singular fits
        sig = np.full(M, np.nan)
    cn = c.cpu().numpy()
    moved = np.linalg.norm(cn - c_start.cpu().numpy(), axis=1)
    ok = np.all(np.isfinite(cn), 1) & (moved < 2.0) & (lin[:, 0].cpu().numpy() > 0) & np.isfinite(sig)
    return cn, r.cpu().numpy(), s.cpu().numpy(), ok, sig
