"""Evaluation end to end: known answers in real shards, an oracle and a constant model through
the real adapter (rollout, decode, checkers), `mmdistill eval` on a trained run, and a 2-stage
continual run producing its 2x2 accuracy matrix."""
from __future__ import annotations

import json
import re

import pytest
import torch
from omegaconf import OmegaConf

from mmdistill.adapters import TextAdapter
from mmdistill.config import load_config
from mmdistill.evaluation.evaluate import eval_splits, score_split
from mmdistill.models.loading import load_tokenizer
from tests.helpers import run_mmdistill, write_lines, write_shards


class ScriptedLM(torch.nn.Module):
    """A 'model' whose generate writes `reply(prompt)`: the oracle reads the question and
    answers it, the constant one always says the same. Real tokenizer and adapter around it."""

    def __init__(self, tok, reply):
        super().__init__()
        self.tok, self.reply = tok, reply
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the adapter reads the device from a parameter

    def generate(self, input_ids, attention_mask=None, generation_config=None, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()])
            rows.append(self.tok(self.reply(prompt), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        width = max(map(len, rows))
        new = torch.full((len(rows), width), self.tok.pad_token_id)
        for i, r in enumerate(rows):
            new[i, : len(r)] = torch.tensor(r)
        return torch.cat([input_ids, new], dim=1)


def oracle(prompt: str) -> str:
    a, b = map(int, re.findall(r"What is (\d+)\+(\d+)\?", prompt)[-1])
    return f"I add {a} and {b}. Answer: {a + b}"


def samples(split: str) -> list[dict]:
    pairs = [(3, 4), (2, 5), (6, 1), (1, 1), (2, 2), (4, 5), (0, 7), (3, 3), (8, 1), (5, 5)]  # sums 7, 7, 7, ...
    return [{"id": f"{split}-{i}", "split": split, "domain": "toy", "prompt": f"What is {a}+{b}?", "answer": str(a + b),
             "hint": f"add {a} and {b}", "checker": "numeric", "response": f"Answer: {a + b}"}
            for i, (a, b) in enumerate(pairs)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for split in ("test", "ood"):
        write_shards(root / split, samples(split))
    cfg = load_config("tiny", ["data.source=shards", f"data.train_path={root / 'test'}",
                               f"data.test_path={root / 'test'}",
                               f"eval.splits={{test: {root / 'test'}, ood: {root / 'ood'}}}", "eval.batch_size=3"])
    tok = load_tokenizer(cfg.student)
    return cfg, tok, TextAdapter(tok, cfg.privileged, 0)


def test_oracle_scores_everything_and_a_constant_its_share(setup):
    cfg, tok, adapter = setup
    splits = eval_splits(cfg)
    assert set(splits) == {"test", "ood"} and all(len(v) == 10 for v in splits.values())
    row = score_split(adapter, ScriptedLM(tok, oracle), splits["test"], cfg.eval)
    assert row["n"] == 10 and row["correct"] == 10 and row["accuracy"] == 1.0
    assert row["ci95"][1] == 1.0 and 0.69 < row["ci95"][0] < 0.73  # Wilson, 10/10
    assert row["leakage_rate"] == 0.0  # "I add 3 and 4" is shorter than a leaked span
    constant = score_split(adapter, ScriptedLM(tok, lambda p: "Answer: 7"), splits["test"], cfg.eval)
    sevens = sum(s["answer"] == "7" for s in samples("test"))
    assert constant["accuracy"] == sevens / 10 and constant["correct"] == sevens
    assert constant["shortcut_rate"] is not None and constant["mean_response_tokens"] > 0
    assert row["distinct_rate"] == 1.0 and constant["distinct_rate"] == 0.1  # one answer for ten questions
    assert sum(b["n"] for b in constant["by_length"]) == 10


def test_pass_at_k_with_sampling(setup):
    cfg, tok, adapter = setup
    ev = OmegaConf.merge(cfg.eval, {"samples": 4, "temperature": 1.0})
    row = score_split(adapter, ScriptedLM(tok, oracle), samples("test"), ev)
    assert row["responses"] == 40 and row["pass_at_k"] == {"1": 1.0, "2": 1.0, "4": 1.0}


def test_leaking_model_is_caught(setup):
    cfg, tok, adapter = setup
    ev = OmegaConf.merge(cfg.eval, {})
    s = [dict(x, hint="carry the one into the tens column before you write the sum") for x in samples("test")]
    leaky = ScriptedLM(tok, lambda p: "Carry the one into the tens column before you write it. Answer: 7")
    assert score_split(adapter, leaky, s, ev)["leakage_rate"] == 1.0


@pytest.mark.slow
def test_eval_command_on_a_trained_run_writes_json_and_markdown(setup, tmp_path):
    cfg, _, _ = setup
    run = tmp_path / "run"
    r = run_mmdistill("train", "tiny", f"train.output_dir={run}", "train.max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    splits = OmegaConf.to_yaml(cfg.eval.splits).replace("\n", ", ").strip(", ")
    r = run_mmdistill("eval", str(run), f"eval.splits={{{splits}}}", "eval.max_per_split=6")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((run / "eval" / "student.json").read_text())
    assert result["role"] == "student" and set(result["splits"]) == {"test", "ood"}
    assert result["model_path"] == str(run / "student") and result["splits"]["ood"]["n"] == 6
    assert (run / "eval" / "student.md").is_file() and "ood" in r.stdout
    examples = result["splits"]["test"]["examples"]
    assert len(examples) == 5 and all(set(e) == {"id", "answer", "response", "correct"} for e in examples)
    assert sum(e["correct"] for e in examples) <= result["splits"]["test"]["correct"]
    for role in ("teacher_priv", "student_priv"):
        r = run_mmdistill("eval", str(run), f"eval.model={role}", "eval.max_per_split=3")
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads((run / "eval" / f"{role}.json").read_text())
        assert got["role"] == role
    # student_priv is the trained student reading p: same weights as "student", another prompt
    assert got["model_path"] == str(run / "student")


@pytest.mark.slow
def test_two_stage_continual_run_gives_a_2x2_matrix(tmp_path):
    run = tmp_path / "cl"
    r = run_mmdistill("train", "tiny_vlm", f"train.output_dir={run}", "eval.num_samples=4", "train.sample_every=1",
                      "data.scenes.num_test=24",
                      "train.stages=[{name: count, steps: 2, select: {task: count}}, "
                      "{name: attribute, steps: 2, select: {task: attribute}}]")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((run / "continual.json").read_text())
    assert data["stages"] == ["count", "attribute"]
    assert len(data["R"]) == 2 and all(len(row) == 2 for row in data["R"]) and len(data["baseline"]) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and {"acc", "bwt", "fwt"} <= {k.lower() for k in summary["continual"]}
    assert (run / "continual.png").is_file() and (run / "continual.md").is_file()
    rollouts = [json.loads(line) for line in (run / "rollouts" / "rank_00000.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rollouts} == {1, 2, 3, 4}
    assert all(r["prompt"].startswith("How many") for r in rollouts if r["step"] <= 2)  # stage 1: count questions
    assert all(r["prompt"].startswith("What") for r in rollouts if r["step"] > 2)  # stage 2: attribute questions


# --- hostile evaluation inputs: an extraction that finds nothing, bad test samples -----------------

def test_no_answer_rate_counts_responses_the_extraction_finds_nothing_in(setup):
    cfg, tok, adapter = setup
    test = samples("test")
    assert score_split(adapter, ScriptedLM(tok, oracle), test, cfg.eval)["no_answer_rate"] == 0.0
    bare = score_split(adapter, ScriptedLM(tok, lambda p: "it is 7"), test, cfg.eval)  # never writes "Answer:"
    assert bare["no_answer_rate"] == 1.0 and bare["accuracy"] == 0.0
    last_number = OmegaConf.merge(cfg.eval, {"extraction": "last_number"})
    fitted = score_split(adapter, ScriptedLM(tok, lambda p: "it is 7"), test, last_number)
    assert fitted["no_answer_rate"] == 0.0 and fitted["accuracy"] > 0  # the same responses, an extraction that fits


def test_eval_command_warns_about_skipped_samples_and_answers_it_cannot_extract(tmp_path, capsys):
    """`mmdistill eval` on a random student (it never writes "Answer:") and a test file with one bad line."""
    from mmdistill.cli import main

    good = [{"id": f"q{i}", "prompt": f"What is {i}+1?", "answer": str(i + 1), "checker": "numeric"} for i in range(3)]
    test = write_lines(tmp_path / "test.jsonl", [*good, {"id": "bad", "prompt": None, "answer": "0"}])
    args = ["eval", "tiny", "data.source=jsonl", f"data.train_path={test}", f"data.test_path={test}",
            f"eval.output_dir={tmp_path / 'eval'}", "eval.max_new_tokens=4"]
    assert main(args) == 2  # on_bad_sample=raise: one line naming file and line
    assert capsys.readouterr().err == f"mmdistill: {test}:4: 'prompt' must be a string, got NoneType\n"
    assert main([*args, "data.on_bad_sample=skip"]) == 0
    out, err = capsys.readouterr()
    result = json.loads((tmp_path / "eval" / "student.json").read_text())
    split = result["splits"]["test"]
    assert split["n"] == 3 and split["bad_skipped"] == 1 and split["no_answer_rate"] == 1.0
    skipped = (f"warning: split 'test': skipped 1 bad sample(s) (data.on_bad_sample=skip); first: {test}:4: 'prompt' "
               "must be a string, got NoneType")
    extraction = ("warning: split 'test': 100% of the responses have no answer that eval.extraction=tag, "
                  "eval.tag='Answer:' can extract, so its accuracy measures the format")
    assert result["warnings"][0] == skipped and result["warnings"][1].startswith(extraction)
    assert f"mmdistill: {skipped}\n" in err and f"mmdistill: {extraction}" in err
    assert f"> {skipped}" in out and f"> {extraction}" in out  # at the top of the table too (and in the .md)
    assert f"> {extraction}" in (tmp_path / "eval" / "student.md").read_text()
