"""The package works from a wheel: built from this tree, installed into a fresh environment outside
it, it finds its shipped configs by name and runs prepare -> train -> export, and ``demo --help``."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (path,) = out.glob("jaxdistil-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_holds_every_package_config_and_asset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {str(p.relative_to(REPO)) for p in (REPO / "jaxdistil").rglob("*.py")}
    assert source <= names, sorted(source - names)[:5]  # pyproject's package list misses none
    configs = {f"jaxdistil/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    assert configs and configs <= names
    assert "jaxdistil/assets/teacher-pydocs/model.safetensors" in names


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_source_tree(wheel, tmp_path):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)  # pip from ensurepip
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies come from this environment (a path line: its .pth files, among them the
    # editable install of the source tree, are not run); jaxdistil itself only from the wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    # --ignore-installed: the dependencies' path also holds the editable install's metadata.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, timeout=300, env=env)
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    work = tmp_path / "elsewhere"
    work.mkdir()

    def jd(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run([str(env_dir / "bin" / "jaxdistil"), *args], cwd=work, env=env, capture_output=True,
                             text=True, timeout=900)
        assert res.returncode == 0, (args, res.stdout[-2000:], res.stderr[-3000:])
        return res

    res = subprocess.run([str(python), "-c", "import jaxdistil; print(jaxdistil.__file__)"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    where = res.stdout.strip()
    assert where.startswith(purelib), where  # the wheel's copy, not the source tree
    words = "the a of to and in is it that for on with as was by this be are from at or".split()
    (work / "corpus.txt").write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(20))
                                               for i in range(60)) + "\n")
    jd("prepare", "--source", "corpus.txt", "--tokenizer", "train:120", "--output", "data", "--max-len", "32",
       "--workers", "1")
    jd("train", "--config", "tiny", "run_dir=run", "data.dir=data", "loader.max_len=32", "loader.buckets=[32]",
       "loader.batch_size=4", "student.config.max_position_embeddings=32", "train.steps=2", "train.eval_every=-1",
       "checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false", "logging.peak_tflops=1")
    jd("export", "--run", "run", "--output", "hf")
    assert (work / "hf" / "model.safetensors").is_file() and (work / "hf" / "config.json").is_file()
    assert "--ablation" in jd("demo", "--help").stdout
