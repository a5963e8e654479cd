"""The book's CPU kernels are pinned before torch runs anything; a re-run is checked exactly on the grids' kind of
machine and in its first steps on others."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from gradclip_book import reproducibility

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not X86, reason="the pin applies to x86-64 only")
def test_importing_the_book_package_pins_avx2_kernels_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in reproducibility.PINNED}
    code = ("import torch, gradclip_book; from gradclip_book.reproducibility import cpu_kernels; "
            "torch.ones(3).exp(); print(cpu_kernels())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kernels = eval(done.stdout.strip())
    assert kernels == {"aten": "AVX2", **reproducibility.PINNED}


def test_a_variable_the_environment_sets_is_left_alone(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    newly = reproducibility.pin_cpu_kernels()
    assert "MKL_CBWR" not in newly and os.environ["MKL_CBWR"] == "COMPATIBLE"


@pytest.mark.skipif(not X86, reason="the pin applies to x86-64 only")
def test_this_test_process_runs_the_pinned_kernels():
    assert reproducibility.cpu_kernels()["aten"] == "AVX2"


# --- re-runs on the grids' kind of machine and on others ------------------------------------------------

def _stored_line():
    import gzip
    import json

    from gradclip_book import grids

    lines = (json.loads(text) for text in gzip.open(grids.CLASSIFICATION_FILE, "rt"))
    return next(line for line in lines if line["section"] == "grid" and line["config"]["depth"] == 8
                and line["config"]["lr"] == 0.1 and line["config"]["method"] == "norm")


def test_other_kernels_change_a_run_in_its_last_bits_and_the_first_steps_still_match():
    # ATen's scalar kernels stand in for another CPU: the run differs (so an exact check could not pass there),
    # but not in its first EARLY_STEPS steps, which is what a re-run is held to off the grids' kind of machine
    code = ("import json, sys; from gradclip_book import classification as c; "
            "line = json.loads(sys.stdin.read()); "
            "print(json.dumps(c.compact(c.train(c.RunConfig(**line['config'])))))")
    line = _stored_line()
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    import json

    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(line), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout)
    assert reproducibility.rerun_differences(fresh, line, same_machine=True)  # differs somewhere
    assert reproducibility.rerun_differences(fresh, line, same_machine=False) == []


def test_the_first_steps_catch_a_changed_run():
    from dataclasses import replace

    from gradclip_book import classification as c

    line = _stored_line()
    config = c.RunConfig(**line["config"])
    assert reproducibility.rerun_differences(c.compact(c.train(config)), line, same_machine=False) == []
    nudged = c.compact(c.train(replace(config, lr=config.lr * 1.01)))
    nudged["config"] = line["config"]  # only the numbers differ: a change in the code that trains
    problems = reproducibility.rerun_differences(nudged, line, same_machine=False)
    assert problems and all(p.startswith("loss at step") for p in problems)


def test_rerun_differences_reads_every_record_format():
    curve = {"curve": {"step": [0, 1, 20], "loss": [2.0, 1.5, 0.3]}, "seconds": 1.0}
    later = {"curve": {"step": [0, 1, 20], "loss": [2.0, 1.5, 0.9]}, "seconds": 2.0}
    assert reproducibility.rerun_differences(later, curve, same_machine=False) == []  # step 20 is not compared
    assert reproducibility.rerun_differences(later, curve, same_machine=True) == [
        "curve stored {'step': [0, 1, 20], 'loss': [2.0, 1.5, 0.3]}, now {'step': [0, 1, 20], 'loss': [2.0, 1.5, 0.9]}"]
    parallel = {"curve_step": [0, 2], "loss": [2.0, 1.0]}
    assert reproducibility.rerun_differences({"curve_step": [0, 2], "loss": [2.0, 1.0001]}, parallel,
                                             same_machine=False) == []
    assert reproducibility.rerun_differences({"curve_step": [0, 2], "loss": [2.0, 1.01]}, parallel,
                                             same_machine=False) == ["loss at step 2: stored 1.0, now 1.01"]
    per_step = {"config": {"seed": 0}, "loss": [2.0, "nan"]}
    assert reproducibility.rerun_differences({"config": {"seed": 0}, "loss": [2.0, 1.0]}, per_step,
                                             same_machine=False) == ["loss at step 1: stored nan, now 1.0"]
    assert reproducibility.rerun_differences({"config": {"seed": 1}, "loss": [2.0, "nan"]}, per_step,
                                             same_machine=False) == ["config differs"]


def test_this_machine_kind_is_named_and_the_grids_readme_names_the_grid_machine():
    from gradclip_book import grids

    assert set(reproducibility.machine()) == set(reproducibility.GRID_MACHINE)
    readme = (grids.CLASSIFICATION_FILE.parent / "README.md").read_text(encoding="utf-8")
    assert "rerun_differences" in readme and "AVX-512" in readme
