"""``python -m benchmarks static``: the SASS reader on a hand-written listing, and the whole benchmark on one
small kernel compiled for sm_90 (a few seconds; skipped where Triton has no NVIDIA backend)."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import bench_static, sass, sm90  # noqa: E402

LISTING = """
\tcode for sm_90a
\t\tFunction : _toy_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                        /* 0x0000000000007919 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;         /* 0x000000100000780c */
        /*0030*/              @P0 BRA 0xd0 ;                                   /* 0x0000000000248947 */
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;            /* 0x0000000402047981 */
        /*0050*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24 ;   /* 0x00000000081879f0 */
        /*0060*/                   IMAD.HI.U32 R6, R5, 0xd2511f53, RZ ;        /* 0x0000000000067827 */
        /*0070*/                   STL [R1], R6 ;                              /* 0x0000000601007387 */
        /*0080*/                   FFMA R8, R6, R7, R8 ;                       /* 0x0000000706087223 */
        /*0090*/                   LDL R9, [R1+0x4] ;                          /* 0x0000040001097983 */
        /*00a0*/                   IADD3 R0, R0, 0x1, RZ ;                     /* 0x0000000100007810 */
        /*00b0*/                   ISETP.GE.AND P1, PT, R0, 0x10, PT ;         /* 0x000000100000780c */
        /*00c0*/             @!P1 BRA 0x40 ;                                   /* 0xffffffff00dc9947 */
        /*00d0*/                   STG.E [R2.64], R8 ;                         /* 0x0000000802007986 */
        /*00e0*/                   EXIT ;                                      /* 0x000000000000794d */
        /*00f0*/                   BRA 0xf0;                                   /* 0xfffffffc00fc7947 */
"""


def test_sass_reader_finds_the_loop_and_counts_by_class():
    result = sass.analyse(LISTING)
    assert result["total_instructions"] == 16
    # The forward branch at 0x30 and the trap at 0xf0 (a branch to itself) close no loop.
    assert [(r["start"], r["end"]) for r in result["loops"]] == [("0x40", "0xc0")]
    assert result["counted"] == "main loop" and result["instructions"] == 9
    assert result["classes"] == {"mma": 1, "int": 3, "float": 1, "memory": 1, "local": 2, "uniform": 0,
                                 "other": 1}
    assert result["opcodes"]["LDG.E.128"] == 1
    assert (result["spill_stores"], result["spill_loads"]) == (1, 1)


def test_loop_free_kernel_is_counted_whole():
    straight = "\n".join(line for line in LISTING.splitlines() if "@!P1 BRA" not in line)
    result = sass.analyse(straight)
    assert result["loops"] == [] and result["main_loop"] is None
    assert result["counted"] == "whole kernel" and result["instructions"] == 15


def test_main_loop_prefers_tensor_core_loops():
    # Two loops: a bigger one without MMA (e.g. an epilogue copy) and the MMA loop, which must win.
    lines = [f"        /*{a:04x}*/                   {op} ;" for a, op in enumerate(
        ["NOP"] + ["FADD R0, R0, R1"] * 3 + ["HGMMA.64x64x16.F32 R24, gdesc[UR8], R24", "@P0 BRA 0x10"]
        + ["IADD3 R0, R0, 0x1, RZ"] * 5 + ["@P1 BRA 0x60", "EXIT"])]
    listing = "\n".join(line.replace(f"/*{int(line.split('/*')[1][:4], 16):04x}*/",
                                     f"/*{int(line.split('/*')[1][:4], 16) * 16:04x}*/") for line in lines)
    result = sass.analyse(listing)
    assert len(result["loops"]) == 2
    assert result["classes"]["mma"] == 1 and result["instructions"] == 5


def test_static_benchmark_end_to_end_on_one_kernel(tmp_path):
    """One kernel, compiled by the Triton of a folder given as ``--triton`` (here this environment's own
    site-packages, so the test needs no second install): the report records the workers' Triton."""
    import triton
    site = Path(triton.__file__).resolve().parent.parent
    only = r"layer_norm_bwd fp16 N=768 residual=1 dropout=0$"  # not its input_bias=1 twin
    args = cli.build_parser().parse_args(["static", "--out", str(tmp_path), "--only", only, "--workers", "1",
                                          "--triton", str(site)])
    try:
        result = bench_static.run(args.out, only=args.only, workers=1, timeout_s=600, triton_site=args.triton)
    except sm90.Unavailable as e:
        pytest.skip(f"cannot compile for sm_90 here: {e}")
    assert result["failed"] == []
    env = result["environment"]
    assert env["triton"] == triton.__version__ and Path(env["triton_path"]) == site / "triton"
    assert env["ptxas"]
    (row,) = result["rows"]
    assert row["kernel"] == "layer_norm_bwd" and row["dtype"] == "fp16"
    assert row["counted"] == "main loop"  # the band-of-rows loop
    assert row["registers"] > 0 and row["shared_bytes"] >= 0 and row["loop_instructions"] > 50
    assert row["classes"]["float"] > 0 and row["classes"]["local"] == 0
    assert row["enable_fp_fusion"] is True  # pinned by the kernels' launches (_compile_options), not Triton's default
    saved = json.loads((tmp_path / "static.json").read_text())
    assert saved["rows"][0]["loop_instructions"] == row["loop_instructions"]
    md = (tmp_path / "static.md").read_text()
    assert "layer_norm_bwd" in md and "## Targets" in md and "FP fusion (FMA contraction) on" in md


