"""The model card: content (what it says), figures, rendering (markdown, and HTML from it)."""

from kd_core.card import gather  # what a task's card reads from a run (Task.write_card)
from kd_core.card.content import (
    DATA_DOCS,
    FIGURES,
    HTML_FILE,
    MD_FILE,
    CardInputs,
    loss_label,
    now,
    score_test_split,
    setting_line,
    write_card,
)

__all__ = ["DATA_DOCS", "FIGURES", "HTML_FILE", "MD_FILE", "CardInputs", "gather", "loss_label", "now",
           "score_test_split", "setting_line", "write_card"]
