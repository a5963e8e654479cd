"""Chapter 4's text runs (gradclip_book.text_runs) and their stored grid (gradclip_book.text_grid)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from gradclip_book import harness, text, text_grid
from gradclip_book.reproducibility import rerun_differences
from gradclip_book.text_runs import (RNN, TRANSFORMER, CarriedState, TextConfig, _batches, build,
                                     gradient_through_time, run, train)

GRID_HINT = f"recompute it with `{text_grid.COMMAND}` (then update chapters/data/README.md)"


def test_recurrent_run_equals_a_hand_written_truncated_bptt_loop():
    config = replace(RNN, width=16, seq_len=8, chars=64, lr=0.5, method="norm", threshold=0.3, steps=12, seed=2)
    result, model, _ = train(config)
    # an independent loop: same model and streams, the state carried and detached by hand, torch's clipping
    torch.set_num_threads(1)
    reference = build(config)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    offset = int(torch.randint(0, 8, (1,), generator=torch.Generator().manual_seed(2)))
    batches = text.stream_batches(text.split()["train"], 8, 8, offset)
    state, losses = None, []
    for _ in range(12):
        x, y, fresh = next(batches)
        logits, new = reference(x, None if fresh else state)
        state = new.detach()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.3)
        optimizer.step()
    assert result.loss == pytest.approx(losses, rel=1e-5)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))
    assert result.metrics["val_loss"] == pytest.approx(text.stream_loss(reference, text.split()["validation"]),
                                                       rel=1e-5)


def test_transformer_run_uses_adamw_in_the_language_model_setting_and_adds_the_z_loss():
    config = replace(TRANSFORMER, width=16, heads=2, seq_len=16, chars=64, lr=3e-3, z_loss=0.1, steps=4, seed=1)
    result, model, probes = train(config)
    torch.set_num_threads(1)  # the harness's reduction order (Adam turns tiny gradient differences into lr-sized ones)
    reference = build(config)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batches = text.window_batches(text.split()["train"], 4, 16, torch.Generator().manual_seed(1))
    losses = []
    for _ in range(4):
        x, y = next(batches)
        logits = reference(x)
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        log_z = torch.logsumexp(logits, dim=-1)
        loss = ce + 0.1 * (log_z ** 2).mean()
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert result.loss == pytest.approx(losses, rel=1e-5)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))
    assert [v[0] for v in probes["attention"]] == [0, 3]


def test_gradient_through_time_follows_the_jacobian_product():
    # vanilla RNN: d l / d h_(t-1) = W_hh^T (delta_t * (1 - h_t^2)); a float64 numpy transcription
    torch.manual_seed(0)
    model = text.CharRNN(12, 6, "rnn").double()
    windows = torch.randint(0, 12, (3, 11))
    got = gradient_through_time(model, windows, lags=(0, 1, 4, 9))
    w_hh = model.rnn.weight_hh_l0.detach().numpy()
    with torch.no_grad():
        states = torch.stack(model.unrolled_states(windows[:, :-1]), 1).numpy()
        probs = torch.softmax(model.head(torch.from_numpy(states[:, -1])), -1).numpy()
    delta = probs.copy()
    delta[np.arange(3), windows[:, -1].numpy()] -= 1
    delta = delta @ model.head.weight.detach().numpy()  # d l / d h_T per window
    norms = {0: np.linalg.norm(delta, axis=1).mean()}
    for k in range(1, 10):
        h = states[:, -k]
        delta = (delta * (1 - h ** 2)) @ w_hh
        norms[k] = np.linalg.norm(delta, axis=1).mean()
    assert got == pytest.approx([norms[k] for k in (0, 1, 4, 9)], rel=1e-6)


def test_cliff_probe_measures_the_step_batch_and_restores_the_model():
    config = replace(RNN, seq_len=128, lr=3.0, steps=40, seed=0)
    result, model, probes = train(config)
    cliff = probes["cliff"]
    assert cliff is not None and cliff["step"] >= 20 and cliff["norm"] > 10 * cliff["median"]
    # distance 0 is the step's own batch loss, before its update
    assert cliff["loss"][0] == pytest.approx(result.loss[cliff["step"]], rel=1e-5)
    assert cliff["distance"][-1] == pytest.approx(cliff["lr"] * cliff["norm"], rel=1e-6)
    # the probe left no trace: the same run without it gives the same weights
    plain = build(config)
    harness.train(plain, torch.optim.SGD(plain.parameters(), lr=3.0), _batches(config), 40, loss_fn=CarriedState())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="threshold"):
        TextConfig(method="norm")
    with pytest.raises(ValueError, match="transformer only"):
        TextConfig(model="rnn", qk_norm=True)
    with pytest.raises(ValueError, match="model"):
        TextConfig(model="gru")
    assert replace(RNN, seq_len=128).batch == 8


# --- the stored grid --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_lines():
    lines = text_grid.lines()
    if not lines:
        pytest.fail(f"chapters/data/text_grid.jsonl.gz is missing or empty: {GRID_HINT}")
    return lines


def test_grid_is_complete_and_current(grid_lines):
    assert {line["code_version"] for line in grid_lines} == {text_grid.version()}, \
        f"the text harness changed since the grid was computed: {GRID_HINT}"
    stored = {line["key"] for line in grid_lines}
    missing = [c for _, c in text_grid.points() if harness.config_key(c) not in stored]
    assert not missing, f"{len(missing)} runs missing, e.g. {missing[0]}: {GRID_HINT}"
    assert {line["corpus"] for line in grid_lines} == {text.corpus_fingerprint()}, (
        "the grid was computed on another Python's pydoc_data.topics: the corpus differs, so the stored runs "
        f"cannot be reproduced on this Python ({text.corpus_fingerprint()})")


def test_grid_records_match_a_rerun(grid_lines):
    # three random recurrent runs of the shorter windows, re-run in full (a few seconds each) ...
    cheap = [line for line in grid_lines if line["config"]["model"] == "rnn" and line["config"]["seq_len"] <= 32]
    problems = harness.spot_check(cheap, run, text_grid.config_of, count=3, seed=random.randrange(1 << 30))
    assert not problems, "\n".join(problems[:5]) + f"\n{GRID_HINT}"


def test_transformer_records_start_as_a_rerun_does(grid_lines):
    # ... and the first 40 steps of two random transformer runs (stored step by step) re-run
    runs = [line for line in grid_lines if line["config"]["model"] == "transformer"]
    for line in random.Random().sample(runs, 2):
        config = replace(text_grid.config_of(line["config"]), steps=40)
        fresh = train(config)[0]
        stored = line["curve"]
        assert stored["step"][:40] == list(range(40))
        now = {"curve": {"step": list(range(40)), **{name: [harness.curves.round_float(v) for v in values[:40]]
                                                      for name, values in (("loss", fresh.loss),
                                                                           ("grad_norm", fresh.grad_norm))}}}
        then = {"curve": {name: stored[name][:40] for name in ("step", "loss", "grad_norm")}}
        # bit for bit on the grid's kind of machine, the first steps elsewhere (reproducibility)
        assert not rerun_differences(now, then), (rerun_differences(now, then)[:5], line["config"])


def test_recurrent_learning_rates_continue_the_books_grid_without_changing_it():
    # the text page's SGD rates go past the shared grid's end (3) at the same spacing; the grid itself stays
    assert text_grid.RNN_LRS[:4] == harness.lr_range(0.1, 3.0)
    assert max(harness.LR_GRID) == 3.0 and not set(text_grid.RNN_LRS[4:]) & set(harness.LR_GRID)
    ratios = [b / a for a, b in zip(text_grid.RNN_LRS, text_grid.RNN_LRS[1:])]
    assert all(math.isclose(r, 3.0) or math.isclose(r, 10 / 3) for r in ratios)