def _static_row(kernel, case, regs, stack, local=0):
    return {"kernel": kernel, "dtype": "fp16", "case": case, "registers": regs, "stack_bytes": stack,
            "spill_stores": stack // 8, "spill_loads": stack // 8, "loop_instructions": 100,
            "classes": {"mma": 1, "int": 1, "float": 1, "memory": 1, "local": local}, "config": {},
            "num_warps": 8, "shared_bytes": 0, "counted": "main loop"}


def test_static_report_lists_where_two_triton_versions_differ():
    env = {"target": "sm_90", "ptxas": "ptxas", "git_commit": "abc", "date": "today", "triton_path": "/x"}
    ours = {"environment": dict(env, triton="3.9.0"), "verdicts": [], "ratios": [],
            "rows": [_static_row("attn_bwd_dkdv", "D=128 varlen dropout=0", 254, 0),
                     _static_row("ce_lse_forward", "V=50265", 48, 0)]}
    other_rows = [_static_row("attn_bwd_dkdv", "D=128 varlen dropout=0", 255, 16),
                  _static_row("ce_lse_forward", "V=50265", 48, 0)]
    other_rows[1]["loop_instructions"] = 120
    other = {"environment": dict(env, triton="3.6.0"), "rows": other_rows,
             "verdicts": [("no local-memory load or store in any main loop", True, "none")]}
    md = bench_static.markdown(ours, None, other)
    section = md[md.index("## Triton 3.9.0 vs 3.6.0"):md.index("## Every kernel")]
    assert "2 kernels compared" in section and "`triton-3.6/static.md`" in section
    assert "median 1.20x, from 1.00x to 1.20x" in section
    assert "Targets under 3.6.0: no local-memory load or store in any main loop: yes (none)." in section
    assert "| attn_bwd_dkdv | fp16 | D=128 varlen dropout=0 | 254 / 255 | 0 / 16 | 0 / 2 | 0 / 2 | 0 / 0 |" in section
    assert "| ce_lse_forward |" not in section  # same stack and spills: not listed
    same = bench_static.markdown(ours, None, dict(other, rows=[dict(r, stack_bytes=0, spill_stores=0, spill_loads=0)
                                                               for r in other_rows]))
    assert "Stack and spills are the same under both versions." in same


def test_static_rejects_a_triton_folder_without_triton(tmp_path, capsys):
    args = cli.build_parser().parse_args(["static", "--out", str(tmp_path), "--triton", str(tmp_path)])
    assert bench_static.main_from_args(args) is False
    assert f"--triton {tmp_path}: no Triton there" in capsys.readouterr().err


def test_only_that_matches_nothing_is_an_error(tmp_path, capsys):
    """`static --only` with no matching case: exit 1 and one line, nothing written (not '0 kernels compiled' and
    every target [MISSED])."""
    for only, expected in (("ln_fwd fp16", "matches no kernel case"), ("attn_fwd (", "is not a regular expression")):
        args = cli.build_parser().parse_args(["static", "--out", str(tmp_path), "--only", only, "--workers", "1"])
        try:
            ok = bench_static.main_from_args(args)
        except sm90.Unavailable as e:  # pragma: no cover - main_from_args catches it
            pytest.skip(str(e))
        captured = capsys.readouterr()
        if "cannot compile for sm_90" in captured.err:
            pytest.skip("cannot compile for sm_90 here")
        lines = captured.err.strip().splitlines()
        assert ok is False and captured.out == "", captured
        assert len(lines) == 1 and lines[0].startswith(f"static: error: --only {only!r} ") and expected in lines[0]
        assert not (tmp_path / "static.json").exists()
