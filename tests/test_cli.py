"""The command line, end to end on a tiny model (subprocesses), error paths included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = str(Path(__file__).parent / "fixtures" / "edits_small.json")


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "-m", "gradlocate", *args], capture_output=True, text=True, env=env, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_layers():
    p = run("layers", "--model", "tiny-llama")
    assert "model.layers.3.mlp.down_proj" in p.stdout


def test_select_all_json_and_plot(tmp_path):
    out, png = tmp_path / "sel.json", tmp_path / "sel.png"
    p = run("select", "--model", "tiny-gpt2", "--edits", FIXTURE, "-n", "3", "--method", "all",
            "--samples", "2", "--json", str(out), "--plot", str(png))
    res = json.loads(out.read_text())
    assert set(res) == {"gradratio", "lga", "cma", "recommendation"}
    assert res.pop("recommendation")["layer"] in {r["selected"] for r in res.values()}
    for name, r in res.items():
        assert 0 <= r["selected"] < 4 and len(r["scores"]) == 4
        assert f"{name:>10}: layer {r['selected']}" in p.stdout
    assert png.stat().st_size > 1000
    assert "selected by" in p.stdout


def test_trace(tmp_path):
    p = run("trace", "--model", "tiny-gpt2", "--prompt", "The Eiffel Tower is located in",
            "--subject", "Eiffel Tower", "--kind", "mlp", "--samples", "2", "--json", str(tmp_path / "t.json"))
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["kind"] == "mlp"


def test_edit_saves_only_that_layer(tmp_path):
    from gradlocate.models import tiny
    from transformers import AutoModelForCausalLM

    save = tmp_path / "edited"
    p = run("edit", "--model", "tiny-gpt2", "--edits", FIXTURE, "-n", "2", "--layer", "2", "--set", "epochs=3",
            "--set", "lr=0.01", "--no-generation", "--save", str(save))
    assert "edited layer 2" in p.stdout and "after:" in p.stdout
    edited = AutoModelForCausalLM.from_pretrained(save).state_dict()
    original = tiny("gpt2")[0].state_dict()  # tiny-gpt2 is tiny("gpt2") with its default seed
    changed = [k for k in original if not torch.equal(original[k], edited[k])]
    assert changed == ["transformer.h.2.mlp.c_proj.weight"]


def test_sweep_and_resume(tmp_path):
    out = tmp_path / "s.jsonl"
    args = ("sweep", "--model", "tiny-gpt2", "--edits", FIXTURE, "-n", "2", "--layers", "2:4", "--set", "epochs=2",
            "--no-generation", "--out", str(out))
    p = run(*args)
    assert "golden" in p.stdout and len(out.read_text().splitlines()) == 2
    run(*args)
    assert len(out.read_text().splitlines()) == 2  # nothing redone


def test_compare(tmp_path):
    p = run("compare", "--model", "tiny-gpt2", "--edits", FIXTURE, "--method", "gradratio,lga", "--proxy", "0.5",
            "--layers", "3:4", "--set", "epochs=2", "--no-generation", "--json", str(tmp_path / "c.json"))
    assert "| gradratio |" in p.stdout and "| lga |" in p.stdout
    assert json.loads((tmp_path / "c.json").read_text())["n_proxy"] == 2


@pytest.mark.parametrize("args, msg", [
    (("select", "--model", "tiny-gpt2", "--edits", "/nonexistent/edits.json"), "no edits file"),
    (("select", "--model", "/nonexistent/model", "--edits", FIXTURE), "unknown model"),
    (("select", "--model", "tiny-gpt2", "--edits", FIXTURE, "--method", "magic"), "--method"),
    (("select", "--model", "tiny-gpt2", "--edits", FIXTURE, "-n", "0"), "-n must be >= 1"),
    (("edit", "--model", "tiny-gpt2", "--edits", FIXTURE, "--layer", "9"), "out of range"),
    (("edit", "--model", "tiny-gpt2", "--edits", FIXTURE, "--layer", "x"), "give an int or 'auto'"),
    (("sweep", "--model", "tiny-gpt2", "--edits", FIXTURE, "--layers", "a:b"), "--layers"),
    (("trace", "--model", "tiny-gpt2", "--prompt", "Hello there", "--subject", "Paris"), "does not occur"),
    (("select", "--model", "tiny-gpt2", "--edits", FIXTURE, "--plot", "/nonexistent/dir/x.png"), "does not exist"),
    (("select", "--model", "tiny-gpt2", "--edits", FIXTURE, "--method", "gradratio", "--n-retain", "0"),
     "--n-retain must be >= 1"),
    (("select", "--model", "tiny-gpt2", "--edits", FIXTURE, "--method", "gradratio", "--n-retain", "1000"),
     "--retain FILE"),
    # an argument the library (not the CLI) refuses is a usage error too: one line, exit 2
    (("trace", "--model", "tiny-gpt2", "--prompt", "Hello there", "--subject", "Hello", "--samples", "0"), "samples"),
])
def test_errors_are_one_line_exit_2(args, msg):
    p = run(*args, ok=False)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gradlocate {args[0]}: error:") and msg in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]


def test_usage_error_exit_2():
    p = run("select", "--model", "tiny-gpt2", ok=False)  # --edits missing
    assert p.returncode == 2 and "--edits" in p.stderr


def test_every_option_of_every_verb_has_help_and_shows_its_default():
    import argparse

    from gradlocate.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"matrix", "report", "migrate", "editors", "select", "edit", "trace"} <= set(sub.choices)
    for name, p in sub.choices.items():
        missing = [a.dest for a in p._actions if not a.help and a.dest != "help"]
        assert not missing, f"gradlocate {name}: options without help: {missing}"
        assert any(a.dest == "threads" for a in p._actions), f"gradlocate {name} has no --threads"
        text = p.format_help()
        for a in p._actions:
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and not isinstance(a.default, list):
                assert f"default: {a.default}" in " ".join(text.split()) or "default" in (a.help or ""), (name, a.dest)


def test_version():
    import gradlocate

    p = run("--version")
    assert p.stdout.strip() == f"gradlocate {gradlocate.__version__}"


@pytest.mark.parametrize("args, msg", [
    (("edit", "--model", "tiny-gpt2", "--edits", FIXTURE, "--layer", "1", "--set", "epoch=3"),
     "LocFT-BF has no setting 'epoch' (did you mean 'epochs'?)"),
    (("edit", "--model", "tiny-gpt2", "--edits", FIXTURE, "--layer", "1", "--set", "lr"), "expected NAME=VALUE"),
    (("select", "--model", "tiny-gpt2", "--edits", FIXTURE, "-n", "10"), "-n 10: "),
    (("matrix", "--out", "/nonexistent-folder-gl"), "give --model and --edits to start one"),
    (("report", "/nonexistent-folder-gl"), None),
])
def test_new_errors_are_one_line(args, msg):
    p = run(*args, ok=False)
    if msg is None:  # report: a folder that cannot be judged is reported in its place, exit 1
        assert p.returncode == 1 and "not judged" in p.stderr and "Traceback" not in p.stderr
        return
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gradlocate {args[0]}: error:") and msg in last, p.stderr[-2000:]


def test_editors_lists_each_setting_with_its_default_and_source():
    p = run("editors", "r-rome")
    assert "r-rome (R-ROME)" in p.stdout and "v_num_grad_steps = 25" in p.stdout and "EasyEdit" in p.stdout


def test_select_all_ends_with_one_recommendation(tmp_path):
    p = run("select", "--model", "tiny-gpt2", "--edits", FIXTURE, "-n", "3", "--method", "gradratio,lga",
            "--set", "epochs=1", "--json", str(tmp_path / "s.json"))
    lines = p.stdout.splitlines()
    rec = next(l for l in lines if l.startswith("Recommendation: edit layer "))
    picks = json.loads((tmp_path / "s.json").read_text())
    layer = int(rec.split("edit layer ")[1].split()[0])
    assert layer in (picks["gradratio"]["selected"], picks["lga"]["selected"])
    assert picks["recommendation"]["layer"] == layer and picks["recommendation"]["check_cells"] == 4 * 4
    assert "--method search --editor locft" in p.stdout
    assert all(len(l) <= 100 for l in lines if not l.startswith("  gradlocate ")), lines  # a command is one line


def test_trace_with_a_target_fits_100_columns(tmp_path):
    p = run("trace", "--model", "tiny-gpt2", "--prompt", "Paris is the capital of", "--subject", "Paris",
            "--target", " France", "--samples", "2", "--json", str(tmp_path / "t.json"))
    assert all(len(l) <= 100 for l in p.stdout.splitlines()), p.stdout
    got = json.loads((tmp_path / "t.json").read_text())["answer_text"]
    assert got and " France".startswith(got)  # the target's first token (a byte, with this tokenizer)


def test_select_with_the_search_recommends_the_searched_layer(tmp_path):
    p = run("select", "--model", "tiny-gpt2", "--edits", FIXTURE, "-n", "4", "--method", "gradratio,search",
            "--budget", "8", "--set", "epochs=1", "--json", str(tmp_path / "s.json"))
    got = json.loads((tmp_path / "s.json").read_text())
    assert got["recommendation"]["layer"] == got["search"]["layer"] and got["recommendation"]["checked"]
    assert f"Recommendation: edit layer {got['search']['layer']}: the budgeted search edited with LocFT-BF" in p.stdout
    assert got["search"]["cost"]["cells"] <= 8
    assert all(len(l) <= 100 for l in p.stdout.splitlines()), p.stdout  # the search's lines too
