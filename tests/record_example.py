"""Run an example script as one of the processes torchrun starts, and keep what its tracker's layers output.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/record_example.py OUT SCRIPT ARGS...

The script runs as ``__main__`` with the tracker class it imports from ``delve`` replaced
by :func:`tests.reference.recording_tracker`'s subclass. Each process then saves, in
``OUT/rank{RANK}.npz``, the raw outputs of every layer and mode in every epoch, under
``{epoch}/{layer}/{mode}``, for the test to compare the script's files with numpy.
"""

import os
import runpy
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import delve  # noqa: E402
from tests.reference import recording_tracker  # noqa: E402


def main() -> None:
    out, script, *args = sys.argv[1:]
    epochs = []
    delve.CheckLayerSat = recording_tracker(delve.CheckLayerSat, epochs)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
    arrays = {
        f"{epoch}/{layer}/{mode}": np.concatenate(outputs)
        for epoch, recorded in enumerate(epochs)
        for (layer, mode), outputs in recorded.items()
    }
    np.savez(os.path.join(out, f"rank{os.environ['RANK']}.npz"), **arrays)


if __name__ == "__main__":
    main()
