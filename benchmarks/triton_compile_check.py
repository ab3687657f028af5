"""Compile every Triton kernel variant the networks launch for a GPU target, on any machine.

Triton compiles ahead of time for a named target (``GPUTarget``) with the ptxas it ships, no GPU
needed, so a kernel that would not compile on the GPU (or that spills registers, or wants more shared
memory than the chip has) shows up here before any GPU time is spent. The variants are recorded
from one forward pass of the three networks at the chosen widths: each convolution launch (map kind,
channel counts, fused epilogue) with every tile configuration the tuner may try on CUDA, in bf16
and fp32, plus the nearest-cell, farthest-point-sampling, modulation and map-building kernels and the
training's weight-gradient kernel.

Prints one line per compiled variant (registers, spilled bytes, shared memory) and a summary; exits
non-zero when a variant fails to compile or spills. Needs only Triton (and this package's torch
import for the recording pass, which runs with the kernels stubbed out)::

    python benchmarks/triton_compile_check.py --widths full --arch 90
    LIDAR_COMPLETION_TRITON_LOOP=both python benchmarks/triton_compile_check.py   # the flat K loop too
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def record_launches(widths: str):
    """Distinct (kind, kvol, ca, cb, n, flags) of the convolutions of one forward pass of the
    encoder, the guided denoiser and the refiner, with the kernels replaced by a recorder."""
    import torch

    from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig, Refiner
    from lidar_completion.sparse import conv_implicit_gemm as igemm

    seen = {}
    real = igemm.implicit_gemm

    def recorder(segments, weight, plan_for, rows, epilogue, out_dtype, kind, interpreted):
        kvol, cin, n = weight.shape
        ca = segments[0].shape[-1]
        cb = segments[1].shape[-1] if len(segments) > 1 else 0
        flags = (epilogue.scale is not None, epilogue.residual is not None, bool(epilogue.relu))
        groups = max([s.shape[0] for s in segments if s.dim() == 3] or [0])
        key = (kind, kvol, ca, cb, n, max(1, groups)) + flags
        seen[key] = seen.get(key, 0) + 1
        shape = (groups, rows, n) if groups else (rows, n)
        return torch.zeros(shape, dtype=out_dtype, device=weight.device)

    from lidar_completion.sparse import triton_backend
    refusal = triton_backend.triton_refusal
    modulate = triton_backend.TritonBackend.__dict__["modulate"]
    maps = triton_backend.TritonEngine.__dict__["maps"]
    igemm.implicit_gemm = recorder
    triton_backend.triton_refusal = lambda device: None     # nothing runs: the CPU will do
    triton_backend.TritonEngine.maps = None                 # maps from torch operations
    triton_backend.TritonBackend.modulate = triton_backend.TorchBackend.__dict__["modulate"]
    try:
        cfg = ModelConfig.full() if widths == "full" else ModelConfig.tiny()
        g = torch.Generator().manual_seed(0)
        pts = torch.randn(400, 3, generator=g) * 6
        batch = torch.zeros(400, dtype=torch.long)
        with torch.no_grad():
            enc = ConditionEncoder(cfg, "torch").eval()
            cond = enc(pts, batch)
            uncond = enc.empty_condition(100, 1)
            Denoiser(cfg, "triton").eval().forward_cfg(pts + 0.1, batch, torch.tensor([500]), cond, uncond)
            Refiner(cfg, "triton").eval()(pts, batch)
            ConditionEncoder(cfg, "triton").eval()(pts, batch)
    finally:
        igemm.implicit_gemm = real
        triton_backend.triton_refusal = refusal
        triton_backend.TritonBackend.modulate = modulate
        triton_backend.TritonEngine.maps = maps
    return seen


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes) of the one kernel in a cubin, from cuobjdump's resource usage."""
    import re

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1)) if "REG:" in text else -1
    spill = sum(int(v) for v in re.findall(r"(?:STORE|LOAD):(\d+)", text))   # spill stores / loads
    return regs, spill


