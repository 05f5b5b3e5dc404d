"""Blinded pairwise human evaluation (the paper's Tables 3, 5, 6): export a study of two eval
runs as a self-contained HTML page plus a separate key, then un-blind and score raters' answers."""

from __future__ import annotations

import hashlib
import html
import json
import random
from pathlib import Path

import numpy as np
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

from mhsupport.errors import MhsError
from mhsupport.evaluation.generations_io import read_generations
from mhsupport.evaluation.statistics import binomial_p

CHOICES = ("A", "B", "tie")


def export(run_a: Path, run_b: Path, n: int, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """The same n test contexts from both runs, the two responses in random order per item."""
    a_lines, b_lines = read_generations(run_a), read_generations(run_b)
    b_by_key = {(l["conversation_id"], l["turn_index"]): l for l in b_lines}
    common = [l for l in a_lines if (l["conversation_id"], l["turn_index"]) in b_by_key]
    if len(common) < n:
        raise MhsError(f"only {len(common)} test examples are in both runs; asked for --n {n}")
    rng = random.Random(seed)
    chosen = rng.sample(common, n)
    names = {"a": _system_name(run_a), "b": _system_name(run_b)}
    study_id = hashlib.sha256(f"{run_a}|{run_b}|{n}|{seed}".encode()).hexdigest()[:12]
    items, key = [], {}
    for index, a in enumerate(chosen):
        b = b_by_key[(a["conversation_id"], a["turn_index"])]
        item_id = f"item-{index + 1:03d}"
        a_first = rng.random() < 0.5
        shown = (a, b) if a_first else (b, a)
        key[item_id] = {"A": "a" if a_first else "b", "B": "b" if a_first else "a",
                        "conversation_id": a["conversation_id"], "turn_index": a["turn_index"]}
        items.append({"id": item_id, "context": [{"speaker": t["speaker"], "text": t["text"]} for t in a["context"]],
                      "A": shown[0]["response"], "B": shown[1]["response"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    study = out_dir / "study.html"
    key_path = out_dir / "key.json"
    study.write_text(study_html(study_id, items))
    key_path.write_text(json.dumps({"study_id": study_id, "run_a": str(run_a), "run_b": str(run_b),
                                    "system_a": names["a"], "system_b": names["b"], "items": key}, indent=2) + "\n")
    return study, key_path


def _system_name(run_dir: Path) -> str:
    metrics = Path(run_dir) / "metrics.json"
    if not metrics.is_file():
        return str(run_dir)
    try:
        return json.loads(metrics.read_text())["system"]
    except (ValueError, KeyError, TypeError):
        raise MhsError(f"{metrics}: not the metrics of an `mhs eval` run (expected a JSON object with 'system'); "
                       "rebuild the run with its `mhs eval` command and --force") from None


def score(key_path: Path, answer_paths: list[Path]) -> dict:
    """Un-blinded wins/losses/ties of system B against system A, per rater and pooled, with a
    two-sided sign test (ties left out) and Fleiss' kappa between raters. Each rater counts
    once: a file given twice, or two files with the same rater id, is refused."""
    key, per_rater = rater_outcomes(key_path, answer_paths)
    outcomes_by_item = {}
    for outcomes in per_rater.values():
        for item_id, outcome in outcomes.items():
            outcomes_by_item.setdefault(item_id, []).append(outcome)
    pooled = _tally([o for values in outcomes_by_item.values() for o in values])
    return {"system_a": key["system_a"], "system_b": key["system_b"], "pooled": pooled,
            "raters": {rater: _tally(list(outcomes.values())) for rater, outcomes in per_rater.items()},
            "fleiss_kappa": _agreement(outcomes_by_item, len(per_rater))}


def rater_outcomes(key_path: Path, answer_paths: list[Path]) -> tuple[dict, dict[str, dict[str, str]]]:
    """The study's key and each rater's un-blinded answers: rater -> item id -> "a", "b" or "tie"
    (the key's system a or b, whichever side it was shown on). Each rater counts once."""
    key = read_key(Path(key_path))
    per_rater, seen_files, seen_raters = {}, {}, {}
    for path in map(Path, answer_paths):
        if path.resolve() in seen_files:
            raise MhsError(f"{path} is given twice (each rater counts once): drop the repeat")
        answers = _read_answers(path, key)
        rater = " ".join(answers["rater"].split()).casefold()
        if rater in seen_raters:
            raise MhsError(f"{path}: rater {answers['rater']!r} already answered in {seen_raters[rater]} (each rater "
                           "counts once): drop one file, or give each rater their own id")
        seen_files[path.resolve()], seen_raters[rater] = path, path
        per_rater[answers["rater"]] = {item_id: "tie" if choice == "tie" else key["items"][item_id][choice]
                                       for item_id, choice in answers["answers"].items()}
    return key, per_rater


def _read_json(path: Path, what: str):
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MhsError(f"{path}: cannot read {what} ({err.strerror})") from None
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise MhsError(f"{path}: byte {err.start} is not UTF-8 (expected {what}, a JSON file)") from None
    except json.JSONDecodeError as err:
        raise MhsError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}; expected {what})") from None


KEY_EXPECTED = "the key.json that `mhs human-eval export` writes"
ANSWERS_EXPECTED = "the answers file the study page saves: {\"study_id\", \"rater\", \"answers\"}"


def read_key(path: Path) -> dict:
    key = _read_json(path, KEY_EXPECTED)
    if not isinstance(key, dict):
        raise MhsError(f"{path}: a JSON {_json_type(key)}, expected {KEY_EXPECTED}")
    for field in ("study_id", "system_a", "system_b", "items"):
        if field not in key:
            raise MhsError(f"{path}: missing field '{field}' (expected {KEY_EXPECTED})")
    if not isinstance(key["items"], dict) or not all(
            isinstance(v, dict) and v.get("A") in ("a", "b") and v.get("B") in ("a", "b") for v in key["items"].values()):
        raise MhsError(f"{path}, field 'items': expected item id -> {{\"A\": \"a\"|\"b\", \"B\": ...}} "
                       f"(expected {KEY_EXPECTED})")
    return key


def _read_answers(path: Path, key: dict) -> dict:
    answers = _read_json(path, ANSWERS_EXPECTED)
    if not isinstance(answers, dict):
        raise MhsError(f"{path}: a JSON {_json_type(answers)}, expected {ANSWERS_EXPECTED}")
    for field in ("study_id", "rater", "answers"):
        if field not in answers:
            raise MhsError(f"{path}: missing field '{field}' (expected {ANSWERS_EXPECTED})")
    if answers["study_id"] != key["study_id"]:
        raise MhsError(f"{path}: answers to study {answers['study_id']}, but the key is for study {key['study_id']}")
    if not isinstance(answers["rater"], str) or not answers["rater"].strip():
        raise MhsError(f"{path}, field 'rater': {answers['rater']!r} (expected the rater's name or id)")
    if not isinstance(answers["answers"], dict) or not answers["answers"]:
        raise MhsError(f"{path}, field 'answers': {_json_type(answers['answers'])} {answers['answers']!r:.40} "
                       f"(expected item id -> A, B or tie for at least one of the {len(key['items'])} items)")
    for item_id, choice in answers["answers"].items():
        if item_id not in key["items"]:
            raise MhsError(f"{path}, field 'answers.{item_id}': no such item in the key")
        if choice not in CHOICES:
            raise MhsError(f"{path}, field 'answers.{item_id}': {choice!r} (expected one of {list(CHOICES)})")
    return answers


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _tally(outcomes: list[str]) -> dict:
    wins, losses, ties = outcomes.count("b"), outcomes.count("a"), outcomes.count("tie")
    total = len(outcomes)
    decided = wins + losses
    p = binomial_p(wins, decided) if decided else 1.0
    return {"n": total, "win": wins, "lose": losses, "tie": ties,
            "win_pct": 100 * wins / total if total else 0.0, "lose_pct": 100 * losses / total if total else 0.0,
            "tie_pct": 100 * ties / total if total else 0.0, "sign_test_p": float(p)}


def _agreement(outcomes_by_item: dict, raters: int) -> float | None:
    """Fleiss' kappa over the items every rater answered (None with fewer than two raters)."""
    complete = [values for values in outcomes_by_item.values() if len(values) == raters]
    if raters < 2 or not complete:
        return None
    codes = {"a": 0, "b": 1, "tie": 2}
    table, _ = aggregate_raters(np.array([[codes[o] for o in values] for values in complete]), n_cat=3)
    kappa = fleiss_kappa(table, method="fleiss")
    return None if np.isnan(kappa) else float(kappa)


def score_markdown(result: dict) -> str:
    """In the layout of the paper's Tables 3/5/6: system B's win / lose / tie against system A."""
    lines = [f"| {result['system_b']} vs {result['system_a']} | Win | Lose | Tie | n | sign test p |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    rows = [("all raters", result["pooled"])] + list(result["raters"].items())
    for name, t in rows:
        lines.append(f"| {name} | {t['win_pct']:.1f}% | {t['lose_pct']:.1f}% | {t['tie_pct']:.1f}% | {t['n']} "
                     f"| {t['sign_test_p']:.4f} |")
    kappa = result["fleiss_kappa"]
    lines += ["", f"Agreement between raters (Fleiss' kappa): {'n/a (one rater)' if kappa is None else f'{kappa:.3f}'}"]
    return "\n".join(lines) + "\n"


def study_html(study_id: str, items: list[dict]) -> str:
    data = json.dumps({"study_id": study_id, "items": items}).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Supporter responses: pairwise study {html.escape(study_id)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }}
.item {{ border: 1px solid #ccc; border-radius: 8px; padding: 1rem; margin: 1rem 0; }}
.turn {{ margin: .2rem 0; }} .seeker {{ color: #1f4e79; }} .supporter {{ color: #555; }}
.responses {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin-top: .8rem; }}
.response {{ background: #f6f6f6; border-radius: 6px; padding: .6rem; }}
.choices label {{ margin-right: 1.2rem; }} #status {{ font-weight: bold; }}
</style></head><body>
<h1>Which supporter response is better?</h1>
<p>For each conversation, read the context and the two candidate replies of the supporter, then
choose the better reply (more empathetic, more helpful, more appropriate), or "tie". The texts are
real support conversations and may mention distressing topics. Save your answers when done.</p>
<p><label>Your name or rater id: <input id="rater" autocomplete="off"></label></p>
<div id="items"></div>
<p><button id="save">Save answers</button> <span id="status"></span></p>
<script id="study-data" type="application/json">{data}</script>
<script>
const study = JSON.parse(document.getElementById("study-data").textContent);
const root = document.getElementById("items");
function el(tag, cls, text) {{ const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }}
study.items.forEach((item, i) => {{
  const box = el("div", "item"); box.id = item.id;
  box.appendChild(el("h3", "", `Conversation ${{i + 1}} of ${{study.items.length}}`));
  item.context.forEach(t => box.appendChild(el("p", "turn " + t.speaker, (t.speaker === "seeker" ? "Seeker: " : "Supporter: ") + t.text)));
  const grid = el("div", "responses");
  ["A", "B"].forEach(side => {{ const r = el("div", "response"); r.appendChild(el("strong", "", "Reply " + side + ": ")); r.appendChild(el("span", "", item[side])); grid.appendChild(r); }});
  box.appendChild(grid);
  const choices = el("p", "choices");
  [["A", "Reply A is better"], ["B", "Reply B is better"], ["tie", "Tie"]].forEach(([value, text]) => {{
    const label = el("label"); const input = el("input"); input.type = "radio"; input.name = item.id; input.value = value;
    label.appendChild(input); label.appendChild(document.createTextNode(" " + text)); choices.appendChild(label);
  }});
  box.appendChild(choices); root.appendChild(box);
}});
document.getElementById("save").addEventListener("click", () => {{
  const rater = document.getElementById("rater").value.trim();
  const status = document.getElementById("status");
  if (!rater) {{ status.textContent = "Please enter your name or rater id first."; return; }}
  const answers = {{}};
  study.items.forEach(item => {{ const c = document.querySelector(`input[name="${{item.id}}"]:checked`); if (c) answers[item.id] = c.value; }});
  const blob = new Blob([JSON.stringify({{study_id: study.study_id, rater: rater, answers: answers}}, null, 2)], {{type: "application/json"}});
  const link = document.createElement("a"); link.href = URL.createObjectURL(blob);
  link.download = `answers-${{study.study_id}}-${{rater.replace(/[^A-Za-z0-9_-]/g, "_")}}.json`;
  document.body.appendChild(link); link.click(); link.remove();
  status.textContent = `Saved ${{Object.keys(answers).length}} of ${{study.items.length}} answers.`;
}});
</script></body></html>
"""
