"""A warm Jupyter kernel: one kernel executes many run notebooks, each into its own executed notebook.

Starting a kernel, importing torch / transformers / trl / peft in it and shutting it down cost about 8 s per run
notebook on the project's 2-core machine (`benchmarks/bench_sweep.py`), more than a head-only run's training. A
local sweep worker therefore keeps one kernel (`WarmKernel`) and executes every run notebook it is given in it
with papermill (engine `WARM_ENGINE`), one executed notebook per run as before.

What a notebook sees of the earlier ones: nothing but modules already imported. Before each notebook the engine
calls `fresh_namespace` in the kernel: the IPython namespace is cleared and the execution counter restarts at 1
(as in a new kernel), the "warn once" registries are cleared (so a warning shows in every run it applies to, not
only the first) and the last exception and open figures are released. `train()` seeds every generator it uses
at its start, so a run's numbers do not depend on what ran before it in the kernel
(tests/test_run_notebook.py checks this). A kernel that died (e.g. killed by the OOM killer) is replaced by a new
one for the next notebook.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from arca_lab.sweep.clock import CLOCK_ENV

KERNEL_NAME = "arca-lab-sweep"
WARM_ENGINE = "arca-lab-warm-kernel"
"""papermill engine name of `WarmKernelEngine` (registered on first use)."""


# ------------------------------------------------------------------------------------------ kernelspec
def install_kernel(jupyter_dir: Path, threads: int = 0, clock_dir: Path | None = None) -> str:
    """Write `<jupyter_dir>/kernels/arca-lab-sweep/kernel.json` running this interpreter; return its name.

    Thread pinning reaches the kernel twice: RunConfig.threads (torch.set_num_threads in `train`) and the
    OpenMP/MKL environment below (libraries that start their own pools before torch is told). `clock_dir`: where
    the run notebooks' step clocks write (`arca_lab.sweep.clock`); None: no clock.
    """
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    env = {"TOKENIZERS_PARALLELISM": "false", "ARCA_LAB_SWEEP_KERNEL": str(spec_dir.resolve())}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if clock_dir is not None:
        env[CLOCK_ENV] = str(Path(clock_dir).resolve())
    spec = {
        # ERROR-level kernel logging: its TCP-transport warning would print once per run on a local machine.
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--log-level=ERROR"],
        "display_name": f"arca-lab sweep ({sys.executable})",
        "language": "python",
        "env": env,
        "metadata": {"debugger": False},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    return KERNEL_NAME


@contextmanager
def jupyter_path(jupyter_dir: Path):
    """Put `jupyter_dir` first on JUPYTER_PATH (where jupyter_client looks for kernelspecs) for a block."""
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(jupyter_dir), *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


# --------------------------------------------------------------------------------------- kernel side
_state = {"notebooks": 0, "started": time.time(), "frozen_modules": 0}


def fresh_namespace(shell: Any) -> None:
    """Run in the kernel before each notebook: what a new kernel would look like, imported modules apart."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        sys.__dict__.pop(name, None)  # a failed run's traceback would keep its model alive
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
    # Namespace cleared, execution counter back to 1; its output-cache flush runs gc.collect() (~0.25 s), which
    # frees the last run's model and trainer (reference cycles) before the next one loads.
    shell.reset(new_session=True)
    # Imported modules are most of what is alive (~0.5 M objects once torch, transformers, trl and peft are in),
    # and every collection scans them again: ~0.22 s each for the next reset's and for the one accelerate runs at
    # the end of every `trainer.train()`. gc.freeze() moves what is alive to the permanent generation, so later
    # collections scan only what later runs allocate. IPython's reset collects *before* it clears the namespace,
    # so the last notebook's cycles (its figures, ...) are garbage only now: collect them first, or they would be
    # frozen for good. Done again only when a run imported more modules (a second collection, ~0.22 s); a frozen
    # object is still freed when its reference count drops, only a cycle among frozen objects is never collected.
    if len(sys.modules) != _state["frozen_modules"]:
        gc.collect()
        gc.freeze()
        _state["frozen_modules"] = len(sys.modules)
    # "Warn once" state: a library that stops invalidating these registries would hide a warning from every
    # run but the first (today something in each run resets them anyway).
    for module in list(sys.modules.values()):
        registry = getattr(module, "__warningregistry__", None)
        if isinstance(registry, dict):
            registry.clear()
    _clear_once_caches()
    _state["notebooks"] += 1


