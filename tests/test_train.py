"""Training runs (jaxdistil.train): exact resume after SIGKILL, restore onto another mesh, SIGTERM,
run-dir checks, the files a run writes, and the command's one-line errors.

One tiny distillation run (``ref_run``: 2-layer BERT teacher, 1-layer student from its layer 1, 12
steps, 8 CPU devices) is the reference every other test compares with. All runs share JAX's
persistent compilation cache (the session's, tests/conftest.py; the subprocess too), so each
distinct step compiles once; the exact-resume test thereby also shows that a cached executable keeps
losses bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from cli_errors import one_line_error
from tiny_runs import STEPS, base_config, losses, make_data_dir, make_teacher_dir

from jaxdistil import cli
from jaxdistil.distill.config import config_from_dict, dump_run_config, load_run_config
from jaxdistil.train import train

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data_dir) -> Path:
    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "bert", data_dir)


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, data_dir, teacher_dir):
    root = tmp_path_factory.mktemp("runs")
    raw = base_config(root / "ref", data_dir, teacher_dir)
    cfg = config_from_dict(raw)
    result = train(cfg, log=lambda *a: None)
    return {
        "raw": raw,
        "cfg": cfg,
        "result": result,
        "dir": root / "ref",
        "losses": losses(root / "ref"),
        "root": root,
    }


def subprocess_env() -> dict[str, str]:
    """A ``jaxdistil train`` subprocess sharing this module's compilation cache."""
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAX_COMPILATION_CACHE_DIR=os.environ["JAX_COMPILATION_CACHE_DIR"],
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def _with(raw: dict, run_dir: Path, **sections) -> dict:
    out = json.loads(json.dumps(raw))
    out["run_dir"] = str(run_dir)
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_reference_run_writes_everything(ref_run):
    run = ref_run["dir"]
    ref = ref_run["losses"]
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in ref.values())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if r["kind"] == "train"]
    for key in ("loss", "loss_ce", "loss_mlm", "loss_cos", "mlm_accuracy", "grad_norm", "lr", "memory_gb"):
        assert key in train_rec[-1], key
    assert "tokens_per_s" in train_rec[-1] and "mfu" in train_rec[-1]
    assert train_rec[-1]["loss_ce"] > 0 and train_rec[-1]["loss_cos"] > 0  # the triple loss is on
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]  # 0: the student as copied from the teacher
    assert "teacher_accuracy" in evals[0] and all("teacher_accuracy" not in r for r in evals[1:])  # once
    for r in evals:
        assert np.isclose(r["student_perplexity"], np.exp(r["student_loss"]))
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == list(range(2, STEPS + 1, 2))
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((run / "student" / "config.json").read_text())["n_layers"] == 1
    # The resolved config round-trips; train.attention "auto" is resolved: the run records the
    # implementation it used.
    recorded = load_run_config(run / "config.yaml")
    assert recorded.train.attention in ("xla", "cudnn", "einsum")
    given = ref_run["cfg"]
    assert recorded == dataclasses.replace(given, train=dataclasses.replace(given.train, attention=recorded.train.attention))
    result = ref_run["result"]
    assert result.step == STEPS and result.interrupted is None and result.teacher_eval
    # Distillation from the teacher's own layer: the student starts close to the teacher.
    from jaxdistil.hf.load import restore_run_params as restore_params

    step, cfg, params = restore_params(run)
    assert (
        step == STEPS
        and cfg.n_layers == 1
        and params["encoder"]["layers"]["lin1"]["kernel"].shape == (1, 32, 64)
    )


@pytest.mark.slow
def test_exact_resume_after_sigkill(ref_run, tmp_path, capfd):
    """SIGKILL at a random step, resume: every per-step loss equals the uninterrupted run's, bit for bit."""
    kill_and_resume(ref_run["raw"], ref_run["losses"], tmp_path, capfd)


