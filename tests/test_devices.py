"""The device rule (runtime.device, runtime.bf16) and where every loader puts its model.

This machine has no GPU, so two stand-ins are used, each for what it can show honestly:
- torch's `meta` device is real and is not the default placement, so a loader that ignores the
  rule leaves its model on the CPU and fails; nothing can run forward on it, so the input paths are
  checked by recording what reaches the model and stopping there;
- `runtime.bf16` set against the rule's choice for this CPU (bf16 where it has bf16 instructions,
  fp32 elsewhere) is a placement that differs from the default and still runs, so a whole eval can
  show that every model it loads follows the rule and that the manifest says so.
CUDA itself is faked only where no tensor is made (the rule's choice of index).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, write_raw_slice
from mhsupport import pipeline
from mhsupport.runs import artifacts
from mhsupport.modeling import classifier as classifier_api, devices, loading
from mhsupport.training import loop, validation
from mhsupport.settings.config import classifier_config, eval_config, generation_config, generator_config, load_config
from mhsupport.errors import MhsError
from mhsupport.modeling.decoding import generate
from mhsupport.modeling.formatting import build_formatter
from mhsupport.stages import train_classifier

META = devices.Placement(torch.device("meta"), torch.bfloat16)
GEN = ["generator=tiny", "generator.train_subset=48", "generator.valid_subset=8"]
CLF = ["classifier=tiny", "classifier.train_subset=120"]
TEXTS = ["I feel so alone since I moved", "Have you tried talking to your family about it?"] * 20


def runtime(**values):
    return OmegaConf.create({"device": "auto", "bf16": "auto", **values})


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'available' with a given number of devices, for the rule's choice alone."""
    def make(count: int, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return make


@pytest.fixture
def cpu_flags(tmp_path, monkeypatch):
    """A /proc/cpuinfo with these flags."""
    def make(*flags: str):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse {' '.join(flags)}\n")
        monkeypatch.setattr(devices, "CPUINFO", cpuinfo)
    return make


# --- the rule -----------------------------------------------------------------------------

def test_auto_is_the_cpu_without_cuda_and_cuda_0_with_it(fake_cuda, cpu_flags, monkeypatch):
    cpu_flags("avx2", "avx512f")  # no bf16 instructions
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve(runtime()) == torch.device("cpu")
    assert devices.inference(runtime()).dtype == torch.float32
    assert devices.resolve(None) == torch.device("cpu")
    fake_cuda(2)
    assert devices.resolve(runtime()) == torch.device("cuda", 0)
    assert devices.inference(runtime()) == devices.Placement(torch.device("cuda", 0), torch.bfloat16)
    assert devices.training(runtime()).dtype == torch.float32  # the Trainer autocasts; weights stay fp32
    assert devices.resolve(runtime(device="cpu")) == torch.device("cpu")
    assert devices.inference(runtime(device="cpu")).dtype == torch.float32
    assert devices.resolve(runtime(device="cuda:1")) == torch.device("cuda", 1)
    assert devices.inference(runtime(bf16=False)).dtype == torch.float32
    fake_cuda(1, bf16=False)  # a GPU without bf16 (before Ampere): fp32
    assert devices.inference(runtime()).dtype == torch.float32


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bf16_on_a_cpu_with_bf16_instructions(cpu_flags, monkeypatch, flag):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_flags("avx2", "avx512f", flag)
    cpu = torch.device("cpu")
    assert devices.cpu_supports_bf16() and devices.uses_bf16(cpu, runtime())
    assert devices.inference(runtime()) == devices.Placement(cpu, torch.bfloat16)
    assert devices.training(runtime()).dtype == torch.float32  # weights stay fp32; the Trainer autocasts
    assert devices.inference(runtime(bf16=False)).dtype == torch.float32
    assert devices.describe(runtime(), {})["cpu"]["flags"] == ["avx2", "avx512f", flag]
    cpu_flags("avx2", "avx512f", "amx_tile", "amx_int8")  # matrix tiles without bf16: fp32
    assert not devices.uses_bf16(cpu, runtime()) and devices.inference(runtime()).dtype == torch.float32
    assert devices.inference(runtime(bf16=True)).dtype == torch.bfloat16


def test_torchrun_local_rank_picks_each_process_gpu(fake_cuda, monkeypatch):
    fake_cuda(4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert devices.resolve(runtime()) == torch.device("cuda", 3)
    assert devices.resolve(runtime(device="cuda")) == torch.device("cuda", 3)
    assert devices.resolve(runtime(device="cpu")) == torch.device("cpu")
    devices.check_training_device(torch.device("cuda", 3))
    with pytest.raises(MhsError, match="CUDA_VISIBLE_DEVICES=1"):
        devices.check_training_device(torch.device("cuda", 1))
    fake_cuda(2)
    with pytest.raises(MhsError, match="needs CUDA device 3, but 2 are visible"):
        devices.resolve(runtime())


@pytest.mark.parametrize("values, message", [
    ({"device": "gpu"}, "expected auto, cpu, cuda or cuda:N"),
    ({"device": "cuda"}, "needs CUDA device 0, but 0 are visible"),
    ({"device": "cuda:1"}, "needs CUDA device 1, but 0 are visible"),
    ({"bf16": "yes"}, "runtime.bf16='yes': expected auto, true or false"),
])
def test_bad_device_settings_are_one_line_errors(values, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(MhsError, match=message):
        devices.inference(runtime(**values))


def test_runtime_device_cpu_keeps_the_trainer_off_a_gpu(fake_cuda, cpu_flags, tmp_path, monkeypatch):
    cpu_flags("avx2")
    fake_cuda(1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = load_config("train_generator", ["generator=tiny", "runtime.device=cpu"])
    args = loop.training_arguments(tmp_path, cfg.generator, cfg.runtime, 0, 10)
    assert args.use_cpu and not args.bf16 and args.device == torch.device("cpu")


def test_cpu_flags_come_from_proc_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 amx_bf16 avx512f "
                       "amx_tile\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)
    described = devices.cpu_description()
    assert described["name"] == "Test CPU 9000"
    assert described["flags"] == ["avx2", "avx512f", "amx_tile", "amx_bf16"]


def test_the_device_stays_out_of_run_ids_the_precision_goes_in_and_both_reach_the_stages_reproduce_runs():
    cpu = load_config("report", ["generator=tiny", "classifier=tiny", "runtime.device=cpu", "runtime.bf16=false"])
    cuda = load_config("report", ["generator=tiny", "classifier=tiny", "runtime.device=cuda:1"])
    assert artifacts.result_config(cpu) != artifacts.result_config(cuda)  # bf16=false vs auto
    cuda.runtime.bf16 = False
    assert artifacts.result_config(cpu) == artifacts.result_config(cuda)
    for stage in ("train_generator", "train_classifier", "eval", "likelihood"):
        fp32, auto = (load_config(stage, [f"runtime.bf16={value}"]) for value in ("false", "auto"))
        assert artifacts.plan_run(stage, fp32, {}).run_id != artifacts.plan_run(stage, auto, {}).run_id
    values = {"dataset": "unified", "strategy_tag": True}
    trained = generator_config(eval_config(cpu, values))
    assert (trained.runtime.device, trained.runtime.bf16) == ("cpu", False)
    assert classifier_config(eval_config(cuda, values), "response").runtime.device == "cuda:1"


def test_decoding_batch_size_is_sized_per_profile():
    sizes = {p: load_config("eval", [f"generator={p}"]).decoding.batch_size for p in ("tiny", "cpu", "offline", "paper")}
    assert sizes == {"tiny": 16, "cpu": 64, "offline": 64, "paper": 64}
    assert load_config("eval", ["generator=paper", "decoding.batch_size=8"]).decoding.batch_size == 8


# --- every loader places its model by the rule ---------------------------------------------

def on(model) -> tuple[str, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device.type, parameter.dtype


def test_every_loader_places_its_model_where_the_rule_says(tmp_path, monkeypatch):
    tiny_generator = load_config("train_generator", ["generator=tiny"]).generator
    tiny_classifier = load_config("train_classifier", ["classifier=tiny"]).classifier
    model, tokenizer = loading.load_causal_lm(tiny_generator, META, train_texts=TEXTS)
    assert on(model) == ("meta", torch.bfloat16)
    model, _ = loading.load_sequence_classifier(tiny_classifier, 4, META, train_texts=TEXTS)
    assert on(model) == ("meta", torch.bfloat16)

    cpu_model, tokenizer = loading.load_causal_lm(tiny_generator, devices.training(runtime(device="cpu")),
                                                 train_texts=TEXTS)
    assert on(cpu_model) == ("cpu", torch.float32)
    cpu_model.save_pretrained(tmp_path / "generator")
    tokenizer.save_pretrained(tmp_path / "generator")
    model, _ = loading.load_saved_causal_lm(tmp_path / "generator", META)
    assert on(model) == ("meta", torch.bfloat16)

    settings = train_classifier.settings_for(load_config("train_classifier", ["classifier=tiny"]))
    cpu_classifier, classifier_tokenizer = loading.load_sequence_classifier(tiny_classifier, 4, devices.training(None),
                                                                           train_texts=TEXTS)
    classifier_api.Classifier(cpu_classifier, classifier_tokenizer, settings).save(tmp_path / "classifier")
    monkeypatch.setattr(devices, "resolve", lambda runtime: torch.device("meta"))
    assert on(classifier_api.load(tmp_path / "classifier", runtime(bf16=True)).model) == ("meta", torch.bfloat16)
    assert on(classifier_api.load(tmp_path / "classifier").model) == ("meta", torch.float32)


class ReachedModel(Exception):
    """Raised where a model is called, once the devices of its inputs are recorded."""


def record_inputs(seen: list):
    def hook(module, args, kwargs):
        seen.extend(value.device.type for value in [*args, *kwargs.values()] if torch.is_tensor(value))
        raise ReachedModel
    return hook


def test_generation_nll_and_classifier_inputs_follow_the_model(tmp_path):
    tiny_generator = load_config("train_generator", ["generator=tiny"])
    model, tokenizer = loading.load_causal_lm(tiny_generator.generator, META, train_texts=TEXTS)
    formatter = build_formatter(tiny_generator, tokenizer)
    context = [{"speaker": "seeker", "text": "I lost my job"}]

    seen = []
    model.register_forward_pre_hook(record_inputs(seen), with_kwargs=True)
    with pytest.raises(ReachedModel):  # one prompt: all but its last token is encoded first, as a shared prefix
        generate(model, tokenizer, formatter, [context], [None], progress=False)
    assert seen == ["meta"]  # input ids
    seen.clear()
    with pytest.raises(ReachedModel):  # prompts with nothing in common go straight to the batch
        generate(model, tokenizer, formatter, [context, [{"speaker": "seeker", "text": "Hello"}]], [None, None],
                 progress=False)
    assert len(seen) == 3 and set(seen) == {"meta"}  # input ids, attention mask, positions

    seen.clear()
    features = [formatter.training_features({"context": context, "response": "That is hard.", "category": "Comforting"})]
    with pytest.raises(ReachedModel):
        validation.per_example_nll(model, features, 4)
    assert seen and set(seen) == {"meta"}

    settings = train_classifier.settings_for(load_config("train_classifier", ["classifier=tiny"]))
    classifier_model, classifier_tokenizer = loading.load_sequence_classifier(
        load_config("train_classifier", ["classifier=tiny"]).classifier, 4, META, train_texts=TEXTS)
    seen = []
    classifier_model.register_forward_pre_hook(record_inputs(seen), with_kwargs=True)
    with pytest.raises(ReachedModel):
        classifier_api.Classifier(classifier_model, classifier_tokenizer, settings).predict([[{"speaker": "seeker",
                                                                                           "text": "hello"}]])
    assert seen and set(seen) == {"meta"}


# --- manifests ------------------------------------------------------------------------------

def test_manifests_record_where_each_stage_ran_its_models(make_cfg, prepared):
    pipeline.run("train_generator", make_cfg("train_generator", *GEN, "strategy_tag=true", "runtime.device=cpu"))
    for mode in ("next_category", "response"):
        pipeline.run("train_classifier", make_cfg("train_classifier", *CLF, f"mode={mode}"))
    trained = json.loads((pipeline.Pipeline().plan("train_generator", make_cfg("train_generator", *GEN, "strategy_tag=true"))
                          .path / "manifest.json").read_text())["device"]
    bf16_cpu = devices.cpu_supports_bf16()  # this machine's: auto autocasts to bf16 where the CPU has it
    assert trained["requested"] == "cpu" and trained["autocast"] == ("bf16" if bf16_cpu else None)
    assert trained["cuda"] is None and trained["models"] == {"generator": {"device": "cpu", "dtype": "float32"}}
    assert "flags" in trained["cpu"] and trained["cpu"]["logical_cores"] >= 1

    # bf16 against the rule's choice for this CPU (so this runs on any CPU): every model eval loads must follow it.
    # The setting is part of run ids, so the eval needs upstream runs made with it too.
    dtype = "float32" if bf16_cpu else "bfloat16"
    flipped = f"runtime.bf16={not bf16_cpu}"
    pipeline.run("train_generator", make_cfg("train_generator", *GEN, "strategy_tag=true", flipped))
    for mode in ("next_category", "response"):
        pipeline.run("train_classifier", make_cfg("train_classifier", *CLF, f"mode={mode}", flipped))
    result = pipeline.Pipeline().ensure("eval", make_cfg("eval", *GEN, *CLF, "strategy_tag=true", "sampler=classifier",
                                       "test_subset=6", "decoding.max_new_tokens=4", "bootstrap.resamples=10",
                                       flipped, "runtime.progress=false"))
    recorded = json.loads((result.run.path / "manifest.json").read_text())["device"]
    assert recorded["bf16"] is (not bf16_cpu)
    # the tagged eval chooses its replies from the generation pass, which loaded the generator and recogniser
    assert recorded["models"] == {"classifier": {"device": "cpu", "dtype": dtype}}
    passed = pipeline.Pipeline().plan("generate", generation_config(result.run.cfg))
    recorded = json.loads((passed.path / "manifest.json").read_text())["device"]
    assert recorded["models"] == {name: {"device": "cpu", "dtype": dtype} for name in ("generator", "recogniser")}


# --- the GPU check, in its CPU quick mode ----------------------------------------------------

def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_flags_a_model_off_the_rules_device(tmp_path):
    gpu_check = load_gpu_check()
    cpu_fp32 = devices.Placement(torch.device("cpu"), torch.float32)

    def manifest(stage, run, models_):
        (tmp_path / stage / run).mkdir(parents=True)
        record = {} if models_ is None else {"device": {"models": models_}}
        (tmp_path / stage / run / "manifest.json").write_text(json.dumps(record))

    manifest("train_generator", "g", {"generator": {"device": "cpu", "dtype": "float32"}})
    manifest("train_classifier", "c", {"classifier": {"device": "cpu", "dtype": "float32"}})
    manifest("likelihood", "l", {"generator": {"device": "cpu", "dtype": "float32"}})
    manifest("generate", "p", {"generator": {"device": "cpu", "dtype": "float32"}})
    manifest("eval", "e1", {"generator": {"device": "cpu", "dtype": "float32"}})
    manifest("eval", "e0", {})  # chose among a generation pass's replies: loaded nothing
    assert gpu_check.model_placements(tmp_path, cpu_fp32)["ok"]
    manifest("eval", "e2", {"generator": {"device": "cpu", "dtype": "float32"},
                            "recogniser": {"device": "cuda:0", "dtype": "float32"}})
    checked = gpu_check.model_placements(tmp_path, cpu_fp32)
    assert not checked["ok"] and [m["model"] for m in checked["misplaced"]] == ["recogniser"]
    assert not gpu_check.model_placements(tmp_path, devices.Placement(torch.device("cpu"), torch.bfloat16))["ok"]
    manifest("eval", "e3", None)  # a run that did not record its models
    assert gpu_check.model_placements(tmp_path, cpu_fp32)["unrecorded"] == ["eval/e3: no device record"]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_in_quick_mode(real_raw_dir, tmp_path):
    raw = write_raw_slice(real_raw_dir, tmp_path / "raw")
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--raw-dir", str(raw), "--models-dir", str(tmp_path / "no-models"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["card"]["name"].startswith("CPU") and result["quick"]
    chain = result["chain"]
    assert chain["ok"] and chain["expected_device"] == "cpu" and not chain["misplaced"]
    # 4 generators, 2 classifiers, 5 likelihood runs, 2 generation passes, and the 5 evals that load a model
    # (3 untagged, 2 classifier-sampler); the 6 other tagged evals choose among a pass's replies
    assert chain["runs_checked"] == 4 + 2 + 5 + 2 + 5
    assert len(chain["stages"]) == 1 + 4 + 2 + 5 + 2 + 11 + 1  # each distinct eval (and generation pass) is built once
    measured = result["throughput"]
    for part in ("generator_training", "classifier_training"):
        assert measured[part]["tokens_per_s"] > 0 and 0 <= measured[part]["padding_share"] < 1
        assert measured[part]["model_device"] == {"device": "cpu", "dtype": "float32"}
    assert measured["generation"]["batch_size"] == 64 and measured["generation"]["examples_per_s"] > 0
    projection = result["projection"]
    assert projection["evals"] == 11 and projection["total_s"] == pytest.approx(
        projection["generators_s"] + projection["classifiers_s"] + projection["evals_s"] + projection["likelihood_s"],
        abs=0.3)
    assert result["offline"] == {"ran": False, "why": result["offline"]["why"]} and "models fetch" in result["offline"]["why"]
