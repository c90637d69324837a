"""The wheel: the library packages only, compatible version ranges, and the README's usage snippet runs from the
installed wheel alone (no checkout on the path)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What must not go into the wheel, and what a copy of the checkout to build from leaves out.
NOT_SHIPPED = ("train", "evaluation", "benchmarks", "configs", "tests", "experiments")
SKIP_COPY = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "build", "dist", "*.egg-info", "runs",
                                   ".whl", ".pytest_cache")


def readme_snippet() -> str:
  """The first ```python block under README.md's "## Usage"."""
  usage = (ROOT / "README.md").read_text().split("## Usage", 1)[1]
  return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def _has_setuptools() -> bool:
  try:
    import setuptools  # noqa: F401
    return True
  except ImportError:
    return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """Builds the wheel from a copy of the checkout (a build writes egg-info/ and build/ next to the sources)."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  shutil.copytree(ROOT, src, ignore=SKIP_COPY)
  cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)]
  if _has_setuptools():  # else pip fetches setuptools from the package index into an isolated build env
    cmd.insert(4, "--no-build-isolation")
  subprocess.run(cmd, check=True, capture_output=True, timeout=300)
  return next((tmp / "dist").glob("gdn2_jax-*.whl"))


def test_wheel_holds_the_library_only_with_ranges(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
  top = {n.split("/")[0] for n in names}
  assert top == {"gdn2_jax", "pallas_kernels", wheel.name.split("-py")[0] + ".dist-info"}, top
  assert "gdn2_jax/fla.py" in names and "pallas_kernels/gdn2/api.py" in names
  requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
  assert "jax<0.12,>=0.11.2" in requires, requires
  # Ranges, not pins (the pins live in constraints.txt).
  assert not [r for r in requires if "==" in r.split(";")[0]], requires
  assert not entry_points  # no console script that would need the checkout


def test_readme_snippet_runs_from_the_installed_wheel(wheel, tmp_path):
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                  str(wheel)], check=True, capture_output=True, timeout=120)
  # -I: no PYTHONPATH, no current directory on the path; the wheel's copy goes first (ahead of an editable install).
  code = (f"import sys; sys.path.insert(0, {str(site)!r})\n" + readme_snippet() +
          "\nimport gdn2_jax, importlib.util\n"
          f"assert gdn2_jax.__file__.startswith({str(site)!r}), gdn2_jax.__file__\n"
          "assert o.shape == (B, T, H, V) and o1.shape == (B, H, V)\n"
          "print('snippet ok')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as a user's laptop
  out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and "snippet ok" in out.stdout, out.stderr[-3000:]


def test_constraints_pin_what_pyproject_ranges_allow():
  pins = {}
  for line in (ROOT / "constraints.txt").read_text().splitlines():
    if line and not line.startswith("#"):
      name, version = line.split("==")
      pins[name.lower().replace("_", "-")] = version
  expected = {"jax": "0.11.2", "jaxlib": "0.11.2", "flax": "0.12.10", "optax": "0.2.8", "chex": "0.1.92",
              "orbax-checkpoint": "0.12.4", "grain": "0.2.18"}
  assert {k: pins.get(k) for k in expected} == expected
  assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


@pytest.mark.slow  # downloads jax and its dependencies from the package index into a fresh venv
def test_wheel_in_a_fresh_venv(wheel, tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
  py = str(venv / "bin" / "python")
  subprocess.run([py, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)], check=True,
                 capture_output=True, timeout=900)
  code = readme_snippet() + "\nimport gdn2_jax; assert 'site-packages' in gdn2_jax.__file__; print('snippet ok')\n"
  out = subprocess.run([py, "-I", "-c", code], cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "snippet ok" in out.stdout, out.stderr[-3000:]
  for name in NOT_SHIPPED:  # nothing of the checkout's tools leaks into site-packages
    assert subprocess.run([py, "-I", "-c", f"import {name}"], cwd=tmp_path, capture_output=True).returncode != 0
