"""Chapter 3's experiments (gradclip_book.implementation) and playground (implementation_figures), against
torch's own clipping, hand computations in float64, and the eager runs."""

from __future__ import annotations

import ast
import math
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import gradclip
from gradclip_book import harness
from gradclip_book import classification as cls
from gradclip_book import implementation as im
from gradclip_book.implementation_figures import COMPONENTS, RULES, THRESHOLDS, clip_2d, playground

ROOT = Path(__file__).resolve().parents[2]
SMALL = cls.RunConfig(depth=3, width=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- 3.1 -------------------------------------------------------------------------------------


def test_versions_are_the_installed_ones():
    v = im.versions()
    assert v["torch"] == torch.__version__ and v["numpy"] == np.__version__
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert v["gradclip"] == gradclip.__version__


def test_book_extra_is_pyprojects():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["book"]
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    assert {name.match(r).group(0).lower() for r in im.book_extra()} == {name.match(r).group(0).lower() for r in declared}


# --- 3.2 -------------------------------------------------------------------------------------


def _by_hand_norm(config, x, y):
    model = cls.build_model(config)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))


def test_preprocessing_norms_against_a_hand_computation():
    from gradclip_book.data import digits

    r = im.preprocessing_norms(SMALL, samples=100)
    x, y = digits(samples=100, dtype=torch.float32)
    assert r["raw"] == pytest.approx(_by_hand_norm(SMALL, x * 16, y), rel=1e-5)
    assert r["unit"] == pytest.approx(_by_hand_norm(SMALL, x, y), rel=1e-5)
    std = (x - x.mean(0)) / x.std(0, unbiased=False).clamp(min=1 / 16)
    assert r["standardised"] == pytest.approx(_by_hand_norm(SMALL, std, y), rel=1e-5)
    assert r["factor"] == pytest.approx(r["raw"] / r["standardised"])
    assert r["input_rms"]["raw"] == pytest.approx(16 * r["input_rms"]["unit"], rel=1e-6)


def test_layer_norms_monitor_matches_torch_per_layer():
    r = im.layer_norms(SMALL, batch=16)
    rows = {row["layer"]: row["grad_norm"] for row in r["rows"]}
    assert rows.keys() == r["by_hand"].keys() == {"0", "2", "4", "6"}
    for layer, norm in rows.items():
        assert norm == pytest.approx(r["by_hand"][layer], rel=1e-5)
    assert math.sqrt(sum(n * n for n in rows.values())) == pytest.approx(r["total"], rel=1e-5)


def test_methods_table_breaks_long_names_only_between_words():
    # fixed column shares cut "input", "0.559" and clip_grad_norm_per_tensor_ inside the word at 1280 px
    row = {"name": "clip_grad_norm_per_tensor_", "input": "10 x g", "setting": "clip_value=0.003", "pre": 0.559,
           "post": 0.1, "changed": 1.0, "units": None, "angle": 0.0, "threshold": None}
    table = im.methods_table_html([row])
    assert "<colgroup>" not in table and "gc-text" not in table   # columns sized by their longest piece
    assert "clip_<wbr>grad_<wbr>norm_<wbr>per_<wbr>tensor_" in table and "clip_<wbr>value=<wbr>0.003" in table
    assert "10&nbsp;x&nbsp;g" in table and "0.559" in table


def _target_grad(config, batch=32):
    model = cls.build_model(config)
    x, y = harness.image_split(0)["train"]
    torch.nn.functional.cross_entropy(model(x[:batch]), y[:batch]).backward()
    return model, [p.grad.detach().double().clone() for p in model.parameters()]