def _clear_once_caches() -> None:
    """transformers' `logger.warning_once` / `info_once` remember messages for the process: forget them."""
    import logging

    for name in ("warning_once", "info_once"):
        cache_clear = getattr(getattr(logging.Logger, name, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def kernel_note() -> str:
    """One line for the executed notebook: which kernel ran it and how many notebooks it ran before."""
    n = _state["notebooks"]
    if n == 0:  # the notebook was not started by the warm engine (by hand, or papermill's default engine)
        return f"kernel: pid {os.getpid()}, a new kernel"
    started = time.strftime("%H:%M:%S", time.localtime(_state["started"]))
    return f"kernel: pid {os.getpid()} (started {started}), notebook {n} executed in it; namespace reset before it"


# ------------------------------------------------------------------------------------------- papermill
_RESET_CODE = "import arca_lab.sweep.kernel as _arca_kernel; _arca_kernel.fresh_namespace(get_ipython())"


def _engine() -> type:
    """The papermill engine class (papermill and nbclient are imported on first use: the runner does not need
    them for a dry run)."""
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine
    from papermill.log import logger

    class WarmClient(PapermillNotebookClient):
        """papermill's client on the warm kernel and its client (the kernel-info handshake of a new client costs
        ~0.4 s): reset the namespace, then the cells; leave kernel and channels open for the next notebook."""

        def __init__(self, nb_man, warm: WarmKernel, **kw):
            super().__init__(nb_man, km=warm.km, **kw)
            self.warm = warm
            self.kc = warm.kc  # None for a new kernel: nbclient makes the client, kept below

        def papermill_execute_cells(self):
            self.warm.kc = self.kc
            reply = self.wait_for_reply(self.kc.execute(_RESET_CODE, silent=True, store_history=False))
            if reply is None or reply["content"]["status"] != "ok":
                content = (reply or {}).get("content", {})
                raise RuntimeError(
                    f"could not reset the kernel before the notebook: {content.get('ename')}: "
                    f"{content.get('evalue')}"
                )
            super().papermill_execute_cells()

    class WarmKernelEngine(NBClientEngine):
        """NBClientEngine that executes in a `WarmKernel` (`warm=`) and leaves its kernel running."""

        @classmethod
        def execute_managed_notebook(
            cls,
            nb_man,
            kernel_name,
            warm=None,
            log_output=False,
            start_timeout=60,
            execution_timeout=None,
            **kw,
        ):
            kw = {k: v for k, v in kw.items() if k not in ("input_path", "timeout", "startup_timeout")}
            client = WarmClient(
                nb_man,
                warm,
                kernel_name=kernel_name,
                log=logger,
                log_output=log_output,
                startup_timeout=start_timeout,
                timeout=execution_timeout,
                **kw,
            )
            return client.execute()

    return WarmKernelEngine


def register_engine() -> str:
    from papermill.engines import papermill_engines

    if WARM_ENGINE not in papermill_engines._engines:
        papermill_engines.register(WARM_ENGINE, _engine())
    return WARM_ENGINE


class WarmKernel:
    """One sweep kernel (kernelspec `arca-lab-sweep` under `jupyter_dir`) kept alive across notebooks.

    The kernel starts with the first notebook (in that call's `cwd`) and again after it died; `shutdown()` ends it.
    """

    def __init__(self, jupyter_dir: Path, start_timeout: float = 300) -> None:
        self.jupyter_dir = Path(jupyter_dir)
        self.start_timeout = start_timeout
        self.km: Any = None
        self.kc: Any = None
        self.notebooks = 0
        self.starts = 0

    def _ensure_manager(self) -> None:
        """Keep a live kernel; else a new manager, whose kernel nbclient starts (the old kernel is gone)."""
        from jupyter_client import AsyncKernelManager
        from jupyter_client.utils import run_sync

        if self.km is not None and run_sync(self.km.is_alive)():
            return
        self.shutdown()
        with jupyter_path(self.jupyter_dir):  # the kernelspec is looked up here, when the manager is made
            self.km = AsyncKernelManager(kernel_name=KERNEL_NAME)
        self.starts += 1

    def execute(self, notebook: Path, output: Path, parameters: Mapping[str, Any], cwd: Path) -> None:
        """papermill `notebook` -> `output` in this kernel (saved after every cell; raises as papermill does)."""
        import papermill

        self._ensure_manager()
        self.notebooks += 1
        with jupyter_path(self.jupyter_dir):
            papermill.execute_notebook(
                str(notebook),
                str(output),
                parameters=dict(parameters),
                kernel_name=KERNEL_NAME,
                engine_name=register_engine(),
                warm=self,
                cwd=str(cwd),  # the kernel's working directory when it starts
                progress_bar=False,
                log_output=False,
                start_timeout=self.start_timeout,
                # nbclient's default for kernels it starts: no IPython history file shared by the workers
                extra_arguments=["--HistoryManager.hist_file=:memory:"],
            )

    def shutdown(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        if self.km is None:
            return
        from jupyter_client.utils import run_sync

        km, self.km = self.km, None
        try:
            if km.has_kernel:
                run_sync(km.shutdown_kernel)(now=False)
        except Exception:  # already gone: nothing to clean up
            pass

    def __enter__(self) -> WarmKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
