import pytest

from mhsupport.settings.config import load_config
from mhsupport.errors import MhsError
from mhsupport.data.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def taxonomy():
    return Taxonomy.from_config(load_config("prepare_data").taxonomy)


@pytest.mark.parametrize("strategy, category", [
    ("Question", "Exploration"),
    ("Restatement or Paraphrasing", "Exploration"),
    ("Reflection of feelings", "Comforting"),
    ("Self-disclosure", "Comforting"),
    ("Affirmation and Reassurance", "Comforting"),
    ("Providing Suggestions", "Action"),
    ("Information", "Action"),
    ("Others", "Others"),
    ("Emotional Reactions", "Comforting"),
    ("Explorations", "Exploration"),
    ("Interpretations", "Action"),
])
def test_primary_mapping_is_the_design_table(taxonomy, strategy, category):
    assert taxonomy.primary(strategy) == category


def test_membership_keeps_table1_multi_membership(taxonomy):
    assert taxonomy.members("Self-disclosure") == ["Comforting", "Exploration", "Action"]
    assert taxonomy.members("Reflection of feelings") == ["Comforting", "Exploration"]
    assert taxonomy.members("Question") == ["Exploration"]


def test_unknown_strategy_is_an_error_not_others(taxonomy):
    with pytest.raises(MhsError, match="unknown strategy 'Greeting'"):
        taxonomy.primary("Greeting")
    with pytest.raises(MhsError, match="unknown strategy"):
        taxonomy.members("question")  # names are case-sensitive


@pytest.mark.parametrize("levels, category", [
    ({"emotional_reactions": 0, "explorations": 0, "interpretations": 0}, "Others"),
    ({"emotional_reactions": 1, "explorations": 2, "interpretations": 0}, "Exploration"),
    ({"emotional_reactions": 0, "explorations": 1, "interpretations": 2}, "Action"),
    # ties: Comforting before Exploration before Action
    ({"emotional_reactions": 2, "explorations": 2, "interpretations": 2}, "Comforting"),
    ({"emotional_reactions": 0, "explorations": 1, "interpretations": 1}, "Exploration"),
    ({"emotional_reactions": 1, "explorations": 0, "interpretations": 1}, "Comforting"),
])
def test_epitome_label_highest_level_with_tie_order(taxonomy, levels, category):
    assert taxonomy.epitome_category(levels) == category


def test_mapping_lives_in_config():
    cfg = load_config("prepare_data", ["taxonomy.priority=[Exploration,Comforting,Action]"])
    assert Taxonomy.from_config(cfg.taxonomy).primary("Reflection of feelings") == "Exploration"


def test_config_naming_an_unknown_category_is_refused():
    cfg = load_config("prepare_data", ["taxonomy.fallback=Misc"])
    with pytest.raises(MhsError, match="'Misc' is not one of the categories"):
        Taxonomy.from_config(cfg.taxonomy)
