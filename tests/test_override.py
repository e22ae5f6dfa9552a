"""A tuning location named once reaches every function: the attention output
(``self_attn.o_proj``), as in LocFT-BF's location study, through one resolved object.

The references are plain autograd on the o_proj weights, written without gradlocate."""

from __future__ import annotations

import pytest
import torch

import gradlocate as gl
from gradlocate.models import tiny

EDITS = [
    {"prompt": "Paris is the capital of", "target_new": "Italy", "ground_truth": "France", "subject": "Paris",
     "rephrase_prompt": "The city of Paris is the capital of", "locality_prompt": "Berlin is in",
     "locality_ground_truth": "Germany"},
    {"prompt": "The Nile flows through", "target_new": "Peru", "ground_truth": "Egypt", "subject": "The Nile",
     "locality_prompt": "Rome is in", "locality_ground_truth": "Italy"},
    {"prompt": "Mozart was born in", "target_new": "Oslo", "ground_truth": "Salzburg", "subject": "Mozart"},
]
TEXTS = ["The sky was grey all morning, and then it rained.", "Bread is baked from flour, water and yeast."]


@pytest.fixture(scope="module")
def model_tok():
    return tiny("llama", n_layers=4, d_model=32, d_mlp=48, seed=4, initializer_range=0.2)


@pytest.fixture(scope="module")
def h(model_tok):
    model, tok = model_tok
    return gl.down_projections(model, tokenizer=tok, blocks="model.layers", down="self_attn.o_proj")


def o_proj(model):
    return [b.self_attn.o_proj.weight for b in model.model.layers]


def target_nll(model, tok, prompt, target):
    """The selectors' edit loss: the answer tokens only (no EOS), given the prompt."""
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    logp = model(input_ids=torch.tensor([p + t])).logits[0].float().log_softmax(-1)
    return -logp[torch.arange(len(p) - 1, len(p) + len(t) - 1), torch.tensor(t)].mean()


def test_handles_name_the_override(h):
    assert [x.path for x in h] == [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    assert h.site_path == "self_attn.o_proj" and h.d_mlp == 32
    assert h.mlp_paths[0] == "model.layers.0.mlp"  # causal tracing's MLP sites stay the MLPs


def test_gradratio_equals_plain_autograd_on_o_proj(model_tok, h):
    model, tok = model_tok
    r = gl.gradratio(h, EDITS, TEXTS, min_layer=0)
    ws = o_proj(model)
    edit = sum(target_nll(model, tok, e["prompt"], e["target_new"]) for e in EDITS) / len(EDITS)
    g_e = torch.autograd.grad(edit, ws)
    total, count = 0.0, 0
    for t in TEXTS:
        ids = tok(t)["input_ids"]
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        total = total - logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()
        count += len(ids) - 1
    g_r = torch.autograd.grad(total / count, ws)
    want = [float((a.double() ** 2).sum() / (b.double() ** 2).sum()) for a, b in zip(g_e, g_r)]
    assert r.scores == pytest.approx(want, rel=1e-4)


def test_lga_equals_materialized_o_proj_products(model_tok, h):
    model, tok = model_tok
    r = gl.lga(h, EDITS)
    ws = o_proj(model)
    want = [0.0] * 4
    for e in EDITS:
        g_new = torch.autograd.grad(target_nll(model, tok, e["prompt"], e["target_new"]), ws)
        g_old = torch.autograd.grad(target_nll(model, tok, e["prompt"], e["ground_truth"]), ws)
        want = [w + float((a.double() * b.double()).sum()) for w, a, b in zip(want, g_new, g_old)]
    scale = max(abs(w) for w in want)
    assert r.scores == pytest.approx(want, abs=1e-5 * scale)


def test_locft_changes_only_the_o_proj_weight(model_tok, h):
    model, _ = model_tok
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with gl.LocFTBF(h, 2, lr=1e-2, epochs=3, progress=False) as ft:
        r = ft.fit(EDITS)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert changed == ["model.layers.2.self_attn.o_proj.weight"]
        assert r.cache_mode == "residual"  # the MLP reads the attention output: not additive
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_every_function_runs_on_the_override(model_tok, h):
    model, _ = model_tok
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cma = gl.cma_layer(h, EDITS, samples=2, window=2, progress=False)
    assert len(cma.scores) == 4
    ev = gl.evaluate(h, EDITS, generation=False)
    assert ev.teacher_forced["reliability"] is not None
    sw = gl.sweep(h, EDITS, layers=[1, 3], trainer={"epochs": 2, "lr": 1e-2}, generation=False, progress=False)
    assert sw.layers == [1, 3] and all(rec.error is None for rec in sw.records)
    cmp = gl.compare(h, EDITS, TEXTS, proxy=0.4, layers=[1, 3], trainer={"epochs": 2, "lr": 1e-2},
                     generation=False, progress=False,
                     selector_kwargs={"gradratio": {"min_layer": 0}, "cma": {"samples": 2, "window": 2}})
    assert [r.selector for r in cmp.rows] == ["gradratio", "lga", "cma"] and all(r.error is None for r in cmp.rows)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
