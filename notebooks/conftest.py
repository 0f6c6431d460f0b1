"""pytest plugin for the chapter notebooks under nbval (``pytest --nbval-lax notebooks/``).

Two things, both only for the CI-style run and harmless otherwise:

* ``--nb-executed-dir DIR`` saves every notebook that nbval ran, with the outputs nbval's kernel
  produced, as ``DIR/<name>.ipynb``. ``tools/build_book.py`` then builds the book from those copies
  with execution off, so each chapter is executed once per CI run. The user's ``notebooks/`` are
  never written to. The book build refuses a copy whose cells differ from the source notebook's
  (the notebook changed since nbval ran it).
* Under pytest-xdist (``-n 2 --dist loadfile --no-loadscope-reorder``) the notebooks are queued
  so that the ones that train a cached model run first, no notebook waits for a model the other
  worker is still training, and the longest run early (see ``NOTEBOOK_ORDER``); anything else in the
  same session (CI's unit tests) is queued after them. Concurrent training of one model is serialised
  by :func:`tinyddpm.atomic.write_dir_atomic`, so a worker never trains what another is training.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest

# Queue order under xdist (the first two go to the two workers; each later one to the worker that frees
# up first). A notebook that loads a cached model another worker is still training waits for it with its
# core idle, so the order is chosen so that nothing waits: 09 trains the longest model (the CLIP, VAE and
# UNet of the text-to-image pipeline) while the other worker trains "digits" (05), "digits-cond" (08) and
# chapter 12's flows; 14 (needs the pipeline and "digits") comes after 09; then the rest, longest first.
# Durations on the 2-core CI machine are in the comment of ``pytest_collection_modifyitems``.
NOTEBOOK_ORDER: tuple[str, ...] = (
    "09_latent_and_text", "05_training", "08_guidance", "12_flow_matching", "14_editing", "13_edm",
    "07_ddim", "06_ddpm_sampling", "appendix_diffusers", "04_epsilon_prediction", "02_forward_process",
    "11_scores_and_sdes", "10_samplers", "03_posterior", "01_gaussians", "appendix_bug_zoo",
)

EXECUTED_KEY = "tinyddpm_executed"  # notebook metadata written into each saved copy


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--nb-executed-dir", default=None, metavar="DIR",
                     help="save each notebook nbval executed, with its outputs, as DIR/<name>.ipynb "
                          "(tools/build_book.py builds the book from them without executing again)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Hidden notebooks (``.name.ipynb``: an editor's or a script's scratch copy) are not chapters."""
    return True if collection_path.suffix == ".ipynb" and collection_path.name.startswith(".") else None


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two kernels share two cores: OpenMP threads that sleep instead of spinning while they wait
        # keep one kernel from burning the other's core (results do not depend on the wait policy).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    config.stash[_saver_key] = _Saver(config.getoption("--nb-executed-dir"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the notebooks as :data:`NOTEBOOK_ORDER` says (cells keep their order within a notebook),
    then everything else collected in the same session (CI runs the unit tests in the same two-worker
    session: queued last, their many small files fill whatever time one worker would otherwise idle).

    Measured with an empty model cache (nbval, two workers, seconds per notebook, Dec 2026, before this
    order, on a machine loaded by other jobs): 09 918 (875 of them training the pipeline), 12 447, 08 401,
    05 376, 14 352 (273 of them waiting for 09's pipeline under the old order), every other notebook under
    60. On an unloaded CI machine chapter 9 prints "pipeline ready in 414.0 s".
    """
    rank = {name: i for i, name in enumerate(NOTEBOOK_ORDER)}

    def key(indexed: tuple[int, pytest.Item]) -> tuple[int, int]:
        i, item = indexed
        if item.path.suffix != ".ipynb":
            return (len(rank) + 1, i)  # unit tests etc.: after the notebooks, in their own order
        return (rank.get(item.path.stem, len(rank)), i)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


class _Saver:
    """Collects each notebook's outputs cell by cell and writes the notebook after its last cell."""

    def __init__(self, out_dir: str | None) -> None:
        self.out_dir = Path(out_dir).resolve() if out_dir else None
        self.notebooks: dict[Path, Any] = {}
        self.counters: dict[Path, int] = {}

    def record(self, item: pytest.Item) -> None:
        """Store the outputs nbval captured for one code cell (an error output included)."""
        if self.out_dir is None or not hasattr(item, "cell_num"):
            return
        path = item.path
        if path not in self.notebooks:
            nb = copy.deepcopy(item.parent.nb)
            for cell in nb.cells:
                if cell.cell_type == "code":
                    cell.outputs, cell.execution_count = [], None
            nb.metadata[EXECUTED_KEY] = {"source": path.name, "by": "nbval (notebooks/conftest.py)"}
            nb.metadata["language_info"] = _language_info(nb)
            self.notebooks[path], self.counters[path] = nb, 0
        outputs = getattr(item, "test_outputs", None)
        if outputs is None:  # skipped (nbval-skip) or never started: leave the cell without outputs
            return
        code_cells = [c for c in self.notebooks[path].cells if c.cell_type == "code"]
        cell = code_cells[item.cell_num]
        self.counters[path] += 1
        cell.execution_count = self.counters[path]
        cell.outputs = [_as_output(out, self.counters[path]) for out in outputs]

    def flush(self, item: pytest.Item) -> None:
        """Write the notebook of ``item`` (its last cell just ran) to ``out_dir``."""
        path = item.path
        nb = self.notebooks.pop(path, None)
        if nb is None or self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        target = self.out_dir / path.name
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        nbformat.write(nb, str(tmp))
        os.replace(tmp, target)  # the book build never reads half a notebook


def _language_info(nb: Any) -> dict[str, Any]:
    """What an executing build (nbclient) records from the kernel: the book then highlights code as
    ``ipython3``, exactly as when it executes the notebook itself."""
    info = dict(nb.metadata.get("language_info", {}))
    if nb.metadata.get("kernelspec", {}).get("language", "python") == "python":
        try:
            from ipykernel.ipkernel import IPythonKernel

            info.update(IPythonKernel.language_info)
        except ImportError:  # pragma: no cover - nbval needs a kernel, so ipykernel is here
            pass
    return info


def _as_output(out: Any, count: int) -> Any:
    """nbval's output node as a valid nbformat v4 output (execute_result gets its execution_count)."""
    node = copy.deepcopy(out)
    if node.get("output_type") == "execute_result":
        node["execution_count"] = count
        node.setdefault("metadata", {})
    elif node.get("output_type") == "display_data":
        node.setdefault("metadata", {})
    return node


_saver_key = pytest.StashKey[_Saver]()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    saver = item.config.stash[_saver_key]
    saver.record(item)
    if nextitem is None or nextitem.path != item.path:
        saver.flush(item)
