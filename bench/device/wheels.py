"""Wheels for a GPU machine with no network whose image already has torch and lightning
(bench/device/image_packages.txt) but not the rest of the project's stack.

    python bench/device/wheels.py            # fills .whl/ (git-ignored), checks it is complete
    python bench/device/wheels.py --check    # only the check, on what .whl/ holds

On the machine: `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` (check.sh does it).

Walks the project's dependencies (pyproject.toml) and each carried wheel's Requires-Dist, with
markers evaluated for the machine (CPython 3.12 on x86-64 Linux, no extras); whatever the image
lacks is carried, at the version installed here (the one the tests ran with). A requirement the
image meets is trusted by name: the list has no versions. Packages that publish only a source
archive (DeepSpeed) are built into a wheel here; DeepSpeed's is pure Python (its CUDA ops are
compiled on first use, with the nvcc and ninja the image has).
"""

import argparse
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
# Carried as their pure-Python wheel: torchao's float8 training (train/float8.py) is PyTorch code;
# its compiled kernels (8 MiB more in the manylinux wheel) serve other features, and the carried
# tree must stay under the device's 64 MiB.
PURE_PYTHON = {"torchao"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def image_packages() -> set[str]:
    lines = (ROOT / "bench" / "device" / "image_packages.txt").read_text().splitlines()
    return {canonicalize_name(n) for n in lines if n.strip() and not n.startswith("#")}


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def needed(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({**default_environment(), **TARGET})


def carried(wheels_dir: Path = WHEELS) -> dict[str, Path]:
    return {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in sorted(wheels_dir.glob("*.whl"))}


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def fetch(name: str, version: str, wheels_dir: Path) -> None:
    """One wheel for CPython 3.12 on manylinux x86-64 (PURE_PYTHON: the pure-Python one); built here when
    only a source archive exists."""
    pip = [sys.executable, "-m", "pip"]
    spec = f"{name}=={version}"
    pure = canonicalize_name(name) in PURE_PYTHON
    platforms = ["--platform", "any"] if pure else [a for p in PLATFORMS for a in ("--platform", p)]
    got = subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                          "--implementation", "py" if pure else "cp", *platforms, "-d", str(wheels_dir), spec])
    if got.returncode != 0:
        print(f"{spec}: no wheel for the machine on the index; building one here")
        subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels_dir), spec], check=True)
        built = carried(wheels_dir)[canonicalize_name(name)]
        if not built.name.endswith("-none-any.whl"):
            sys.exit(f"{built.name}: built for this machine's Python, not the device's 3.12: carry a pure-Python or cp312 wheel")


def resolve(roots: list[Requirement], have: set[str], wheels_dir: Path = WHEELS, download: bool = False) -> list[str]:
    """Walk the requirements from roots (those met by `have` are trusted); returns the problems,
    empty when wheels_dir holds all the rest. download: fetch what is missing first."""
    problems, seen, wheels = [], set(), carried(wheels_dir)
    todo = [(r, "pyproject.toml") for r in roots]
    while todo:
        req, by = todo.pop()
        name = canonicalize_name(req.name)
        if not needed(req) or name in have or (name, str(req.specifier)) in seen:
            continue
        seen.add((name, str(req.specifier)))
        if name not in wheels and download:
            try:
                fetch(req.name, metadata.version(req.name), wheels_dir)
            except metadata.PackageNotFoundError:
                problems.append(f"{req} (needed by {by}) is not installed here: `make install` first")
                continue
            wheels = carried(wheels_dir)
        if name not in wheels:
            problems.append(f"{req} (needed by {by}): neither in the image nor in {wheels_dir.name}/")
            continue
        version = parse_wheel_filename(wheels[name].name)[1]
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} (needed by {by}): {wheels_dir.name}/ holds {version}")
        todo += [(r, wheels[name].name) for r in wheel_requirements(wheels[name])]
    names = [canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels_dir.glob("*.whl")]
    problems += [f"two versions of {n} in {wheels_dir.name}/: keep one" for n in sorted(set(names)) if names.count(n) > 1]
    return problems


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="check .whl/ without downloading")
    args = p.parse_args(argv)
    WHEELS.mkdir(exist_ok=True)
    problems = resolve(project_requirements(), image_packages(), WHEELS, download=not args.check)
    wheels = carried()
    size = sum(w.stat().st_size for w in wheels.values()) / 2**20
    print(f".whl/: {len(wheels)} wheels, {size:.1f} MiB: {', '.join(sorted(wheels))}")
    if problems:
        sys.exit("incomplete:\n  " + "\n  ".join(problems))
    print("complete for the device image (bench/device/image_packages.txt)")


if __name__ == "__main__":
    main()
