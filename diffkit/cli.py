"""``diffkit`` command line: simulate, train, evaluate, predict, map, demo, serve."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

DEMO_CATALOG = pathlib.Path(__file__).resolve().parent.parent / "catalogs" / "demo.yaml"


def _demo_catalog_path(arg):
    if arg:
        return arg
    if DEMO_CATALOG.exists():
        return str(DEMO_CATALOG)
    raise SystemExit("demo catalog not found; pass --catalog PATH (the repository's catalogs/demo.yaml)")


def cmd_info(args):
    import torch

    from . import __version__
    from .models.registry import model_cards

    print(f"diffkit {__version__}; torch {torch.__version__}; device: {'cuda' if torch.cuda.is_available() else 'cpu'}")
    for kind in ("pacbed", "disks"):
        for c in model_cards(kind):
            ho = c.get("held_out", {})
            extra = ""
            if kind == "pacbed" and ho:
                extra = (f"  held-out: thickness ±1 nm {ho.get('thickness_within_1nm', float('nan')):.1%}, "
                         f"tilt ±0.25 mrad {ho.get('tilt_within_0.25mrad', float('nan')):.1%}")
            print(f"  {kind}: {c['id']}{extra}")


def cmd_simulate(args):
    if args.what == "library":
        from .models.train import default_spec
        from .sim.pacbed import build_pacbed_library

        spec = default_spec(args.material, args.zone, args.kv, args.convergence)
        t = time.perf_counter()
        lib = build_pacbed_library(spec, cache_dir=args.cache, progress=True)
        print(f"library: {dict(lib.sizes)}; {lib.attrs['n_directions']} Bloch solves with {lib.attrs['n_beams']} beams; "
              f"pixel {lib.attrs['pixel_size_mrad']:.4f} mrad/px; built in {lib.attrs['build_seconds']} s "
              f"(this call {time.perf_counter() - t:.1f} s)")
    elif args.what == "demo":
        from .sim.demo import DemoScanSpec, write_demo_scan

        spec = DemoScanSpec(convergence_mrad=args.convergence)
        if args.convergence > 16:
            spec.thickness_range_nm = (20.0, 50.0)
            spec.pixel_ratio = 1.3
        if args.scan:
            spec.scan_shape = (args.scan, args.scan)
        out = args.out or f"catalogs/data/sto_pacbed_wedge{'' if args.convergence < 16 else '_19mrad'}.zarr"
        write_demo_scan(out, spec)
        print(f"wrote {out}")
    elif args.what == "testset":
        from .sim.testset import MultisliceTestSetSpec, build_multislice_testset

        if args.physics != "multislice":
            raise SystemExit("diffkit simulate testset: --physics multislice is the only independent physics so far")
        kw = {k: v for k, v in dict(n_tilts=args.n_tilts, thicknesses_per_tilt=args.per_tilt, n_phonons=args.phonons,
                                    sampling_A=args.sampling, cells=args.cells, seed=args.seed).items() if v is not None}
        if args.thickness:
            kw["thickness_nm"] = tuple(args.thickness)
        spec = MultisliceTestSetSpec(material=args.material, zone=args.zone, energy_kv=args.kv,
                                     convergence_mrad=args.convergence, **kw)
        out = args.out or f"{args.material}_{args.zone}_{args.convergence:g}mrad_multislice_testset.npz"
        test = build_multislice_testset(spec, out=out, cache_dir=args.cache)
        print(f"wrote {out}: {len(test['patterns'])} patterns, {spec.n_tilts} tilts (multislice, own phonon seeds and "
              f"Debye-Waller draws); score a model with: diffkit evaluate pacbed --test-set {out}")
    elif args.what == "strain-demo":
        from .strain import make_strain_demo_scan

        out = args.out or "catalogs/data/si_strain_nbed.zarr"
        make_strain_demo_scan(out)
        print(f"wrote {out}")


def cmd_train(args):
    if args.what == "pacbed":
        from .models.pacbed_training import TrainConfig
        from .models.train import train_pacbed

        cfg = None
        if args.smoke:
            cfg = TrainConfig(measure_steps=30, align_steps=20, batch_size=32, thin_measure_steps=10)
        elif args.measure_steps or args.align_steps or args.pixel_ratio or args.crop_fraction is not None:
            cfg = TrainConfig()
            cfg.measure_steps = args.measure_steps or cfg.measure_steps
            cfg.align_steps = args.align_steps or cfg.align_steps
            if args.pixel_ratio:
                cfg.pixel_ratio = tuple(args.pixel_ratio)
            if args.crop_fraction is not None:
                cfg.crop_fraction = args.crop_fraction
        p = train_pacbed(args.material, args.zone, args.kv, args.convergence, out_dir=args.out, config=cfg,
                         smoke=args.smoke, cache_dir=args.cache)
        print(f"model card: {p}")
    elif args.what == "pacbed-thin":
        from .models.registry import WEIGHTS_DIR
        from .models.train import model_stem, train_thin_measure

        folder = pathlib.Path(args.out) if args.out else WEIGHTS_DIR
        p = train_thin_measure(folder / f"{model_stem(args.material, args.zone, args.kv, args.convergence)}.json",
                               cache_dir=args.cache)
        print(f"model card: {p}")
    else:
        from .models.disks_training import main as train_disks

        spec = (args.material, args.zone, args.kv, args.convergence) if args.specialise else None
        card = train_disks(out_dir=args.out, smoke=args.smoke, specialise=spec, radius_px=args.disk_radius)
        print(f"model card: {card['id']}.json")


def cmd_evaluate(args):
    from .models.pacbed_eval import evaluate, make_test_set
    from .models.train import default_spec
    from .pacbed import load_predictor
    from .sim.pacbed import build_pacbed_library

    if args.test_set:
        return _evaluate_test_set(args)
    pred = load_predictor(material=args.material, zone=args.zone, energy_kv=args.kv, convergence_mrad=args.convergence)
    lib = build_pacbed_library(default_spec(args.material, args.zone, args.kv, args.convergence), cache_dir=args.cache)
    test = make_test_set(lib, n=args.n, seed=args.seed)
    rep, out = evaluate(pred, test, distributions=bool(args.plot))
    if args.plot:
        import matplotlib.pyplot as plt

        from .models.pacbed_eval import coverage_curves
        from .pacbed.plots import plot_calibration

        # the library thicknesses (the table's test set) and continuous thicknesses between them: the
        # former's truths sit on bin centres, which a confident network hits exactly
        cont = make_test_set(lib, n=args.n, seed=args.seed + 1, continuous=True)
        _, out_c = evaluate(pred, cont, distributions=True)
        curves = {"library thicknesses": coverage_curves(out, test), "continuous thicknesses": coverage_curves(out_c, cont)}
        rep["coverage_curves"] = curves
        fig, axs = plt.subplots(2, 2, figsize=(8.4, 7.4), constrained_layout=True)
        for row, (name, c) in zip(axs, curves.items()):
            plot_calibration(c, title=f"{args.convergence:g} mrad, {name}", ax=row)
        fig.savefig(args.plot, dpi=100)
        print(f"calibration plot written to {args.plot}")
        for name, c in curves.items():
            i68, i95 = c["levels"].index(0.7), c["levels"].index(0.95)
            print(f"{name}: thickness interval coverage at nominal 70 / 95 %: {c['thickness'][i68]:.3f} / "
                  f"{c['thickness'][i95]:.3f}; tilt {c['tilt'][i68]:.3f} / {c['tilt'][i95]:.3f}")
    _report(rep, pred.card.get("held_out", {}), "this run", "model card",
            ["thickness_within_1nm", "thickness_within_2nm", "tilt_within_0.25mrad", "tilt_within_0.5mrad",
             "center_within_1px", "size_within_1pct", "rotation_within_1deg", "thickness_coverage_68",
             "thickness_coverage_95"])
    if args.update_card:
        rep["command"] = f"diffkit evaluate pacbed --convergence {args.convergence:g} --n {args.n}" + (
            f" --plot {args.plot}" if args.plot else "")
        _write_card_section(pred, ("held_out",), rep)


def _report(rep: dict, reference: dict, name: str, ref_name: str, keys) -> None:
    """Print an evaluation as JSON, then the chosen metrics beside a reference table."""
    print(json.dumps(rep, indent=1))
    print(f"{'metric':28s} {name:>9s} {ref_name:>21s}")
    for k in keys:
        print(f"{k:28s} {rep[k]:9.3f} {reference.get(k, float('nan')):21.3f}")


def _write_card_section(pred, path: tuple, rep: dict) -> None:
    """Store ``rep`` in the predictor's model card under the nested keys ``path`` (checksums kept valid)."""
    from .models.registry import write_card

    card_path = pathlib.Path(pred.card["card_path"])
    card = json.loads(card_path.read_text())
    node = card
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = rep
    write_card(card_path, card)
    print(f"{'.'.join(path)} table written to {card_path}")


