"""Packing: first-fit decreasing against a plain reference, segment ids / positions, and the real
test — a packed batch through the model gives each sample the logits it gets alone."""

from __future__ import annotations

import numpy as np
import pytest

from jaxtune.data.packing import first_fit_decreasing, length_buckets, pack_examples, pad_batch, packing_efficiency


def reference_ffd(lengths, capacity):
    """The textbook O(n * bins) first-fit decreasing."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, free = [], []
    for i in order:
        for b, space in enumerate(free):
            if space >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ffd_matches_reference_and_is_valid(seed):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.0, 1.0, size=700).astype(int), 1, 512).tolist()
    bins = first_fit_decreasing(lengths, 512)
    assert bins == reference_ffd(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)


def test_packing_efficiency_on_skewed_lengths():
    rng = np.random.default_rng(0)
    # Many short samples and a few long ones: naive one-sample-per-row padding wastes most slots.
    lengths = np.concatenate([rng.integers(8, 64, 2000), rng.integers(400, 1024, 100)])
    bins = first_fit_decreasing(lengths, 1024)
    eff = packing_efficiency(lengths, len(bins), 1024)
    unpacked = packing_efficiency(lengths, len(lengths), 1024)
    assert eff > 0.97 and unpacked < 0.1
    # FFD's bound: at most 11/9 OPT + 6/9 bins, and OPT >= total / capacity.
    assert len(bins) <= 11 / 9 * np.ceil(lengths.sum() / 1024) + 1


def test_pack_examples_segments_positions_and_labels():
    ids = [[1] * 5, [2] * 3, [3] * 4, [4] * 2]
    labels = [[-100, 11, 11, 11, 11], [22, 22, 22], [-100, -100, 33, 33], [44, 44]]
    packed = pack_examples(ids, labels, 8)  # the module docstring's worked example
    assert packed["input_ids"] == [[1] * 5 + [2] * 3, [3] * 4 + [4] * 2]
    assert packed["segment_ids"] == [[1] * 5 + [2] * 3, [1] * 4 + [2] * 2]
    assert packed["positions"] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    assert packed["labels"][1] == [-100, -100, 33, 33, 44, 44]
    batch = pad_batch([{k: v[1] for k, v in packed.items()}, None], 8, pad_id=0)
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2, 0, 0], [0] * 8]
    assert batch["labels"][0, 6:].tolist() == [-100, -100] and (batch["labels"][1] == -100).all()
    assert length_buckets(1000) == [64, 128, 256, 512, 1000]


def test_packed_logits_equal_each_sample_alone(tmp_path):
    """Packing must not leak attention across samples: every token's logits in a packed row equal
    those of its sample run alone (fp32, 1e-5), with real RoPE positions."""
    from transformers import LlamaConfig

    import jaxtune
    from tests.conftest import save_tiny

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0)
    model, _ = jaxtune.load_pretrained(save_tiny(tmp_path, cfg))
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, n).tolist() for n in (13, 7, 21, 5, 9, 30, 2)]
    packed = pack_examples(samples, samples, 40)
    rows = [{k: v[r] for k, v in packed.items()} for r in range(len(packed["input_ids"]))]
    batch = pad_batch(rows, 40, pad_id=0)
    logits = np.asarray(model(batch["input_ids"], batch["segment_ids"], batch["positions"]))
    bins = first_fit_decreasing([len(s) for s in samples], 40)
    for r, members in enumerate(bins):
        offset = 0
        for item in members:
            n = len(samples[item])
            alone = np.asarray(model(np.asarray([samples[item]])))[0]
            np.testing.assert_allclose(logits[r, offset:offset + n], alone, atol=1e-5, rtol=0)
            offset += n
