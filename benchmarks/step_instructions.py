"""Instructions per training step of our `scvi` and `je` variants, counted by valgrind's callgrind.

On a shared machine the wall-clock JE cost of train_throughput.py moves by about 3 points
between runs, which hides changes of 1-2% of a step. An instruction count is the same on
every run of the same code and libraries, so it shows them. It leaves out what instructions
do not show (cache and memory stalls, page faults): on the 2-core VM of docs/benchmarks.md,
JE's wall-clock cost has run 5-7 points above its instruction cost.

Each variant runs in its own process under callgrind with instrumentation off. The process
loads --steps batches of pbmc3k (2,000 genes) into memory, so the loader is not counted; it
then takes WARM_STEPS steps, switches instrumentation on (callgrind_control), takes one
step per batch and switches it off. One torch thread. Both processes run side by side.

    .venv/bin/python benchmarks/step_instructions.py [--batch-size 128] [--steps 16]

Needs valgrind (`apt install valgrind`); each process takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from loader_throughput import reference_store  # noqa: E402  (the store the other benchmarks use)
from train_throughput import training_run  # noqa: E402  (the same model, optimizer and batches)

from distributed_je.store import open_store  # noqa: E402

VARIANTS = ("scvi", "je")
WARM_STEPS = 3


def steps_under_callgrind(variant: str, store: str, batch_size: int, steps: int) -> None:
    """The child: ``steps`` training steps with callgrind's instrumentation on, nothing else."""
    import itertools

    import torch

    from distributed_je.loop import train_epoch

    torch.set_num_threads(1)
    model, optimizer, stream, state, config = training_run(open_store(store), variant, batch_size)
    batches = list(itertools.islice(stream, steps))  # across epochs: pbmc3k's 2,700 cells fill 5 batches of 512
    train_epoch(model, optimizer, batches[:WARM_STEPS], state=state, config=config)

    def instrument(switch: str) -> None:
        subprocess.run(["callgrind_control", "-i", switch, str(os.getpid())], check=True, capture_output=True)

    instrument("on")
    train_epoch(model, optimizer, batches, state=state, config=config)
    instrument("off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dje_loader_bench"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="counted steps per variant")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, store, batch_size, steps = args.one
        steps_under_callgrind(variant, store, int(batch_size), int(steps))
        return
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"{' and '.join(missing)} not found: this benchmark counts instructions with valgrind's "
                 "callgrind (apt install valgrind)")

    store = str(reference_store(args.work))
    with tempfile.TemporaryDirectory() as tmp:
        children = {
            variant: subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/{variant}.out",
                 sys.executable, __file__, "--one", variant, store, str(args.batch_size), str(args.steps)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
            for variant in VARIANTS
        }
        per_step = {}
        for variant, child in children.items():
            _, log = child.communicate()
            collected = re.search(r"Collected : (\d+)", log)
            if child.returncode or collected is None:
                sys.exit(f"the {variant} process failed (exit {child.returncode}):\n{log[-3000:]}")
            per_step[variant] = int(collected.group(1)) / args.steps

    print(f"\npbmc3k, 2,000 genes, batch {args.batch_size}, {args.steps} counted steps per variant, 1 torch thread")
    print("\n| variant | million instructions per step | vs scvi |")
    print("|---|---|---|")
    for variant, count in per_step.items():
        print(f"| {variant} | {count / 1e6:.2f} | {count / per_step['scvi']:.3f}x |")


if __name__ == "__main__":
    main()