def test_clip_each_method_against_torch_and_formulas():
    rows = im.clip_each_method(SMALL)   # 30 earlier gradients: ZClip is past its 25-step warm-up
    by = {(r["name"], r["input"]): r for r in rows}
    model, grads = _target_grad(SMALL)
    flat = torch.cat([g.reshape(-1) for g in grads])
    norm = float(flat.norm())
    assert all(r["pre"] == pytest.approx(norm if r["input"] == "g" else 10 * norm, rel=1e-6) for r in rows)
    # global norm: torch.nn.utils.clip_grad_norm_ on a copy
    copies = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for c_, g in zip(copies, grads):
        c_.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(copies, 0.1)
    assert by["clip_grad_norm_", "g"]["post"] == pytest.approx(float(torch.cat([c_.grad.reshape(-1) for c_ in copies]).norm()), rel=1e-6)
    assert by["clip_grad_norm_", "g"]["angle"] < 1e-4 and by["clip_grad_norm_", "g"]["changed"] == 1.0
    # value: numpy clamp, fraction of non-zero entries above v
    v = 0.003
    clamped = np.clip(flat.numpy(), -v, v)
    assert by["clip_grad_value_", "g"]["post"] == pytest.approx(np.linalg.norm(clamped), rel=1e-6)
    nonzero = flat.numpy() != 0
    assert by["clip_grad_value_", "g"]["changed"] == pytest.approx(np.mean(np.abs(flat.numpy()[nonzero]) > v), abs=1e-3)
    # per tensor: each tensor to its own norm
    per = [g * min(1.0, 0.1 / (float(g.norm()) + 1e-6)) for g in grads]
    assert by["clip_grad_norm_per_tensor_", "g"]["post"] == pytest.approx(float(torch.cat([p.reshape(-1) for p in per]).norm()), rel=1e-5)
    assert by["clip_grad_norm_per_tensor_", "g"]["tensors_clipped"] == sum(float(g.norm()) > 0.1 for g in grads)
    # soft: c ||g|| / (||g|| + c)
    assert by["soft_clip_grad_norm_", "g"]["post"] == pytest.approx(0.1 * norm / (norm + 0.1), rel=1e-5)
    # AGC: a fraction of units, never lengthens
    agc = by["adaptive_clip_grad_", "g"]
    assert 0 < agc["units"] <= 1 and agc["post"] <= agc["pre"]
    # the stateful ones on the spike: clipped to their threshold, direction kept
    for name in ("AutoClip", "ZClip"):
        spike = by[name, "10 x g"]
        assert spike["post"] == pytest.approx(spike["threshold"], rel=1e-5) and spike["angle"] < 1e-4
        assert spike["threshold"] < spike["pre"]


def test_autoclip_threshold_is_numpy_percentile_of_the_history():
    rows = im.clip_each_method(SMALL, history=8)
    model = cls.build_model(SMALL)
    x, y = harness.image_split(0)["train"]
    norms = []
    for k in range(9):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[32 * k:32 * (k + 1)]), y[32 * k:32 * (k + 1)]).backward()
        norms.append(float(torch.cat([p.grad.reshape(-1).double() for p in model.parameters()]).norm()))
    history = norms[1:] + norms[:1]   # the 8 other batches first, then the target
    auto = next(r for r in rows if r["name"] == "AutoClip" and r["input"] == "g")
    assert auto["threshold"] == pytest.approx(np.percentile(history, 10), rel=1e-5)


def test_source_html_shows_code_without_docstring():
    text = im.source_html({"clip_grad_value_": gradclip.clip_grad_value_})
    assert "check_call" in text and "&gt;&gt;&gt;" not in text and text.startswith("<details")


def test_update_lengths_against_hand_computation():
    r = im.update_lengths(SMALL, max_norm=0.05)
    assert r["sgd"]["plain"] == pytest.approx(r["lr"] * r["norm"], rel=1e-4)
    assert r["sgd"]["clipped"] == pytest.approx(r["lr"] * 0.05, rel=1e-4)
    # Adam's first step is lr * g / (|g| + eps) entry by entry: the length of g barely matters
    model, grads = _target_grad(SMALL, batch=64)
    for clip, key in ((1.0, "plain"), (0.05 / r["norm"], "clipped")):
        g = torch.cat([t.reshape(-1) for t in grads]) * min(1.0, clip)
        expected = 1e-3 * float((g / (g.abs() + 1e-8)).norm())
        assert r["adam"][key] == pytest.approx(expected, rel=1e-3)


def test_corrected_listing_caps_every_norm():
    r = im.corrected_listing(max_norm=0.5, epochs=1)
    assert r["max_post"] <= 0.5 * (1 + 1e-5) and r["clipped"] == r["steps"]
    never = im.corrected_listing(max_norm=math.inf, epochs=1)
    assert never["clipped"] == 0 and never["max_post"] == pytest.approx(never["max_pre"])


def test_listing_recipe_is_the_90th_percentile_of_the_unclipped_norms_and_clips_a_minority():
    (r,) = im.listing_recipe(seeds=(0,))
    probe = r["plain"]["norms"][:harness.recipe.PROBE_STEPS]
    assert r["max_norm"] == float(f"{np.quantile(np.array(probe, dtype=np.float64), 0.9):.3g}")   # numpy, not gradclip
    norms = r["clipped"]["norms"]
    assert r["clipped"]["clipped"] == sum(n > r["max_norm"] for n in norms) and 0 < r["clipped"]["clipped"] < len(norms) / 2
    assert r["clipped"]["max_post"] <= r["max_norm"] * (1 + 1e-5) and r["verdict"] == "keep"
    # the steps before the first clip are the unclipped run's, bit for bit
    first = next(i for i, n in enumerate(norms) if n > r["max_norm"])
    assert norms[:first + 1] == r["plain"]["norms"][:first + 1]


