"""Every preference loss against TRL 1.16's own code on the same log-prob arrays: value and gradient.

TRL's DPO and KTO losses live inside their trainers' `_compute_loss`; these tests call those methods
on a stand-in trainer whose model returns the token log-probs we choose (TRL sums them over each
completion itself), with the reference's log-probs given as precomputed. ORPO's `odds_ratio_loss`
and CPO's `cpo_loss` are called directly. Gradients are TRL's autograd against jax.grad of ours.

Tolerance: the arrays are float32, the losses a few elementwise ops and a mean over 6 pairs;
float32 rounding is ~1e-7 relative, and torch and XLA may round the transcendental functions
differently by an ulp or two, so 1e-5 relative (1e-6 absolute near zero) is far above rounding and far
below any formula difference (a wrong sign, factor or term changes the value by >1e-2).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxtune.objectives import losses as L

P, T = 6, 14  # pairs, tokens per sequence
RTOL, ATOL = 1e-5, 1e-6


def _arrays(seed: int):
    """Token log-probs [2P, T-1] (chosen rows then rejected rows), completion masks [2P, T], reference
    sequence log-probs [P] each, and log sum_v p_v^2 per token (WPO)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(2, 6, 2 * P)
    length = rng.integers(3, T - 5, 2 * P)
    mask = np.zeros((2 * P, T), np.int64)
    for i in range(2 * P):
        mask[i, prompt[i]:prompt[i] + length[i]] = 1
    token = -rng.uniform(0.05, 1.5, (2 * P, T - 1)) * mask[:, 1:]
    sq = -rng.uniform(0.5, 3.0, (2 * P, T - 1))
    ref = -rng.uniform(2.0, 12.0, (2, P))
    return token.astype(np.float32), mask, ref.astype(np.float32), sq.astype(np.float32)


def _stand_in(cls, **attrs):
    """A trainer object with just what `_compute_loss` reads."""
    self = cls.__new__(cls)
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    base = dict(accelerator=accelerator, model=SimpleNamespace(training=True), aux_loss_enabled=False,
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
                precompute_ref_logps=True, args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None))
    self.__dict__.update({**base, **attrs})
    return self


class _FakeModel:
    """Returns the chosen token log-probs (and zeros for the metrics TRL computes from the model)."""

    def __init__(self, outputs: dict):
        self.outputs = outputs

    def __call__(self, input_ids=None, **kwargs):
        logps = self.outputs[id(input_ids)] if isinstance(self.outputs, dict) and id(input_ids) in self.outputs \
            else self.outputs["main"]
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               log_sum_sq_probs=self.outputs.get("sq"), aux_loss=None)


def _trl_dpo(token, mask, ref, sq, **cfg):
    from trl.trainer.dpo_trainer import DPOTrainer

    logps = torch.tensor(token, requires_grad=True)
    trainer = _stand_in(DPOTrainer, beta=cfg["beta"], loss_types=cfg["loss_types"], loss_weights=cfg["loss_weights"],
                        label_smoothing=cfg.get("label_smoothing", 0.0), use_weighting=cfg.get("use_weighting", False),
                        f_divergence_type="reverse_kl", ld_alpha=None)
    ids = torch.zeros(mask.shape, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(mask),
              "ref_chosen_logps": torch.tensor(ref[0]), "ref_rejected_logps": torch.tensor(ref[1])}
    loss = trainer._compute_loss(_FakeModel({"main": logps, "sq": torch.tensor(sq)}), inputs, False)
    loss.backward()
    # A real model's log-probs are constant 0 off the completions (labels -100): only completion tokens
    # have a gradient to compare.
    grad = logps.grad.numpy() * mask[:, 1:]
    return float(loss.detach()), grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _ours_dpo(token, mask, ref, sq, **cfg):
    shift = mask[:, 1:].astype(np.float32)
    lengths = mask.sum(1).astype(np.float32)
    chosen_tokens = shift[:P].sum()

    def loss(chosen, rejected, nll):
        p = L.PairLogps(chosen, rejected, jnp.asarray(ref[0]), jnp.asarray(ref[1]), jnp.asarray(lengths[:P]),
                        jnp.asarray(lengths[P:]), jnp.ones(P, bool))
        weights = None
        if cfg.get("use_weighting"):
            aligned = ((token - sq) * shift).sum(1)
            weights = L.wpo_weights(jnp.stack([aligned[:P], aligned[P:]], 1), jnp.stack([shift[:P].sum(1),
                                                                                          shift[P:].sum(1)], 1))
        terms = L.dpo_terms(p, nll, loss_types=cfg["loss_types"], loss_weights=cfg["loss_weights"], beta=cfg["beta"],
                            label_smoothing=cfg.get("label_smoothing", 0.0), weights=weights)
        return terms["pairs"] / P + terms["sft"] / chosen_tokens

    sums = token.sum(1)
    args = (jnp.asarray(sums[:P]), jnp.asarray(sums[P:]), -jnp.asarray(sums[:P].sum()))
    value, (g_c, g_r, g_nll) = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
    # d loss / d token log-prob: through its sequence's sum, and (chosen tokens) through the sft NLL
    grad = np.concatenate([np.asarray(g_c) - float(g_nll), np.asarray(g_r)])[:, None] * shift
    return float(value), grad


