"""Retrieval metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from mmrag.pipelines.evaluation import (average_precision_at, hit_at, load_queries, ndcg_at, reciprocal_rank, recall_at,
                                       score_ranking)
from mmrag.retrievers import ConfigError

RANKED = ["a", "x", "b", "y", "z", "c"]
REL = {"a", "b", "c", "d"}


def test_metrics_by_hand():
    assert recall_at(RANKED, REL, 1) == 0.25 and recall_at(RANKED, REL, 5) == 0.5 and recall_at(RANKED, REL, 10) == 0.75
    assert reciprocal_rank(RANKED, REL) == 1.0 and reciprocal_rank(["x", "b"], REL) == 0.5 and reciprocal_rank(["x"], REL) == 0
    dcg = 1 / math.log2(2) + 1 / math.log2(4) + 1 / math.log2(7)
    idcg = sum(1 / math.log2(i + 1) for i in range(1, 5))
    assert ndcg_at(RANKED, REL) == pytest.approx(dcg / idcg)
    assert average_precision_at(RANKED, REL) == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 4)
    assert hit_at(RANKED, REL, 1) == 1.0 and hit_at(["x", "y", "b"], REL, 2) == 0.0 and hit_at(["x", "y", "b"], REL, 3) == 1.0
    assert set(score_ranking(RANKED, REL)) == {"recall@1", "recall@5", "recall@10", "hit@1", "hit@5", "mrr", "ndcg@10",
                                               "map@50"}


def test_query_file_errors_name_the_line(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"text": "ok", "relevant": ["a"]}\n{"text": "no relevant"}\n')
    with pytest.raises(ConfigError, match=r"q.jsonl:2: `relevant`"):
        load_queries(f)
    f.write_text('{"image": "missing.png", "relevant": ["a"]}\n')
    with pytest.raises(ConfigError, match=r"q.jsonl:1: .*does not exist"):
        load_queries(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_queries(tmp_path / "nope.jsonl")


def test_vqa_soft_accuracy_is_vqa_rule_over_many_answers_and_exact_match_over_one():
    from mmrag.pipelines.evaluation import vqa_soft_accuracy

    ten = ["red"] * 2 + ["blue"] * 8
    assert vqa_soft_accuracy("Red.", ten) == pytest.approx(2 / 3)  # VQA: min(1, 2 / 3)
    assert vqa_soft_accuracy("blue", ten) == 1.0
    assert vqa_soft_accuracy("the Zorbla", ["Zorbla"]) == 1.0  # one gold answer: exact match (was capped at 1/3)
    assert vqa_soft_accuracy("Zorbla", ["Zorbla", "Fexqui"]) == 0.5
    assert vqa_soft_accuracy("Tamqui", ["Zorbla"]) == 0.0
