"""Scoring a stochastic defense under several draws of its randomness, and paired statistics."""

import pytest
import torch
from torch import nn

from attacks.base import Threat
from attacks.core import Judge, Verdict
from benchmark.harness import run_attack
from benchmark.records import (
    RecordError,
    bit_string,
    count_string,
    read_record,
    write_record,
)
from benchmark.registry import ATTACKS, DEFENSES
from benchmark.stats import draw_scores, mcnemar, wilson_interval
from defenses.base import DefendedModel, Defense

THREAT = Threat("linf", 0.05)


class MeanClassifier(nn.Module):
    """Class 1 when the image's mean pixel is above 0.5, else class 0."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([0.5 - m, m - 0.5], dim=1) * 100


class Jitter(Defense):
    """Shifts every image by one random brightness offset in [-0.2, 0.2] (only for tests)."""

    stochastic = True

    def purify(self, x, masks=None):
        shift = torch.rand((len(x), 1, 1, 1), generator=self._gen(x.device), device=x.device) * 0.4 - 0.2
        return (x + shift).clamp(0, 1)


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    level = torch.linspace(0.1, 0.9, n)  # images near 0.5 flip under the jitter, far ones never do
    x = (level.view(n, 1, 1, 1) + 0.01 * torch.randn((n, 1, 4, 4), generator=g)).clamp(0, 1)
    return x, (level > 0.5).long()


def test_several_draws_give_counts_and_the_three_accuracies():
    x, y = _data()
    model = DefendedModel(Jitter(), MeanClassifier())
    clean = ATTACKS.get("clean")()
    out = run_attack(clean, model, x, y, THREAT, batch_size=16, seed=3, draws=6)
    assert out.draws == 6 and out.draw_counts.shape == (64,) and int(out.draw_counts.max()) <= 6
    assert torch.equal(out.correct, out.draw_counts == 6)
    # images far from the boundary survive every draw; some near it lose some draws
    assert bool(out.correct[:8].all()) and bool(out.correct[-8:].all())
    partial = (out.draw_counts > 0) & (out.draw_counts < 6)
    assert int(partial.sum()) >= 4
    # all-R correct implies the first draw and the majority vote are correct
    assert bool((out.single | ~out.correct).all()) and bool((out.majority | ~out.correct).all())
    scores = draw_scores(out.draw_counts.tolist(), 6, out.majority.tolist(), out.single.tolist())
    assert scores["all"]["accuracy"] <= scores["mean"]["accuracy"] and scores["all"]["accuracy"] <= scores["single"]["accuracy"]
    assert scores["mean"]["accuracy"] == pytest.approx(float(out.draw_counts.sum()) / (6 * 64))
    assert out.score_forwards == 6 * 64 and out.forwards == 6 * 64  # clean: the scoring passes only
    # reproducible, and independent of the batching: every batch's draws are seeded from (seed, row)
    again = run_attack(clean, model, x, y, THREAT, batch_size=16, seed=3, draws=6)
    assert torch.equal(again.draw_counts, out.draw_counts)
    # one draw is the first of several: every draw is seeded from (batch, draw), not from the attack's stream
    one = run_attack(clean, model, x, y, THREAT, batch_size=16, seed=3, draws=1)
    assert one.draws == 1 and torch.equal(one.correct, out.single)


def test_deterministic_scoring_takes_one_draw():
    x, y = _data(16)
    out = run_attack(ATTACKS.get("clean")(), DefendedModel(DEFENSES.get("none")(), MeanClassifier()), x, y, THREAT,
                     batch_size=16, draws=8)
    assert out.draws == 1 and out.score_forwards == 16
    # an attack whose scoring draws no randomness (the representation attack scores the classifier
    # alone) is scored once
    rep = run_attack(ATTACKS.get("representation")(steps=2, step_size=0.02),
                     DefendedModel(Jitter(), MeanClassifier()), x, y, THREAT, batch_size=16, draws=8)
    assert rep.draws == 1 and rep.score_forwards == 16
    with pytest.raises(Exception, match=r"draws must be in \[1, 35\]"):
        run_attack(ATTACKS.get("clean")(), DefendedModel(Jitter(), MeanClassifier()), x, y, THREAT, batch_size=16,
                   draws=36)


class Scripted:
    """Scores with predictions given in advance, one row of ``script`` per draw."""

    def __init__(self, script):
        self.script, self.calls = script, 0

    def __call__(self, model, x_adv):
        pred = torch.tensor(self.script[self.calls])
        self.calls += 1
        return nn.functional.one_hot(pred, 4).float()


def test_majority_is_a_plurality_vote_and_a_tie_is_not_correct():
    y = torch.tensor([0, 1, 2, 3])
    # draws (rows) x samples (columns)
    script = [[0, 1, 0, 3], [1, 2, 1, 0], [2, 2, 2, 1], [0, 3, 1, 2]]
    judge = Judge(None, torch.zeros(4, 1), y, draws=4, random=True)
    preds = judge.predictions(torch.zeros(4, 1), score=Scripted(script))
    assert preds.tolist() == [list(col) for col in zip(*script)]
    vote = Verdict.of(preds, y).majority
    # sample 0: 0 twice (plurality, correct); 1: 2 twice beats 1 once; 2: 2 once vs 0 once, 1 twice; 3: a four-way tie
    assert vote.tolist() == [True, False, False, False]
    counts = (preds == y.view(-1, 1)).sum(1)
    assert counts.tolist() == [2, 1, 1, 1]


def test_records_keep_draw_counts_and_reject_inconsistent_ones(tmp_path):
    counts = [0, 3, 10, 10, 7]
    record = {"cell": {"dataset": "d", "target": "t", "defense": "m", "attack": "pgd"}, "ci95": [0.1, 0.8],
              "threat": {"norm": "linf", "eps": 0.1}, "future_field": {"kept": True},
              "cell_hash": "h", "n": 5, "n_correct": 2, "accuracy": 0.4, "correct": "00110", "draws": 10,
              "correct_draws": count_string(counts), "correct_majority": "01111", "correct_single": "01110",
              "scores": draw_scores(counts, 10, [0, 1, 1, 1, 1], [0, 1, 1, 1, 0])}
    path = write_record(tmp_path / "r.json", record)
    back = read_record(path)
    assert back.draw_counts() == counts and back.scores["mean"].accuracy == pytest.approx(30 / 50)
    assert back.scores["all"].n_correct == 2 and back.scores["majority"].n_correct == 4
    bad = dict(record, correct_draws=count_string([0, 3, 10, 9, 7]))  # 9 of 10 draws but counted correct
    with pytest.raises(RecordError, match="per-draw counts disagree"):
        read_record(write_record(tmp_path / "bad.json", bad))
    assert bit_string(torch.tensor([True, False])) == "10"
    # a field this version does not know survives a round trip
    assert back.extra == {"future_field": {"kept": True}} and back.to_json()["future_field"] == {"kept": True}
    with pytest.raises(RecordError, match=r"bad2.json: missing field\(s\) threat"):
        read_record(write_record(tmp_path / "bad2.json", {k: v for k, v in record.items() if k != "threat"}))
    with pytest.raises(RecordError, match=r"is not a purifybench-record/2 record \(schema 'purifybench-record/9'"):
        read_record(write_record(tmp_path / "new.json", record, schema="purifybench-record/9"))


def test_a_schema_1_record_reads_as_one_draw(tmp_path):
    """Records written before per-draw scoring still read: one draw, its scores derived."""
    old = {"cell": {"dataset": "d", "target": "t", "defense": "m", "attack": "pgd"}, "n": 4, "n_correct": 3,
           "accuracy": 0.75, "ci95": [0.3, 0.95], "correct": "1101", "threat": {"norm": "linf", "eps": 0.1},
           "defense_declarations": {"stochastic": True}}
    back = read_record(write_record(tmp_path / "old.json", old, schema="purifybench-record/1"))
    assert back.old_schema and back.draws == 1 and back.draw_counts() == [1, 1, 0, 1]
    assert back.scores["mean"].accuracy == back.scores["all"].accuracy == 0.75


def test_mcnemar_exact_and_newcombe_interval():
    a = "1" * 30 + "0" * 10
    b = "1" * 14 + "0" * 26
    c = mcnemar(a, b)
    assert (c["only_a"], c["only_b"]) == (16, 0)
    assert c["p_value"] == pytest.approx(2 * 0.5 ** 16)  # two-sided exact binomial on 16 discordant pairs
    assert c["difference"] == pytest.approx(0.4) and 0 < c["ci95"][0] < 0.4 < c["ci95"][1] <= 1
    same = mcnemar(a, a)
    assert same["p_value"] == 1.0 and same["difference"] == 0
    assert same["ci95"][0] < 0 < same["ci95"][1] or same["ci95"] == [0.0, 0.0]
    # no correlation information lost: independent-looking data give an interval near the unpaired one
    lo, hi = wilson_interval(30, 40)
    assert lo < 0.75 < hi
