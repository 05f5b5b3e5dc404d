"""The CLI's flags for the config keys users set most often: one table gives each flag's commands,
the config key it sets, its help (whose "{default}" is read from the config when help is shown, so
it cannot drift from it), how it becomes a Hydra override, and how a hint (`pipeline.command`)
writes the key back as the flag.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass

from omegaconf import DictConfig

from mhsupport.settings import options
from mhsupport.settings.config import default_choice, load_config

# The commands that take config flags, and the stage whose config each one composes.
STAGE_OF = {"prepare-data": "prepare_data", "train dialogpt": "train_generator",
            "train classifier": "train_classifier", "generate": "generate", "eval": "eval", "likelihood": "likelihood",
            "judge": "judge",
            "report": "report",
            "reproduce": "report", "chat": "chat", "screen": "screen", "clean": "clean", "models fetch": "models"}
GROUPS = ("profile",)  # config groups a flag chooses (not keys of the composed config)


@dataclass(frozen=True)
class Flag:
    name: str                # e.g. "--dataset"
    key: str                 # the config key it sets (dotted), or a config group in GROUPS
    helps: dict[str, str]    # command -> help text; "{default}" is the config's value
    kind: str = "value"      # value (--flag X) | switch (--flag / --no-flag) | const (--flag sets `const`)
    choices: tuple | None = None
    type: object = None
    const: object = None
    dest: str | None = None
    in_hints: bool = True    # False: hints keep the key as an override
    metavar: str | None = None

    @property
    def attribute(self) -> str:
        return self.dest or self.name.removeprefix("--").replace("-", "_")

    def override(self, value) -> str:
        """The Hydra override a parsed value stands for."""
        if self.kind == "switch":
            value = str(value).lower()
        return f"{self.key}={self.const if self.kind == 'const' else value}"

    def writes(self, value) -> bool:
        """Whether a hint can write this config value as this flag."""
        return self.kind != "const" or str(value).lower() == str(self.const)

    def hint(self, value) -> str:
        """The flag as a hint writes it for a config value."""
        if self.kind == "switch":
            return self.name if value else self.name.replace("--", "--no-", 1)
        return self.name if self.kind == "const" else f"{self.name} {shlex.quote(str(value))}"


def _seed_list(text: str) -> str:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    return "[" + ",".join(map(str, seeds)) + "]"


_MODEL_COMMANDS = ("train dialogpt", "train classifier", "generate", "eval", "likelihood", "chat")
_GENERATOR_COMMANDS = ("train dialogpt", "generate", "eval", "likelihood", "chat")
_TAG_FORMAT_HELP = ("how the tag reaches the generator: a special token opening the reply, the strategy in words "
                    "opening it, or an instruction before it (default: {default})")

# In the order their overrides are applied: a later flag wins over an earlier one for the same key.
FLAGS = (
    Flag("--raw-dir", "paths.raw_dir", {"prepare-data": "raw data root holding esconv/ and epitome/ (default: "
                                                        "$MHS_RAW_DIR, else data/raw)"}, in_hints=False),
    Flag("--profile", "profile", {command: "the models, their sizes and the eval budgets: " + ", ".join(options.profiles())
                                  + " or one of yours in a hydra.searchpath folder (default: {default})"
                                  for command in (*_MODEL_COMMANDS, "judge", "report", "reproduce")}, metavar="NAME"),
    Flag("--dataset", "dataset", {**{command: "training data (default: {default})"
                                     for command in ("train dialogpt", "train classifier")},
                                  **{command: "the generator's training data (default: {default})"
                                     for command in ("generate", "eval", "likelihood", "chat")}},
         choices=options.DATASETS),
    Flag("--tag-set", "tag_set", {command: "4 categories or the 8 ESConv strategies (esconv only) (default: {default})"
                                  for command in _MODEL_COMMANDS}, choices=options.TAG_SETS),
    Flag("--strategy-tag", "strategy_tag", {
        "train dialogpt": "train with a strategy tag before each response (default: {default})",
        "generate": "the tagged generator (the only kind with tags to generate under) (default: {default})",
        "eval": "evaluate the tagged generator (default: {default})",
        "likelihood": "score the tagged generator (default: {default})",
        "chat": "talk to the tagged generator (default: {default})"}, kind="switch"),
    Flag("--tag-format", "generator.tag_format", {command: _TAG_FORMAT_HELP for command in _GENERATOR_COMMANDS},
         choices=options.TAG_FORMATS),
    Flag("--mode", "mode", {"train classifier": "predict the next supporter category, or recognise a response's "
                                                "category (default: {default})"}, choices=options.MODES),
    Flag("--context-turns", "context_turns", {"train classifier": "how many recent context turns to read "
                                                                  "(default: {default})"}, type=int, metavar="K"),
    Flag("--history-categories", "history_categories", {
        "train classifier": "give the classifier the categories of earlier supporter turns (default: {default})"},
         kind="switch"),
    Flag("--class-weighting", "class_weighting", {
        "train classifier": "inverse-frequency class weights in the loss (default: {default})"}, kind="switch"),
    Flag("--sampler", "sampler", {"eval": "how the tag is chosen (default: {default})"}, choices=options.SAMPLERS),
    Flag("--sampler", "sampler", {"chat": "how each reply's category is chosen (default: {default}: classifier for "
                                          "a tagged generator, none otherwise)"},
         choices=tuple(s for s in options.SAMPLERS if s != "oracle")),  # a live chat has no gold labels
    Flag("--base", "generator_source", {"eval": "evaluate the model without fine-tuning (Table 2's 'pretrained' row)",
                                        "likelihood": "score the model without fine-tuning"},
         kind="const", const="base"),
    Flag("--generator", "generator_source", {
        "eval": "finetuned, base (= --base) or llm (prompting a chat model, no fine-tuning) (default: {default})"},
         choices=options.GENERATOR_SOURCES),
    Flag("--prompt", "llm.prompt", {"eval": "with --generator llm: the prompt (strategy: the classifier's category) "
                                            "(default: {default})"}, choices=options.PROMPTS),
    Flag("--table", "judge.table", {"judge": "judge one of the paper's human-evaluation tables on this profile's "
                                             "eval runs"}, choices=options.JUDGE_TABLES),
    Flag("--known-pairs", "judge.known_pairs", {"judge": "judge only the known pairs (the validity check every run "
                                                         "makes), e.g. with judge.validity.split=valid to tune prompts"},
         kind="const", const="true"),
    Flag("--backend", "judge.backend", {"judge": "openai (any OpenAI-compatible server: vLLM, llama.cpp, Ollama, "
                                                 "hosted) or local (a transformers chat model, scored) "
                                                 "(default: {default})"},
         choices=options.JUDGE_BACKENDS[1:]),
    Flag("--model", "judge.model", {"judge": "openai: the model name the server serves; local: a model folder, Hub "
                                             "id or .gguf file (default: the offline Qwen2.5-Coder-1.5B-Instruct of "
                                             "`mhs models fetch judge=true`)"}),
    Flag("--base-url", "endpoint.base_url", {"judge": "the server's OpenAI-compatible base URL (default: {default})"}),
    Flag("--examples", "judge.examples", {"judge": "examples judged per pair, a seeded subset (default: {default})"},
         type=int),
    Flag("--seeds", "seeds", {command: "training seeds, e.g. 1,2,3: every system is trained and evaluated once per "
                                       "seed; tables give mean and sd, paired tests pool the seeds (default: one "
                                       "run, of the config's `seed`)" for command in ("report", "reproduce")},
         type=_seed_list, in_hints=False),
    Flag("--role", "role", {"screen": "seeker: risk of suicide or self-harm in seeker messages; supporter: harmful "
                                      "replies (default: {default})"}, metavar="ROLE"),
    Flag("--force", "force", {command: "rebuild even if an up-to-date run exists" for command in STAGE_OF
                              if command != "screen"},  # mhs screen builds no run
         kind="const", const="true", in_hints=False),
)


def flags_of(command: str) -> list[Flag]:
    return [flag for flag in FLAGS if command in flag.helps]


def default_text(stage: str, key: str) -> str:
    """A key's value in the stage's default config (or a group's default choice), as help shows it."""
    if key in GROUPS:
        return default_choice(stage, key)
    value = load_config(stage)
    for part in key.split("."):
        value = value[part]
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def config_keys(stage: str) -> str:
    """The stage config's top-level keys, a node's as `key.*`, as help lists them."""
    cfg = load_config(stage)
    return ", ".join(f"{key}.*" if isinstance(cfg[key], DictConfig) else key for key in cfg)


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The command's flags; each action keeps a `config_default` that help calls for "{default}"."""
    stage = STAGE_OF[command]
    for flag in flags_of(command):
        kwargs = {"help": flag.helps[command], "dest": flag.attribute}
        if flag.kind == "switch":
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif flag.kind == "const":
            kwargs.update(action="store_true")
        else:
            for name in ("choices", "type", "metavar"):
                if getattr(flag, name) is not None:
                    kwargs[name] = getattr(flag, name)
        action = parser.add_argument(flag.name, **kwargs)
        action.config_default = lambda key=flag.key: default_text(stage, key)


def overrides(args: argparse.Namespace, command: str) -> list[str]:
    """The Hydra overrides the given flags stand for, in table order."""
    out = []
    for flag in flags_of(command):
        value = getattr(args, flag.attribute, None)
        if flag.kind == "const" and value:
            out.append(flag.override(value))
        elif flag.kind != "const" and value is not None:
            out.append(flag.override(value))
    return out


def hint_flags(command: str) -> dict[str, list[Flag]]:
    """Config key -> the flags a hint may write it as (value and switch flags first)."""
    out: dict[str, list[Flag]] = {}
    for flag in sorted(flags_of(command), key=lambda f: f.kind == "const"):
        if flag.in_hints and flag.key not in GROUPS:
            out.setdefault(flag.key, []).append(flag)
    return out


class HelpFormatter(argparse.HelpFormatter):
    """Fills "{default}" in a flag's help from the config when help is shown (not when parsing: a
    config compose per flag would slow every command down)."""

    def _expand_help(self, action):
        text = super()._expand_help(action)
        default = getattr(action, "config_default", None)
        return text.replace("{default}", default()) if default and "{default}" in text else text
