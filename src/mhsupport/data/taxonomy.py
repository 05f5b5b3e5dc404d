"""The unified support taxonomy (DESIGN.md section 2), read from config."""

from __future__ import annotations

from dataclasses import dataclass

from mhsupport.errors import MhsError


@dataclass(frozen=True)
class Taxonomy:
    categories: tuple[str, ...]
    priority: tuple[str, ...]
    fallback: str
    membership: dict[str, tuple[str, ...]]
    esconv_strategies: tuple[str, ...]
    epitome_mechanisms: dict[str, str]  # key -> mechanism name ("emotional_reactions" -> "Emotional Reactions")
    epitome_files: dict[str, str]  # key -> CSV file name

    @classmethod
    def from_config(cls, cfg) -> "Taxonomy":
        taxonomy = cls(
            categories=tuple(cfg.categories),
            priority=tuple(cfg.priority),
            fallback=str(cfg.fallback),
            membership={c: tuple(names) for c, names in cfg.membership.items()},
            esconv_strategies=tuple(cfg.esconv_strategies),
            epitome_mechanisms={k: str(v.name) for k, v in cfg.epitome_mechanisms.items()},
            epitome_files={k: str(v.file) for k, v in cfg.epitome_mechanisms.items()},
        )
        taxonomy._check()
        return taxonomy

    def _check(self) -> None:
        known = set(self.categories)
        for name in (*self.priority, self.fallback, *self.membership):
            if name not in known:
                raise MhsError(f"taxonomy config: '{name}' is not one of the categories {list(self.categories)}")
        for strategy in (*self.esconv_strategies, *self.epitome_mechanisms.values()):
            self.primary(strategy)  # every strategy must map somewhere

    def labels(self, tag_set: str) -> list[str]:
        """The label set a model predicts or is tagged with: the 4 categories or the 8 ESConv strategies."""
        return list(self.categories if tag_set == "category" else self.esconv_strategies)

    @staticmethod
    def label_key(tag_set: str) -> str:
        """The example field holding an example's label in this tag set."""
        return "category" if tag_set == "category" else "strategy"

    def primary(self, strategy: str) -> str:
        """The one category of a strategy or mechanism; unknown names are an error, never 'Others'."""
        for category in self.priority:
            if strategy in self.membership.get(category, ()):
                return category
        if strategy in self.membership.get(self.fallback, ()):
            return self.fallback
        raise MhsError(
            f"unknown strategy '{strategy}': not in the taxonomy's membership lists "
            f"(known: {sorted(self.known_strategies())})"
        )

    def members(self, strategy: str) -> list[str]:
        """Every category whose Table-1 list holds the strategy (for Table-1-style counts)."""
        found = [c for c in self.categories if strategy in self.membership.get(c, ())]
        if not found:
            self.primary(strategy)  # raises the unknown-strategy error
        return found

    def known_strategies(self) -> set[str]:
        return {name for names in self.membership.values() for name in names}

    def epitome_category(self, levels: dict[str, int]) -> str:
        """Category of an EPITOME pair: the mechanism with the highest level, ties in priority
        order; all levels 0 -> fallback."""
        best_level = max(levels.values())
        if best_level == 0:
            return self.fallback
        candidates = {self.primary(self.epitome_mechanisms[k]) for k, v in levels.items() if v == best_level}
        return next(c for c in self.priority if c in candidates)
