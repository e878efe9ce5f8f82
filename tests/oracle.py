"""The oracle (DESIGN §2): a worker's logits against the plain Hugging Face model.

Hogwild! computes a token's K/V once, in the view of the worker that wrote it; that is
the point of sharing the cache. So for a multi-layer model the reference for worker w is
the HF model run on the flat token ids of view(w) whose past K/V are the tokens' stored
K/V (keys moved from block-local to view positions), with the tokens w fed in the last
pass recomputed by HF itself. The check covers the RoPE shift, the block order, the lag
and causal masks, GQA, every layer, and (by comparing HF's new K/V with the stored ones)
the K/V each pass writes. For one-layer models the past K/V do not depend on context, and
the plain HF run on the flat ids, with no cache handed over, must match as well.
"""

from __future__ import annotations

import functools
import inspect

import torch
from hogwild_kernels import gather_segment, rotate_keys_by
from hogwild_kernels.reference import Segment

import hogwild_ray as hw

TOL = 2e-4  # fp32: a few 1e-4 of the largest |logit| (rounding of rotations and sums)

STEPS = 40
# Forced boundaries and an interjection: (pass index, worker) -> text fed before its next token.
FORCED = {5: {1: "Let me check that.\n\n"}, 12: {0: "First part done.\n\n", 2: "Another idea:"},
          20: {2: "We should split the work.\n\n"}, 27: {0: "So far so good.\n\n"},
          33: {1: "Checking the other case.\n\n"}}


def _segment_kv(pool, layer, view, length, inv_freq):
    seg = Segment(torch.tensor(view.block.pages, dtype=torch.int64, device=pool.k.device), length, view.offset)
    k = gather_segment(pool.k[layer], seg).float().cpu()
    v = gather_segment(pool.v[layer], seg).float().cpu()
    return rotate_keys_by(k, view.offset, inv_freq.cpu()), v


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """The keyword that hands a model's forward its K/V cache: `cache` in newer transformers
    (where `past_key_values` is deprecated), `past_key_values` in older ones (5.17 and before)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def stored_kv(session):
    """The K/V pool the last pass used and its RoPE frequencies. A Ray session's pool is spread
    over its shards (each holds its KV heads): it hands back a gathered CPU copy."""
    if hasattr(session, "stored_kv"):
        return session.stored_kv(), session.engine.spec.inv_freq
    return session.engine.cache, session.engine.decoder.inv_freq


def run_oracle(engine, hf_model, workers, layout, plain=False, steps=STEPS, after_prompt=None, **check):
    """A session with forced boundaries and interjections, checked after every step (check:
    more oracle_check options; after_prompt: called once the prompt is written): (worst
    relative logit error, finished steps, the session)."""
    session = engine.start("Compute 12 * 7 and explain.", workers=workers, layout=layout, max_tokens=200,
                           sampling=hw.SamplingParams(temperature=1.0, seed=3), redundancy_every=15)
    if after_prompt is not None:
        after_prompt()
    worst = 0.0
    for i in range(steps):
        inject = {w: t for w, t in FORCED.get(i, {}).items() if w < workers}
        session.step(inject=inject)
        worst = max(worst, oracle_check(session, hf_model, plain=plain, **check))
    finished = sum(session.stats.steps_per_worker)
    session.close()
    return worst, finished, session


def oracle_check(session, hf_model, plain: bool = False, shift: tuple[int, int] | None = None,
                 kv_tol: float = TOL) -> float:
    """Largest |logit difference| / max |logit| over the workers fed in the last pass.

    shift=(worker, segment index) moves that segment one position later in the
    reference, to prove the check can fail; kv_tol bounds the stored K/V against HF's
    (relative to their largest entry; looser for half-precision caches)."""
    from transformers import DynamicCache

    eng = session.engine
    pool, inv_freq = stored_kv(session)
    worst = 0.0
    for w, step in session.last_steps.items():
        view = step.flat_view()
        n = len(step.tokens)
        assert view[-n:] == step.tokens and view == session.last_views[w]
        past = len(view) - n
        if plain:
            ids = torch.tensor([view])
            with torch.no_grad():
                ref = hf_model(input_ids=ids).logits[0, -1]
        else:
            cache = DynamicCache(config=hf_model.config)
            for layer in range(eng.spec.num_layers):
                ks, vs = [], []
                for i, seg in enumerate(step.segments):
                    length = seg.length - (n if seg.block is step.block else 0)
                    if length <= 0:
                        continue
                    k, v = _segment_kv(pool, layer, seg, length, inv_freq)
                    if shift == (w, i):
                        k = rotate_keys_by(k, 1, inv_freq.cpu())
                    ks.append(k)
                    vs.append(v)
                cache.update(torch.cat(ks).transpose(0, 1)[None], torch.cat(vs).transpose(0, 1)[None], layer)
            pos = torch.arange(past, past + n)[None]
            with torch.no_grad():
                out = hf_model(input_ids=torch.tensor([step.tokens]), position_ids=pos, use_cache=True,
                               **{_cache_keyword(type(hf_model)): cache})
            ref = out.logits[0, -1]
            own = next(s for s in step.segments if s.block is step.block)
            for layer in range(eng.spec.num_layers if shift is None else 0):
                hk = cache.layers[layer].keys[0, :, past:].transpose(0, 1)
                hv = cache.layers[layer].values[0, :, past:].transpose(0, 1)
                k, v = _segment_kv(pool, layer, own, own.length, inv_freq)
                scale = hk.abs().max().item() + 1e-6
                k_err = (k[-n:] - hk).abs().max().item() / scale
                v_err = (v[-n:] - hv).abs().max().item() / (hv.abs().max().item() + 1e-6)
                assert k_err <= kv_tol, f"stored keys of worker {w}, layer {layer}: relative error {k_err:.2e}"
                assert v_err <= kv_tol, f"stored values of worker {w}, layer {layer}: relative error {v_err:.2e}"
        ours = session.last_logits[w].cpu()
        worst = max(worst, ((ours - ref).abs().max() / ref.abs().max()).item())
    return worst
