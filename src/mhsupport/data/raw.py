"""Reading the raw corpora: ESConv conversations and EPITOME Reddit pairs.

Every check names the file, the line or row, the field and what was expected.
Accepted quirks: a UTF-8 byte-order mark, CRLF line endings, blank lines between
JSON lines, and leading/trailing/repeated whitespace in texts (normalised to one space).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from mhsupport.errors import RawDataError
from mhsupport.data.taxonomy import Taxonomy

ESCONV_SPLIT_FILES = {"train": "train.json", "valid": "valid.json", "test": "test.json"}
ESCONV_SINGLE_FILE = "ESConv.json"
SPEAKERS = {"usr": "seeker", "sys": "supporter"}
EPITOME_COLUMNS = ("sp_id", "rp_id", "seeker_post", "response_post", "level")
EPITOME_LEVELS = {"0": 0, "1": 1, "2": 2}


@dataclass
class Turn:
    speaker: str  # "seeker" | "supporter"
    text: str
    strategy: str | None  # ESConv strategy of a supporter turn


@dataclass
class Conversation:
    conversation_id: str
    situation: str
    emotion_type: str | None
    problem_type: str | None
    turns: list[Turn]
    split: str | None = None  # None until split (single-file ESConv)


@dataclass
class EpitomePair:
    sp_id: str
    rp_id: str
    seeker_post: str
    response_post: str
    levels: dict[str, int] = field(default_factory=dict)  # mechanism key -> max level


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def read_text(path: Path) -> str:
    """Whole file as text: must exist, be non-empty and be UTF-8 (a BOM is accepted)."""
    if not path.is_file():
        raise RawDataError(path, "file not found")
    data = path.read_bytes()
    if not data.strip():
        raise RawDataError(path, "file is empty")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RawDataError(path, f"byte 0x{data[err.start]:02x} at offset {err.start} is not UTF-8",
                           line=line, expected="UTF-8 text") from None


# --- ESConv -----------------------------------------------------------------------------

def esconv_layout(esconv_dir: Path) -> str:
    """'split' when train/valid/test files are there, 'single' for the upstream ESConv.json."""
    if all((esconv_dir / name).is_file() for name in ESCONV_SPLIT_FILES.values()):
        return "split"
    if (esconv_dir / ESCONV_SINGLE_FILE).is_file():
        return "single"
    return "missing"


def load_esconv(esconv_dir: Path, taxonomy: Taxonomy) -> list[Conversation]:
    """All conversations; split files set `.split`, the single upstream file leaves it None."""
    layout = esconv_layout(esconv_dir)
    if layout == "missing":
        raise RawDataError(esconv_dir, "no ESConv data",
                           expected=f"{', '.join(ESCONV_SPLIT_FILES.values())} or {ESCONV_SINGLE_FILE}")
    if layout == "single":
        return _load_esconv_array(esconv_dir / ESCONV_SINGLE_FILE, taxonomy)
    conversations = []
    for split, name in ESCONV_SPLIT_FILES.items():
        path = esconv_dir / name
        index = 0
        for line_no, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RawDataError(path, f"malformed JSON ({err.msg} at column {err.colno})", line=line_no,
                                   expected="one JSON object per line") from None
            conversation = _parse_conversation(record, f"esconv-{split}-{index:04d}", taxonomy,
                                               lambda **kw: RawDataError(path, line=line_no, **kw))
            conversation.split = split
            conversations.append(conversation)
            index += 1
    return conversations


def _load_esconv_array(path: Path, taxonomy: Taxonomy) -> list[Conversation]:
    try:
        records = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise RawDataError(path, f"malformed JSON ({err.msg})", line=err.lineno,
                           expected="a JSON array of conversations") from None
    if not isinstance(records, list):
        raise RawDataError(path, f"top level is a JSON {type(records).__name__}", expected="a JSON array of conversations")
    return [
        _parse_conversation(record, f"esconv-{index:04d}", taxonomy,
                            lambda index=index, **kw: RawDataError(path, row=index, **kw))
        for index, record in enumerate(records)
    ]


def _parse_conversation(record, conversation_id: str, taxonomy: Taxonomy, error) -> Conversation:
    if not isinstance(record, dict):
        raise error(problem=f"not a conversation but a JSON {type(record).__name__}",
                    expected="an object with 'situation' and 'dialog'")
    for name in ("situation", "dialog"):
        if name not in record:
            raise error(problem="missing field", field=name, expected="an ESConv conversation field")
    situation = record["situation"]
    if not isinstance(situation, str) or not situation.strip():
        raise error(problem="empty or non-text situation", field="situation", expected="non-empty text")
    dialog = record["dialog"]
    if not isinstance(dialog, list) or not dialog:
        raise error(problem="dialog is not a non-empty list", field="dialog", expected="a list of turns")
    strategies = set(taxonomy.esconv_strategies)
    turns = []
    for i, turn in enumerate(dialog):
        where = f"dialog[{i}]"
        if not isinstance(turn, dict):
            raise error(problem="turn is not an object", field=where, expected="{text, speaker[, strategy]}")
        for name in ("text", "speaker"):
            if name not in turn:
                raise error(problem="missing field", field=f"{where}.{name}", expected="a turn field")
        speaker = turn["speaker"]
        if speaker not in SPEAKERS:
            raise error(problem=f"unknown speaker {speaker!r}", field=f"{where}.speaker", expected="'usr' or 'sys'")
        text = turn["text"]
        if not isinstance(text, str) or not text.strip():
            raise error(problem="empty text", field=f"{where}.text", expected="non-empty text")
        strategy = None
        if speaker == "sys":
            strategy = turn.get("strategy")
            if strategy is None:
                raise error(problem="supporter turn without strategy", field=f"{where}.strategy",
                            expected="one of the 8 ESConv strategies")
            if strategy not in strategies:
                raise error(problem=f"unknown strategy {strategy!r}", field=f"{where}.strategy",
                            expected=f"one of {sorted(strategies)}")
        turns.append(Turn(SPEAKERS[speaker], normalise_whitespace(text), strategy))
    return Conversation(conversation_id, normalise_whitespace(situation), record.get("emotion_type"),
                        record.get("problem_type"), turns)


# --- EPITOME ----------------------------------------------------------------------------

def load_epitome(epitome_dir: Path, taxonomy: Taxonomy) -> list[EpitomePair]:
    """Pairs joined over the mechanism files on (sp_id, rp_id); level = max over duplicate rows;
    texts from the first mechanism's file (emotional reactions)."""
    pairs: dict[tuple[str, str], EpitomePair] = {}
    reference = None
    for key, file_name in taxonomy.epitome_files.items():
        path = epitome_dir / file_name
        levels, texts = {}, {}
        for sp_id, rp_id, seeker_post, response_post, level in _read_epitome_csv(path):
            levels[(sp_id, rp_id)] = max(level, levels.get((sp_id, rp_id), 0))
            texts.setdefault((sp_id, rp_id), (seeker_post, response_post))
        if reference is None:
            reference = path
            pairs = {pair_id: EpitomePair(*pair_id, *texts[pair_id]) for pair_id in levels}
        else:
            _check_same_pairs(reference, path, set(pairs), set(levels))
        for pair_id, level in levels.items():
            pairs[pair_id].levels[key] = level
    return list(pairs.values())


