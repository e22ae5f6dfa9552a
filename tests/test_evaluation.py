"""Edit evaluation against independent computations: teacher-forced accuracy, greedy
generation, locality agreement, n-gram entropy, answer normalisation."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlocate import EditEvaluation, evaluate
from gradlocate.evaluation import LocalityReference, locality_reference
from gradlocate.handles import resolve
from gradlocate.evaluation import exact_match, greedy_generate, ngram_entropy, normalize_answer, truncate_at_stop
from gradlocate.models import tiny

EDITS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "rephrase_prompt": "France's capital:",
     "locality_prompt": "Berlin is in", "locality_ground_truth": "Germany"},
    {"src": "Who wrote Hamlet?", "alt": "Dickens", "rephrase": ["Hamlet's author is", "Hamlet was written by"],
     "loc": "nq question: what is 2+2", "loc_ans": "4"},
    {"prompt": "Water boils at", "target_new": "fifty degrees",
     "portability": {"temp": [{"prompt": "Water boils at a temperature of", "ground_truth": "fifty"}]}},
]


@pytest.fixture(scope="module")
def gpt2():
    """A tiny GPT-2 that has learned some of the edits (so the scores are neither all 0
    nor all 1): large embeddings (initializer_range=1) make confident logits possible,
    then a short LocFT-BF run on the edit prompts and one rephrase."""
    from gradlocate import LocFTBF

    model, tok = tiny("gpt2", n_layers=2, d_model=32, seed=1, initializer_range=1.0)
    ft = LocFTBF(model, 1, lr=0.05, epochs=8, progress=False)
    ft.fit(EDITS + [{"prompt": "France's capital:", "target_new": "Rome"}])
    ft.commit()
    return model, tok


@pytest.fixture(scope="module")
def llama():
    return tiny("llama", n_layers=2, d_model=32, seed=1)


# --------------------------------------------------------------------------- independent computations


def ind_accuracy(model, tok, prompt, answer):
    """(accuracy, predicted ids) of one unpadded prompt + " " + answer."""
    p = tok(prompt)["input_ids"]
    a = tok(("" if prompt[-1:].isspace() else " ") + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + a])).logits[0]
    pred = [int(logits[len(p) + k - 1].argmax()) for k in range(len(a))]
    return sum(x == y for x, y in zip(pred, a)) / len(a), pred


def ind_greedy(model, tok, prompt, max_new, stops=(".", "\n"), no_eos=False):
    """Greedy decoding without padding or cache: recompute the whole sequence each step
    (``no_eos``: EOS is never chosen)."""
    ids = tok(prompt)["input_ids"]
    new = []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
        if no_eos:
            logits[tok.eos_token_id] = -float("inf")
        nxt = int(logits.argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        text = tok.decode(new, skip_special_tokens=True)
        if any(s in text for s in stops):
            break
    text = tok.decode(new, skip_special_tokens=True)
    cut = min([text.find(s) for s in stops if s in text] or [len(text)])
    return text[:cut]


def mean(xs):
    return sum(xs) / len(xs)


# --------------------------------------------------------------------------- text scoring


def test_normalize_answer():
    assert normalize_answer("The Beatles!") == "beatles"
    assert normalize_answer("  An  apple, a day ") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # only whole-word articles
    assert normalize_answer("St. Louis-Park") == "st louispark"
    assert exact_match(" the Liverpool.", "Liverpool")
    assert not exact_match("Liverpool FC", "Liverpool")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_normalize_is_idempotent_and_em_symmetric(text):
    n = normalize_answer(text)
    assert normalize_answer(n) == n
    assert n == n.strip() and "  " not in n
    assert exact_match(text, n) and exact_match(n, text)


def test_truncate_at_stop():
    assert truncate_at_stop(" Rome. Then") == " Rome"
    assert truncate_at_stop(" Rome\nParis.") == " Rome"
    assert truncate_at_stop(" Rome") == " Rome"
    assert truncate_at_stop("a;b", stops=(";",)) == "a"
    assert truncate_at_stop("a.b", stops=()) == "a.b"


def test_ngram_entropy_by_hand():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams ab, ba, ab
    h3 = 1.0  # trigrams aba, bab
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("x x x x x x") == 0.0
    assert ngram_entropy("") == 0.0
    words = "the cat sat on the mat , the cat ran".split()
    ent = []
    for n in (2, 3):
        c = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        tot = sum(c.values())
        ent.append(-sum(v / tot * math.log2(v / tot) for v in c.values()))
    assert ngram_entropy("the cat sat on the mat, the cat ran") == pytest.approx((2 / 3 * ent[0] + 4 / 3 * ent[1]) / 2)


# --------------------------------------------------------------------------- model scoring


def test_teacher_forced_metrics_equal_independent(gpt2):
    model, tok = gpt2
    ev = evaluate(model, EDITS, generation=False)
    rel = [ind_accuracy(model, tok, e, t)[0] for e, t in
           [("The capital of France is", "Rome"), ("Who wrote Hamlet?", "Dickens"), ("Water boils at", "fifty degrees")]]
    gen = [ind_accuracy(model, tok, "France's capital:", "Rome")[0],
           mean([ind_accuracy(model, tok, p, "Dickens")[0] for p in ("Hamlet's author is", "Hamlet was written by")])]
    port = ind_accuracy(model, tok, "Water boils at a temperature of", "fifty")[0]
    assert 0 < mean(rel) < 1 and 0 < mean(gen) < 1  # scores that can tell a wrong implementation
    assert ev.teacher_forced["reliability"] == pytest.approx(mean(rel), abs=1e-6)
    assert ev.teacher_forced["generalization"] == pytest.approx(mean(gen), abs=1e-6)
    assert ev.teacher_forced["portability"] == pytest.approx(port, abs=1e-6)
    assert ev.teacher_forced["locality"] is None and any("pre=" in n for n in ev.notes)
    assert [r["reliability_tf"] for r in ev.rows] == pytest.approx(rel, abs=1e-6)
    assert ev.rows[2]["generalization_tf"] is None
    assert ev.generation is None


@pytest.fixture(scope="module")
def llama_bpe():
    from gradlocate.models import bpe_tokenizer

    return tiny("llama", n_layers=2, d_model=32, seed=1, tokenizer=bpe_tokenizer())


def test_teacher_forced_metrics_equal_independent_bpe(llama_bpe):
    """With merges, a BOS on the prompt only, and a prompt ending in a space (the target is
    tokenized apart: " fifty" must not merge). One target is the model's own greedy next
    word, so the scores are not all zero and a misaligned target would show."""
    model, tok = llama_bpe
    with torch.no_grad():
        first = tok.decode([int(model(**tok("Water boils at", return_tensors="pt")).logits[0, -1].argmax())])
    assert first.startswith(" ") and first.strip().isalpha()  # a word: " to" with this seed
    edits = [{"prompt": "The capital of France is", "target_new": "Rome"},
             {"prompt": "Water boils at", "target_new": f"{first.strip()} fifty degrees"},
             {"prompt": "Water boils at ", "target_new": "fifty degrees"}]
    ev = evaluate(model, edits, generation=False)
    rel = [ind_accuracy(model, tok, e["prompt"], e["target_new"])[0] for e in edits]
    assert 0 < mean(rel) < 1  # scores that can tell a wrong implementation
    assert ev.teacher_forced["reliability"] == pytest.approx(mean(rel), abs=1e-6)
    assert [r["reliability_tf"] for r in ev.rows] == pytest.approx(rel, abs=1e-6)


@pytest.mark.parametrize("fixture", ["gpt2", "llama", "llama_bpe"])
def test_batched_generation_equals_unpadded_greedy(request, fixture):
    model, tok = request.getfixturevalue(fixture)
    prompts = ["The capital of France is", "Hi", "Who wrote Hamlet? Tell me now"]
    got = greedy_generate(resolve(model, tok), prompts, max_new_tokens=6, batch_size=3)
    want = [ind_greedy(model, tok, p, 6) for p in prompts]
    assert got == want
    got_long = greedy_generate(resolve(model, tok), prompts[:2], max_new_tokens=8, stops=(), batch_size=2)
    assert got_long == [ind_greedy(model, tok, p, 8, stops=()) for p in prompts[:2]]


def test_generation_em_and_locality_against_independent(gpt2):
    model, tok = gpt2
    pre = evaluate(model, EDITS, max_new_tokens=5)
    assert isinstance(pre.reference, LocalityReference)
    # change the model: the last down-projection gets noise
    w = model.transformer.h[1].mlp.c_proj.weight
    saved = w.detach().clone()
    loc = [("Berlin is in", "Germany"), ("nq question: what is 2+2", "4")]
    pre_preds = [ind_accuracy(model, tok, p, a)[1] for p, a in loc]
    pre_gens = [ind_greedy(model, tok, p, 5) for p, _ in loc]
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    try:
        post = evaluate(model, EDITS, pre=pre, max_new_tokens=5)
        post_preds = [ind_accuracy(model, tok, p, a)[1] for p, a in loc]
        post_gens = [ind_greedy(model, tok, p, 5) for p, _ in loc]
        rel_gens = [ind_greedy(model, tok, p, 5) for p in ("The capital of France is", "Who wrote Hamlet?", "Water boils at")]
    finally:
        with torch.no_grad():
            w.copy_(saved)
    agree = [mean([x == y for x, y in zip(a, b)]) for a, b in zip(pre_preds, post_preds)]
    assert 0 < mean(agree) < 1  # the noise changed some locality predictions, not all
    assert post.teacher_forced["locality"] == pytest.approx(mean(agree), abs=1e-6)
    assert post.generation["locality"] == pytest.approx(
        mean([float(exact_match(a, b)) for a, b in zip(post_gens, pre_gens)]), abs=1e-6)
    targets = ["Rome", "Dickens", "fifty degrees"]
    assert 0 < post.generation["reliability"] < 1
    assert post.generation["reliability"] == pytest.approx(
        mean([float(exact_match(g, t)) for g, t in zip(rel_gens, targets)]), abs=1e-6)
    assert [r["reliability_generations"][0] for r in post.rows] == rel_gens
    assert post.rows[2]["locality_tf"] is None  # that edit has no locality prompt
    # unchanged model: locality is perfect under both scorings
    again = evaluate(model, EDITS, pre=pre, max_new_tokens=5)
    assert again.teacher_forced["locality"] == 1.0 and again.generation["locality"] == 1.0


def test_locality_reference_function(llama):
    model, tok = llama
    ref = locality_reference(model, EDITS, max_new_tokens=4)
    full = evaluate(model, EDITS, max_new_tokens=4)
    assert ref.tokens == full.reference.tokens and ref.generations == full.reference.generations
    assert ref.tokens[0][0] == ind_accuracy(model, tok, "Berlin is in", "Germany")[1]
    post = evaluate(model, EDITS, pre=ref, max_new_tokens=4)
    assert post.teacher_forced["locality"] == 1.0
    assert "2 locality prompts" in repr(ref)


def test_fluency_option(gpt2):
    model, tok = gpt2
    ev = evaluate(model, EDITS[:2], generation=False, fluency=True, fluency_tokens=6)
    texts = [p + ind_greedy(model, tok, p, 6, stops=(), no_eos=True)
             for p in ("The capital of France is", "Who wrote Hamlet?")]
    assert ev.fluency == pytest.approx(mean([ngram_entropy(t) for t in texts]))
    assert [r["fluency_text"] for r in ev.rows] == texts


def test_fluency_generation_does_not_stop_at_eos(gpt2):
    """An edit trained to end its target with EOS must not end the fluency text there:
    else every edited layer scores the same text (prompt + target). With EOS always the
    model's first choice, plain generation is empty and fluency's has its full length."""
    model, tok = gpt2
    def eos_first(module, args, out):
        out = out.clone()
        out[..., tok.eos_token_id] = out.max() + 10.0
        return out
    hook = model.lm_head.register_forward_hook(eos_first)
    try:
        assert greedy_generate(resolve(model, tok), ["The capital of France is"], max_new_tokens=6, stops=()) == [""]
        prompt = "The capital of France is"
        ev = evaluate(model, EDITS[:1], generation=False, fluency=True, fluency_tokens=6)
        cont = ev.rows[0]["fluency_text"][len(prompt):]
        assert cont == ind_greedy(model, tok, prompt, 6, stops=(), no_eos=True)
        assert len(tok(cont)["input_ids"]) == 6
    finally:
        hook.remove()


def test_generation_refuses_nan_logits(gpt2):
    """NaN (or +inf) logits during generation are a clear error, not a token picked from
    garbage; the model's weights are put back afterwards by the test."""
    from gradlocate.losses import NonFiniteLossError

    model, tok = gpt2
    w = model.lm_head.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[tok.eos_token_id + 1:, 0] = float("nan")
    try:
        with pytest.raises(NonFiniteLossError, match="during generation"):
            greedy_generate(resolve(model, tok), ["Hi"], max_new_tokens=2, stops=())
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_bad_input_and_mismatched_pre(gpt2, unchecked):
    model, _ = gpt2
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, EDITS, batch_size=0)
    pre = evaluate(model, EDITS[:2], generation=False)
    with pytest.raises(ValueError, match="other edits"):
        evaluate(model, EDITS[1:], pre=pre, generation=False)
    with pytest.raises(ValueError, match="generation"):
        evaluate(model, EDITS[:2], pre=pre)  # pre has no generations
    with pytest.raises(TypeError, match="pre must be"):
        unchecked(evaluate)(model, EDITS, pre={"locality": 1})
    no_loc = evaluate(model, EDITS[2:], generation=False)
    again = evaluate(model, EDITS[2:], pre=no_loc, generation=False)  # no locality prompts: absent, not an error
    assert again.teacher_forced["locality"] is None


