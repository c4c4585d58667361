"""Evaluation: Dice and HD95 (:mod:`.metrics`), ``nnunet-sud evaluate`` (:mod:`.evaluate`) and
``nnunet-sud compare`` (:mod:`.compare`). See docs/evaluation.md for the definitions."""