# --- 3.3 -------------------------------------------------------------------------------------


def test_pattern_reads_the_marked_lines():
    lines = im.pattern(im.amp_case)
    assert "scaler.unscale_(optimizer)" in lines and "# pattern" not in lines and not lines.startswith(" ")
    with pytest.raises(ValueError):
        im.pattern(im.versions)


def test_plain_case_step_lengths():
    r = im.plain_case()
    assert r["after_backward"]["step"] == pytest.approx(r["lr"] * r["max_norm"], rel=1e-5)
    assert r["before_backward"]["returned"] == 0.0
    assert r["before_backward"]["step"] == pytest.approx(r["lr"] * r["norm"], rel=1e-5)
    assert r["after_step"]["step"] == pytest.approx(r["lr"] * r["norm"], rel=1e-5)
    # torch gives the same 0 on parameters without gradients
    assert float(torch.nn.utils.clip_grad_norm_([torch.zeros(2, requires_grad=True)], 1.0)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_case(dtype):
    r = im.amp_case(dtype)
    assert r["right"]["returned"] == pytest.approx(r["true_norm"], rel=1e-3)
    assert r["right"]["step"] == pytest.approx(r["reference"]["step"], rel=1e-4)
    assert r["wrong"]["returned"] == pytest.approx(r["scale"] * r["true_norm"], rel=1e-3)
    # a step of ~1e-6 measured as float32 parameter differences: a few percent of rounding
    assert r["wrong"]["step"] == pytest.approx(r["lr"] * r["max_norm"] / r["scale"], rel=0.05)
    assert "unscale_" in r["guard"]


def test_bf16_case_clips_the_true_gradient_without_a_scaler():
    r = im.bf16_case()
    model, x, y = im._tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert r["returned"] == pytest.approx(math.sqrt(sum(float(g.double().square().sum()) for g in grads)), rel=1e-6)
    assert r["step"] == pytest.approx(r["lr"] * r["max_norm"], rel=1e-5) and r["grad_dtypes"] == ["torch.float32"]
    assert r["with_scaler_diff"] == 0.0 and r["reference_diff"] < 1e-7
    assert r["returned"] != pytest.approx(r["float32_norm"], rel=1e-6)   # the forward did run in bfloat16


def test_joint_optimizers_case_against_one_torch_clip_over_both():
    r = im.joint_optimizers_case()
    model, x, y = im._tiny()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert r["norm"] == pytest.approx(float(torch.nn.utils.clip_grad_norm_(model.parameters(), r["max_norm"])), rel=1e-6)
    assert r["max_diff"] < 1e-6 and r["used_norm"] == pytest.approx(r["max_norm"], rel=1e-4)
    assert r["used_norm_separate"] == pytest.approx(math.sqrt(2) * r["max_norm"], rel=1e-3)   # each part at c


def test_nonfinite_case_skips_exactly_the_bad_step():
    r = im.nonfinite_case(steps=5, bad_step=2)
    assert r["skipped"] == [2] and math.isnan(r["norms"][2]) and all(math.isfinite(n) for i, n in enumerate(r["norms"]) if i != 2)
    assert r["skip_vs_reference"] == 0.0 and r["guard_vs_reference"] == 0.0 and not r["unchecked_finite"]
    assert r["error_step"] == 2 and r["params_unchanged_by_error"]


def test_distributed_accumulation_matches_torch_on_one_process():
    r = im.distributed_accumulation_case()
    model, _, _ = im._tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = []
    for x, y in im._dist_batches():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        expected.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), r["max_norm"])))
        optimizer.step()
    for kind in ("ddp", "fsdp"):
        for rank_norms in r[kind]["norms"]:
            assert rank_norms == pytest.approx(expected, rel=1e-5), kind
        assert r[kind]["max_diff"] < 1e-6


def test_fused_case_matches_foreach():
    r = im.fused_case(steps=2)
    assert r["explicit"] < 1e-6 and r["attached"] < 1e-6
    assert r["attached_norms"]["fused"] == pytest.approx(r["attached_norms"]["foreach"], rel=1e-6)
    assert r["scale"] > 1  # the gradients the fused step saw were scaled


