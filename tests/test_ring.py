"""Ring attention (jaxtune.parallel.ring) equals the reference attention, forward and backward, with
causal masks, packed segment ids, GQA, sliding windows and the logit soft cap, on the natural and the load-balanced
token layouts (8 forced CPU devices, in a subprocess); the balanced layout itself
(jaxtune.parallel.sequence) keeps every token's next-token target."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from jaxtune.data.chat import IGNORE
from jaxtune.objectives.sft import next_token_labels
from jaxtune.parallel.sequence import balance, balanced_order

from conftest import cpu_env

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jaxtune.kernels.attention import attention
    from jaxtune.parallel import mesh as M
    from jaxtune.parallel import ring
    from jaxtune.parallel.sequence import balanced_order

    calls = []  # traces that took the ring path
    traced_ring = ring.ring_attention
    ring.ring_attention = lambda *a, **kw: calls.append(1) or traced_ring(*a, **kw)

    B, T, N, K, H = 2, 96, 6, 2, 16
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    # row 0: three packed samples of odd lengths and padding; row 1: one sample
    seg = np.array([[1] * 29 + [2] * 37 + [3] * 23 + [0] * 7, [1] * T], np.int32)
    pos = np.array([list(range(29)) + list(range(37)) + list(range(23)) + [0] * 7, list(range(T))], np.int32)
    cot = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)

    def loss(q, k, v, seg, pos, window, softcap):
        out = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                        sliding_window=window, softcap=softcap, implementation="blockwise")
        return jnp.sum(out * cot), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=(5, 6))
    errors = {}
    for mesh_kw in ({"sequence": 8}, {"fsdp": 2, "sequence": 4}, {"sequence": 2, "tensor": 2, "data": 2}):
        mesh = M.make_mesh(**mesh_kw)
        ways = mesh.shape["sequence"]
        for layout in ("natural", "balanced"):
            order = balanced_order(T, ways) if layout == "balanced" else np.arange(T)
            for window, softcap in ((None, None), (17, None), (None, 0.8)):  # 0.8: Gemma's cap, bending hard
                args = (q[:, order], k[:, order], v[:, order], jnp.asarray(seg[:, order]), jnp.asarray(pos[:, order]))
                # no mesh in context: the xla-equal blockwise path
                (ref_l, ref_o), ref_g = grad(*args, window, softcap)
                with jax.set_mesh(mesh):
                    (l, o), g = grad(*args, window, softcap)
                name = f"{mesh_kw}/{layout}/window={window}/softcap={softcap}"
                errors[name] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip((ref_o, *ref_g), (o, *g)))
                ref_x = attention(*args[:3], q_segment_ids=args[3], kv_segment_ids=args[3], q_positions=args[4],
                                  kv_positions=args[4], sliding_window=window, softcap=softcap, implementation="xla")
                errors[name + "/xla"] = float(jnp.max(jnp.abs(o - ref_x)))
    errors["ring_traces"] = len(calls)
    print("RESULT " + json.dumps(errors))
    """
)


def test_ring_attention_equals_reference():
    env = cpu_env(8)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert errors.pop("ring_traces") == 9  # 3 meshes x 3 settings (the layouts share a trace)
    assert len(errors) == 36
    bad = {k: v for k, v in errors.items() if v > 1e-5}
    assert not bad, bad


def test_balanced_layout_keeps_next_token_targets():
    assert balanced_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (3, 2, 13)).astype(np.int32)  # [accumulation, rows, 13 tokens]: padded to 16
    seg = np.broadcast_to(np.array([1] * 5 + [2] * 6 + [0] * 2, np.int32), ids.shape).copy()
    pos = np.broadcast_to(np.array(list(range(5)) + list(range(6)) + [0, 0], np.int32), ids.shape).copy()
    labels = np.where(rng.random(ids.shape) < 0.3, IGNORE, ids).astype(np.int32)
    batch = {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos}
    out = balance(batch, ways=2)
    order = balanced_order(16, 2)
    assert all(v.shape == (3, 2, 16) for v in out.values())
    natural_next = np.asarray(next_token_labels(np.pad(labels, [(0, 0), (0, 0), (0, 3)], constant_values=IGNORE),
                                                np.pad(seg, [(0, 0), (0, 0), (0, 3)])))
    np.testing.assert_array_equal(out["next_labels"], natural_next[..., order])
    np.testing.assert_array_equal(out["input_ids"][..., np.argsort(order)][..., :13], ids)
    # every token's target is its natural right-hand neighbour in the same sample
    trained = out["next_labels"] != IGNORE
    assert trained.sum() > 0 and (out["segment_ids"][trained] > 0).all()