def _evaluate_test_set(args):
    """Score the model matching a stored test set (e.g. multislice) with the model card's table."""
    from .models.pacbed_eval import evaluate
    from .pacbed import load_predictor
    from .sim.testset import load_testset

    test = load_testset(args.test_set)
    ts = test["meta"]["spec"]
    pred = load_predictor(material=ts["material"], zone=ts["zone"], energy_kv=ts["energy_kv"],
                          convergence_mrad=ts["convergence_mrad"])
    rep, _ = evaluate(pred, test)
    rep["test_set"] = {"physics": test["meta"].get("physics"), "spec": ts}
    _report(rep, pred.card.get("held_out", {}), "this set", "own simulator (card)",
            ["thickness_within_1nm", "thickness_within_2nm", "tilt_within_0.25mrad", "thickness_coverage_68",
             "thickness_coverage_95", "ood_flag_rate"])
    if args.update_card:
        rep["command"] = f"diffkit evaluate pacbed --test-set {args.test_set}"
        _write_card_section(pred, ("cross_physics", test["meta"].get("physics", "other")), rep)


def cmd_calibrate(args):
    from .models.train import recalibrate
    from .pacbed import load_predictor

    pred = load_predictor(material=args.material, zone=args.zone, energy_kv=args.kv, convergence_mrad=args.convergence)
    temps, table = recalibrate(pred.card["card_path"], n=args.n, cache_dir=args.cache)
    print(f"temperatures: thickness {temps[0]:.4f}, tilt {temps[1]:.4f}; OOD pattern statistics and rotation "
          "uncertainty per thickness band written")


