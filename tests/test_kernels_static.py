"""The launch geometry (kernels/common.py) and the static report's reading of compiled code
(benchmarks/kernels_static.py, benchmarks/kernels_compile.py), on known values: no compiler needed."""

import math
import random

import pytest

from benchmarks.kernels_compile import nan_dropping_minmax
from benchmarks.kernels_static import profile
from vae_scale.kernels.common import GPU, blocks_per_sm, grid, wave_fill

H100 = GPU(name="H100", arch=90, sms=132)
A100 = GPU(name="A100", arch=80, sms=108, smem_per_sm=164 * 1024)


@pytest.mark.parametrize(
    "n_regs, shared, warps, gpu, want",
    [
        (32, 0, 8, H100, 8),  # threads: 2048 / 256
        (64, 0, 8, H100, 4),  # registers: 65536 / (64 * 256)
        (71, 0, 4, H100, 7),  # 71 regs -> 2304 per warp, 7 warps per sub-partition, 28 per SM
        (168, 0, 4, H100, 3),  # 5376 per warp: 3 warps per sub-partition
        (255, 0, 1, H100, 8),  # 8192 per warp: 2 warps per sub-partition
        (16, 0, 1, H100, 32),  # the per-SM block limit
        (32, 48 * 1024, 4, A100, 3),  # shared memory: 164 KiB / (48 + 1) KiB
    ],
)
def test_blocks_per_sm_as_the_occupancy_calculator_counts(n_regs, shared, warps, gpu, want):
    assert blocks_per_sm(n_regs, shared, warps, gpu) == want


def test_wave_fill():
    assert wave_fill(132, 132) == (1, 1.0)
    assert wave_fill(133, 132) == (2, 1 / 132)
    assert wave_fill(66, 132) == (1, 0.5)


def test_grid_covers_every_tile_and_fills_the_waves():
    """Every tile in exactly one program; with at least four waves of tiles, the time (waves x the longest
    program) within 20% of the ideal (tiles / slots)."""
    rng = random.Random(0)
    for _ in range(2000):
        slots = rng.choice([108, 132, 148]) * rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 32])
        rows, tiles = rng.randint(1, 5000), rng.randint(1, 2000)
        g = grid(rows, tiles, slots)
        assert g.splits * g.tiles_per_split >= tiles > (g.splits - 1) * g.tiles_per_split
        assert g.programs * g.runs_per_program >= rows * g.splits > (g.programs - 1) * g.runs_per_program
        if rows * tiles >= 4 * slots:
            longest = g.tiles_per_split * g.runs_per_program
            efficiency = rows * tiles / (math.ceil(g.programs / slots) * slots * longest)
            assert efficiency >= 0.8, (rows, tiles, slots, g)


def test_grid_is_never_worse_than_one_program_per_row():
    for rows, tiles, slots in [(1024, 64, 528), (4096, 4, 792), (64, 256, 1056), (2048, 64, 396), (5, 1, 4)]:
        g = grid(rows, tiles, slots)
        naive = math.ceil(rows / slots) * tiles
        assert math.ceil(g.programs / slots) * g.tiles_per_split * g.runs_per_program <= naive


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 EXIT ;
.L_x_3:
        /*0020*/                   IMAD R2, R3, R4, RZ ;
        /*0030*/               @P1 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0050*/                   LDG.E.64 R8, desc[UR4][R6.64] ;
        /*0060*/                   MUFU.EX2 R10, R4 ;
        /*0070*/                   FFMA R11, R10, R5, R6 ;
        /*0080*/                   STG.E.128 desc[UR4][R2.64], R8 ;
        /*0090*/                   BRA.U !UP0, `(.L_x_1) ;
.L_x_0:
        /*00a0*/                   LDG.E.CONSTANT R12, desc[UR4][R2.64] ;
        /*00b0*/                   LDG.E.STRONG.GPU R13, desc[UR4][R2.64] ;
        /*00c0*/                   STG.E desc[UR4][R2.64], R13 ;
        /*00d0*/              @!P2 EXIT ;
        /*00e0*/                   BRA `(.L_x_3) ;
.L_x_4:
        /*00f0*/                   BRA `(.L_x_4);
        /*0100*/                   NOP;
"""


def test_sass_profile_counts_the_main_loop_and_the_paths():
    p = profile(SASS)
    assert p.total == 16  # NOPs dropped
    # the inner loop: 6 instructions, 16 + 8 bytes loaded (a uniform branch is still a conditional back-edge)
    assert (p.loop_instructions, p.loop_mufu, p.loop_load_bytes) == (6, 1, 24)
    # the loop around it, skipping the inner one: IMAD, BRA, then the epilogue to the back-edge
    assert p.outer_instructions == 2 + 5
    # entry to an exit that stored something: LDC, EXIT, the outer pass (skipping the inner loop) and out
    assert p.path_instructions == 2 + 2 + 4


def test_nan_dropping_min_max_in_ptx():
    ptx = "max.NaN.f32 %r1, %r2, %r3; min.NaN.bf16x2 %r4, %r5, %r6; min.s32 %r7, %r8, %r9; max.f32 %r1, %r2;"
    assert nan_dropping_minmax(ptx) == 1
    assert nan_dropping_minmax("max.bf16x2 %r1, %r2, %r3; min.ftz.f32 %r1, %r2, %r3;") == 2
