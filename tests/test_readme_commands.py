"""The README's own commands, run as a user types them: relative paths, from the repository root
and from another directory. Only the step counts and minicity's example counts are shortened (the
demo's model, image sizes and batch sizes are kept): scoring and predicting the demo's 800 held-out
scenes three times per test took most of the suite's time, and a handful of scenes per split runs
the same code.

The commands are read from README.md itself, so a README edit that breaks them fails here. The
demo minicity is rendered once per test session (both tests, whichever xdist worker runs them)
into a shared data dir, passed through $SYNSEG_DATA_DIR, which the commands do not mention.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scenes per minicity split: real_val is not a multiple of the eval batch (25), so the padded last
# batch is scored; sim[90%:] (the demo's in-domain eval split) holds 2 scenes.
NUM_EXAMPLES = {"sim": 20, "sim_topdown": 4, "real_train": 8, "real_val": 10, "objects": 64}
# The demo preset, shortened: 2 training steps after a 1-step pretraining (which reads the same
# minicity counts: recipe.ensure_pretrained passes data.minicity on), on the small minicity.
SHORT_STEPS = ",".join(["demo", "train.steps=2", "pretrain.overrides=train.steps=1",
                        *(f"data.minicity.num_examples.{s}={n}" for s, n in NUM_EXAMPLES.items())])


def readme_commands() -> dict[str, str]:
    """The demo, eval and predict command lines of README.md's bash blocks."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    demo = [line for line in lines if line.startswith("pip install -e . && python -m "
                                                      "synseg_jax.main")]
    evals = [line for line in lines if line.startswith("python -m synseg_jax.main")
             and "--mode=eval" in line]
    predicts = [line for line in lines if line.startswith("python -m synseg_jax.predict")]
    assert len(demo) == 1 and evals and predicts, "README lost its demo, eval or predict command"
    # The demo's install half is this environment; the test runs what follows it.
    return {"demo": demo[0].split("&&", 1)[1].strip(), "eval": evals[0], "predict": predicts[0]}


def shorten(command: str, config_dir: str | None = None) -> list[str]:
    """argv of ``command`` with the step counts shortened (and, given ``config_dir``, the config
    file read from there, as a user in another directory would name it)."""
    argv = shlex.split(command)
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            assert ":" not in path, f"README's command already carries config arguments: {arg}"
            if config_dir is not None:
                path = os.path.join(config_dir, os.path.relpath(path, "configs"))
            arg = f"--config={path}:{SHORT_STEPS}"
        out.append(arg)
    assert out[:2] == ["python", "-m"], command
    return [sys.executable] + out[1:]


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> str:
    """The shortened demo's minicity (the options its config gives), rendered once for every
    xdist worker of this session."""
    from filelock import FileLock  # noqa: PLC0415  (comes with tensorflow-datasets' deps)

    root = tmp_path_factory.getbasetemp().parent
    data_dir, done = root / "readme_minicity", root / "readme_minicity.done"
    with FileLock(str(root / "readme_minicity.lock")):
        if not done.exists():
            code = ("from configs import source_only; from synseg_jax import inputs; "
                    "from synseg_jax.data import datasets as d; "
                    f"o = inputs.minicity_options(source_only.get_config({SHORT_STEPS!r}).data); "
                    f"d.builder('minicity', 'sim', data_dir={str(data_dir)!r}, "
                    "minicity_options=o); "
                    f"d.builder('minicity', 'objects', data_dir={str(data_dir)!r}, "
                    "minicity_options=o)")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=900, env=_env(str(data_dir)), cwd=REPO)
            assert proc.returncode == 0, proc.stderr[-3000:]
            done.touch()
    return str(data_dir)


def _env(data_dir: str) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "SYNSEG_DATA_DIR": data_dir}


def _run(argv: list[str], cwd: str, data_dir: str) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=_env(data_dir))
    assert proc.returncode == 0, (f"{shlex.join(argv)} in {cwd} failed:\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    # The commands read the session's minicity; rendering another would mean the fixture's
    # options and the commands' config have drifted apart (and every test renders its own).
    assert "Rendering minicity" not in proc.stderr, proc.stderr[-4000:]
    return proc.stdout


def _run_readme(cwd: str, data_dir: str, config_dir: str | None) -> None:
    commands = readme_commands()
    _run(shorten(commands["demo"], config_dir), cwd, data_dir)
    workdir = os.path.join(cwd, "runs", "source_only")
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = json.load(f)
    # Every path is recorded absolute, so the run means the same from anywhere.
    assert os.path.isabs(recorded["pretrain"]["config"])
    assert os.path.isabs(recorded["init"]["seg"]["path"])
    trained = sorted(os.listdir(os.path.join(workdir, "eval")))
    assert "minicity_real_val_2.json" in trained

    stdout = _run(shorten(commands["eval"], config_dir), cwd, data_dir)
    assert "minicity/real_val" in stdout

    _run(shorten(commands["predict"], config_dir), cwd, data_dir)
    out = [a.split("=", 1)[1] for a in shlex.split(commands["predict"]) if a.startswith("--out=")]
    written = os.listdir(os.path.join(cwd, out[0]))
    assert len(written) == NUM_EXAMPLES["real_val"]
    assert all(n.endswith("_pred_labelIds.png") for n in written)


def test_readme_commands_from_the_repository_root(tmp_path, demo_data_dir):
    """The repository root as a user has it: `configs/` beside the relative `runs/` the commands
    write (a copy, so the test leaves the real tree clean and two suites cannot collide)."""
    root = tmp_path / "synseg_jax_checkout"
    shutil.copytree(os.path.join(REPO, "configs"), root / "configs")
    _run_readme(str(root), demo_data_dir, config_dir=None)


def test_readme_commands_from_another_directory(tmp_path, demo_data_dir):
    """The same commands started elsewhere, naming the config file by its path."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run_readme(str(elsewhere), demo_data_dir, config_dir=os.path.join(REPO, "configs"))
