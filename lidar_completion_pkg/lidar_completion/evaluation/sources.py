"""Where evaluated frames come from, and the two evaluations built on them.

* :class:`SequenceSource`: the frames of a SemanticKITTI-layout sequence with the ground-truth
  cache's evaluation targets; :func:`evaluate_sequence` completes them with a Completer (or scores
  the input scan itself, ``baseline="input"``).
* :class:`FileSource`: prediction and ground-truth files paired by stem; :func:`evaluate_files`
  scores completions made elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import CloudFormatError, ConfigError, DatasetError, EmptyFrameError
from ..fileutil import sha256_file
from ..settings import CompletionSettings
from .runner import EvalOptions, run_evaluation

__all__ = ["SequenceSource", "FileSource", "evaluate_sequence", "evaluate_files", "pair_files",
           "gt_cache_targets", "weights_fingerprint", "CLOUD_EXTS", "BIN_FORMATS"]

log = logging.getLogger(__name__)

CLOUD_EXTS = (".bin", ".npy", ".ply", ".pcd")


class SequenceSource:
    """Frames ``0, every, 2 every, ...`` (at most ``limit``) of one sequence: ``load(key)`` gives
    (filtered input scan, evaluation target: z band -4..4.4 m, viewpoint mask) from the cache
    (``cache_root``, default DATASET_ROOT/gt_cache; ``build=True`` builds a missing cache first)."""

    def __init__(self, dataset_root, sequence="08", cache_root=None, build: bool = False,
                 every: int = 1, limit: Optional[int] = None):
        from ..data import EvaluationDataset

        # n_fps=1: the dataset's farthest-point sampling is not needed here (the Completer does its own)
        self.dataset = EvaluationDataset(dataset_root, [sequence], cache_root=cache_root, n_fps=1,
                                         tile=1, build=build)
        self.dataset_root = Path(dataset_root)
        self.sequence = self.dataset.sequences[0].sequence
        self.indices = list(range(0, len(self.dataset), every))[:limit]
        if not self.indices:
            raise DatasetError(f"sequence {self.sequence} has no frames to evaluate")
        self.keys = [f"{f:06d}" for f in self.indices]
        self.cache = self.dataset.caches[0]
        self._last: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}

    def gt_fingerprint(self) -> str:
        """sha256 naming the ground truth by content: the cache's build settings, its source
        fingerprint and the sha256 its manifest records for every target (the files are not read
        again), so a cache rebuilt with other settings or from other scans at the same path is told
        apart, and a copy of the same cache elsewhere is not."""
        header = self.cache.header
        content = {"config": header.get("config"), "source": header.get("source"),
                   "targets": [self.cache.entries[i].get("sha256")
                               for i in sorted(self.cache.entries)]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def load(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        if key not in self._last:
            item = self.dataset.sample(int(key), np.random.default_rng(0))   # eval: no randomness drawn
            self._last = {key: (item["raw_scan"], item["target"])}
        return self._last[key]

    def run_info(self, seed: int, every: int, limit: Optional[int]) -> Dict:
        """The run record's description of the data (identity keys: dataset, sequence, seed,
        gt_cache; ``every`` and ``limit`` choose frames but change no frame's numbers)."""
        return {"dataset": str(self.dataset_root.resolve()), "sequence": self.sequence,
                "seed": int(seed), "every": every, "limit": limit,
                "gt_cache": self.gt_fingerprint(), "gt_cache_dir": str(self.cache.dir.resolve())}