def kill_and_resume(raw: dict, reference: dict[int, float], tmp_path: Path, capfd) -> None:
    """Runs ``raw`` in a ``jaxdistil train`` subprocess, SIGKILLs it after a random step, resumes it
    in this process and checks every per-step loss against ``reference`` (bit for bit)."""
    run = tmp_path / "killed"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_with(raw, run)))
    # Early enough that several steps, saves and an evaluation remain when the signal lands.
    kill_after = random.Random(time.time_ns()).randint(3, STEPS - 5)
    print(f"killing after step {kill_after}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxdistil.cli", "train", "--config", str(config)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"train exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            done = losses(run) if (run / "metrics.jsonl").is_file() else {}
            complete = [p for p in (run / "checkpoints").glob("*") if p.name.isdigit()]
            if done and max(done) >= kill_after and complete:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the subprocess did not reach the kill step in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = losses(run)
    assert max(before) >= kill_after
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    # A save cut short leaves only a temporary directory; plant one past the last step to be sure.
    fake = run / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1234"
    (fake / "params").mkdir(parents=True)
    (fake / "params" / "garbage").write_bytes(b"\0" * 10)

    # The killed process's lock is still recorded: the next run takes it over, with a warning.
    holder = json.loads((run / "lock.json").read_text())
    assert holder["pid"] == proc.pid
    messages = []
    capfd.readouterr()
    result = train(config_from_dict(_with(raw, run)), log=messages.append)
    warnings = [line for line in capfd.readouterr().err.splitlines() if "taking the lock over" in line]
    assert len(warnings) == 1 and f"pid {proc.pid}" in warnings[0] and "no longer running" in warnings[0]
    resumed = [m for m in messages if m.startswith("resumed")]
    assert saved and resumed and resumed[0].endswith(f"from step {max(saved)}"), (messages, saved)
    assert result.step == STEPS
    assert not fake.exists()  # temporary directories are cleaned up, never read
    after = losses(run)
    assert after == reference  # exact float equality, every step
    assert not (run / "lock.json").exists()  # released at the end


def _bert_dir(out: Path, data_dir: Path, seed: int, with_tokenizer: bool = True, vocab_extra: int = 0, **shape) -> Path:
    """A random BERT (Flax model dir) for the data's vocabulary (+ ``vocab_extra`` padded rows)."""
    from jaxdistil.data.manifest import load_manifest, tokenizer_dir
    from jaxdistil.hf import save_flax_model
    from jaxdistil.models import BertConfig, build_model, init_params

    manifest = load_manifest(data_dir)
    cfg = BertConfig(vocab_size=manifest["tokenizer"]["vocab_size"] + vocab_extra, max_position_embeddings=32,
                     **shape)
    shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
    save_flax_model(cfg, params, out, tokenizer_dir=tokenizer_dir(manifest) if with_tokenizer else None)
    return out


def two_teacher_config(raw: dict, second: Path) -> dict:
    """``raw`` with a second teacher "wide" (weight 2): a KL to the mixture of both teachers' soft
    targets, the MLM loss, and a projected hidden MSE from the student's layer 1 to wide's layer 3."""
    out = _with(raw, Path(raw["run_dir"]))
    out["teachers"] = [{"name": "wide", "model": str(second), "weight": 2.0}]
    out["loss"] = {"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0}
    out["terms"] = [{"kind": "kl", "weight": 5.0, "teacher": ["teacher", "wide"]}, {"kind": "mlm_ce", "weight": 2.0},
                    {"kind": "hidden_mse", "teacher": "wide", "layers": [[1, 3]], "projection": True}]
    return out


@pytest.mark.slow
def test_two_teacher_run_resumes_exactly_after_sigkill(ref_run, data_dir, tmp_path, capfd):
    """Two teachers (the run's 2-layer BERT and a 3-layer, 48-wide one with the data's tokenizer):
    the run trains (its terms are logged and fall), and a SIGKILLed copy resumes bit for bit."""
    second = _bert_dir(tmp_path / "wide", data_dir, seed=3, hidden_size=48, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=96)
    raw = two_teacher_config(_with(ref_run["raw"], tmp_path / "two"), second)
    result = train(config_from_dict(raw), log=lambda *a: None)
    reference = losses(tmp_path / "two")
    assert result.step == STEPS and sorted(reference) == list(range(1, STEPS + 1))
    records = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if r["kind"] == "train"]
    assert {"loss_kl", "loss_mlm_ce", "loss_hidden_mse"} <= set(train_rec[-1]) and "loss_ce" not in train_rec[-1]
    assert train_rec[-1]["loss_hidden_mse"] < train_rec[0]["loss_hidden_mse"]
    assert load_run_config(tmp_path / "two" / "config.yaml").teachers[0].name == "wide"
    kill_and_resume(raw, reference, tmp_path, capfd)


def test_a_logit_term_mixing_vocabularies_is_refused(ref_run, data_dir, tmp_path, capsys):
    """A second teacher with a padded vocabulary (the data's + 8 rows, no tokenizer of its own): fine
    for a hidden-state term, refused in one line for a soft-target mixture; nothing is written."""
    padded = _bert_dir(tmp_path / "padded", data_dir, seed=4, with_tokenizer=False, vocab_extra=8, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    raw = two_teacher_config(_with(ref_run["raw"], tmp_path / "run"), padded)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    line = one_line_error(capsys, ["train", "--config", str(config)])
    assert "terms[0] (kl) mixes teachers with different vocabularies" in line and "wide" in line
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()
    line = one_line_error(capsys, ["train", "--config", str(config), f"teachers=[{{name: wide, model: {tmp_path}/none}}]"])
    assert "none" in line and "does not exist" in line


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: (size, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_second_process_on_a_run_dir_is_refused(ref_run, tmp_path):
    """Two `train` processes on one run dir: the second exits 2 with one line naming the holder and
    writes nothing; the first finishes with the losses of an undisturbed run."""
    run = tmp_path / "shared-run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_with(ref_run["raw"], run)))
    argv = [sys.executable, "-m", "jaxdistil.cli", "train", "--config", str(config)]
    first = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not ((run / "lock.json").is_file() and (run / "metrics.jsonl").is_file()):
            if first.poll() is not None or time.time() > deadline:
                pytest.fail(f"the first train did not start: {first.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        # Paused (it keeps its lock), so that the second process surely meets a live holder.
        os.kill(first.pid, signal.SIGSTOP)
        before = _tree_state(run)
        second = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        after = _tree_state(run)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2, second.stderr
    assert len(lines) == 1 and lines[0].startswith("error: run dir "), second.stderr
    assert f"in use by pid {first.pid} on host " in lines[0]
    assert after == before  # the second process wrote nothing
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    assert losses(run) == ref_run["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [True, False])
def test_failed_save_is_one_line_and_earlier_checkpoints_restore(ref_run, tmp_path, capsys, monkeypatch,
                                                                 async_save):
    """A save that fails (disk full, injected into the saver at step 6) ends the run with one line
    naming the step and the cause; the run then resumes exactly from step 4."""
    from jaxdistil.training import checkpoint as ckpt_lib

    run = tmp_path / "full-disk"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_with(ref_run["raw"], run, checkpoint={"async_save": async_save})))
    real_save = ckpt_lib.DataStateHandler.save

    def save(self, directory, args):
        if "6" in str(directory).split("/")[-2].split("."):
            raise OSError(28, "No space left on device")
        return real_save(self, directory, args)

    monkeypatch.setattr(ckpt_lib.DataStateHandler, "save", save)
    line = one_line_error(capsys, ["train", "--config", str(config)])
    assert "checkpoint of step 6" in line and "No space left on device" in line
    assert "checkpoints up to step 4 are intact" in line and "run the same command to resume" in line
    assert not (run / "lock.json").exists()
    monkeypatch.setattr(ckpt_lib.DataStateHandler, "save", real_save)
    messages = []
    result = train(config_from_dict(_with(ref_run["raw"], run)), log=messages.append)
    assert f"resumed {run} from step 4" in messages, messages
    assert result.step == STEPS and losses(run) == ref_run["losses"]


@pytest.mark.slow
def test_restore_onto_another_mesh(ref_run, tmp_path):
    """Saved with data=8 at step 4, resumed with fsdp=4 x tensor=2: the remaining losses match within 1e-5."""
    run = tmp_path / "remesh"
    shutil.copytree(ref_run["dir"], run)
    for step in range(6, STEPS + 1, 2):
        shutil.rmtree(run / "checkpoints" / str(step))
    raw = _with(ref_run["raw"], run, mesh={"data": 1, "fsdp": 4, "tensor": 2}, train={"eval_every": -1})
    messages = []
    result = train(config_from_dict(raw), log=messages.append)
    assert any(m == f"resumed {run} from step 4" for m in messages), messages
    got, ref = losses(run), ref_run["losses"]
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    # The parameters really are split on the new mesh.
    kernel = result.state.params["encoder"]["layers"]["lin1"]["kernel"]  # [1, 32, 64]: (layers, embed, mlp)
    assert kernel.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
    assert kernel.addressable_shards[0].data.shape == (1, 8, 32)


@pytest.mark.slow
def test_sigterm_saves_then_resume_is_exact(ref_run, tmp_path):
    run = tmp_path / "term"
    raw = _with(ref_run["raw"], run)

    def send_when_logged():
        while not ((run / "metrics.jsonl").is_file() and losses(run) and max(losses(run)) >= 3):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_when_logged, daemon=True).start()
    messages = []
    first = train(config_from_dict(raw), log=messages.append)
    assert first.interrupted == signal.SIGTERM and 3 <= first.step < STEPS
    assert (run / "checkpoints" / str(first.step)).is_dir()
    assert any("SIGTERM received: saved a checkpoint" in m for m in messages)
    second = train(config_from_dict(raw), log=lambda *a: None)
    assert second.step == STEPS and second.interrupted is None
    assert losses(run) == ref_run["losses"]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(ref_run, tmp_path, capsys):
    run = tmp_path / "corrupt"
    shutil.copytree(ref_run["dir"], run)
    for f in (run / "checkpoints" / str(STEPS) / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_with(ref_run["raw"], run, train={"eval_every": -1})))
    assert cli.main(["train", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith(f"warning: checkpoint step {STEPS} ")]
    assert len(warning) == 1 and f"falling back to step {STEPS - 2}" in warning[0], err
    assert losses(run) == ref_run["losses"]  # the last two steps redone, identically
    assert (run / "checkpoints-corrupt").is_dir() and (run / "checkpoints" / str(STEPS)).is_dir()



@pytest.mark.slow
def test_errors_are_one_line(ref_run, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    raw = _with(ref_run["raw"], tmp_path / "new")
    raw["train"]["stepz"] = 3
    config.write_text(yaml.safe_dump(raw))
    assert "train.stepz" in one_line_error(capsys, ["train", "--config", str(config)])

    config.write_text(yaml.safe_dump(_with(ref_run["raw"], tmp_path / "new")))
    line = one_line_error(
        capsys, ["train", "--config", str(config), f"teacher.model={tmp_path}/no-such-teacher"]
    )
    assert "no-such-teacher" in line and "does not exist" in line

    # The reference run's dir with a 2-layer student: refused before anything is touched.
    config.write_text(yaml.safe_dump(_with(ref_run["raw"], ref_run["dir"])))
    mtime = (ref_run["dir"] / "config.yaml").stat().st_mtime
    line = one_line_error(capsys, ["train", "--config", str(config), "student.layers=0,1"])
    assert "made by another config" in line and "2 layers" in line
    assert (ref_run["dir"] / "config.yaml").stat().st_mtime == mtime

    line = one_line_error(
        capsys, ["train", "--config", str(config), "student.init=teacher", "teacher.model=null"]
    )
    assert "needs a teacher" in line

    # A teacher whose vocabulary is not the data's: refused against the data's manifest.
    from jaxdistil.hf import load_model, save_flax_model

    teacher = load_model(ref_run["raw"]["teacher"]["model"])
    other = tmp_path / "other-teacher"
    cfg = dataclasses.replace(teacher.config, vocab_size=teacher.config.vocab_size + 1)
    params = jax.tree.map(np.copy, teacher.params)
    params["embeddings"]["word_embeddings"]["embedding"] = np.zeros((cfg.vocab_size, 32), np.float32)
    params["mlm_head"]["bias"] = np.zeros((cfg.vocab_size,), np.float32)
    save_flax_model(cfg, params, other)
    config.write_text(yaml.safe_dump(_with(ref_run["raw"], tmp_path / "new")))
    line = one_line_error(capsys, ["train", "--config", str(config), f"teacher.model={other}"])
    assert "vocabulary" in line and "prepare the data" in line


@pytest.mark.slow
def test_evaluate_command(ref_run, data_dir, capsys):
    assert cli.main(["evaluate", "--model", str(ref_run["dir"]), "--data", str(data_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == STEPS and 0.0 <= out["accuracy"] <= 1.0 and out["masked_tokens"] > 0
    assert np.isclose(out["perplexity"], np.exp(out["loss"]))
    # Fixed masks: a second evaluation gives identical numbers.
    assert cli.main(["evaluate", "--model", str(ref_run["dir"]), "--data", str(data_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


@pytest.mark.slow
def test_mlm_only_random_bert(ref_run, tmp_path):
    """No teacher: a randomly initialised BERT trained with the MLM loss alone."""
    raw = _with(
        ref_run["raw"],
        tmp_path / "mlm",
        teacher={"model": None},
        student={
            "init": "random",
            "model_type": "bert",
            "config": {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 32,
            },
        },
        loss={"alpha_ce": 0.0, "alpha_cos": 0.0, "alpha_mlm": 1.0},
        train={"steps": 3, "eval_every": 0},
        checkpoint={"every": 0},
    )
    result = train(config_from_dict(raw), log=lambda *a: None)
    assert result.step == 3 and not result.teacher_eval and result.last_eval["accuracy"] >= 0
    assert type(result.student_config).__name__ == "BertConfig"
    assert sorted(int(p.name) for p in (tmp_path / "mlm" / "checkpoints").iterdir()) == [3]
    dump_run_config(config_from_dict(raw))  # serialisable


def _opt_state_paths(run: Path, step: int) -> list[str]:
    from jaxdistil.training.checkpoint import RunCheckpointer

    ckpt = RunCheckpointer(run, read_only=True)
    meta = ckpt.manager.item_metadata(step)["opt_state"]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(meta)]
    ckpt.manager.close()
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("how", ["freeze_pos_embs", "sinusoidal_pos_embds"])
def test_frozen_positions_stay_bit_identical_and_export_exactly(ref_run, tmp_path, how):
    """student.freeze_pos_embs (the reference's --freeze_pos_embs), or a teacher-initialised student
    with sinusoidal_pos_embds (2019 transformers froze that table after the teacher's was loaded):
    10 updates leave the table bit-identical, the optimizer holds no moments for it, and the export
    is exact."""
    from jaxdistil.hf import export_model, load_model
    from jaxdistil.students import student_from_teacher

    student = {"freeze_pos_embs": True} if how == "freeze_pos_embs" else {"config": {"sinusoidal_pos_embds": True}}
    raw = _with(ref_run["raw"], tmp_path / "frozen", student=student,
                train={"steps": 10, "eval_every": -1}, checkpoint={"every": 0})
    result = train(config_from_dict(raw), log=lambda *a: None)
    assert result.step == 10
    teacher = load_model(raw["teacher"]["model"])
    _, initial, _ = student_from_teacher(teacher.config, teacher.params, [1])
    trained = load_model(tmp_path / "frozen")
    pos = "position_embeddings"
    np.testing.assert_array_equal(trained.params["embeddings"][pos]["embedding"],
                                  initial["embeddings"][pos]["embedding"])
    assert not np.array_equal(trained.params["embeddings"]["word_embeddings"]["embedding"],
                              initial["embeddings"]["word_embeddings"]["embedding"])  # the rest trains
    paths = _opt_state_paths(tmp_path / "frozen", 10)
    assert any("word_embeddings" in p for p in paths) and not any(pos in p for p in paths), paths
    report = export_model(tmp_path / "frozen", tmp_path / "hf", force=True)
    assert report.verified and report.max_abs_diff <= 1e-4
    exported = load_model(tmp_path / "hf")
    np.testing.assert_array_equal(exported.params["embeddings"][pos]["embedding"],
                                  initial["embeddings"][pos]["embedding"])


@pytest.mark.slow
def test_frozen_token_types(ref_run, tmp_path, capsys):
    raw = _with(ref_run["raw"], tmp_path / "tt", teacher={"model": None},
                student={"init": "random", "model_type": "bert", "freeze_token_type_embds": True,
                         "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "intermediate_size": 64, "max_position_embeddings": 32}},
                loss={"alpha_ce": 0.0, "alpha_cos": 0.0, "alpha_mlm": 1.0},
                train={"steps": 10, "eval_every": -1}, checkpoint={"every": 1, "keep": 20})
    train(config_from_dict(raw), log=lambda *a: None)
    from jaxdistil.hf.load import restore_run_params as restore_params

    _, _, first = restore_params(tmp_path / "tt", 1)
    _, _, last = restore_params(tmp_path / "tt", 10)
    tt = "token_type_embeddings"
    # Step 1's update is zero for them as for every step: equal to step 10's, bit for bit.
    np.testing.assert_array_equal(first["embeddings"][tt]["embedding"], last["embeddings"][tt]["embedding"])
    assert not np.array_equal(first["embeddings"]["position_embeddings"]["embedding"],
                              last["embeddings"]["position_embeddings"]["embedding"])
    assert not any(tt in p for p in _opt_state_paths(tmp_path / "tt", 10))
    # A DistilBERT student has no token types: a one-line error.
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_with(ref_run["raw"], tmp_path / "bad",
                                           student={"freeze_token_type_embds": True})))
    line = one_line_error(capsys, ["train", "--config", str(config)])
    assert "freeze_token_type_embds" in line and "no token-type embeddings" in line
