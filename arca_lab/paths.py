"""What a relative path in a notebook parameter means: a path below the repository root, wherever the kernel runs.

A notebook's kernel starts in a different directory under each entry point: JupyterLab and `jupyter nbconvert
--execute` start it in the notebook's own directory (`notebooks/`), papermill in the directory it is called from
(or `--cwd`), `arca-lab sweep` and `arca-lab report` in the sweep directory. So the notebooks never read a path
parameter against the working directory; they pass it through `resolve`, which reads a relative path against
`REPO_ROOT` and leaves an absolute one (what `arca-lab sweep` passes) unchanged. `sweep_dir = "sweeps/default"`
is then `<repository>/sweeps/default` under every entry point.

`REPO_ROOT` is the checkout arca_lab is imported from (the directory holding `pyproject.toml` and `notebooks/`,
as `pip install -e .` installs it); without one (a non-editable install) it is the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def _repo_root() -> Path:
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else Path.cwd()


REPO_ROOT: Path = _repo_root()


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """`path` itself if absolute (after `~` expansion), else `root / path` (default root: `REPO_ROOT`), with
    "." and ".." segments folded (`os.path.normpath`, symlinks kept)."""
    p = Path(path).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else (root or REPO_ROOT) / p))


class MissingSweep(FileNotFoundError):
    """No sweep.nc where a notebook was told to read a sweep; Jupyter shows the message alone, one line."""

    def _render_traceback_(self) -> list[str]:
        # IPython prints what this returns instead of the traceback (a sweep that is not there needs no stack).
        return [f"{type(self).__name__}: {self}"]


def existing_sweep(sweep_dir: str | Path, root: Path | None = None) -> Path:
    """The resolved sweep directory if it holds a combined sweep (sweep.nc), else `MissingSweep` naming the
    command that makes one: `arca-lab report` when its runs exist but are not combined, else `arca-lab sweep`."""
    root = root or REPO_ROOT
    path = resolve(sweep_dir, root)
    if (path / "sweep.nc").is_file():
        return path
    shown = _shown(path, root)
    where = f" in {root}" if shown != str(path) else ""
    if (path / "sweep.json").is_file():
        todo = f"its runs are not combined yet: run `arca-lab report {shown}`{where}"
    else:
        todo = f"run `arca-lab sweep --out {shown}`{where} first"
    raise MissingSweep(f"no sweep.nc in {path} (sweep_dir = {str(sweep_dir)!r}): {todo}")


def _shown(path: Path, root: Path) -> str:
    """`path` relative to `root` when it lies below it (the short form a command run in `root` takes)."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
