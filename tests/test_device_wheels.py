"""bench/device/wheels.py: the wheels carried to a GPU machine without network are checked for
completeness by following each wheel's requirements (markers for CPython 3.12 on Linux)."""

import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.device import wheels  # noqa: E402


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    meta = "Metadata-Version: 2.1\nName: {0}\nVersion: {1}\n".format(name, version)
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_missing_requirement_wrong_version_and_duplicates_are_reported(tmp_path):
    roots, image = [Requirement("app>=1")], {"torch"}
    fake_wheel(tmp_path, "app", "1.0", ["torch", "lib>=2", "win_only; sys_platform == 'win32'",
                                        "old_only; python_version < '3.0'", "extra_only; extra == 'docs'"])
    folder = tmp_path.name
    assert wheels.resolve(roots, image, tmp_path) == [f"lib>=2 (needed by app-1.0-py3-none-any.whl): neither in the image nor in {folder}/"]
    fake_wheel(tmp_path, "lib", "1.5", [])
    assert wheels.resolve(roots, image, tmp_path) == [f"lib>=2 (needed by app-1.0-py3-none-any.whl): {folder}/ holds 1.5"]
    (tmp_path / "lib-1.5-py3-none-any.whl").unlink()
    fake_wheel(tmp_path, "lib", "2.1", [])
    assert wheels.resolve(roots, image, tmp_path) == []  # torch from the image; the rest not for Linux 3.12
    fake_wheel(tmp_path, "lib", "2.2", [])
    assert wheels.resolve(roots, image, tmp_path)[-1] == f"two versions of lib in {folder}/: keep one"


def test_image_list_names_what_the_project_relies_on_there():
    have = wheels.image_packages()
    assert {"torch", "torchaudio", "lightning", "einops", "safetensors", "numpy"} <= have
    assert not {"deepspeed", "hydra-core", "wandb", "av", "webdataset"} & have  # carried
