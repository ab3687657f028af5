"""Loading the repository's scripts (scripts/release, scripts/research, benchmarks) as modules in
tests, and running a command's ``main(argv)`` only as far as its argument parser."""
import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """The module of ``ROOT/relpath`` (e.g. ``scripts/research/validation_curves.py``), executed fresh
    with its own folder importable (benchmarks import their neighbours)."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


def small_drive(root: Path, sequences=(8,), scans: int = 2, seed: int = 1) -> Path:
    """A synthetic SemanticKITTI-layout root with a few coarse scans (256 azimuth steps) per
    sequence and its built ground truth: the data of the scripts' end-to-end tests."""
    from lidar_completion.data import build_gt, generate_dataset
    from lidar_completion.data.synthetic import SyntheticConfig

    generate_dataset(root, sequences=list(sequences), scans=scans, seed=seed,
                     config=SyntheticConfig(azimuth_steps=256))
    build_gt(root, [f"{s:02d}" for s in sequences], progress=False)
    return Path(root)


class Refused(Exception):
    """The argument parser's complaint (its message), or a command that never parsed."""


class _Parsed(Exception):
    pass


def parse_only(main, argv: list):
    """Run ``main(argv)`` until its argument parser has accepted ``argv``, then stop: the parsed
    namespace (None after ``--help`` / ``--version``). The parser's error is raised as
    :class:`Refused` with its message; nothing past the parsing runs."""
    real_parse, real_error = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.error

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(real_parse(self, args, namespace))

    def refuse(self, message):
        raise Refused(message)

    argparse.ArgumentParser.parse_args = parse_then_stop
    argparse.ArgumentParser.error = refuse
    try:
        main(argv)
    except _Parsed as done:
        return done.args[0]
    except SystemExit as e:
        if e.code in (0, None):
            return None
        raise Refused(f"exit {e.code}") from None
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.error = real_parse, real_error
    raise Refused("it ran past its parser without parsing")


def command_main(argv: list):
    """(main function, its arguments) of a command line given from its program on:
    ``lidar-completion ...``, ``lidar-completion-train ...``, ``-m module ...`` or
    ``path/to/script.py ...`` (relative to the repository)."""
    prog = argv[0].rsplit("/", 1)[-1]
    if prog == "lidar-completion":
        from lidar_completion.cli import main
        return main, argv[1:]
    if prog == "lidar-completion-train" or argv[:2] == ["-m", "training"]:
        from training.__main__ import main
        return main, argv[1:] if prog == "lidar-completion-train" else argv[2:]
    if argv[0] == "-m":
        return importlib.import_module(argv[1]).main, argv[2:]
    if not (ROOT / argv[0]).is_file():
        raise Refused(f"no such script: {argv[0]}")
    return load_script(argv[0]).main, argv[1:]
