"""SASS instructions per element of the perturbation kernels, on a machine without a GPU.

    python profiling/sass_count.py [--json OUT.json] [--markdown OUT.md] [--only NAME ...]

Every kernel specialisation the engine launches (``sass_targets`` below: distribution,
dtype, number of seed terms, buffer or not, dot or square) is compiled for sm_90 with Triton's own
compiler and disassembled with the cuobjdump inside Triton's package. The count is static (the
kernels are straight-line: the interior blocks carry no masks and no loops), divided by the
elements one thread handles. Pipes: integer multiply (IMAD family), fp32 arithmetic, MUFU
(transcendentals), conversions, global memory, shared memory, barriers, uniform datapath, other.

On an H100 `pass_ms ~= 0.384 x instructions_per_element / 0.72` fitted four measured kernels at
OPT-13B shapes (../shared/docs/environment.md); the same SMs issue at the same rate on an H200.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sass_count: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton.language as tl  # noqa: E402

from zoscale.engine import rng  # noqa: E402
from zoscale.engine.kernels import launch, v1, v2  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
PIPES = {"imad": ("IMAD", "IMUL"), "fp32": ("FMUL", "FFMA", "FADD", "FMNMX", "FSEL", "FSETP"),
         "mufu": ("MUFU",), "convert": ("I2F", "I2FP", "F2F", "F2I", "F2FP", "F2IP"),
         "global_memory": ("LDG", "STG"), "shared_memory": ("LDS", "STS", "LDSM"), "barrier": ("BAR",)}


class SassTarget(NamedTuple):
    """One kernel specialisation as the engine launches it."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    elements_per_program: int
    record: dict


def sass_targets() -> list[SassTarget]:
    """The interior-block specialisations a run launches, for both stream versions: per
    distribution and dtype, the affine pass with 1 to 3 seed terms (MeZO's passes: 1; its deferred
    update and n-SPSA: 2 and more), with a buffer (ConMeZO's momentum), and the dot and square
    reductions."""
    affine_args = {"table_ptr": "*i64", "owner_ptr": "*i32", "key_ptr": "*i64", "coef_ptr": "*fp32", "alpha": "fp32",
                   "beta": "fp32", "advance_ptr": "*fp32", "gamma": "fp32", "partial_ptr": "*fp32"}
    dot_args = {"partial_ptr": "*fp32", "table_ptr": "*i64", "owner_ptr": "*i32", "key_ptr": "*i64"}
    names = {tl.bfloat16: "bfloat16", tl.float16: "float16", tl.float32: "float32"}
    targets = []
    for version in rng.STREAMS:
        for distribution in ("gaussian", "rademacher"):
            if version == "v1":
                affine, dot, warps, elements = v1.affine_noise, v1.dot_noise, v1.NUM_WARPS, v1.BLOCK
                common = {"HEAD": 0, "ALIGNED": True, "MASKED": False, "FAST": True, "BLOCK": v1.BLOCK}
            else:
                shape = launch._v2_shape(distribution)
                affine, dot, warps = v2.affine_noise, v2.dot_noise, shape.pop("num_warps")
                elements = launch._panel_size(version, distribution)
                common = {"ALIGNED": True, "MASKED": False, "FAST": True, **shape}
            suffix = "" if version == "v1" else "-v2"
            for dtype, dtype_name in names.items():
                # ConMeZO's passes: a buffer read (the direction), then also written (the momentum's advance)
                cases = [(terms, False, False) for terms in (1, 2, 3)] + [(1, True, False), (1, True, True)]
                for terms, buffer, advance in cases:
                    constexprs = {"OUT": dtype, "SRC": dtype, "BUF": tl.float32, "HAS_BUF": buffer, "UNIT": True,
                                  "TERMS": terms, "GAUSSIAN": distribution == "gaussian", "ADVANCE": advance, **common}
                    kind = "-advance" if advance else "-buffer" if buffer else ""
                    targets.append(SassTarget(
                        f"affine-{distribution}-{dtype_name}-{terms}{kind}{suffix}", affine,
                        {**affine_args, **{k: "constexpr" for k in constexprs}}, constexprs, warps, elements,
                        {"kernel": "affine-advance" if advance else "affine", "stream": version,
                         "distribution": distribution, "dtype": dtype_name, "terms": terms, "buffer": buffer}))
                for square in (False, True):
                    constexprs = {"X": dtype, "SQUARE": square, "GAUSSIAN": distribution == "gaussian", **common}
                    targets.append(SassTarget(
                        f"{'square' if square else 'dot'}-{distribution}-{dtype_name}{suffix}", dot,
                        {**dot_args, **{k: "constexpr" for k in constexprs}}, constexprs, warps, elements,
                        {"kernel": "square" if square else "dot", "stream": version, "distribution": distribution,
                         "dtype": dtype_name, "terms": 1, "buffer": False}))
    return targets


def pipe(opcode: str) -> str:
    base = opcode.split(".")[0]
    for name, prefixes in PIPES.items():
        if base.startswith(prefixes):
            return name
    return "uniform" if base.startswith("U") or base in ("R2UR", "S2UR") else "other"


def sass(target: SassTarget, workdir: Path) -> list[str]:
    """The kernel's SASS opcodes (NOPs left out)."""
    compiled = triton.compile(ASTSource(fn=target.fn, signature=target.signature, constexprs=target.constexprs),
                              target=SM90, options={"num_warps": target.num_warps})
    cubin = workdir / f"{target.name}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    listing = subprocess.run([str(CUOBJDUMP), "--dump-sass", str(cubin)], capture_output=True, text=True, check=True)
    opcodes = [m.group(1) for line in listing.stdout.splitlines() if (m := _INSTRUCTION.match(line))]
    return [op for op in opcodes if op != "NOP"]


def count(target: SassTarget, workdir: Path) -> dict:
    opcodes = sass(target, workdir)
    per_thread = target.elements_per_program / (32 * target.num_warps)
    pipes = collections.Counter(pipe(op) for op in opcodes)
    return {"name": target.name, **target.record, "instructions": len(opcodes), "elements_per_thread": per_thread,
            "instructions_per_element": round(len(opcodes) / per_thread, 3),
            "per_element_by_pipe": {name: round(n / per_thread, 3) for name, n in sorted(pipes.items())}}


def markdown(records: list[dict]) -> str:
    pipes = sorted({p for r in records for p in r["per_element_by_pipe"]})
    head = ["kernel", "stream", "distribution", "dtype", "terms", "buffer", "instructions / element", *pipes]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in records:
        cells = [r["kernel"], r["stream"], r["distribution"], r["dtype"], str(r["terms"]), str(r["buffer"]),
                 f"{r['instructions_per_element']:.2f}", *(f"{r['per_element_by_pipe'].get(p, 0):.2f}" for p in pipes)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these specialisations (e.g. affine-gaussian-bfloat16-1)")
    args = parser.parse_args()
    targets = [t for t in sass_targets() if not args.only or t.name in args.only]
    if args.only and len(targets) != len(args.only):
        sys.exit(f"sass_count: unknown --only names; known: {[t.name for t in sass_targets()]}")
    with tempfile.TemporaryDirectory() as tmp:
        records = [count(target, Path(tmp)) for target in targets]
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "records": records},
                                        indent=1))
    table = markdown(records)
    if args.markdown:
        args.markdown.write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
