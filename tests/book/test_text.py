"""Chapter 4's text data and models (gradclip_book.text), against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradclip_book import text


def test_corpus_is_pythons_reference_and_the_vocabulary_round_trips():
    from pydoc_data import topics

    corpus = text.corpus()
    assert len(corpus) == sum(map(len, topics.topics.values())) + 2 * (len(topics.topics) - 1)
    assert corpus.startswith(topics.topics[min(topics.topics)])
    vocab, ids = text.encoded()
    assert len(ids) == len(corpus) and vocab.decode(ids[:500]) == corpus[:500]
    assert len(vocab) == len(set(corpus)) and list(vocab.chars) == sorted(set(corpus))
    with pytest.raises(KeyError, match="not in the vocabulary"):
        vocab.encode("\x00")


def test_split_interleaves_blocks_and_covers_every_character_once():
    _, ids = text.encoded()
    parts = text.split()
    assert sum(len(p) for p in parts.values()) == len(ids)
    # an independent transcription: block i goes to validation when i % 20 == 18, to test when 19
    blocks = [ids[i:i + text.BLOCK] for i in range(0, len(ids), text.BLOCK)]
    expected = {"validation": [b for i, b in enumerate(blocks) if i % 20 == 18],
                "test": [b for i, b in enumerate(blocks) if i % 20 == 19],
                "train": [b for i, b in enumerate(blocks) if i % 20 < 18]}
    for name, pieces in expected.items():
        assert torch.equal(parts[name], torch.cat(pieces)), name
    assert 0.04 < len(parts["validation"]) / len(ids) < 0.06


def test_stream_batches_continue_each_stream_and_restart_fresh():
    data = torch.arange(103)
    it = text.stream_batches(data, batch=3, length=4, offset=1)
    per_stream = (len(data) - 1 - 1) // 3
    seen = [next(it) for _ in range(per_stream // 4 + 1)]
    assert seen[0][2] and not any(fresh for _, _, fresh in seen[1:-1]) and seen[-1][2]
    rows = torch.cat([x for x, _, _ in seen[:-1]], dim=1)
    for b in range(3):  # each row is one contiguous piece of the data, continued window after window
        start = 1 + b * per_stream
        assert torch.equal(rows[b], torch.arange(start, start + rows.shape[1]))
    for x, y, _ in seen:
        assert torch.equal(y, x + 1)
    assert torch.equal(seen[-1][0], seen[0][0])


def test_window_batches_are_seeded_and_shifted_by_one():
    data = text.split()["train"]
    a = next(text.window_batches(data, 5, 16, torch.Generator().manual_seed(3)))
    b = next(text.window_batches(data, 5, 16, torch.Generator().manual_seed(3)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[0][:, 1:], a[1][:, :-1])


def test_stream_loss_equals_one_pass_over_each_whole_stream():
    torch.manual_seed(0)
    model = text.CharRNN(20, 8, "lstm")
    data = torch.randint(0, 20, (301,))
    got = text.stream_loss(model, data, batch=3, length=7)
    per_stream = 300 // 3
    x, y = data[:300].view(3, per_stream), data[1:301].view(3, per_stream)
    with torch.no_grad():
        logits, _ = model(x)  # one call over the whole stream: the state is carried exactly
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), y.reshape(-1)).item()
    assert math.isclose(got, want, rel_tol=1e-5)


def test_window_loss_is_the_mean_over_non_overlapping_windows():
    torch.manual_seed(0)
    model = text.CharTransformer(20, width=16, layers=1, heads=2, context=8)
    data = torch.randint(0, 20, (50,))
    got = text.window_loss(model, data, chunk=2)
    losses = []
    with torch.no_grad():
        for start in range(0, 48, 8):
            logits = model(data[None, start:start + 8])[0]
            losses.append(torch.nn.functional.cross_entropy(logits, data[start + 1:start + 9], reduction="sum"))
    assert math.isclose(got, float(sum(losses)) / 48, rel_tol=1e-5)


def test_transformer_is_causal_and_its_attention_matches_the_explicit_formula():
    torch.manual_seed(0)
    model = text.CharTransformer(30, width=16, layers=2, heads=4, context=12).eval()
    x = torch.randint(0, 30, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 30
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :7], model(y)[:, :7], atol=1e-6)
        assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])
        # the fused attention equals softmax of the explicit logits times v
        block, h = model.blocks[0], model.token(x) + model.position(torch.arange(12))
        _, _, v = block._qkv(h)
        explicit = block.attention_logits(h).softmax(-1) @ v
        fused = torch.nn.functional.scaled_dot_product_attention(*block._qkv(h), is_causal=True)
        assert torch.allclose(explicit, fused, atol=1e-5)


def test_qk_layernorm_bounds_the_attention_logits_at_initialisation():
    torch.manual_seed(0)
    x = torch.randint(0, 30, (4, 16))
    head = 8
    normed = text.CharTransformer(30, width=32, layers=2, heads=4, context=16, qk_norm=True)
    # unit-gain LayerNorm gives q and k norm sqrt(head) each: |q.k|/sqrt(head) <= sqrt(head)
    assert normed.max_attention_logit(x) <= math.sqrt(head) + 1e-4
    plain = text.CharTransformer(30, width=32, layers=2, heads=4, context=16)
    for block in plain.blocks:
        block.qkv.weight.data *= 30  # large q and k: only the normalised model stays bounded
    assert plain.max_attention_logit(x) > 10 * math.sqrt(head)


def test_z_loss_is_the_mean_squared_log_partition_function():
    logits = torch.randn(3, 5, 7, dtype=torch.float64) * 4
    want = np.mean(np.log(np.exp(logits.numpy()).sum(-1)) ** 2)
    assert math.isclose(float(text.z_loss(logits)), want, rel_tol=1e-6)


def test_rnn_cells_and_errors():
    assert isinstance(text.CharRNN(5, 4, "rnn").rnn, torch.nn.RNN)
    assert text.CharRNN(5, 4, "rnn").rnn.nonlinearity == "tanh"
    with pytest.raises(ValueError, match="cell"):
        text.CharRNN(5, 4, "gru")
    with pytest.raises(ValueError, match="divisible"):
        text.CharTransformer(5, width=10, heads=4)
    with pytest.raises(ValueError, match="context"):
        text.CharTransformer(5, width=8, heads=2, context=4)(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_unrolled_states_equal_the_fused_layer(cell):
    torch.manual_seed(0)
    model = text.CharRNN(20, 12, cell)
    x = torch.randint(0, 20, (3, 9))
    fused, _ = model.hidden_states(x)
    unrolled = torch.stack(model.unrolled_states(x), dim=1)
    assert torch.allclose(fused, unrolled, atol=1e-6)