def cmd_predict(args):
    import numpy as np

    from .calibration import Calibration
    from .pacbed import load_predictor

    from .io import open_npy

    if not pathlib.Path(args.file).exists():
        raise CliError(f"no such file: {args.file}")
    arr = open_npy(args.file)
    if arr.ndim == 4:
        arr = np.asarray(arr).reshape(-1, *arr.shape[-2:]).mean(0)
    cal = Calibration(beam_energy_kv=args.kv, convergence_mrad=args.convergence, pixel_size_mrad=args.pixel_size,
                      material=args.material, zone_axis=args.zone)
    pred = load_predictor(cal)
    res = pred.predict(np.asarray(arr, dtype=np.float32), background_strength=args.background,
                       pixel_size_mrad=args.pixel_size)
    print(res.to_dataframe().T.to_string() if hasattr(res, "to_dataframe") else res)


class CliError(SystemExit):
    """A problem the command line reports in one line (exit status 1); a ``SystemExit`` so that
    commands called from Python stop the same way."""


def calibration_args(p):
    """``--kv --convergence --pixel-size --material --zone --scan-step``: calibration of a data file
    (overrides the file's values; for catalog entries too)."""
    g = p.add_argument_group("calibration (overrides the file's values)")
    g.add_argument("--kv", type=float, default=None, help="beam energy (kV)")
    g.add_argument("--convergence", type=float, default=None, help="convergence semi-angle (mrad)")
    g.add_argument("--pixel-size", type=float, default=None, help="detector pixel size (mrad/px)")
    g.add_argument("--material", default=None, help="crystal, e.g. SrTiO3")
    g.add_argument("--zone", default=None, help="zone axis, e.g. 001")
    g.add_argument("--scan-step", type=float, default=None, help="scan step (nm)")