@pytest.mark.parametrize("kind", L.DPO_LOSS_TYPES)
def test_each_dpo_loss_type_equals_trl(kind):
    smoothing = {"robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}.get(kind, 0.0)
    cfg = dict(beta=0.3, loss_types=[kind], loss_weights=[1.0], label_smoothing=smoothing)
    arrays = _arrays(0)
    value, grad, _ = _trl_dpo(*arrays, **cfg)
    ours, our_grad = _ours_dpo(*arrays, **cfg)
    np.testing.assert_allclose(ours, value, rtol=RTOL, atol=ATOL, err_msg=kind)
    np.testing.assert_allclose(our_grad, grad, rtol=RTOL, atol=ATOL, err_msg=kind)
    assert np.abs(grad).max() > 1e-3  # the gradient is really compared


def test_weighted_mixture_and_wpo_equal_trl():
    """Several loss types with weights (sft included), and WPO weighting, as TRL sums them."""
    arrays = _arrays(1)
    for cfg in (dict(beta=0.1, loss_types=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
                dict(beta=0.5, loss_types=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], use_weighting=True)):
        value, grad, metrics = _trl_dpo(*arrays, **cfg)
        ours, our_grad = _ours_dpo(*arrays, **cfg)
        np.testing.assert_allclose(ours, value, rtol=RTOL, atol=ATOL, err_msg=str(cfg))
        np.testing.assert_allclose(our_grad, grad, rtol=RTOL, atol=ATOL, err_msg=str(cfg))


def test_dpo_metrics_equal_trl():
    from jaxtune.objectives.preference import _pair_metrics

    token, mask, ref, sq = _arrays(2)
    _, _, metrics = _trl_dpo(token, mask, ref, sq, beta=0.2, loss_types=["sigmoid"], loss_weights=[1.0])
    sums = token.sum(1)
    chosen_r, rejected_r = 0.2 * (sums[:P] - ref[0]), 0.2 * (sums[P:] - ref[1])
    ours = _pair_metrics(jnp.asarray(chosen_r), jnp.asarray(rejected_r), jnp.asarray(sums[:P]), jnp.asarray(sums[P:]),
                         jnp.ones(P, bool))
    for key, value in ours.items():
        np.testing.assert_allclose(float(value) / P, metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)


def test_orpo_odds_ratio_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    rng = np.random.default_rng(3)
    chosen, rejected = (-rng.uniform(0.05, 3.0, P).astype(np.float32) for _ in range(2))
    c, r = torch.tensor(chosen, requires_grad=True), torch.tensor(rejected, requires_grad=True)
    stand_in = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_r, rejected_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stand_in, c, r)
    (-losses.mean()).backward()

    def ours(a, b):
        return -0.25 * jnp.mean(jax.nn.log_sigmoid(L.orpo_log_odds(a, b)))

    value, grads = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(chosen), jnp.asarray(rejected))
    np.testing.assert_allclose(float(value), float(-losses.mean().detach()), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(grads[0]), c.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(grads[1]), r.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(jnp.mean(L.orpo_log_odds(chosen, rejected))), float(log_odds), rtol=RTOL)


@pytest.mark.parametrize("kind", ["simpo", "sigmoid", "hinge", "ipo"])
def test_cpo_and_simpo_equal_trl(kind):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    rng = np.random.default_rng(4)
    chosen, rejected = (-rng.uniform(0.05, 2.0, P).astype(np.float32) for _ in range(2))
    c, r = torch.tensor(chosen, requires_grad=True), torch.tensor(rejected, requires_grad=True)
    stand_in = SimpleNamespace(alpha=0.0, loss_type=kind, simpo_gamma=0.7, beta=2.0, label_smoothing=0.1,
                               accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(stand_in, c, r)
    losses.mean().backward()

    def ours(a, b):
        return jnp.mean(L.cpo_loss(kind, a, b, beta=2.0, label_smoothing=0.1, simpo_gamma=0.7)[0])

    value, grads = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(chosen), jnp.asarray(rejected))
    np.testing.assert_allclose(float(value), float(losses.mean().detach()), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(grads[0]), c.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(grads[1]), r.grad.numpy(), rtol=RTOL, atol=ATOL)
    _, our_c, our_r = L.cpo_loss(kind, jnp.asarray(chosen), jnp.asarray(rejected), beta=2.0, simpo_gamma=0.7)
    np.testing.assert_allclose(np.asarray(our_c), chosen_r.detach().numpy(), rtol=RTOL)


