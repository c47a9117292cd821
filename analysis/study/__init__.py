"""Studies and benchmarks that scripts/ runs (tests check them on small sizes):

    rmt_study    the random-matrix study of trained and initial QK spectra (scripts/rmt_figures.py)
    compare      side-by-side report of runs (scripts/spectral_report.py, trainer sweep report)
    bench        cost of a spectral check per null (scripts/bench_spectral.py)
    alert_bench  the alerts benchmark: rules scored on failing and healthy runs (scripts/bench_alerts.py)
    flops        FLOPs per token of each attention variant (MFU figures)
"""