def _calibration_overrides(args) -> dict:
    vals = {"beam_energy_kv": getattr(args, "kv", None), "convergence_mrad": getattr(args, "convergence", None),
            "pixel_size_mrad": getattr(args, "pixel_size", None), "material": getattr(args, "material", None),
            "zone_axis": getattr(args, "zone", None), "scan_step_nm": getattr(args, "scan_step", None)}
    return {k: v for k, v in vals.items() if v is not None}


def _looks_like_path(s: str) -> bool:
    from .io import SUFFIXES

    return any(c in s for c in "/\\") or s.lower().rstrip("/").endswith(tuple(SUFFIXES))


def _load_entry(args):
    from .catalog import open_catalog

    cat = open_catalog(_demo_catalog_path(args.catalog), **({"dose": args.dose} if args.dose else {}))
    names = list(cat)
    if args.entry not in names:
        raise CliError(f"no entry {args.entry!r} in catalog {args.catalog or 'demo'}; entries: "
                       f"{', '.join(names) or '(none)'}")
    return cat[args.entry].read()


def load_source(args):
    """The data of ``args.source``: a data file (with the calibration options) or a catalog entry."""
    overrides = _calibration_overrides(args)
    src = args.source
    if src and pathlib.Path(src).exists():
        from .io import load

        data = load(src, calibration=overrides or None)
        if getattr(args, "dose", None):
            data = data.with_dose(args.dose)
        return data
    if src and _looks_like_path(src):
        raise CliError(f"no such file: {src}")
    args.entry = src or args.entry
    data = _load_entry(args)
    if overrides:
        data.calibration = data.calibration.replace(**overrides)
    return data


def cmd_map(args):
    from .maps import map_pacbed
    from .report import compare_to_truth, plot_pacbed_maps

    data = load_source(args)
    t = time.perf_counter()
    window = (args.window, args.window)
    step = (args.step, args.step) if args.step else None
    from .maps import StoreMismatchError

    def run(overwrite):
        return map_pacbed(data, window=window, step=step, store=args.out, scheduler=args.scheduler,
                          background=args.background or None, overwrite=overwrite)

    try:
        maps = run(getattr(args, "overwrite", False))
    except StoreMismatchError as e:
        if not getattr(args, "replace_stale", False):
            raise CliError(f"{e} (on the command line: --overwrite starts the map over)") from None
        # the demo's own output folder: a store from another model or other arguments is recomputed
        print(f"{args.out} was written by another model or with other arguments: computing it again")
        t = time.perf_counter()
        maps = run(True)
    dt = time.perf_counter() - t
    n = data.data.shape[0] * data.data.shape[1]
    print(f"mapped {n} frames ({maps.sizes['y']}x{maps.sizes['x']} windows) in {dt:.1f} s ({n / dt:.0f} frames/s)")
    if args.out:
        print(f"map written to {args.out}")
    if args.png:
        plot_pacbed_maps(maps, args.png, title=str(getattr(data, "source", "")))
        print(f"figure written to {args.png}")
    if getattr(data, "truth", None) is not None:
        cmp = compare_to_truth(maps, data.truth)
        print("against ground truth:")
        print(json.dumps(cmp, indent=1))
    return maps


def cmd_demo(args):
    """The main job on the bundled demo catalog, headless: map + PNG + comparison with truth."""
    out = pathlib.Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(catalog=args.catalog, entry="sto_pacbed_wedge", source=None, dose=None, debug=False,
                            window=5, step=None, out=str(out / "sto_pacbed_wedge_map.zarr"),
                            png=str(out / "sto_pacbed_wedge_map.png"), scheduler=args.scheduler, background=None,
                            replace_stale=True)
    cmd_map(ns)
    if args.serve:
        cmd_serve(argparse.Namespace(port=args.port, address=args.address, show=False, apps=None, catalog_root=None))


