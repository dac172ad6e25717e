"""The paper's two headline comparisons (TOFU, batch; arXiv 2505.15674), computed from a report's rows.

Within one protocol (benchmark, split, setting, model, and every benchmark, evaluation and target setting:
`Run.protocol`), each configuration is averaged over its seeds
(plot_units). Among the fine-tuning baselines (`method.kind: finetune`) the best-forgetting one has the highest
forget efficacy (FE) and the best-retaining one the highest model utility (MU). For every configuration of a
UniErase-family method (`method.kind: unierase`: UniErase and its ablations):

  utility ratio  = MU(UniErase) / MU(best-forgetting baseline)     paper: 4.01x, while forgetting more
  efficacy gain  = FE(UniErase) / FE(best-retaining baseline) - 1  paper: +35.96 %

The first claim holds in direction when the ratio exceeds 1 and UniErase's FE is at least the best-forgetting
baseline's; the second when the gain is positive.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from unierase.io import stable_hash
from unierase.report.plots import Stat, Unit, plot_units, unit_stat
from unierase.report.runs import FE, MU, Run

PAPER_UTILITY_RATIO = 4.01
PAPER_EFFICACY_GAIN = 0.3596


@dataclass(frozen=True)
class Row:
    """One configuration of the comparison, its seeds averaged."""
    label: str
    forget_efficacy: Stat
    model_utility: Stat
    partial: bool  # FE or MU came from the `*_partial` fallback

    def text(self) -> str:
        return (f"{self.label} (FE {self.forget_efficacy.text()}, MU {self.model_utility.text()}"
                f"{', partial' if self.partial else ''}, n={self.forget_efficacy.n})")


@dataclass(frozen=True)
class Headline:
    protocol: tuple[str, ...]  # benchmark, split, setting, model, hash of Run.protocol()
    unierase: Row
    best_forgetting: Row
    best_retaining: Row

    @property
    def utility_ratio(self) -> float:
        return _ratio(self.unierase.model_utility.mean, self.best_forgetting.model_utility.mean)

    @property
    def efficacy_gain(self) -> float:
        return _ratio(self.unierase.forget_efficacy.mean, self.best_retaining.forget_efficacy.mean) - 1

    @property
    def forgets_more(self) -> bool:
        """At least the best-forgetting baseline's forget efficacy."""
        return self.unierase.forget_efficacy.mean >= self.best_forgetting.forget_efficacy.mean

    @property
    def utility_claim_holds(self) -> bool:
        return self.utility_ratio > 1 and self.forgets_more

    @property
    def efficacy_claim_holds(self) -> bool:
        return self.efficacy_gain > 0


def _ratio(numerator: float, denominator: float) -> float:
    # A baseline can end at exactly 0 (GA destroys the model): any positive value is infinitely more.
    if denominator == 0:
        return math.inf if numerator > 0 else math.nan
    return numerator / denominator


def _row(unit: Unit) -> Row | None:
    fe, mu = unit_stat(unit, FE), unit_stat(unit, MU)
    if fe is None or mu is None:
        return None
    return Row(unit.label, fe, mu, any(run.partial & {FE, MU} for run in unit.runs))


def headlines(runs: list[Run]) -> list[Headline]:
    """One Headline per UniErase-family configuration, in each protocol that also has a baseline."""
    by_protocol: dict[tuple[str, ...], dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for unit in plot_units(runs):
        row = _row(unit)
        if row is not None:
            first = unit.runs[0]
            protocol = (*(str(value) for value in first.family()[1:]), stable_hash(first.protocol(), 8))
            by_protocol[protocol][str(first.settings.get("method.kind"))].append(row)
    found = []
    for protocol, kinds in sorted(by_protocol.items()):
        baselines = kinds.get("finetune", [])
        if not baselines:
            continue
        best_forgetting = max(baselines, key=lambda row: row.forget_efficacy.mean)
        best_retaining = max(baselines, key=lambda row: row.model_utility.mean)
        found += [Headline(protocol, row, best_forgetting, best_retaining) for row in kinds.get("unierase", [])]
    return found


def _ratio_text(ratio: float) -> str:
    return "unbounded (the baseline's utility is 0)" if math.isinf(ratio) else f"{ratio:.2f}x"


def _verdict(holds: bool) -> str:
    return "holds in direction" if holds else "does NOT hold"


def render_headlines(found: list[Headline]) -> list[str]:
    """Markdown lines: per protocol, the two baselines compared against, then one bullet per UniErase row."""
    lines: list[str] = []
    protocol = None
    # The settings' hash is named only where two protocols would otherwise read alike.
    titles = [key[:-1] for key in dict.fromkeys(headline.protocol for headline in found)]
    for headline in found:
        if headline.protocol != protocol:
            protocol = headline.protocol
            title = "/".join(protocol[:-1]) + (f" #{protocol[-1]}" if titles.count(protocol[:-1]) > 1 else "")
            lines += ["", f"### The paper's headline comparisons ({title})", "",
                      f"Best-forgetting baseline: {headline.best_forgetting.text()}. "
                      f"Best-retaining baseline: {headline.best_retaining.text()}. Means over seeds; "
                      f"paper (TOFU, batch): utility ratio {PAPER_UTILITY_RATIO}x while forgetting more, "
                      f"efficacy gain +{PAPER_EFFICACY_GAIN:.2%}.", ""]
        lines.append(
            f"- {headline.unierase.text()}: utility ratio {_ratio_text(headline.utility_ratio)}, "
            f"{'forgetting more' if headline.forgets_more else 'forgetting less'} "
            f"({_verdict(headline.utility_claim_holds)}); efficacy gain {headline.efficacy_gain:+.2%} "
            f"({_verdict(headline.efficacy_claim_holds)}).")
    return lines
