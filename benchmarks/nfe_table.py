"""Error against NFE for every sampler on the 2-D mixture oracle (ground truth: no network error).

    python benchmarks/nfe_table.py [--n 2000] [--nfes 5 10 20 50]

Prints a Markdown table: path error mean ‖x - x_ref‖ against a 1000-step solution from the same
x_T, and the energy distance to fresh data beside its floor. See tinyddpm.sampling.nfe.
"""

from __future__ import annotations

import argparse

import torch

import tinyddpm as td
from tinyddpm.sampling.nfe import format_nfe_table, nfe_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="samples per run (default 2000)")
    p.add_argument("--nfes", type=int, nargs="+", default=[5, 10, 20, 50], help="NFE budgets")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    args = p.parse_args()
    torch.set_num_threads(1)
    s = getattr(td.NoiseSchedule, args.schedule)(1000)
    gm = td.GaussianMixture([[-1.5, -0.5], [1.0, 1.0], [1.4, 0.6], [0.0, -1.5]], [0.15, 0.3, 0.25, 0.1],
                            [0.4, 0.25, 0.25, 0.1])
    print(format_nfe_table(nfe_table(gm, s, nfes=args.nfes, n=args.n, generator=torch.Generator().manual_seed(0))))


if __name__ == "__main__":
    main()
