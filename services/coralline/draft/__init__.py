"""Drafters: turn (committed context, target features) into a TokenTree plus the draft rows the
verifier needs. The engine and the drafter service use the same drafter objects."""

from coralline.draft.base import Drafter, DraftProposal, check_pair, default_verifier

__all__ = ["DraftProposal", "Drafter", "check_pair", "default_verifier"]