@pytest.mark.parametrize("kind", L.KTO_LOSS_TYPES)
def test_kto_equals_trl(kind):
    """KTO with its KL baseline from mismatched completions: TRL's `_compute_loss` (KL term from the
    KL completions under no_grad, clamped at 0) against ours on the same arrays."""
    from trl.trainer.kto_trainer import KTOTrainer

    n = 8
    rng = np.random.default_rng(5)
    mask = np.zeros((n, T), np.int64)
    kl_mask = np.zeros((n, T), np.int64)
    for i in range(n):
        mask[i, 3:3 + rng.integers(3, T - 4)] = 1
        kl_mask[i, 3:3 + rng.integers(3, T - 4)] = 1
    token = (-rng.uniform(0.05, 1.5, (n, T - 1)) * mask[:, 1:]).astype(np.float32)
    kl_token = (-rng.uniform(0.05, 1.5, (n, T - 1)) * kl_mask[:, 1:]).astype(np.float32)
    ref = -rng.uniform(2.0, 9.0, n).astype(np.float32)
    # the reference's KL log-probs below the policy's: a positive KL that the clamp keeps
    ref_kl = (kl_token.sum(1) - rng.uniform(0.0, 0.4, n)).astype(np.float32)
    label = np.array([1, 0, 1, 1, 0, 0, 1, 0])

    logps = torch.tensor(token, requires_grad=True)
    ids, kl_ids = torch.zeros(mask.shape, dtype=torch.long), torch.zeros(kl_mask.shape, dtype=torch.long)
    trainer = _stand_in(KTOTrainer, beta=0.4, loss_type=kind, desirable_weight=1.3, undesirable_weight=0.7,
                        calculate_KL=kind == "kto")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(mask),
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
             "KL_completion_mask": torch.tensor(kl_mask), "label": torch.tensor(label, dtype=torch.bool),
             "ref_logps": torch.tensor(ref), "ref_KL_logps": torch.tensor(ref_kl)}
    model = _FakeModel({id(kl_ids): torch.tensor(kl_token), "main": logps})
    loss = trainer._compute_loss(model, batch, False)
    loss.backward()

    def ours(sums):
        kl = jnp.maximum(jnp.mean(jnp.asarray(kl_token.sum(1) - ref_kl)), 0.0) if kind == "kto" else 0.0
        per = L.kto_loss(kind, sums, jnp.asarray(ref), jnp.asarray(label, jnp.float32), kl, beta=0.4,
                         desirable_weight=1.3, undesirable_weight=0.7)
        return jnp.mean(per)

    value, grad = jax.value_and_grad(ours)(jnp.asarray(token.sum(1)))
    np.testing.assert_allclose(float(value), float(loss.detach()), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(grad)[:, None] * mask[:, 1:], logps.grad.numpy() * mask[:, 1:], rtol=RTOL,
                               atol=ATOL)
    if kind == "kto":
        assert trainer._metrics["train"]["kl"][-1] > 0.05  # the KL term is live, not clamped away


@pytest.mark.parametrize("kind", ["aot", "aot_unpaired", "sigmoid"])
def test_padding_pairs_between_real_ones_change_nothing(kind):
    """Empty example slots (a packed row with fewer pairs than the widest) may sit anywhere in the
    micro-batch: the summed loss over the real pairs equals the loss of the real pairs alone, also
    for the types that sort the batch."""
    rng = np.random.default_rng(6)
    valid = np.array([True, False, True, True, False, True, False, True])
    arrays = [jnp.asarray(-rng.uniform(1.0, 20.0, valid.size), jnp.float32) for _ in range(4)]
    lengths = jnp.asarray(rng.integers(1, 9, valid.size), jnp.float32)

    def total(mask):
        p = L.PairLogps(*(a[mask] for a in arrays), lengths[mask], lengths[mask], jnp.ones(int(mask.sum()), bool))
        return float(L.dpo_terms(p, 0.0, loss_types=[kind], loss_weights=[1.0], beta=0.4, label_smoothing=0.1)["pairs"])

    padded = L.PairLogps(*arrays, lengths, lengths, jnp.asarray(valid))
    got = float(L.dpo_terms(padded, 0.0, loss_types=[kind], loss_weights=[1.0], beta=0.4, label_smoothing=0.1)["pairs"])
    np.testing.assert_allclose(got, total(valid), rtol=1e-6)
