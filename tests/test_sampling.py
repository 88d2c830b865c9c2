"""Token sampling: exactly jax.random.categorical's draw, first-index greedy ties, top-k / top-p
supports and renormalised frequencies."""
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.generate import SamplingParams, first_argmax, sample_token


def test_temperature_sampling_is_categoricals_draw():
    sp = SamplingParams(8, 0.7, 0, 1.0)
    for i in range(20):
        key = jax.random.key(i)
        logits = jax.random.normal(jax.random.fold_in(key, 1), (16, 512)) * 3
        ours = np.asarray(sample_token(logits, key, sp))
        ref = np.asarray(jax.random.categorical(key, logits / 0.7, axis=-1))
        np.testing.assert_array_equal(ours, ref)


def test_greedy_takes_the_first_maximum():
    x = jnp.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-jnp.inf, -1.0, -jnp.inf, -2.0]])
    assert first_argmax(x).tolist() == [1, 0, 1]
    assert sample_token(x, jax.random.key(0), SamplingParams(1, 0.0)).tolist() == [1, 0, 1]
    r = jax.random.normal(jax.random.key(3), (8, 1000))
    np.testing.assert_array_equal(np.asarray(first_argmax(r)), np.asarray(jnp.argmax(r, -1)))


def _draws(probs, sp, n=4000):
    logits = jnp.log(jnp.asarray([probs] * n, jnp.float32))
    return np.asarray(sample_token(logits, jax.random.key(7), sp))


def test_top_k_and_top_p_supports_and_frequencies():
    probs = [0.5, 0.3, 0.15, 0.05]
    # top_k=2 and top_p=0.8 both keep {0, 1} (0.5 + 0.3 reaches 0.8), renormalised to 0.625 / 0.375
    for sp in (SamplingParams(1, 1.0, 2, 1.0), SamplingParams(1, 1.0, 0, 0.8)):
        d = _draws(probs, sp)
        assert set(d.tolist()) == {0, 1}
        assert abs(np.mean(d == 0) - 0.625) < 0.03
    # top_p=0.81 needs the third token too; plain sampling sees all four at their probabilities
    assert set(_draws(probs, SamplingParams(1, 1.0, 0, 0.81)).tolist()) == {0, 1, 2}
    freq = np.bincount(_draws(probs, SamplingParams(1, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(freq, probs, atol=0.03)


def test_generation_runs_lora_models_in_eval_mode():
    """A LoRA model with dropout, left in training mode: generate() must not draw dropout masks
    (it did, and with weights sliced once per call it could not mutate the dropout counters)."""
    import llama_jax
    from flax import nnx

    from llama_jax import lora

    cfg = llama_jax.preset("toy", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128)
    m = llama_jax.init_model(cfg, 0)
    lora.apply(m, rank=4, alpha=8, dropout=0.1)
    key = jax.random.key(5)

    def nonzero_b(path, x):  # B starts at zero; make the adapters matter
        name = jax.tree_util.keystr(path)
        return jax.random.normal(jax.random.fold_in(key, len(name)), x.shape, x.dtype) * 0.5 if "'b'" in name else x

    nnx.update(m, jax.tree_util.tree_map_with_path(nonzero_b, nnx.state(m)))
    prompts = [[1, 5, 9, 22], [1, 7], [1, 3, 4, 5, 6, 7, 8]]
    out = llama_jax.generate(m, prompts, max_new_tokens=6, temperature=0.0, eos_ids=[])
    assert llama_jax.generate(m, prompts, max_new_tokens=6, temperature=0.0, eos_ids=[]) == out
    # the decoder that slices weights inside the loop (accelerators) samples the same tokens
    from llama_jax.generate import Cache, SamplingParams as SP, decode, left_pad, prefill

    ids, mask = left_pad(prompts, 0)
    gd, state = nnx.split(m)
    lg, cache = prefill(gd, state, jnp.asarray(ids), jnp.asarray(mask), Cache.init(cfg, 3, ids.shape[1] + 6))
    toks, _ = decode(gd, state, cache, lg, jnp.asarray(mask.sum(-1), jnp.int32), jax.random.key(0), SP(6),
                     (), 0, None, hoist_layers=False)
    assert np.asarray(toks).tolist() == out
    m.eval()
    for p, o in zip(prompts, out):  # the uncached eval-mode forward, one token at a time
        seq = list(p)
        for _ in range(6):
            seq.append(int(jnp.argmax(m(jnp.asarray([seq]))[0, -1])))
        assert seq[len(p):] == o


def test_per_row_sampling_matches_sample_token():
    """sample_rows (the server's per-slot parameters, one batch mixing every kind of row) draws from
    the same distribution as sample_token with those parameters statically: the same supports and
    frequencies, through its top-k candidate path and its whole-vocabulary paths alike."""
    from llama_jax.generate import FILTER_CANDIDATES, sample_rows

    V, n = 200, 3000
    rng = np.random.default_rng(0)
    peaked = np.log(rng.dirichlet(np.full(V, 0.05)) + 1e-12).astype(np.float32)  # nucleus(0.8) well inside 64 tokens
    flat = rng.normal(size=V).astype(np.float32) * 0.3                   # nucleus(0.9) beyond 64 tokens
    cases = [(peaked, SamplingParams(1, 1.0, 2, 1.0)), (peaked, SamplingParams(1, 0.8, 0, 0.8)),
             (flat, SamplingParams(1, 1.0, 0, 0.9)), (flat, SamplingParams(1, 1.0, 100, 1.0)),
             (flat, SamplingParams(1, 1.0, 5, 0.5)), (peaked, SamplingParams(1, 0.7, 0, 1.0)),
             (peaked, SamplingParams(1, 0.0, 0, 1.0))]
    assert 100 > FILTER_CANDIDATES
    logits = jnp.asarray(np.concatenate([np.tile(lg, (n, 1)) for lg, _ in cases]))
    col = lambda f: jnp.asarray(np.repeat([f(sp) for _, sp in cases], n))  # noqa: E731
    got = np.asarray(jax.jit(sample_rows)(logits, jax.random.split(jax.random.key(1), len(cases) * n),
                                          col(lambda sp: sp.temperature), col(lambda sp: sp.top_k),
                                          col(lambda sp: sp.top_p)))
    for i, (lg, sp) in enumerate(cases):
        ours = got[i * n:(i + 1) * n]
        if sp.temperature == 0:
            assert set(ours.tolist()) == {int(np.argmax(lg))}
            continue
        exact = _filtered_probs(lg, sp)  # numpy, by the definition
        ref = np.asarray(sample_token(jnp.asarray(np.tile(lg, (n, 1))), jax.random.key(2), sp))
        support = np.count_nonzero(exact)
        for draws in (ours, ref):
            assert set(draws.tolist()) <= set(np.flatnonzero(exact).tolist()), (i, sp)
            l1 = np.abs(np.bincount(draws, minlength=V) / n - exact).sum()
            assert l1 < 2.5 * np.sqrt(support / n) + 0.02, (i, sp, l1, support)


def _filtered_probs(lg, sp):
    x = lg.astype(np.float64) / sp.temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), bool)
    k = sp.top_k if 0 < sp.top_k < len(x) else len(x)
    keep[order[:k]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    if sp.top_p < 1:
        ps = p[order]
        before = np.cumsum(ps) - ps
        keep2 = np.zeros(len(x), bool)
        keep2[order[before < sp.top_p]] = True
        p = np.where(keep2, p, 0.0)
        p /= p.sum()
    return p
