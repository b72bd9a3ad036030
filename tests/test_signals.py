"""Ctrl-C, SIGTERM and SIGUSR1 stop a run after the step in progress, with a checkpoint where it stands from which
``--resume`` ends bit-identical to an uninterrupted run; the exit code is the signal's (128 + its number)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import invoke, tiny_checkpoint

from conftest import TINY, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import load_recipe
from ssl_cli.runtime import SilentReporter
from ssl_cli.signals import Stopped, StopSignals
from ssl_cli.train.pretrain import pretrain


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = read_checkpoint(a), read_checkpoint(b)
    assert x.meta["step"] == y.meta["step"]
    for section in ("model", "optim"):
        p, q = x.section(section), y.section(section)
        assert p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p), section


class SignalAt(SilentReporter):
    """Sends ``signum`` to this very process at the progress line of global step ``step`` (every 10 steps)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def update(self, step: int, epoch: int, metrics: dict) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=["usr1", "term", "int"])
def test_a_signal_stops_after_the_step_with_a_mid_epoch_checkpoint_that_resumes_exactly(tmp_path, signum) -> None:
    data = str(write_image_folder(tmp_path / "data", per_class=24, classes=4))  # 96 images, batch 8: 12 steps
    r = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("train.epochs", 2), ("train.checkpoint_every", 0)])
    full = pretrain(r, data, tmp_path / "full")

    with pytest.raises(Stopped) as info:
        pretrain(r, data, tmp_path / "cut", reporter=SignalAt(signum, 22))
    assert info.value.exit_code == 128 + signum
    message = str(info.value)
    assert f"stopped by {signal.Signals(signum).name} in epoch 2 (step 22)" in message
    assert f"ssl pretrain --out {tmp_path / 'cut'} --resume" in message and "\n" not in message
    meta = read_checkpoint(tmp_path / "cut/checkpoints/last.safetensors").meta
    assert (meta["epoch"], meta["epoch_step"], meta["step"]) == (1, 10, 22)
    assert signal.getsignal(signum) is not None and signal.getsignal(signum) == _default_handler(signum)

    resumed = pretrain(r, data, tmp_path / "cut", resume=True)
    assert_same_weights(Path(full.checkpoint), Path(resumed.checkpoint))


def _default_handler(signum: int):
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL


def test_a_signal_on_an_epochs_last_step_stops_after_that_epochs_checkpoint(tmp_path) -> None:
    data = str(write_image_folder(tmp_path / "data", per_class=20, classes=4))  # 80 images, batch 8: 10 steps
    r = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("train.epochs", 3)])
    with pytest.raises(Stopped, match=r"stopped by SIGTERM after epoch 1 \(step 10\)"):
        pretrain(r, data, tmp_path / "run", reporter=SignalAt(signal.SIGTERM, 10))
    meta = read_checkpoint(tmp_path / "run/checkpoints/last.safetensors").meta
    assert (meta["epoch"], meta.get("epoch_step", 0)) == (1, 0)
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 1


def test_a_second_ctrl_c_stops_at_once() -> None:
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_a_command_without_resume_does_not_suggest_it(monkeypatch, tmp_path) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ssl_cli.eval.run.run_knn", interrupted)
    result = invoke("knn", tiny_checkpoint(tmp_path / "ckpt.safetensors"))
    assert result.exit_code == 130
    assert "interrupted" in result.output and "--resume" not in result.output


# --- the real command, in its own process group (as Slurm and a terminal signal it) ---

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ARGS = [
    "--recipe", "mocov2", "--set", "backbone.name=test_resnet", "--set", "views.*.size=32", "--set",
    "train.device=cpu", "--set", "schedule.warmup_epochs=0", "--set", "method.queue_size=32", "--set",
    "data.augment=sample", "--num-workers", "1", "--batch-size", "8", "--quiet",
]  # fmt: skip


