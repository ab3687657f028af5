"""`lidar-completion complete IN... -o OUT`: complete one scan file, or many with one model load."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import CloudFormatError, ConfigError, LidarCompletionError
from ..io import BIN_FORMATS
from ..cli import add_threads_argument, apply_threads
from ..settings import BY_NAME, CompletionSettings, add_arguments

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "complete",
        help="complete scan files (.bin/.npy/.ply/.pcd) into dense scenes",
        description="Complete LiDAR scans with the few-step diffusion model: range/z filters, "
                    "farthest-point sampling, the SDE-DPM-Solver++ with classifier-free guidance, "
                    "post-processing and (unless --no-refine) the x6 refinement network. Input and "
                    "output formats follow the file extensions: .bin (KITTI float32 x,y,z,intensity; "
                    "see --bin-format), "
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
                        "several inputs or OUT ends with '/' (each completion under its scan's name); "
                        "parent folders are created")
    p.add_argument("--ascii", action="store_true", help="write .ply/.pcd as ascii instead of binary")
    p.add_argument("--render", metavar="PNG", default=None,
                   help="also draw input vs completion (bird's-eye and oblique views) to this PNG "
                        "(with several inputs: a folder receiving <name>.png per scan)")
    p.add_argument("--format", choices=("bin", "npy", "ply", "pcd"), default=None,
                   help="with several inputs or an output folder: the completions' format [each "
                        "input's own]")
    p.add_argument("--bin-format", choices=BIN_FORMATS, default="kitti",
                   help="how .bin inputs are read and .bin completions written: 'kitti' float32 x, "
                        "y, z, intensity (16 bytes a point; the completions' intensity is 0); 'xyz' "
                        "float32 x, y, z (12 bytes a point, as `build-gt` writes its targets). The "
                        "file cannot tell: 4 xyz points are 3 KITTI points [kitti]")
    p.add_argument("--skip-existing", action="store_true",
                   help="with several inputs or an output folder (-o DIR/): leave scans whose output "
                        "file exists (resume a batch)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar over a batch (there is one on a terminal only)")
    add_threads_argument(p)
    add_arguments(p)
    p.set_defaults(func=run)


def _read_scan(path: Path, bin_format: str) -> np.ndarray:
    """``read_cloud`` with ``--bin-format`` (a .bin of the other layout gets a hint)."""
    from ..io import read_bin_checked, read_cloud

    if path.suffix.lower() == ".bin":
        return read_bin_checked(path, bin_format)
    return read_cloud(path)


def _check_writable(path: Path, flag: str, folder: bool = False) -> None:
    """ConfigError naming ``path`` as given when it cannot be written: a folder where a file goes
    (with ``folder``: a file where the output folder goes), a parent that is a file, or a folder
    that refuses new files (no permission, a read-only mount). Checked before the model loads,
    instead of failing after the scan was completed, on a private temporary name."""
    from ..cli import unwritable_folder

    if path.exists() and not folder and path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is a folder; give a file name (or end it with "
                          "'/' to write into the folder under the scan's name)")
    if path.exists() and folder and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    problem = unwritable_folder(path if folder else path.parent)
    if problem is not None:
        raise ConfigError(f"{flag} {path}: {problem}; give a path in a folder you can write to")


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


def _check_kept_points(src, result) -> None:
    """CloudFormatError naming ``src`` when the completion kept no points (the Completer says why:
    :attr:`lidar_completion.completer.CompletionResult.empty_reason`), instead of writing an empty
    cloud and reporting success."""
    if len(result.points):
        return
    why = getattr(result, "empty_reason", None) or "post-processing removed every generated point"
    raise CloudFormatError(f"{src}: the completion kept no points: {why.replace('n_fps', '--n-fps')}")


def _warn_if_not_z_up(src, scan: np.ndarray, completer) -> None:
    """A warning for a scan whose z axis is likely not up (:meth:`Completer.not_z_up`): it would
    lose what lies behind the sensor to the height limit and be completed as if the ground were a
    wall."""
    hint = completer.not_z_up(scan)
    if hint is not None:
        log.warning("%s: %s", src, hint)


def _line(src, result, out, n_read: int) -> str:
    """One scan's line: the points read and what of them was left out before completing (rows
    with NaN / inf - no-returns of an organised scan - and points outside the range / z limits)."""
    counts = ((n_read - result.num_input, "non-finite"),
              (result.num_input - result.num_filtered, "outside the range / z limits"))
    dropped = [f"{n} {what}" for n, what in counts if n > 0]
    left_out = f" (left out: {', '.join(dropped)})" if dropped else ""
    return (f"{src}: {n_read} points{left_out} -> {len(result.points)} points in "
            f"{result.timings['total']:.2f} s ({result.steps} {result.process} steps, w={result.guidance:g}, "
            f"seed {result.seed}) -> {out}")


def _is_folder_name(name: str) -> bool:
    """A path written with a trailing separator (``dense/``): a folder, existing or not."""
    return name.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))


def _write_error(exc: OSError, path) -> str:
    """One line for an OSError writing ``path``, naming ``path`` (not our temporary file)."""
    from ..cli import describe_os_error
    text = describe_os_error(exc, path)
    return text if text.endswith(f": {path}") else f"cannot write {path}: {text}"


def _is_same_file(a: Path, b: Path) -> bool:
    """Whether writing ``b`` would replace ``a`` (the same path, or a link to it)."""
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def run(args) -> int:
    from ..io import FORMATS

    files = _expand(args.inputs)
    batch = len(args.inputs) > 1 or Path(args.inputs[0]).is_dir()
    out = Path(args.output)
    into_folder = not batch and _is_folder_name(args.output)
    if into_folder:
        # one scan into a folder: under the scan's name, as a batch names its completions
        src = files[0]
        if not args.format and src.suffix.lower() not in FORMATS:
            raise CloudFormatError(f"{src}: unsupported extension {src.suffix or '(none)'!r}; expected "
                                   f"one of {', '.join(FORMATS)}")
        _check_writable(out, "-o", folder=True)
        out = out / (src.stem + (f".{args.format}" if args.format else src.suffix.lower()))
    elif args.format and not batch:
        raise ConfigError("--format is for several inputs or an output folder (-o DIR/); with one "
                          "output file, its extension is its format")
    if not batch:
        if out.suffix.lower() not in FORMATS:
            raise CloudFormatError(f"output {out}: unsupported extension {out.suffix or '(none)'!r}; "
                                   f"expected one of {', '.join(FORMATS)} (or end -o with '/' to write "
                                   "into a folder)")
        if args.render and Path(args.render).suffix.lower() != ".png":
            raise ConfigError(f"--render expects a .png path, got {args.render!r}")
        if args.skip_existing and not into_folder:
            raise ConfigError("--skip-existing is for several inputs or an output folder (-o DIR/); "
                              "with one output file, run the command or not")
        if args.ascii and out.suffix.lower() not in (".ply", ".pcd"):
            log.warning("--ascii applies to .ply and .pcd outputs; %s is written in its binary format", out)
        if _is_same_file(files[0], out):
            raise ConfigError(f"-o {out} is the input scan itself: its completion would replace it; "
                              "write the completion to another file")
        _check_writable(out, "-o")
        if args.render:
            _check_writable(Path(args.render), "--render")
    settings = CompletionSettings.from_args(args)   # ConfigError for values out of range
    if batch and settings.seed is not None:
        # scan i is completed with --seed + i: the last scan's seed must be one the Completer takes,
        # found now rather than as a failure of that scan after the others were completed
        last, high = settings.seed + len(files) - 1, BY_NAME["seed"].range[1]
        if last > high:
            raise ConfigError(f"--seed {settings.seed}: scan {len(files) - 1} ({files[-1]}) would be "
                              f"completed with seed {last}, above {high}; give a seed <= "
                              f"{high - len(files) + 1}")
    apply_threads(args.threads)
    if into_folder and args.skip_existing and out.exists():
        print(f"completed 0 of 1 scans into {out.parent}, 1 left as it was (--skip-existing): {out}")
        return 0
    if batch:
        return _run_batch(args, settings, files, out)

    from ..completer import Completer
    from ..io import write_cloud

    scan = _read_scan(files[0], args.bin_format)    # CloudFormatError for missing / malformed files
    completer = Completer.from_settings(settings)
    _warn_if_not_z_up(files[0], scan, completer)
    try:
        result = completer.complete_detailed(scan)
    except CloudFormatError as exc:        # an unusable scan (too few points, flat): name the file
        if str(files[0]) in str(exc):
            raise
        raise CloudFormatError(f"{files[0]}: {exc}") from None
    _check_kept_points(files[0], result)
    try:
        write_cloud(out, result.points, binary=not args.ascii, bin_format=args.bin_format)
    except OSError as exc:                 # a full disk: name the output, not our temporary file
        raise LidarCompletionError(_write_error(exc, out)) from None
    times = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if k != "total" and v > 0)
    print(_line(files[0], result, out, len(scan)))
    log.info("stage times: %s", times)
    if args.render:
        try:
            _render(args.render, scan, result, files[0].name)
        except OSError as exc:
            raise LidarCompletionError(_write_error(exc, args.render)) from None
        print(f"render -> {args.render}")
    return 0


def _remove_stale_temporaries(targets: list[Path]) -> None:
    """The temporary files (``<output>.<pid>.tmp``) a killed batch left beside its outputs: never
    read (--skip-existing looks at finished names only), but full-sized scans. Those of a batch
    still running into the folder are left alone."""
    from ..fileutil import stale_tmp

    for target in targets:
        for tmp in target.parent.glob(target.name + ".*.tmp"):
            if stale_tmp(tmp):
                tmp.unlink(missing_ok=True)


def _run_batch(args, settings, files: list[Path], out_dir: Path) -> int:
    from ..progress import progress_bar

    from ..completer import Completer
    from ..io import FORMATS, write_cloud

    if out_dir.suffix.lower() in FORMATS:
        raise ConfigError(f"-o {out_dir}: with several inputs the output is a folder, not a "
                          f"{out_dir.suffix} file")
    _check_writable(out_dir, "-o", folder=True)
    render_dir = Path(args.render) if args.render else None
    if render_dir is not None and render_dir.suffix.lower() == ".png":
        raise ConfigError(f"--render {render_dir}: with several inputs it is a folder for one PNG per scan")
    if render_dir is not None:
        _check_writable(render_dir, "--render", folder=True)
    targets = [out_dir / (f.stem + (f".{args.format}" if args.format else f.suffix.lower())) for f in files]
    _remove_stale_temporaries(targets)
    if args.ascii and any(t.suffix not in (".ply", ".pcd") for t in targets):
        log.warning("--ascii applies to .ply and .pcd outputs; .bin and .npy ones are written in their "
                    "binary formats")
    seen: dict[Path, Path] = {}
    unreadable: dict[Path, str] = {}   # named inputs of no cloud format: failures, as bad files are
    for src, dst in zip(files, targets):
        if src.suffix.lower() not in FORMATS:
            unreadable[src] = (f"{src}: unsupported extension {src.suffix or '(none)'!r}; expected one "
                               f"of {', '.join(FORMATS)}")
            continue
        if _is_same_file(src, dst):             # nor a completion replace its own scan
            raise ConfigError(f"{src} would be replaced by its completion ({dst}); write the completions "
                              "to another folder, or in another format (--format)")
        if dst in seen:                         # two inputs must not write one file
            raise ConfigError(f"{seen[dst]} and {src} would both be written to {dst}; give inputs "
                              "with distinct names (or complete them in separate runs)")
        seen[dst] = src
    if len(unreadable) == len(files):       # nothing to complete: say so before loading the model
        raise CloudFormatError("; ".join(unreadable.values()))
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
    bar = progress_bar(list(zip(files, targets, renders)), desc="complete", unit="scan",
                       file=sys.stderr, disable=len(files) < 2 or getattr(args, "no_progress", False) or None)
    for i, (src, dst, png) in enumerate(bar):
        if args.skip_existing and dst.exists():
            skipped += 1
            continue
        seed = None if settings.seed is None else settings.seed + i
        target = dst
        if src in unreadable:
            failed.append((src, unreadable[src]))
            bar.write(f"error: {unreadable[src]}", file=sys.stderr)
            continue
        try:
            for path in (dst, png):         # a folder in the way: found before completing the scan
                if path is not None and path.is_dir():
                    raise ConfigError(f"cannot write {path}: it is a folder")
            scan = _read_scan(src, args.bin_format)
            _warn_if_not_z_up(src, scan, completer)
            result = completer.complete_detailed(scan, seed=seed)
            _check_kept_points(src, result)
            write_cloud(dst, result.points, binary=not args.ascii, bin_format=args.bin_format)
            if png is not None:
                target = png
                _render(png, scan, result, src.name)
        # a bad file is reported and the batch goes on; so is a file that cannot be written (no
        # permission, a full disk) and a scan the model fails on (out of memory): one scan's
        # problem, and the scans after it may well go through
        except (LidarCompletionError, OSError, RuntimeError) as exc:
            if isinstance(exc, OSError):
                text = _write_error(exc, target)
            elif isinstance(exc, LidarCompletionError):
                text = str(exc)
            else:
                log.debug("%s failed", src, exc_info=True)
                text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            msg = text if str(src) in text else f"{src}: {text}"
            failed.append((src, msg))
            bar.write(f"error: {msg}", file=sys.stderr)
            continue
        done += 1
        bar.write(_line(src, result, dst, len(scan)))
    bar.close()
    extra = f", {skipped} left as they were (--skip-existing)" if skipped else ""
    print(f"completed {done} of {len(files)} scans into {out_dir}{extra}"
          + (f"; {len(failed)} failed: " + ", ".join(s.name for s, _ in failed) if failed else ""))
    return 1 if failed else 0
