"""Offline training: LiDiff teacher, refiner, and Distillation-DPO / VSD students (torch DDP)."""
