"""The cluster plan's report: `zoscale plan`'s layouts for OPT-13B, OPT-66B, OPT-175B and a Llama-2-70B
config on 8 to 1,024 H100s, and its world-size-1 predictions beside the H100 measurements.

    python profiling/plan_report.py OUT_DIR
"""

import sys
from datetime import date
from pathlib import Path

from zoscale.cli import layouts

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
NAMES = ("opt-13b", "opt-66b", "opt-175b", "llama-70b")
GPUS_PER_NODE, MEMORY, INTRA, INTER, SEQ = 8, 80.0, 3600.0, 400.0, 128
# measured on one H100 80GB, 2026-11-23 (profiling/reports/h100-2026-11-23/speed), batch 16 x 128, bf16, MeZO
MEASURED = [("opt-1.3b", False, 20.17, 41.97), ("opt-13b", False, 90.58, 286.85), ("opt-30b", False, 198.26, 633.29),
            ("opt-1.3b", True, 42.02, 75.61)]


def size(n: float) -> str:
    return layouts._size(n)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Cluster layouts of a ZO run, predicted ({date.today().isoformat()})", "",
             "`zoscale plan --nodes N --gpus-per-node 8 --gpu-memory 80 --intra-gbps 3600 --inter-gbps 400` "
             "(H100 SXM nodes: NVLink at 450 GB/s per GPU and direction, one 400 Gbit/s NIC per GPU), MeZO, bf16, "
             f"2 sequences of {SEQ} tokens per GPU (batch = 2 x GPUs). Predictions from the model in "
             "`zoscale/cli/layouts.py` and the constants below, not measurements: no multi-GPU run has been made. "
             "Written by `python profiling/plan_report.py`.", "", "## Constants", "", layouts.constants_table(), "",
             "## The fastest layout that fits, against flat FSDP2 over every GPU", "",
             "| model | GPUs | fastest layout | shard size | dual_forward | memory per GPU | step | network per "
             "step and GPU | flat FSDP2: step | flat: network per step |", "|" + " --- |" * 10]
    for name in NAMES:
        model = str(MODELS / f"{name}.json")
        for nodes in (1, 2, 4, 8, 16, 32, 64, 128):
            gpus = nodes * GPUS_PER_NODE
            found = layouts.layouts(model, nodes, GPUS_PER_NODE, MEMORY, INTRA, INTER, 2 * gpus, SEQ)
            best = next((lay for lay in found if lay.fastest), None)
            flat = next(lay for lay in found if lay.name == "flat" and not lay.dual)
            flat_text = f"{flat.step_s * 1e3:.0f} ms{'' if flat.fits else ' (does not fit)'}"
            if best is None:
                lines.append(f"| {name} | {gpus} | nothing fits | | | | | | {flat_text} | {size(flat.inter_bytes)} |")
                continue
            lines.append(f"| {name} | {gpus} | {best.name} | {best.shard_size} | {'yes' if best.dual else 'no'} | "
                         f"{best.memory_gib:.1f} GiB | {best.step_s * 1e3:.0f} ms | {size(best.inter_bytes)} | "
                         f"{flat_text} | {size(flat.inter_bytes)} |")
    lines += ["", "## Every layout on 2 nodes (16 GPUs)", ""]
    for name in NAMES:
        found = layouts.layouts(str(MODELS / f"{name}.json"), 2, GPUS_PER_NODE, MEMORY, INTRA, INTER, 32, SEQ)
        lines += [layouts.table(name, 2, GPUS_PER_NODE, found), ""]
    lines += ["## World size 1: the plan against the H100", "",
              "One H100 80GB, batch 16 x 128, bf16, MeZO (three passes; the perturbation kernel of 2026-11-23). "
              "The FLOP rate and the pass bandwidth come from OPT-13B, so its row agrees by construction, and "
              "the per-layer overhead from OPT-1.3B under FSDP2 against unsharded. Small models run below the "
              "FLOP rate (OPT-1.3B's forward takes 2.2x the prediction): the plan is for the large ones.", "",
              "| model | backend | forward: predicted | measured | MeZO step: predicted | measured |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, sharded, forward_ms, step_ms in MEASURED:
        lay = layouts.predict(str(MODELS / f"{name}.json"), 1, 1, 1, INTRA, INTER, 16, SEQ, sharded=sharded)
        lines.append(f"| {name} | {'fsdp' if sharded else 'local'} | {lay.forward_s * 1e3:.1f} ms | {forward_ms} ms | "
                     f"{lay.step_s * 1e3:.1f} ms | {step_ms} ms |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(out / "README.md")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
