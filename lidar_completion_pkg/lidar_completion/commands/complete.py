"""`lidar-completion complete IN... -o OUT`: complete one scan file, or many with one model load."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..errors import CloudFormatError, ConfigError, LidarCompletionError
from ..settings import CompletionSettings, add_arguments

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "complete",
        help="complete scan files (.bin/.npy/.ply/.pcd) into dense scenes",
        description="Complete LiDAR scans with the few-step diffusion model: range/z filters, "
                    "farthest-point sampling, the SDE-DPM-Solver++ with classifier-free guidance, "
                    "post-processing and (unless --no-refine) the x6 refinement network. Input and "
                    "output formats follow the file extensions: .bin (KITTI float32 x,y,z,intensity), "
                    ".npy, .ply, .pcd (ascii, binary or binary_compressed). With several inputs or a "
                    "folder, the model loads once, OUT is a folder that receives one completion per "
                    "scan under the scan's name, scan i (in the order given, a folder's files sorted "
                    "by name) is completed with --seed + i, and a scan that cannot be read or "
                    "completed is reported and skipped (exit status 1 at the end).",
    )
    p.add_argument("inputs", metavar="IN", nargs="+",
                   help="input scan(s) (.bin, .npy, .ply or .pcd), or folders of them")
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="output cloud (.bin, .npy, .ply or .pcd), or the output folder when there are "
                        "several inputs; parent folders are created")
    p.add_argument("--ascii", action="store_true", help="write .ply/.pcd as ascii instead of binary")
    p.add_argument("--render", metavar="PNG", default=None,
                   help="also draw input vs completion (bird's-eye and oblique views) to this PNG "
                        "(with several inputs: a folder receiving <name>.png per scan)")
    p.add_argument("--format", choices=("bin", "npy", "ply", "pcd"), default=None,
                   help="with several inputs: the completions' format [each input's own]")
    p.add_argument("--skip-existing", action="store_true",
                   help="with several inputs: leave scans whose output file exists (resume a batch)")
    add_arguments(p)
    p.set_defaults(func=run)


def _expand(inputs) -> list[Path]:
    """Files as given, folders as their point-cloud files sorted by name; a missing path is kept
    (reported when it is read)."""
    from ..io import FORMATS

    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
            if not found:
                raise CloudFormatError(f"{path}: a folder without scan files ({', '.join(FORMATS)})")
            files.extend(found)
        else:
            files.append(path)
    return files


def _render(path, scan, result, name):
    from ..io import render_comparison_png
    render_comparison_png(path, {"input": scan, "completion": result.points},
                          title=f"{name}: {result.steps} steps, w={result.guidance:g}")


def _check_kept_points(completer, src, scan, result) -> None:
    """CloudFormatError naming ``src`` when the completion kept no points, instead of writing an
    empty cloud and reporting success. Post-processing (:func:`lidar_completion.preprocess.postprocess`)
    keeps the generated points strictly below the highest point of the sampled scan and above its
    mean height minus 2 standard deviations (a flat scan, where that band is empty, is refused
    before completing: :meth:`lidar_completion.completer.Completer.filtered`)."""
    if len(result.points):
        return
    heights = completer.filtered(scan)[0][:, 2]
    low, high = float(heights.min()), float(heights.max())
    reach = (f" and within {completer.post_max_range:g} m of the sensor"
             if completer.post_max_range is not None else "")
    cause = f"this scan's heights span {low:g} .. {high:g} m"
    raise CloudFormatError(f"{src}: the completion kept no points: post-processing keeps only points "
                           f"below the scan's highest point and above its mean height minus 2 standard "
                           f"deviations{reach}; {cause}")


def _line(src, result, out) -> str:
    return (f"{src}: {result.num_input} points -> {len(result.points)} points in "
            f"{result.timings['total']:.2f} s ({result.steps} {result.process} steps, w={result.guidance:g}, "
            f"seed {result.seed}) -> {out}")


def run(args) -> int:
    from ..io import FORMATS

    files = _expand(args.inputs)
    batch = len(args.inputs) > 1 or Path(args.inputs[0]).is_dir()
    out = Path(args.output)
    if not batch:
        if out.suffix.lower() not in FORMATS:
            raise CloudFormatError(f"output {out}: unsupported extension {out.suffix or '(none)'!r}; "
                                   f"expected one of {', '.join(FORMATS)}")
        if args.render and Path(args.render).suffix.lower() != ".png":
            raise ConfigError(f"--render expects a .png path, got {args.render!r}")
        if args.format or args.skip_existing:
            raise ConfigError("--format and --skip-existing are for several inputs; with one, the "
                              "output's extension is its format")
        if args.ascii and out.suffix.lower() not in (".ply", ".pcd"):
            log.warning("--ascii applies to .ply and .pcd outputs; %s is written in its binary format", out)
    settings = CompletionSettings.from_args(args)   # ConfigError for values out of range
    if batch:
        return _run_batch(args, settings, files, out)

    from ..completer import Completer
    from ..io import read_cloud, write_cloud

    scan = read_cloud(files[0])            # CloudFormatError for missing / malformed files
    completer = Completer.from_settings(settings)
    try:
        result = completer.complete_detailed(scan)
    except CloudFormatError as exc:        # an unusable scan (too few points, flat): name the file
        if str(files[0]) in str(exc):
            raise
        raise CloudFormatError(f"{files[0]}: {exc}") from None
    _check_kept_points(completer, files[0], scan, result)
    write_cloud(out, result.points, binary=not args.ascii)
    times = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if k != "total" and v > 0)
    print(_line(files[0], result, out))
    log.info("stage times: %s", times)
    if args.render:
        _render(args.render, scan, result, files[0].name)
        print(f"render -> {args.render}")
    return 0


def _run_batch(args, settings, files: list[Path], out_dir: Path) -> int:
    from tqdm import tqdm

    from ..completer import Completer
    from ..io import FORMATS, read_cloud, write_cloud

    if out_dir.suffix.lower() in FORMATS:
        raise ConfigError(f"-o {out_dir}: with several inputs the output is a folder, not a "
                          f"{out_dir.suffix} file")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"-o {out_dir}: exists and is not a folder")
    render_dir = Path(args.render) if args.render else None
    if render_dir is not None and render_dir.suffix.lower() == ".png":
        raise ConfigError(f"--render {render_dir}: with several inputs it is a folder for one PNG per scan")
    targets = [out_dir / (f.stem + (f".{args.format}" if args.format else f.suffix.lower())) for f in files]
    if args.ascii and any(t.suffix not in (".ply", ".pcd") for t in targets):
        log.warning("--ascii applies to .ply and .pcd outputs; .bin and .npy ones are written in their "
                    "binary formats")
    seen: dict[Path, Path] = {}
    for src, dst in zip(files, targets):
        if dst.suffix not in FORMATS:
            raise CloudFormatError(f"{src}: unsupported extension {src.suffix or '(none)'!r}; expected "
                                   f"one of {', '.join(FORMATS)} (or choose the output's with --format)")
        if dst in seen:                         # two inputs must not write one file
            raise ConfigError(f"{seen[dst]} and {src} would both be written to {dst}; give inputs "
                              "with distinct names (or complete them in separate runs)")
        seen[dst] = src
    renders = [None if render_dir is None else render_dir / f"{f.stem}.png" for f in files]
    rendered: dict[Path, Path] = {}
    for src, png in zip(files, renders):
        if png is None:
            continue
        if png in rendered:                     # nor one render (a.bin and a.npy: both a.png)
            raise ConfigError(f"{rendered[png]} and {src} would both be rendered to {png}; give "
                              "inputs with distinct names (or complete them in separate runs)")
        rendered[png] = src

    completer = Completer.from_settings(settings)
    failed, done, skipped = [], 0, 0
    bar = tqdm(list(zip(files, targets, renders)), desc="complete", unit="scan", file=sys.stderr,
               disable=len(files) < 2 or None)
    for i, (src, dst, png) in enumerate(bar):
        if args.skip_existing and dst.exists():
            skipped += 1
            continue
        seed = None if settings.seed is None else settings.seed + i
        try:
            scan = read_cloud(src)
            result = completer.complete_detailed(scan, seed=seed)
            _check_kept_points(completer, src, scan, result)
            write_cloud(dst, result.points, binary=not args.ascii)
            if png is not None:
                _render(png, scan, result, src.name)
        except LidarCompletionError as exc:    # a bad file is reported and the batch goes on
            msg = str(exc) if str(src) in str(exc) else f"{src}: {exc}"
            failed.append((src, msg))
            bar.write(f"error: {msg}", file=sys.stderr)
            continue
        done += 1
        bar.write(_line(src, result, dst))
    bar.close()
    extra = f", {skipped} left as they were (--skip-existing)" if skipped else ""
    print(f"completed {done} of {len(files)} scans into {out_dir}{extra}"
          + (f"; {len(failed)} failed: " + ", ".join(s.name for s, _ in failed) if failed else ""))
    return 1 if failed else 0
