"""The next-category classifier: metrics and baselines on fixtures with known answers, the
tiny profile end to end, the prediction API, the 8-way and response modes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mhsupport.modeling import classifier as api
from mhsupport.cli import main
from mhsupport.errors import MhsError
from mhsupport.evaluation.baselines import majority_label, previous_supporter_label, tfidf_logistic_regression
from mhsupport.evaluation.classification import bootstrap_systems, calibration, classification_scores
from mhsupport.modeling.classifier import context_text
from mhsupport import pipeline
from mhsupport.stages import train_classifier

LABELS = ["Comforting", "Exploration", "Action", "Others"]
TINY = ["classifier=tiny", "classifier.train_subset=200"]


def test_classification_scores_hand_worked():
    gold = ["A", "A", "B", "B", "C"]
    predicted = ["A", "B", "B", "B", "A"]
    s = classification_scores(gold, predicted, ["A", "B", "C"])
    assert s["accuracy"] == pytest.approx(3 / 5)
    # A: p=1/2 r=1/2 f=1/2; B: p=2/3 r=1 f=0.8; C: 0
    assert s["per_class"]["A"]["f1"] == pytest.approx(0.5)
    assert s["per_class"]["B"]["precision"] == pytest.approx(2 / 3) and s["per_class"]["B"]["f1"] == pytest.approx(0.8)
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert s["weighted_f1"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 0) / 5)
    assert s["confusion"]["rows_gold_cols_predicted"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def synthetic(n_per_label: int, seed: int):
    """Contexts whose last supporter turn has the *next* turn's category, and whose last seeker
    turn names a word unique to it: previous-category and TF-IDF baselines are exact by
    construction; a shift of labels against inputs would break both."""
    rng = np.random.default_rng(seed)
    words = {"Comforting": "sad", "Exploration": "confused", "Action": "stuck", "Others": "hello"}
    examples = []
    for label in LABELS:
        for _ in range(n_per_label * (2 if label == "Action" else 1)):
            filler = " ".join(rng.choice(["today", "really", "very", "so", "and", "I"], size=4))
            examples.append({"context": [
                {"speaker": "seeker", "text": f"{filler} hi", "category": None, "strategy": None},
                {"speaker": "supporter", "text": f"{filler} ok", "category": label, "strategy": None},
                {"speaker": "seeker", "text": f"{filler} {words[label]}", "category": None, "strategy": None}],
                "response": "x", "category": label})
    return examples


def test_baselines_on_a_fixture_with_known_answers():
    train, test = synthetic(40, seed=0), synthetic(5, seed=1)
    gold = [e["category"] for e in test]
    assert majority_label([e["category"] for e in train]) == "Action"
    assert classification_scores(gold, ["Action"] * len(test), LABELS)["accuracy"] == pytest.approx(2 / 5)
    assert previous_supporter_label(test, "category", "Action") == gold
    texts = lambda rows: [context_text(e["context"], 3, " | ") for e in rows]  # noqa: E731
    assert tfidf_logistic_regression(texts(train), [e["category"] for e in train], {"test": texts(test)},
                                     2, 1000, 0) == {"test": gold}
    no_supporter = [{"context": [{"speaker": "seeker", "text": "hi"}]}]
    assert previous_supporter_label(no_supporter, "category", "Others") == ["Others"]


def test_tfidf_baseline_reads_the_earlier_labels_when_the_model_does(make_cfg):
    """Seeker texts carry no signal here; the earlier supporter turn's label is the next label. With
    history_categories the baseline must see it (exact), without it it cannot (near chance)."""
    rng = np.random.default_rng(0)

    def examples(n):
        rows = []
        for i in range(n):
            label = LABELS[i % 4]
            words = " ".join(rng.choice(["today", "really", "very", "so", "and", "I", "feel", "it"], size=6))
            rows.append({"source": "esconv", "response": "x", "category": label, "context": [
                {"speaker": "supporter", "text": "I see.", "category": label},
                {"speaker": "seeker", "text": words, "category": None}]})
        return rows

    train, valid = examples(200), examples(40)
    gold = [e["category"] for e in valid]
    accuracy = {}
    for history in (True, False):
        cfg = make_cfg("train_classifier", f"history_categories={str(history).lower()}")
        predicted = train_classifier.baseline_predictions(cfg, train_classifier.settings_for(cfg), train,
                                                          {"valid": valid})["valid"]["tfidf_lr"]
        accuracy[history] = classification_scores(gold, predicted, LABELS)["accuracy"]
    assert accuracy[True] == 1.0 and accuracy[False] < 0.5


def test_bootstrap_systems_intervals_and_paired_test():
    rng = np.random.default_rng(1)
    gold = list(rng.choice(LABELS, size=400))
    noisy = [g if rng.random() < 0.6 else str(rng.choice(LABELS)) for g in gold]
    systems = {"model": list(gold), "same": list(gold), "noisy": noisy, "constant": ["Action"] * 400}
    out = bootstrap_systems(gold, systems, LABELS, "model", resamples=200, seed=0)
    for name, predicted in systems.items():  # the fast scoring path agrees with sklearn's
        exact = classification_scores(gold, predicted, LABELS)
        assert out["intervals"][name]["accuracy"]["value"] == pytest.approx(exact["accuracy"])
        assert out["intervals"][name]["macro_f1"]["value"] == pytest.approx(exact["macro_f1"])
        interval = out["intervals"][name]["accuracy"]
        assert interval["ci_low"] <= interval["value"] <= interval["ci_high"]
    paired = out["paired_vs_reference"]
    assert paired["same"]["accuracy"]["delta"] == 0 and paired["same"]["accuracy"]["p_value"] == 1.0
    assert paired["noisy"]["accuracy"]["delta"] > 0.2 and paired["noisy"]["accuracy"]["p_value"] < 0.01
    assert paired["noisy"]["accuracy"]["ci_low"] > 0


def test_calibration_of_a_calibrated_and_an_overconfident_softmax():
    rng = np.random.default_rng(2)
    n = 4000
    gold_ids = rng.integers(0, 4, n)
    # top probability 0.7 on a class that is right 70% of the time: calibrated top label
    predicted = np.where(rng.random(n) < 0.7, gold_ids, (gold_ids + rng.integers(1, 4, n)) % 4)
    probabilities = np.full((n, 4), 0.1)
    probabilities[np.arange(n), predicted] = 0.7
    gold = [LABELS[i] for i in gold_ids]
    calibrated = calibration(gold, probabilities, LABELS)
    assert calibrated["expected_calibration_error"] < 0.03
    assert calibrated["top_label"]["count"] == [n]
    sharpened = np.full((n, 4), 0.01)
    sharpened[np.arange(n), predicted] = 0.97
    overconfident = calibration(gold, sharpened, LABELS)
    assert overconfident["expected_calibration_error"] == pytest.approx(0.97 - calibrated["accuracy"], abs=1e-9)


def test_context_text_reads_the_last_turns_with_optional_categories():
    context = synthetic(1, 0)[0]["context"]
    assert context_text(context, 2, " | ").startswith("Supporter: ")
    assert context_text(context, 2, " | ", "category").startswith("Supporter (Comforting): ")
    assert context_text(context, 1, " | ") == f"Seeker: {context[-1]['text']}"


def test_tiny_classifier_end_to_end_and_its_api(make_cfg, prepared):
    result = pipeline.run("train_classifier", make_cfg("train_classifier", *TINY))
    out, m = result.run.path, result.metrics
    for split in ("valid", "test"):
        assert set(m[split]) == {"model", "majority", "previous_category", "tfidf_lr"}
        assert m[split]["model"]["n"] == m[split]["majority"]["n"] > 0
        assert set(m[split]["model"]["per_class"]) == set(LABELS)
    majority = max(m["train_label_counts"], key=m["train_label_counts"].get)
    gold_share = m["test"]["majority"]["per_class"][majority]["support"] / m["test"]["majority"]["n"]
    assert m["test"]["majority"]["accuracy"] == pytest.approx(gold_share)
    assert (out / "confusion_test.png").stat().st_size > 5000
    assert (out / "reliability_test.png").read_bytes().startswith(b"\x89PNG")
    calibration = m["test"]["model"]["calibration"]
    assert sum(calibration["top_label"]["count"]) == m["test"]["model"]["n"]
    assert calibration["accuracy"] == pytest.approx(m["test"]["model"]["accuracy"])
    significance = m["significance"]["test"]
    assert significance["intervals"]["model"]["accuracy"]["value"] == pytest.approx(m["test"]["model"]["accuracy"])
    assert set(significance["paired_vs_reference"]) == {"majority", "previous_category", "tfidf_lr"}
    assert len(m["epochs"]) == 1 and "valid_accuracy" in m["epochs"][0]
    history = json.loads((out / "log_history.json").read_text())
    assert [e["valid_macro_f1"] for e in history if "valid_macro_f1" in e] == [m["epochs"][0]["valid_macro_f1"]]
    assert history[-1]["train_loss"] > 0 and (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")

    loaded = api.load(out)
    assert loaded.labels == LABELS
    contexts = [[{"speaker": "seeker", "text": "I lost my job and I am scared"}],
                [{"speaker": "seeker", "text": "hi"}, {"speaker": "supporter", "text": "Hello, how are you?"},
                 {"speaker": "seeker", "text": "not great " * 200}]]  # longer than max_length: truncated left
    probabilities = loaded.predict_proba(contexts * 3, batch_size=4)
    assert probabilities.shape == (6, 4)
    assert np.allclose(probabilities.sum(axis=1), 1.0) and (probabilities >= 0).all()
    assert np.allclose(probabilities[0], probabilities[2])  # batching does not change an answer
    loaded.model.train()  # as during the Trainer's epoch-end validation: dropout must not reach predictions
    assert np.allclose(loaded.predict_proba(contexts * 3, batch_size=4), probabilities)
    assert loaded.model.training
    assert loaded.predict(contexts) == [LABELS[i] for i in probabilities[:2].argmax(axis=1)]
    encoded = loaded.tokenizer("")["input_ids"]
    assert encoded == [loaded.tokenizer.cls_token_id, loaded.tokenizer.sep_token_id]  # BERT-style inputs


def test_model_selection_reads_valid_only(make_cfg, prepared):
    result = pipeline.run("train_classifier", make_cfg("train_classifier", *TINY, "model_selection=true"))
    m = result.metrics
    assert "test" not in m and set(m["valid"]) == {"model"} and "significance" not in m
    assert not (result.run.path / "confusion_test.png").exists()
    with pytest.raises(MhsError, match="tfidf_baseline_by_task.next_category.category.C"):
        pipeline.run("train_classifier", make_cfg("train_classifier", *TINY,
                                                  "tfidf_baseline_by_task.next_category.category.C=0"))


def test_recogniser_accepts_empty_responses(make_cfg, prepared):
    result = pipeline.run("train_classifier", make_cfg("train_classifier", *TINY, "mode=response"))
    probabilities = api.load(result.run.path).predict_proba(["", "", "I hear you."], batch_size=2)
    assert probabilities.shape == (3, 4) and np.allclose(probabilities.sum(axis=1), 1.0)


def test_eight_way_strategy_mode(make_cfg, prepared):
    m = pipeline.run("train_classifier", make_cfg("train_classifier", *TINY, "dataset=esconv",
                                          "tag_set=strategy")).metrics
    assert len(m["labels"]) == 8 and "Providing Suggestions" in m["labels"]
    assert len(m["test"]["model"]["confusion"]["rows_gold_cols_predicted"]) == 8
    assert sum(c["support"] for c in m["test"]["model"]["per_class"].values()) == m["test"]["model"]["n"]


def test_response_recogniser_mode(make_cfg, prepared):
    result = pipeline.run("train_classifier", make_cfg("train_classifier", *TINY, "mode=response",
                                               "class_weighting=true"))
    assert set(result.metrics["test"]) == {"model", "majority", "tfidf_lr"}
    recogniser = api.load(result.run.path)
    assert recogniser.predict_proba(["Have you thought about talking to a counsellor?"]).shape == (1, 4)


def test_rerun_is_skipped_and_options_are_checked(make_cfg, prepared, capsys):
    cfg = make_cfg("train_classifier", *TINY)
    first = pipeline.run("train_classifier", cfg)
    assert pipeline.run("train_classifier", cfg).skipped
    raw, artifacts = prepared
    assert main(["train", "classifier", "--tag-set", "strategy", f"paths.raw_dir={raw}",
                 f"paths.artifacts_dir={artifacts}"]) == 2
    assert "needs dataset=esconv" in capsys.readouterr().err
    assert main(["train", "classifier", "--profile", "offline", f"paths.raw_dir={raw}",
                 f"paths.artifacts_dir={artifacts}", "paths.models_dir=/nowhere"]) == 2
    assert "mhs models fetch" in capsys.readouterr().err
    assert json.loads((first.run.path / "metrics.json").read_text())["mode"] == "next_category"


def test_previous_category_falls_back_to_the_commonest_opening_of_training_conversations():
    from mhsupport.settings.config import load_config

    cfg = load_config("train_classifier")
    settings = train_classifier.settings_for(cfg)
    opening = [{"speaker": "seeker", "text": "hello there"}]
    train = ([{"source": "esconv", "context": opening, "category": "Exploration", "response": "hi"}] * 30
             + [{"source": "epitome", "context": opening, "category": "Action", "response": "do x"}] * 50
             + [dict(e, source="esconv") for e in synthetic(10, seed=0)])
    test = [{"source": "esconv", "context": opening, "category": "Exploration", "response": "hi"}] + synthetic(1, 2)
    predictions = train_classifier.baseline_predictions(cfg, settings, train, {"test": test})["test"]
    assert predictions["majority"][0] == "Action"  # Reddit pairs make Action the overall majority
    assert predictions["previous_category"][0] == "Exploration"  # but conversations open with Exploration
    assert predictions["previous_category"][1:] == [e["category"] for e in test[1:]]
