"""The SAFT paper's coefficient-search grids (appendix A.2), shared by the method definitions."""

PAPER_ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # task arithmetic alpha / TIES lambda
PAPER_DENSITIES = (0.3, 0.2, 0.1)  # TIES: mask rate 0.7 / 0.8 / 0.9
PAPER_DROP_RATES = (0.1, 0.3, 0.5, 0.7, 0.9)  # DARE