def _map_kernels() -> tuple:
    """(kernel name in :mod:`lidar_completion.sparse.triton_kmap`, signature, constexprs, warps) of
    the map-building kernels, with the blocks their launchers use."""
    rows = {"M": "i32", "BM": "constexpr"}
    out = [("neighbour_kernel", {"keys_ptr": "*i64", "delta_ptr": "*i64", "table_ptr": "*i32", "bits_ptr": "*i32",
                                 "M": "i32", "iters": "i32", "pad_key": "i64", "K": "constexpr", "KP": "constexpr",
                                 "BM": "constexpr"}, dict(K=27, KP=32, BM=32), 4)]
    for name in ("child_kernel", "parent_kernel"):
        out.append((name, {"parent_ptr": "*i64", "k_ptr": "*i64", "table_ptr": "*i32", "bits_ptr": "*i32", **rows},
                    dict(BM=128), 4))
    for k in (27, 8):
        out.append(("arrange_kernel", {"order_ptr": "*i64", "table_ptr": "*i32", "out_table_ptr": "*i32",
                                       "out_order_ptr": "*i32", "M": "i32", "K": "constexpr", "KP": "constexpr",
                                       "BM": "constexpr"}, dict(K=k, KP=32 if k > 8 else 8, BM=64), 4))
    for block in (16, 32, 64, 128):
        for bits in ("*i32", "*u8"):
            out.append(("tile_mask_kernel", {"bits_ptr": bits, "mask_ptr": "*i32", "M": "i32", "BLOCK": "constexpr"},
                        dict(BLOCK=block), 4))
    out += [("parent_keys_kernel", {"keys_ptr": "*i64", "coarse_ptr": "*i64", "k_ptr": "*i64", "M": "i32",
                                    "sh": "i32", "pad_key": "i64", "AXIS": "constexpr", "BM": "constexpr"},
             dict(AXIS=18, BM=128), 4),
            ("unpack_kernel", {"keys_ptr": "*i64", "out_ptr": "*i64", "M": "i32", "AXIS": "constexpr",
                               "OFFSET": "constexpr", "BM": "constexpr"}, dict(AXIS=18, OFFSET=1 << 17, BM=128), 4),
            ("first_flag_kernel", {"skeys_ptr": "*i64", "flag_ptr": "*i32", **rows}, dict(BM=128), 4),
            ("unique_finish_kernel", {"skeys_ptr": "*i64", "order_ptr": "*i64", "ids_ptr": "*i32",
                                      "ukeys_ptr": "*i64", "dump_ptr": "*i64", "count_ptr": "*i64", "M": "i32",
                                      "cap": "i32", "pad_key": "i64", "BM": "constexpr"}, dict(BM=128), 4),
            ("lattice_nearest_kernel", {"q_ptr": "*i64", "stride_qm": "i32", "stride_qc": "i32", "qb_ptr": "*i64",
                                        "stride_qb": "i32", "skeys_ptr": "*i64", "order_ptr": "*i64",
                                        "out_ptr": "*i64", "unresolved_ptr": "*i8", "M": "i32", "E": "i32",
                                        "iters": "i32", "AXIS": "constexpr", "OFFSET": "constexpr",
                                        "BQ": "constexpr"}, dict(AXIS=18, OFFSET=1 << 17, BQ=32), 4)]
    return tuple(out)