def evaluate_sequence(dataset_root, sequence="08", out="evaluation",
                      settings: Optional[CompletionSettings] = None,
                      options: EvalOptions = EvalOptions(), *, completer=None,
                      baseline: Optional[str] = None, cache_root=None, build_gt: bool = False) -> Dict:
    """Evaluate one SemanticKITTI-layout sequence and return the summary dict.

    The prediction comes from ``completer`` (a :class:`~lidar_completion.completer.Completer`), else
    from ``Completer.from_settings(settings)`` (defaults: the shipped student), or, with
    ``baseline="input"``, is the filtered input scan itself (no model). ``settings.checkpoint`` is
    recorded in the run either way. Frame ``i`` is completed with seed ``options.seed + i``; the
    ground truth is :class:`SequenceSource`'s.
    """
    if baseline not in (None, "input"):
        raise ConfigError(f"baseline: expected 'input' or none, got {baseline!r}")
    settings = settings if settings is not None else CompletionSettings()
    src = SequenceSource(dataset_root, sequence, cache_root=cache_root, build=build_gt,
                         every=options.every, limit=options.limit)
    run: Dict = src.run_info(options.seed, options.every, options.limit)
    # the input baseline scores the scan as the cache's input filter leaves it: no completion
    # setting changes it
    identity = ["dataset", "sequence", "seed", "source", "gt_cache"]
    if baseline == "input":
        run.update(source="input scan (no model)", label=options.label or "input scan alone", steps=None)
        predict_fn = None
    else:
        checkpoint = settings.checkpoint
        if completer is None:
            from ..checkpoints import default_checkpoint_path
            from ..completer import Completer
            completer = Completer.from_settings(settings)
            if checkpoint is None:      # the shipped student: recorded by the file it loaded
                checkpoint = str(default_checkpoint_path())
        ckpt = refiner = None
        if checkpoint is not None:
            ckpt = {"path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint)}
        if settings.refiner_checkpoint is not None:
            refiner = {"path": str(Path(settings.refiner_checkpoint).resolve()),
                       "sha256": sha256_file(settings.refiner_checkpoint)}
        run.update(source="completer", checkpoint=ckpt, refiner_checkpoint=refiner,
                   **completer_record(completer), device=str(completer.device), completer=repr(completer),
                   label=options.label or (Path(checkpoint).stem if checkpoint else "model"))
        identity += COMPLETER_IDENTITY
        if completer.refine and completer.refiner is not None:
            run.update(refined_cut_record(completer))
            identity.append(REFINED_CUT)
        predict_fn = completer.complete_detailed
    run["identity_keys"] = identity
    run["title"] = f"sequence {src.sequence}, {run['label']}"
    run["description"] = ("Ground truth: the cached per-frame targets (z band -4..4.4 m, viewpoint "
                          "mask). Prediction: " + ("the filtered input scan itself."
                                                   if baseline == "input" else
                                                   f"{run['steps']} steps ({run['process']} solver), "
                                                   f"w={run['guidance']:g}, "
                                                   f"refine={run['refine']}, per-frame seed = "
                                                   f"{options.seed} + frame."))

    def predict(key: str, index: int, inp):
        if predict_fn is None:
            return inp, {}
        res = predict_fn(inp, seed=options.seed + int(index))
        return res.points, dict(res.timings, seed=res.seed)

    return run_evaluation(src.keys, src.load, predict, out, run, options, indices=src.indices)


# Every setting of a Completer that changes a frame's completion for a given seed. The checkpoint
# counts by the content of the networks the Completer runs (``weights``), not by the path or bytes of
# its file: a file retrained in place is a different model, a copy or a re-save of the same weights
# is not, and a Completer passed in is covered too. ``noise_device``: the seeded noise comes from a
# torch generator on the Completer's device, and the CPU and CUDA generators give different numbers
# for one seed. ``precision`` is the effective one (the CPU always runs fp32): bf16 / fp16 autocast
# keeps 8 / 11 mantissa bits, far beyond fp32 rounding. Left out: the sparse backend, the device
# index, CUDA graphs and where farthest-point sampling runs (``fps``) compute the same fp32
# operations (exact sampling either way) and change a completion only by rounding, which a resumed
# run may mix.
COMPLETER_IDENTITY = ["weights", "steps", "guidance", "refine", "process", "n_fps", "tile", "fps_parts",
                      "min_range", "max_range", "min_z", "post_max_range", "min_points", "precision",
                      "noise_device"]


#: The identity key of refined rows: the refined completion is cut at post_max_range too (since
#: 0.2.0; before, only the unrefined one was). A folder of refined frames from before records no
#: such cut and is refused, not resumed with frames of the other rule.
REFINED_CUT = "refined_max_range"


def refined_cut_record(completer) -> Dict:
    """{REFINED_CUT: the cut} for a run whose frames are the refined completion."""
    return {REFINED_CUT: completer.post_max_range}


def completer_record(completer) -> Dict:
    """The values of :data:`COMPLETER_IDENTITY` for ``completer`` (for a run record)."""
    return {"weights": weights_fingerprint(completer), "steps": completer.steps,
            "guidance": completer.guidance, "refine": completer.refine, "process": completer.process,
            "n_fps": completer.n_fps, "tile": completer.tile, "fps_parts": completer.fps_parts,
            "min_range": completer.min_range, "max_range": completer.max_range, "min_z": completer.min_z,
            "post_max_range": completer.post_max_range, "min_points": completer.min_points,
            "precision": completer.precision if completer.device.type == "cuda" else "fp32",
            "noise_device": completer.device.type}


def weights_fingerprint(completer) -> str:
    """sha256 of the networks a Completer runs (every tensor's name, dtype, shape and bytes, as
    :func:`lidar_completion.checkpoints.content_hash` hashes a checkpoint); the refiner only when it
    is used (``refine`` is compared on its own)."""
    from ..checkpoints import content_hash
    nets = {"encoder": completer.encoder, "denoiser": completer.denoiser}
    if completer.refine and completer.refiner is not None:
        nets["refiner"] = completer.refiner
    return content_hash({role: net.state_dict() for role, net in nets.items()}, {}, {})


# ------------------------------------------------------------------------------ evaluate files
def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def pair_files(pred_dir, gt_dir, unpaired: Optional[Dict[str, List[str]]] = None) \
        -> List[Tuple[str, Path, Path]]:
    """(stem, prediction file, ground-truth file) for every stem present in both folders
    (.bin/.npy/.ply/.pcd), in natural order; raises DatasetError when nothing pairs. ``unpaired``
    (a dict, filled when given): the stems of each side ("pred", "gt") that have no partner."""
    found = []
    for d, what in ((Path(pred_dir), "prediction"), (Path(gt_dir), "ground-truth")):
        if not d.is_dir():
            raise DatasetError(f"{what} folder {d} does not exist or is not a folder")
        files: Dict[str, Path] = {}
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in CLOUD_EXTS:
                if p.stem in files:
                    raise DatasetError(f"{d}: two clouds share the stem {p.stem!r} "
                                       f"({files[p.stem].name}, {p.name}); keep one")
                files[p.stem] = p
        found.append(files)
    pred, gt = found
    stems = sorted(set(pred) & set(gt), key=_natural)
    if not stems:
        raise DatasetError(f"no file stem is common to {pred_dir} ({len(pred)} clouds) and {gt_dir} "
                           f"({len(gt)} clouds); files are paired by name without extension")
    for role, name, only in (("pred", "prediction", set(pred) - set(gt)),
                             ("gt", "ground truth", set(gt) - set(pred))):
        if unpaired is not None:
            unpaired[role] = sorted(only, key=_natural)
        if only:
            log.warning("%d %s files have no partner and are skipped (e.g. %s)", len(only), name,
                        sorted(only, key=_natural)[0])
    return [(s, pred[s], gt[s]) for s in stems]


#: How ``.bin`` clouds are read: "kitti" float32 (x, y, z, intensity) records of 16 bytes, "xyz"
#: float32 (x, y, z) records of 12 bytes (the ground-truth cache's ``targets/NNNNNN.bin``), "auto"
#: xyz in a folder of the ground-truth cache (recognised by its manifest), KITTI elsewhere.
BIN_FORMATS = ("auto", "kitti", "xyz")


def _gt_cache_header(folder: Path) -> Optional[Dict]:
    """The header of the ground-truth cache whose sequence folder (``CACHE/SS``) is ``folder``;
    None when ``folder`` holds no manifest of the cache's format."""
    from ..data.gt import FORMAT
    for name in ("manifest.json", "manifest.jsonl"):   # consolidated, or the journal of a build
        path = folder / name
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                first = json.loads(fh.read() if name == "manifest.json" else fh.readline())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        header = first.get("header") if name == "manifest.json" and isinstance(first, dict) else first
        if isinstance(header, dict) and header.get("format") == FORMAT:
            return header
    return None


def gt_cache_targets(folder) -> Optional[Path]:
    """The ``targets`` folder of the ground-truth cache that ``folder`` is (``CACHE/SS``) or is the
    targets folder of (``CACHE/SS/targets``), recognised by the cache's manifest; None otherwise."""
    folder = Path(folder).resolve()     # a link to the cache's folder is the cache's folder
    if (folder / "targets").is_dir() and _gt_cache_header(folder) is not None:
        return folder / "targets"
    if folder.name == "targets" and folder.is_dir() and _gt_cache_header(folder.parent) is not None:
        return folder
    return None


class FileSource:
    """PRED_DIR and GT_DIR clouds paired by stem (at most ``limit``); the optional ``input_dir``
    (same stems) only adds the input scan to the renders.

    ``bin_format`` (:data:`BIN_FORMATS`, or ``{"pred": ..., "gt": ...}`` for each folder apart)
    says how the ``.bin`` files of PRED_DIR and GT_DIR are read (input scans are KITTI scans). A folder of the ground-truth cache (``CACHE/SS`` or
    ``CACHE/SS/targets``) is recognised by its manifest: its targets are paired and, with "auto",
    read as the 3 float32 per point the cache writes; any other folder's ``.bin`` files are KITTI
    scans (4 float32 per point) unless "xyz" is given; the cache's targets are scored in the
    evaluation z band of its build settings (-4 < z < 4.4 m), as ``evaluate`` scores them, so the two
    commands give the same numbers for the same completions. A prediction that cannot be read or holds
    NaN / inf is a failed frame (recorded with its file name and left out, as a scan the Completer
    cannot complete is in ``evaluate``); a ground-truth file that cannot be used ends the run,
    naming the file: the reference itself is wrong. ``max_range`` (metres, None: off) keeps the
    predicted points closer than it to the origin, as the published evaluation crops completions
    read from files (the ground truth is not cropped)."""

    def __init__(self, pred_dir, gt_dir, input_dir=None, limit: Optional[int] = None,
                 bin_format="auto", max_range: Optional[float] = 50.0):
        if max_range is not None and (isinstance(max_range, bool) or not isinstance(max_range, (int, float))
                                      or not 0 < max_range < float("inf")):
            raise ConfigError(f"max_range: expected None or a positive distance in metres, got {max_range!r}")
        self.max_range = None if max_range is None else float(max_range)
        given_formats = dict(bin_format) if isinstance(bin_format, Mapping) else \
            {"pred": bin_format, "gt": bin_format}
        for role in ("pred", "gt"):
            given_formats.setdefault(role, "auto")
        for role, value in given_formats.items():
            if role not in ("pred", "gt") or value not in BIN_FORMATS:
                raise ConfigError(f"bin_format: expected one of {', '.join(BIN_FORMATS)} (or a "
                                  f"mapping of pred / gt to one), got {role}={value!r}")
        given_formats["input"] = "auto"  # input scans (only drawn) are raw scans: KITTI
        if input_dir is not None and not Path(input_dir).is_dir():
            raise DatasetError(f"input-scan folder {input_dir} does not exist or is not a folder")
        self.formats: Dict[str, str] = {}
        self.gt_config = None     # the cache's build settings when GT_DIR is a folder of the cache
        folders = {}
        for role, d in (("pred", pred_dir), ("gt", gt_dir), ("input", input_dir)):
            if d is None:
                continue
            targets = gt_cache_targets(d)
            folders[role] = targets if targets is not None else Path(d)
            if role == "gt" and targets is not None:
                from ..data.gt import GTConfig
                self.gt_config = GTConfig.from_dict((_gt_cache_header(targets.parent) or {}).get("config") or {})
            given = given_formats[role]
            self.formats[role] = given if given != "auto" else \
                ("xyz" if targets is not None else "kitti")
        self.pred_dir, self.gt_dir = folders["pred"], folders["gt"]
        if self.gt_config is None and self.formats["gt"] == "xyz":
            # xyz .bin outside a cache folder: most likely targets copied out of the cache, which
            # lose its build settings and with them the z band evaluate scores them in
            log.warning("%s is not a folder of the ground-truth cache: its targets are scored whole, "
                        "while evaluate scores the cache's targets in its evaluation z band (-4 < z < "
                        "4.4 m by default); give the cache folder itself (CACHE/SS) for the same "
                        "numbers", gt_dir)
        self.unpaired: Dict[str, List[str]] = {}
        pairs = pair_files(self.pred_dir, self.gt_dir, self.unpaired)[:limit]
        self.keys = [s for s, _, _ in pairs]
        self._files = {s: (p, g) for s, p, g in pairs}
        self._inputs: Dict[str, Path] = {}
        if input_dir is not None:
            for p in folders["input"].iterdir():
                if p.is_file() and p.suffix.lower() in CLOUD_EXTS:
                    self._inputs[p.stem] = p
        self._warned: set = set()

    def read(self, path: Path, role: str) -> np.ndarray:
        """The (N, 3) float32 cloud of ``path`` in folder ``role`` (pred, gt, input), ``.bin`` read
        as :attr:`formats` says; a CloudFormatError naming the file when it is unusable."""
        from ..io import read_bin_checked, read_cloud
        if path.suffix.lower() != ".bin":
            cloud = read_cloud(path)
        else:
            def warn_once(message):     # once per folder, not for each of thousands of frames
                if role not in self._warned:
                    self._warned.add(role)
                    log.warning(_folder_option(message, role))
            try:
                cloud = read_bin_checked(path, self.formats.get(role, "kitti"), warn=warn_once)
            except CloudFormatError as exc:
                raise CloudFormatError(_folder_option(str(exc), role)) from None
        finite = np.isfinite(cloud).all(axis=1)
        if role == "input":        # only drawn: invalid returns of a raw scan are just not drawn
            return np.ascontiguousarray(cloud[finite])
        bad = int(len(cloud) - finite.sum())
        if bad:
            raise CloudFormatError(f"{path}: {bad} of {len(cloud)} points have NaN/inf coordinates")
        if role == "gt" and not len(cloud):   # nothing to score against: CD and EMD are undefined
            raise CloudFormatError(f"{path}: the ground truth holds no points")
        return cloud

    def signature(self, key: str) -> Dict[str, List]:
        """Name, size and modification time of frame ``key``'s prediction and ground truth: a
        resumed run scores again the frames whose files changed since they were scored."""
        out = {}
        for role, path in zip(("pred", "gt"), self._files[key]):
            try:
                st = path.stat()
                out[role] = [path.name, st.st_size, st.st_mtime_ns]
            except OSError:
                out[role] = [path.name, None, None]
        return out

    @property
    def gt_z_band(self) -> Optional[List[float]]:
        """[z_min, z_max] of the ground truth scored when GT_DIR is a folder of the cache, else None."""
        return None if self.gt_config is None else [self.gt_config.z_min, self.gt_config.z_max_eval]

    def load(self, key: str):
        gt = self.read(self._files[key][1], "gt")
        if self.gt_config is not None:
            from ..data.gt import evaluation_target
            gt = evaluation_target(gt, self.gt_config)
            if not len(gt):      # a failed frame, as `evaluate` has it
                raise EmptyFrameError(f"{self._files[key][1]}: the ground truth holds no point in the "
                                      f"evaluation z band {self.gt_z_band} m")
        inp = self.read(self._inputs[key], "input") if key in self._inputs else None
        return inp, gt

    def predict(self, key: str, index: int, inp):
        t0 = time.perf_counter()
        pred = self.read(self._files[key][0], "pred")     # CloudFormatError: a failed frame
        if self.max_range is not None:
            pred = pred[np.linalg.norm(pred.astype(np.float64), axis=1) < self.max_range]
        return pred, {"read": time.perf_counter() - t0}


def _folder_option(message: str, role: str) -> str:
    """A reader's advice to pass --bin-format, made the option of the folder (--gt-bin-format /
    --pred-bin-format): --bin-format would change the other folder's reading too."""
    return message if role == "input" else message.replace("--bin-format", f"--{role}-bin-format")


def evaluate_files(pred_dir, gt_dir, out, input_dir=None, options: EvalOptions = EvalOptions(),
                   bin_format="auto", max_range: Optional[float] = 50.0) -> Dict:
    """Evaluate completions made elsewhere (see :class:`FileSource`). Returns the summary dict."""
    src = FileSource(pred_dir, gt_dir, input_dir, options.limit, bin_format, max_range)
    run = {"pred_dir": str(src.pred_dir.resolve()), "gt_dir": str(src.gt_dir.resolve()),
           "bin_format": {role: src.formats[role] for role in ("pred", "gt")},
           "pred_max_range": src.max_range, "gt_z_band": src.gt_z_band,
           "source": "files", "label": options.label or Path(pred_dir).name, "steps": None,
           # the band only where there is one: runs on other folders resume as before
           "identity_keys": ["pred_dir", "gt_dir", "bin_format", "pred_max_range"]
           + (["gt_z_band"] if src.gt_z_band else [])}
    run["title"] = f"{run['label']} (files)"
    run["description"] = (f"Predictions from {pred_dir}, ground truth from {gt_dir}, paired by stem"
                          + (f"; predicted points at {src.max_range:g} m or farther left out" if src.max_range
                             else "")
                          + (f"; the ground-truth cache's targets scored in {src.gt_z_band[0]:g} < z < "
                             f"{src.gt_z_band[1]:g} m, as `evaluate` scores them" if src.gt_z_band else "")
                          + ".")
    missing = src.unpaired.get("gt") or []
    if missing:   # a frame a method did not complete is not in its means: the summary says so
        run["gt_without_prediction"] = missing
        run["description"] += (f" {len(missing)} ground-truth file{'' if len(missing) == 1 else 's'} "
                               f"had no prediction and {'is' if len(missing) == 1 else 'are'} not scored: "
                               + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "") + ".")
    return run_evaluation(src.keys, src.load, src.predict, out, run, options, signature=src.signature)