def test_accumulation_case_against_a_float64_replay():
    r = im.accumulation_case(micro=4, max_norm=0.1)
    assert r["once"] < 1e-6 and r["norms"]["once"] == pytest.approx(r["norms"]["full"], rel=1e-5)
    # replay the wrong loop: clip the running sum after every micro-batch
    model, x, y = im._tiny()
    total = None
    for xs, ys in zip(x.chunk(4), y.chunk(4)):
        model.zero_grad()
        (torch.nn.functional.cross_entropy(model(xs), ys) / 4).backward()
        g = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
        total = g if total is None else total + g
        total = total * min(1.0, 0.1 / (float(total.norm()) + 1e-6))
    assert r["norms"]["per_micro"] == pytest.approx(float(total.norm()), rel=1e-4)
    assert r["per_micro"] > 1e-4 and r["per_micro_angle"] > 1.0


def test_zero_grad_case():
    r = im.zero_grad_case()
    assert r["none_grads"] == r["parameters"] and r["function_returns"] == 0.0
    assert "backward" in r["clipper_error"] and r["frozen_skipped"] and r["after_backward"] > 0.1


def test_closure_case():
    r = im.closure_case(steps=2)
    assert r["outside_vs_none"] == 0.0 and r["inside_vs_none"] > 1e-3
    assert r["attached_vs_hand"] == 0.0 and r["attached_vs_inside"] < 1e-6
    assert r["evaluations"] > r["steps"] and r["clipped_evaluations"] == r["evaluations"]


def test_attach_case():
    r = im.attach_case()
    assert r["attached_vs_hand"] == 0.0 and r["resumed_vs_straight"] == 0.0
    assert r["thresholds"]["hand"] == r["thresholds"]["attached"]
    assert any(r["clipped"]["attached"][1:]) and not all(r["clipped"]["attached"])
    assert "twice" in r["twice_error"]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])   # inductor: a C++ build, 15-25 s when its cache is cold
def test_compile_case_equals_eager(backend):
    # 20 steps with new gradient tensors each: one graph (it used to recompile every step, then fail)
    r = im.compile_case(steps=20, backend=backend)
    assert r["max_diff"] < 1e-6 and r["norms"]["compiled"] == pytest.approx(r["norms"]["eager"], rel=1e-6)
    assert r["graphs"] == 1 and r["steps"] == 20
    assert r["backend"] == backend


# --- 3.6 -------------------------------------------------------------------------------------


def test_count_tests_against_a_regex_count():
    counts = im.count_tests(ROOT / "tests")
    files = [p for p in sorted((ROOT / "tests").glob("test_*.py")) if p.name not in im._WHOLE_PROJECT]
    assert counts["files"] == len(files)
    pattern = re.compile(r"^\s*(?:async\s+)?def (test_\w+)\(", re.M)
    assert counts["functions"] == sum(len(pattern.findall(p.read_text())) for p in files)
    given = sum(len(re.findall(r"^@given\(", p.read_text(), re.M)) for p in files)
    assert counts["kinds"]["property"] == given
    assert {"timm", "Keras", "optax"} <= set(counts["peers"])


# --- the playground --------------------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
def test_clip_2d_against_formulas(rule):
    for g1 in COMPONENTS:
        for g2 in COMPONENTS:
            for c in THRESHOLDS:
                g = np.array([g1, g2], dtype=float)
                n = float(np.hypot(g1, g2))
                if rule == "norm":
                    expected = g * min(1.0, c / (n + 1e-6))
                elif rule == "value":
                    expected = np.clip(g, -c, c)
                else:
                    expected = g * c / (n + c)
                r = clip_2d((float(g1), float(g2)), c, rule)
                assert np.allclose(r["after"], expected, atol=1e-4)
                if rule != "value":
                    assert r["angle"] < 1e-4
    with pytest.raises(ValueError):
        clip_2d((1.0, 1.0), 1.0, "sign")


def test_value_clipping_turns_exactly_when_one_entry_is_clamped():
    c = 2.0
    for g1 in COMPONENTS:
        for g2 in COMPONENTS:
            turned = clip_2d((float(g1), float(g2)), c, "value")["angle"] > 1e-6
            clamped = [abs(g1) > c, abs(g2) > c]
            nonzero = [g1 != 0, g2 != 0]
            assert turned == (any(clamped) and not all(clamped) and all(nonzero)
                              or (all(clamped) and abs(g1) != abs(g2)))


def test_playground_frames_and_page_weight():
    ex = playground()
    assert len(ex.frames) == len(COMPONENTS) ** 2 * len(THRESHOLDS) * len(RULES)
    frame = ex.frame(g1=3, g2=4, threshold=1.0, rule="norm")
    assert frame["traces"][3]["x"][1] == pytest.approx(0.6, abs=1e-4)
    assert "turned 0.0°" in frame["note"]
    assert ex.layout["yaxis"]["scaleanchor"] == "x"
    assert len(ex.to_html().encode()) < 200_000
