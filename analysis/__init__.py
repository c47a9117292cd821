"""Pure math on the QK probe, in three rooms; torch, numpy and matplotlib only.

No Lightning, Hydra or W&B here, and no import from trainer/ or callbacks/:

    analysis/spectral/  the spectral health check: probe -> spectra -> nulls -> metrics -> report
                        (what the training callbacks call), its on-disk history and the logit bound
    analysis/surgery/   the post-training tools on a checkpoint: LASER, attention-mask pruning,
                        K-MSHC head-circuit search and the tasks they are scored on
    analysis/study/     studies and benchmarks run by scripts/ (RMT study, run comparison,
                        null-cost and alert benchmarks, FLOP counting)

analysis/files.py holds the one atomic-write helper every on-disk format uses.
"""
