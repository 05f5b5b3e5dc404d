"""The whole chain, raw data to the paper's tables, with the tiny profile on a slice."""

from __future__ import annotations

import csv
import json
import re

import pytest

from mhsupport.errors import MhsError
from mhsupport import pipeline

SLICE = ["generator.train_subset=48", "generator.valid_subset=12", "classifier.train_subset=150", "test_subset=16",
         "bootstrap.resamples=40", "significance_resamples=40", "decoding.max_new_tokens=10", "runtime.progress=false"]


@pytest.mark.slow
def test_reproduce_tiny_end_to_end_then_everything_is_up_to_date(make_cfg, prepared, capsys, tmp_path):
    # its own artifacts folder: another test may have built the same tiny runs in the session's
    cfg = make_cfg("report", "generator=tiny", "classifier=tiny", *SLICE, artifacts=tmp_path / "artifacts")
    first = pipeline.reproduce(cfg)
    out = first.report.run.path
    for name in ("report.md", "table1.csv", "table2.csv", "table4.csv", "significance.csv", "tag_use.csv",
                 "table2_bleu.png", "table4_bleu.png", "table2_bleu.pdf", "table4_bleu.pdf", "tag_use_confusion.png",
                 "manifest.json"):
        assert (out / name).is_file(), name
    table2 = list(csv.DictReader(open(out / "table2.csv")))
    assert [r["system"] for r in table2] == ["Pretrained", "ESConv", "Unified", "ESConv+tag", "Unified+tag"]
    assert float(table2[3]["paper_bleu"]) == 0.293
    table4 = list(csv.DictReader(open(out / "table4.csv")))
    assert len(table4) == 8 and table4[-1]["system"] == "Unified+tag / oracle"
    assert float(table4[-1]["strategy_accuracy"]) == 100.0
    assert float(table4[-1]["strategy_q"]) == 100.0 and float(table4[-1]["strategy_bias"]) == pytest.approx(0, abs=1e-3)
    assert float(table4[-1]["esconv_bleu_2"]) >= 0 and "esconv_rouge_l_ci" in table4[-1]
    assert all(float(r["ppl"]) > 1 for r in table2)  # from the likelihood runs
    tag_use = list(csv.DictReader(open(out / "tag_use.csv")))
    assert [r["system"] for r in tag_use] == ["ESConv+tag", "Unified+tag"]
    assert all(0 <= float(r["tag_discrimination"]) <= 1 and float(r["chance"]) == 0.25 for r in tag_use)
    oracle = {r["system"]: r for r in table4}["ESConv+tag / oracle"]
    assert tag_use[0]["oracle_adherence"] == oracle["tag_adherence"]  # the oracle eval's, beside the references'
    assert 0 <= float(tag_use[0]["recogniser_on_references"]) <= 100
    text = (out / "report.md").read_text()
    assert "| Oracle adherence % |" in text and "| Recogniser on the references % |" in text
    assert "every number below means nothing" in text and "| Comforting |" in text
    assert "## Does the generator use its tag?" in text and "| Tag discrimination |" in text
    assert "| B-2 [esconv] |" in text and "| Liu et al. 2021: DialoGPT-Joint (other model, data, split) |" in text
    assert "signature `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in text
    tests = list(csv.DictReader(open(out / "significance.csv")))
    assert len(tests) == 9 * 4 and f"{len(tests)} comparisons (9 orderings x 4" in text
    assert all(float(t["p_bootstrap_holm"]) >= float(t["p_bootstrap"]) and 0 < float(t["p_randomisation"]) <= 1
               for t in tests)
    for t in tests:  # holds / reversed need both Holm-adjusted tests and the sign
        decided = float(t["p_bootstrap_holm"]) < 0.05 and float(t["p_randomisation_holm"]) < 0.05
        delta = float(t["delta"])
        expected = "holds" if decided and delta > 0 else "reversed" if decided and delta < 0 else "undecided"
        assert t["verdict"] == expected
    assert "- **tag > no tag (ESConv)**: " in text and " of 4 metrics)" in text
    stages = [t["stage"] for t in first.timings]
    # Table 2's tagged rows are Table 4's "none" cells: 11 distinct evals, each built once; 5 likelihood runs;
    # 2 generation passes (one per tagged generator), which the 8 tagged evals choose from.
    assert stages[0] == "prepare-data" and stages[-1] == "report" and len(stages) == 1 + 4 + 2 + 5 + 2 + 11 + 1
    assert "## Steering: replies under every forced category" in text and "| Tag following % |" in text
    steering = list(csv.DictReader(open(out / "steering.csv")))
    assert [r["system"] for r in steering] == ["ESConv+tag", "Unified+tag"]
    assert all(0 <= float(r["tag_following"]) <= 100 for r in steering)
    baselines = [r["system"] for r in csv.DictReader(open(out / "classifier_baselines.csv"))]
    assert baselines == ["classifier", "majority", "previous_category", "tfidf_lr"]
    assert all(float(t["detectable"]) >= 0 for t in tests) and any(float(t["detectable"]) > 0 for t in tests)
    assert json.loads(first.timings_file.read_text())["total_seconds"] > 0

    again = pipeline.reproduce(cfg)
    assert all(t["skipped"] for t in again.timings)
    assert again.report.run.path == out


def test_report_without_evals_lists_what_to_run(make_cfg, tmp_path):
    cfg = make_cfg("report", "generator=tiny", "classifier=tiny", artifacts=tmp_path / "empty")
    with pytest.raises(MhsError, match="mhs prepare-data"):
        pipeline.run("report", cfg)


@pytest.mark.slow
def test_reproduce_with_two_training_seeds_gives_mean_and_sd_and_pools_the_tests(make_cfg):
    from mhsupport.evaluation.generations_io import read_generations

    result = pipeline.reproduce(make_cfg("report", "generator=tiny", "classifier=tiny", *SLICE, "seeds=[42,7]"))
    out = result.report.run.path
    assert sum(t["stage"].startswith("train dialogpt") for t in result.timings) == 4 * 2
    table2 = list(csv.DictReader(open(out / "table2.csv")))
    assert all(re.fullmatch(r"± \d+\.\d\d \(sd, 2 seeds\)", r["bleu_ci"]) for r in table2), table2
    seeds_of_one_system = sorted(name for name in result.report.run.inputs if name.startswith("table2/ESConv@"))
    assert seeds_of_one_system == ["table2/ESConv@42", "table2/ESConv@7"]
    runs = [result.report.run.inputs[name]["run"] for name in seeds_of_one_system]
    keys = [[(l["conversation_id"], l["turn_index"]) for l in read_generations(run)] for run in runs]
    assert keys[0] == keys[1] and len(keys[0]) == 16  # the same test examples for every seed
    assert runs[0] != runs[1]
    assert list(csv.DictReader(open(out / "significance.csv")))
    assert "Training seeds 42, 7:" in (out / "report.md").read_text()