def cmd_serve(args):
    from .ui import serve

    serve(apps=args.apps, port=args.port, address=args.address, show=args.show,
          catalog_roots=getattr(args, "catalog_root", None))


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CliError, SystemExit)):
        return msg
    return f"{type(exc).__name__}: {msg}"


def _options_of(args) -> list[str]:
    """The calibration options the command accepts (those set by :func:`calibration_args`)."""
    return ["--kv", "--pixel-size"] if hasattr(args, "pixel_size") and hasattr(args, "scan_step") else []


def main(argv=None) -> int:
    """Run the command line; returns the exit status: 0 success, 1 handled error (one line on
    stderr; the traceback with ``--debug``), 2 usage error, 130 interrupted."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    ap = argparse.ArgumentParser(prog="diffkit", description=__doc__, parents=[debug])
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_parser = sub.add_parser

    def add_parser(*a, **kw):  # every subcommand also takes --debug (after its name)
        kw.setdefault("parents", [debug])
        return _add_parser(*a, **kw)

    sub.add_parser = add_parser

    def model_args(p):
        p.add_argument("--material", default="SrTiO3")
        p.add_argument("--zone", default="001")
        p.add_argument("--kv", type=float, default=200.0, help="beam energy (kV)")
        p.add_argument("--convergence", type=float, default=13.6, help="convergence semi-angle (mrad)")
        p.add_argument("--cache", default=None, help="simulation cache folder (default $DIFFKIT_CACHE or ~/.cache/diffkit)")

    p = sub.add_parser("info", help="version, device and shipped models")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("simulate", help="build a PACBED library or a simulated demo scan")
    p.add_argument("what", choices=["library", "demo", "strain-demo", "testset"],
                   help="testset: independent PACBED test set (frozen-phonon multislice, its own seeds and "
                        "Debye-Waller draws) for 'diffkit evaluate pacbed --test-set'")
    model_args(p)
    p.add_argument("--out", default=None, help="output path")
    p.add_argument("--physics", default="multislice", choices=["multislice"], help="testset: simulation physics")
    p.add_argument("--n-tilts", type=int, default=None, help="testset: tilts (one multislice run each)")
    p.add_argument("--per-tilt", type=int, default=None, help="testset: thicknesses per tilt")
    p.add_argument("--thickness", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="testset: nm")
    p.add_argument("--phonons", type=int, default=None, help="testset: frozen-phonon configurations")
    p.add_argument("--sampling", type=float, default=None, help="testset: real-space sampling (Å)")
    p.add_argument("--cells", type=int, default=None, help="testset: supercell size (unit cells per side)")
    p.add_argument("--seed", type=int, default=None, help="testset: seed of every draw")
    p.add_argument("--scan", type=int, default=None, help="scan size (positions per side) for demo scans")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("train", help="train and package a model")
    p.add_argument("what", choices=["pacbed", "pacbed-thin", "disks"],
                   help="pacbed-thin: (re)train only the thin-pattern measurement network of a packaged PACBED "
                        "model, then recalibrate and re-evaluate it")
    model_args(p)
    p.add_argument("--out", default=None, help="output folder (default: the package's weights folder)")
    p.add_argument("--smoke", action="store_true", help="tiny library and a few steps (CI)")
    p.add_argument("--measure-steps", type=int, default=None)
    p.add_argument("--pixel-ratio", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="detector pixel / library pixel range of the training frames")
    p.add_argument("--crop-fraction", type=float, default=None,
                   help="fraction of training frames on a detector smaller than the field of view")
    p.add_argument("--align-steps", type=int, default=None)
    p.add_argument("--specialise", action="store_true",
                   help="disks: fine-tune the sub-image CNN for one crystal and probe (--material, --zone, --kv, "
                        "--convergence; e.g. --material Si --zone 001 --kv 200 --convergence 2) instead of training "
                        "the general model (~15 min on 2 CPU cores)")
    p.add_argument("--disk-radius", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="disks --specialise: disk radii on the detector (px) to train for (default 4-6.5; disks "
                        "larger than 8.5 px are binned 2x before detection)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="reproduce a shipped model's held-out accuracy table")
    p.add_argument("what", choices=["pacbed"])
    model_args(p)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=424242)
    p.add_argument("--test-set", default=None, metavar="NPZ",
                   help="score the matching shipped model on a stored test set (diffkit simulate testset) instead")
    p.add_argument("--update-card", action="store_true", help="write the table into the model card (after pipeline changes)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write calibration curves (observed vs nominal interval coverage) to this image")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="re-calibrate a shipped model's uncertainties and OOD checks end to end")
    p.add_argument("what", choices=["pacbed"])
    model_args(p)
    p.add_argument("--n", type=int, default=4096)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("predict", help="thickness/tilt of one PACBED pattern (.npy, 2D or 4D)")
    p.add_argument("file")
    model_args(p)
    p.add_argument("--pixel-size", type=float, default=None, help="detector pixel size (mrad/px)")
    p.add_argument("--background", type=float, default=0.0, help="background strength (fraction of mean per nm)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("map", help="thickness/tilt maps over a 4D-STEM scan on dask chunks")
    p.add_argument("source", nargs="?", default=None, help="data file (any format diffkit.io.load reads), or an "
                   "entry of the catalog")
    p.add_argument("--catalog", default=None)
    p.add_argument("--entry", default="sto_pacbed_wedge")
    p.add_argument("--dose", type=float, default=None, help="resample to this dose (e-/frame)")
    p.add_argument("--window", type=int, default=5, help="PACBED window (scan positions per side)")
    p.add_argument("--step", type=int, default=None, help="window step (positions); default = window")
    p.add_argument("--out", default=None, help="zarr store for incremental, resumable output")
    p.add_argument("--png", default=None)
    p.add_argument("--scheduler", default=None, help="'threads', 'processes' or a dask.distributed address")
    p.add_argument("--background", type=float, default=0.0)
    p.add_argument("--overwrite", action="store_true",
                   help="start over when --out holds a map written with other arguments or another model")
    calibration_args(p)
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("demo", help="main job on the bundled demo catalog (headless), optionally serve the dashboards")
    p.add_argument("--catalog", default=None)
    p.add_argument("--outdir", default="out")
    p.add_argument("--scheduler", default=None)
    p.add_argument("--serve", action="store_true", help="then serve the dashboards")
    p.add_argument("--port", type=int, default=5006)
    p.add_argument("--address", default="127.0.0.1")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve the Panel dashboards (localhost by default)")
    p.add_argument("apps", nargs="*", default=None)
    p.add_argument("--port", type=int, default=5006)
    p.add_argument("--address", default="127.0.0.1", help="bind address; 0.0.0.0 exposes the server to the network")
    p.add_argument("--show", action="store_true")
    p.add_argument("--catalog-root", action="append", default=None, metavar="DIR",
                   help="folder the catalog box may open catalogs from (repeatable; default: the bundled catalogs "
                        "and the working directory)")
    p.set_defaults(func=cmd_serve)

    args = ap.parse_args(argv)  # usage errors: argparse prints them and exits with status 2
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except CliError as exc:
        print(f"diffkit {args.cmd}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # raised by a command with a message (or a status)
        if exc.code in (None, 0):
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(f"diffkit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - every runtime error: one line, traceback only with --debug
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        from .errors import MissingCalibrationError

        hint = (" (on the command line: --kv, --convergence, --pixel-size, --material, --zone, --scan-step)"
                if isinstance(exc, MissingCalibrationError) and any(a.startswith("--kv") or a == "--pixel-size"
                                                                    for a in _options_of(args)) else "")
        print(f"diffkit {args.cmd}: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
