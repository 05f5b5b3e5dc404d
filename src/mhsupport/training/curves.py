"""Training curves: which loggers the Trainer reports to (`runtime.report_to`), and the
`log_history.json` and `loss_curve.png` every training run keeps."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                         get_available_reporting_integrations)

from mhsupport.errors import MhsError

LOG_HISTORY = "log_history.json"
LOSS_CURVE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"
EXTRAS = ("tensorboard", "wandb")  # loggers that pyproject.toml's extras of the same names install


def report_to(value, key: str = "runtime.report_to") -> list[str]:
    """The Trainer's `report_to` for `runtime.report_to` (or `key`): auto (TensorBoard when it is
    installed, else nothing), none, or one or more logger names (a list or comma-separated)."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n) for n in value]
    names = [n for n in names if n]
    if names == ["auto"]:
        return ["tensorboard"] if "tensorboard" in get_available_reporting_integrations() else []
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise MhsError(f"{key}={value!r}: unknown logger {unknown[0]!r}; expected auto, none "
                       f"or some of {', '.join(INTEGRATION_TO_CALLBACK)}")
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        package = f"'mhsupport[{missing[0]}]'" if missing[0] in EXTRAS else missing[0]
        raise MhsError(f"{key}={value!r}: {missing[0]} is not installed; `pip install {package}` "
                       f"or set {key}=none")
    return names


def save(log_history: list[dict], run_dir: Path, title: str) -> None:
    """Write the Trainer's log history and a figure of its training loss and validation metrics."""
    (Path(run_dir) / LOG_HISTORY).write_text(json.dumps(log_history, indent=1) + "\n")
    plot(log_history, Path(run_dir) / LOSS_CURVE, title)


def plot(log_history: list[dict], path: Path, title: str) -> None:
    """Losses against optimizer steps (training loss as logged every `logging_steps`, validation
    loss at epoch ends); other validation metrics (accuracy, macro-F1) in a second panel.
    Perplexity (exp of the validation loss) and token counts are left out."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    valid = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("valid_") and key not in ("valid_ppl", "valid_tokens") and isinstance(value, (int, float)):
                valid.setdefault(key, []).append((entry["step"], value))
    valid_loss = valid.pop("valid_loss", [])
    # A short run may log no training loss (fewer steps than logging_steps): no empty panel then.
    panels = [name for name, shown in (("loss", train or valid_loss), ("metrics", valid)) if shown] or ["loss"]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for panel, ax in zip(panels, axes[0]):
        if panel == "loss":
            if train:
                ax.plot(*zip(*train), label="training loss", marker="." if len(train) < 3 else None)
            if valid_loss:
                ax.plot(*zip(*valid_loss), label="validation loss", marker="o")
            ax.set_ylabel("loss")
        else:
            for key, points in sorted(valid.items()):
                ax.plot(*zip(*points), label=key.removeprefix("valid_").replace("_", " "), marker="o")
            ax.set_ylabel("validation")
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