def ssl_pretrain(*args: str, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-c", "from ssl_cli.cli.app import main; main()", "pretrain", *args]
    return subprocess.Popen(
        command, env=ENV, start_new_session=True, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kwargs
    )


def wait_for_epochs(run: Path, proc: subprocess.Popen, epochs: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach epoch {epochs}: {proc.communicate()[1]}")


@pytest.mark.ddp  # several processes (a loader worker), like the torchrun tests
def test_sigterm_to_the_process_group_stops_the_command_which_resumes_bit_identical(tmp_path: Path) -> None:
    """SIGTERM to the whole group (Slurm's preemption: the loader worker gets it too): exit 143 with one line, a
    mid-epoch checkpoint; ``--resume`` ends with the weights of an uninterrupted run."""
    data = str(write_image_folder(tmp_path / "data", per_class=40, classes=4))  # 160 images: 20 steps an epoch
    args = [*ARGS, "--data", data, "--epochs", "8"]
    cut = ssl_pretrain(*args, "--out", str(tmp_path / "cut"))
    wait_for_epochs(tmp_path / "cut", cut, 1)
    time.sleep(0.3)  # inside epoch 2
    os.killpg(cut.pid, signal.SIGTERM)
    _, stderr = cut.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert cut.returncode == 143, stderr
    assert lines[-1].startswith("error: stopped by SIGTERM") and "--resume" in lines[-1], stderr
    assert "Traceback" not in stderr
    full = ssl_pretrain(*args, "--out", str(tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.communicate()[1]
    resumed = ssl_pretrain("--out", str(tmp_path / "cut"), "--resume", "--quiet")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1]
    last = "checkpoints/last.safetensors"
    assert_same_weights(tmp_path / "full" / last, tmp_path / "cut" / last)


@pytest.mark.slow
def test_random_kill_9s_never_lose_the_run_and_it_ends_bit_identical(tmp_path: Path) -> None:
    """``kill -9`` of the whole group at random moments (mid-step, mid-checkpoint write), then ``--resume``, until
    the run completes: it ends with the weights of an uninterrupted run, and every resume found a readable run."""
    data = str(write_image_folder(tmp_path / "data", per_class=40, classes=4))
    args = [*ARGS, "--data", data, "--epochs", "16", "--set", "train.checkpoint_every_steps=7"]
    full = ssl_pretrain(*args, "--out", str(tmp_path / "full"))
    assert full.wait(timeout=600) == 0, full.communicate()[1]
    rng, kills = random.Random(0), 0
    proc = ssl_pretrain(*args, "--out", str(tmp_path / "cut"))
    while True:
        try:
            code = proc.wait(timeout=rng.uniform(3.5, 6.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            resume = (tmp_path / "cut/checkpoints/last.safetensors").exists()
            proc = ssl_pretrain(
                *(["--out", str(tmp_path / "cut"), "--resume"] if resume else [*args, "--out", str(tmp_path / "cut")])
            )
            continue
        assert code == 0, proc.communicate()[1]
        break
    assert kills >= 3
    last = "checkpoints/last.safetensors"
    assert_same_weights(tmp_path / "full" / last, tmp_path / "cut" / last)


def test_a_signal_that_also_ended_the_loader_workers_still_stops_with_a_checkpoint(tmp_path, monkeypatch) -> None:
    """A group-wide SIGTERM can end the loader's workers before they hand over the next batch: PyTorch then raises
    "DataLoader worker ... exited unexpectedly" in the main process. The run stops where it stands, as on any stop
    signal (it was an internal error, exit 1, with the epoch in progress lost)."""
    import ssl_cli.train.pretrain as pretrain_module

    data = str(write_image_folder(tmp_path / "data", per_class=24, classes=4))  # 12 steps an epoch
    r = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("train.epochs", 2), ("train.checkpoint_every", 0)])
    full = pretrain(r, data, tmp_path / "full")
    real, fetched = pretrain_module._device_batches, [0]

    def workers_die(*args, **kwargs):
        for batch in real(*args, **kwargs):
            fetched[0] += 1
            if fetched[0] == 16:  # the 4th batch of epoch 2
                os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")
            yield batch

    monkeypatch.setattr(pretrain_module, "_device_batches", workers_die)
    with pytest.raises(Stopped, match=r"stopped by SIGTERM in epoch 2 \(step 15\)"):
        pretrain(r, data, tmp_path / "cut")
    monkeypatch.undo()
    meta = read_checkpoint(tmp_path / "cut/checkpoints/last.safetensors").meta
    assert (meta["epoch"], meta["epoch_step"], meta["step"]) == (1, 3, 15)
    resumed = pretrain(r, data, tmp_path / "cut", resume=True)
    assert_same_weights(Path(full.checkpoint), Path(resumed.checkpoint))