def test_state_restored_and_result_api(gpt2):
    model, _ = gpt2
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    ev = evaluate(model, EDITS, max_new_tokens=3)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    model.eval()
    assert isinstance(ev, EditEvaluation) and ev.n_edits == 3
    d = ev.to_dict()
    # the four metrics, and each named group of portability prompts (KnowEdit style)
    assert set(d["teacher_forced"]) == {"reliability", "generalization", "locality", "portability", "portability/temp"}
    assert len(d["rows"]) == 3 and "rows" not in ev.to_dict(rows=False)
    assert "EditEvaluation(n_edits=3" in repr(ev) and "generation EM" in repr(ev)
    assert "teacher-forced" in ev.to_table() and "<table>" in ev._repr_html_()
    import matplotlib

    matplotlib.use("Agg")
    ax = ev.plot()
    assert len(ax.patches) >= 6


# --------------------------------------------------------------------------- capability

HELD_OUT = ["The quick brown fox jumps over the lazy dog.", "Water boils at one hundred degrees.", "A short one."]


def plain_lm_loss(model, tok, texts, max_length=128):
    """The held-out LM loss computed directly: one text at a time, no padding, the model's
    logits and ``cross_entropy`` summed over every next token, divided by their count."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"][:max_length]])
            logits = model(input_ids=ids).logits[0]
            total += float(F.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


@pytest.mark.parametrize("generation", [False, True])
def test_capability_is_the_heldout_loss_with_generation_on_or_off(gpt2, generation):
    """Capability is the loss on the held-out texts whether or not generation ran (the
    generations once took the held-out texts' name, and capability scored the prompts)."""
    model, tok = gpt2
    ev = evaluate(model, EDITS, generation=generation, capability=HELD_OUT, max_new_tokens=3)
    want = plain_lm_loss(model, tok, HELD_OUT)
    assert ev.general["lm_loss"] == pytest.approx(want, rel=1e-5)
    prompts = ["The capital of France is", "Who wrote Hamlet?", "Water boils at"]
    assert abs(want - plain_lm_loss(model, tok, prompts)) > 1e-3  # what the bug scored differs
    assert ev.params["capability"] == len(HELD_OUT)
    assert set(ev.timings) == {"teacher_forced", "capability"} | ({"generation"} if generation else set())


@pytest.mark.parametrize("generation", [False, True])
def test_no_capability_unless_asked(gpt2, generation):
    model, tok = gpt2
    ev = evaluate(model, EDITS, generation=generation, max_new_tokens=3)
    assert "lm_loss" not in ev.general and ev.params["capability"] is None and "capability" not in ev.timings