def compile_all(seen: dict, arch: int, dtypes: list[str]) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lidar_completion.sparse import triton_kernels as K
    from lidar_completion.sparse import triton_kmap as M
    from lidar_completion.sparse.conv_implicit_gemm import candidates

    target = GPUTarget("cuda", arch, 32)
    fn = K.implicit_gemm_kernel
    failures = spills = count = 0
    done = set()
    t0 = time.time()
    for (kind, kvol, ca, cb, n, groups, affine, residual, relu) in sorted(seen):
        for dtype in dtypes:
            ptr = "*" + dtype
            for cfg in candidates(1 << 15, ca + cb, n, False, groups) + candidates(2000, ca + cb, n, False, groups):
                constexprs = dict(KVOL=kvol, IDENTITY=kind == "identity", HAS_B=cb > 0, AFFINE=affine,
                                  RESIDUAL=residual, RELU=relu, DOT_F32=dtype == "fp32",
                                  PRECISION="tf32x3" if dtype == "fp32" else "ieee", PAIR=cfg.pair,
                                  FLAT=cfg.flat and kind != "identity", BM=cfg.bm, BN=cfg.bn, BK=cfg.bk)
                key = (tuple(sorted(constexprs.items())), dtype, cfg.warps, cfg.stages, ca % 16, cb % 16, n % 16)
                if key in done:
                    continue
                done.add(key)
                signature = {"a_ptr": ptr, "b_ptr": ptr, "w_ptr": ptr, "out_ptr": ptr,
                             "order_ptr": "*i32", "table_ptr": "*i32", "tile_mask_ptr": "*i32",
                             "tile_list_ptr": "*i32",
                             "scale_ptr": "*fp32", "shift_ptr": "*fp32", "res_ptr": ptr,
                             "M": "i32", "CA": "i32", "CB": "i32", "N": "i32",
                             "stride_ag": "i32", "stride_am": "i32", "stride_bg": "i32", "stride_bm": "i32",
                             "stride_rg": "i32", "stride_rm": "i32"}
                signature.update({k: "constexpr" for k in constexprs})
                # what the launcher's specialisation gives at run time: tensors from torch's
                # allocator are 16-byte aligned, and channel counts and row strides that are
                # multiples of 16 are marked so (then the gathers become cp.async copies that the
                # pipeliner overlaps; without these marks the check compiles another kernel)
                names = list(signature)
                aligned = [arg for arg in names if arg.endswith("_ptr")]
                # (group strides are rows x channels: multiples of 16 when the channel count is)
                aligned += [arg for arg, c in (("CA", ca), ("stride_am", ca), ("stride_ag", ca), ("CB", cb),
                                               ("stride_bm", cb), ("stride_bg", cb), ("N", n), ("stride_rm", n),
                                               ("stride_rg", n)) if c and c % 16 == 0]
                attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
                name = (f"{kind} k{kvol} {ca}+{cb}->{n} g{groups} {dtype} {cfg.key()} "
                        f"aff{int(affine)} res{int(residual)} relu{int(relu)}")
                count += 1
                try:
                    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                       target=target, options={"num_warps": cfg.warps, "num_stages": cfg.stages})
                except Exception as exc:   # noqa: BLE001 - report every failure, keep going
                    failures += 1
                    print(f"FAIL  {name}: {str(exc).splitlines()[0][:200]}")
                    continue
                regs, spill = _resources(k.asm["cubin"])
                spills += spill > 0
                print(f"{'SPILL' if spill else 'ok   '} {name}: regs {regs} spill {spill} B smem {k.metadata.shared} B")
    for name, sig, consts, warps in (
            ("nearest", {"q_ptr": "*fp64", "r_ptr": "*fp64", "out_ptr": "*i64", "M": "i32", "E": "i32",
                         "BQ": "constexpr", "BR": "constexpr"},
             dict(BQ=64, BR=64), 4),
            ("nearest_rows", {"q_ptr": "*i64", "stride_qm": "i32", "stride_qc": "i32", "rows_ptr": "*i64", "n": "i32",
                              "todo_ptr": "*i8", "r_ptr": "*fp64", "out_ptr": "*i64", "E": "i32", "BQ": "constexpr",
                              "BR": "constexpr"}, dict(BQ=64, BR=64), 4),
            ("fps", {"p_ptr": "*fp32", "start_ptr": "*i64", "count_ptr": "*i32", "n_out_ptr": "*i32",
                     "out_start_ptr": "*i64", "dist_ptr": "*fp32", "out_ptr": "*i64", "BLOCK": "constexpr"},
             dict(BLOCK=1024), 8),
            ("fps_grid", {"p_ptr": "*fp32", "start_ptr": "*i64", "count_ptr": "*i32", "n_out_ptr": "*i32",
                          "out_start_ptr": "*i64", "slot_ptr": "*i64", "status_ptr": "*i32", "out_ptr": "*i64",
                          "P": "i32", "max_polls": "i32", "BLOCK": "constexpr", "PB": "constexpr"},
             dict(BLOCK=1024, PB=128), 1),
            ("fps_grid", {"p_ptr": "*fp32", "start_ptr": "*i64", "count_ptr": "*i32", "n_out_ptr": "*i32",
                          "out_start_ptr": "*i64", "slot_ptr": "*i64", "status_ptr": "*i32", "out_ptr": "*i64",
                          "P": "i32", "max_polls": "i32", "BLOCK": "constexpr", "PB": "constexpr"},
             dict(BLOCK=8192, PB=256), 8),
            *(("fps_rounds", {"p_ptr": "*fp32", "start_ptr": "*i64", "count_ptr": "*i32", "n_out_ptr": "*i32",
                              "out_start_ptr": "*i64", "slot_ptr": "*i64", "status_ptr": "*i32", "out_ptr": "*i64",
                              "P": "i32", "max_polls": "i32", "BLOCK": "constexpr", "PB": "constexpr",
                              "K": "constexpr"},
               dict(BLOCK=block, PB=256, K=kc), warps)
              # the launches of farthest_point_sample_device on a 132-SM GPU: a published-budget
              # scan (1,024 points per program) and the largest chunk it keeps in registers
              for block, kc, warps in ((1024, 1, 1), (1024, 2, 1), (1024, 4, 2), (1024, 8, 4), (8192, 2, 8))),
            # training: the weight gradient per offset (3x3x3 and stride-2 maps over each offset's
            # listed pairs or over every row, 1x1), bf16 and fp32, the launcher's blocks
            *(("weight_grad", {"x_ptr": f"*{dt}", "go_ptr": f"*{dt}", "dw_ptr": "*fp32", "order_ptr": "*i32",
                               "table_ptr": "*i32", "count_ptr": "*i32", "M": "i32", "CX": "i32", "C_OFF": "i32",
                               "CIN": "i32", "N": "i32", "G": "i32", "rows_per_split": "i32", "stride_xg": "i32",
                               "stride_xm": "i32", "stride_gg": "i32", "stride_gm": "i32",
                               **{c: "constexpr" for c in ("KVOL", "IDENTITY", "COMPACT", "DOT_F32", "PRECISION",
                                                           "BR", "BC", "BN")}},
               dict(KVOL=kv, IDENTITY=kv == 1, COMPACT=compact, DOT_F32=dt == "fp32",
                    PRECISION="tf32x3" if dt == "fp32" else "ieee", BR=64, BC=bc, BN=64), 4)
              for dt in ("bf16", "fp32") for kv, compact in ((27, True), (27, False), (8, True), (1, False))
              for bc in (32, 64)),
            ("modulate", {"f_ptr": "*bf16", "w_ptr": "*bf16", "idx_ptr": "*i64", "out_ptr": "*bf16", "M": "i32",
                          "C": "i32", "stride_f": "i32", "stride_o": "i32", "BM": "constexpr", "BC": "constexpr"},
             dict(BM=32, BC=128), 8),
            ("modulate", {"f_ptr": "*bf16", "w_ptr": "*fp32", "idx_ptr": "*i64", "out_ptr": "*fp32", "M": "i32",
                          "C": "i32", "stride_f": "i32", "stride_o": "i32", "BM": "constexpr", "BC": "constexpr"},
             dict(BM=64, BC=32), 4)) + _map_kernels():
        kfn = {"nearest": K.nearest_cell_kernel, "nearest_rows": K.nearest_rows_kernel, "fps": K.fps_kernel, "fps_grid": K.fps_grid_kernel,
               "fps_rounds": K.fps_rounds_kernel, "modulate": K.modulate_kernel,
               "weight_grad": K.weight_grad_kernel}.get(name) or getattr(M, name)
        count += 1
        try:
            k = triton.compile(ASTSource(fn=kfn, signature=sig, constexprs=consts), target=target,
                               options={"num_warps": warps, "enable_fp_fusion": not name.startswith("fps")})
            regs, spill = _resources(k.asm["cubin"])
            spills += spill > 0
            print(f"{'SPILL' if spill else 'ok   '} {name}: regs {regs} spill {spill} B smem {k.metadata.shared} B")
        except Exception as exc:   # noqa: BLE001
            failures += 1
            print(f"FAIL  {name}: {str(exc).splitlines()[0][:200]}")
    print(f"compiled {count} variants for sm_{arch} with triton {triton.__version__} in {time.time() - t0:.0f} s: "
          f"{failures} failed, {spills} spill")
    return 1 if failures or spills else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", choices=("full", "tiny"), default="full",
                    help="network widths whose convolutions are recorded (default: the published ones)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated operand dtypes (bf16, fp16, fp32)")
    args = ap.parse_args(argv)
    seen = record_launches(args.widths)
    print(f"{len(seen)} distinct convolutions in one pass of the encoder, guided denoiser and refiner")
    return compile_all(seen, args.arch, args.dtypes.split(","))


if __name__ == "__main__":
    sys.exit(main())