def _check_same_pairs(reference: Path, path: Path, expected: set, found: set) -> None:
    if expected == found:
        return
    missing, extra = sorted(expected - found), sorted(found - expected)
    detail = []
    if missing:
        detail.append(f"{len(missing)} pair(s) of {reference.name} missing, e.g. {missing[0]}")
    if extra:
        detail.append(f"{len(extra)} pair(s) not in {reference.name}, e.g. {extra[0]}")
    raise RawDataError(path, "does not hold the same (sp_id, rp_id) pairs: " + "; ".join(detail),
                       field="sp_id, rp_id", expected=f"the pairs of {reference.name}")


def _read_epitome_csv(path: Path) -> list[tuple[str, str, str, str, int]]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = [name.strip() for name in next(reader)]
    missing = [c for c in EPITOME_COLUMNS if c not in header]
    if missing:
        raise RawDataError(path, f"missing column(s) {missing}", line=1, field=missing[0],
                           expected=f"header with {list(EPITOME_COLUMNS)}")
    index = {c: header.index(c) for c in EPITOME_COLUMNS}
    rows = []
    line_no = reader.line_num
    for row_no, values in enumerate(reader, start=1):
        start_line, line_no = line_no + 1, reader.line_num
        if not any(v.strip() for v in values):
            continue

        def fail(problem, column, expected):
            raise RawDataError(path, problem, line=start_line, row=row_no, field=column, expected=expected)

        if len(values) < len(header):
            fail(f"{len(values)} values for {len(header)} columns", header[len(values)], "a value per column")
        value = {c: values[i] for c, i in index.items()}
        for column in ("sp_id", "rp_id"):
            if not value[column].strip():
                fail("empty id", column, "a Reddit id")
        for column in ("seeker_post", "response_post"):
            if not value[column].strip():
                fail("empty text", column, "non-empty text")
        level = EPITOME_LEVELS.get(value["level"].strip())
        if level is None:
            fail(f"level {value['level']!r}", "level", "0, 1 or 2")
        rows.append((value["sp_id"].strip(), value["rp_id"].strip(), normalise_whitespace(value["seeker_post"]),
                     normalise_whitespace(value["response_post"]), level))
    if not rows:
        raise RawDataError(path, "no data rows", expected="at least one (sp_id, rp_id) row")
    return rows
