"""Post-training tools on a checkpoint, each through the QK probe and the head gates of models/:

    laser       layer-selective rank reduction (LASER) of the QK bilinear forms and MLPs
    pruning     learned / magnitude / Wanda masks on the attention matrices
    circuits    K-MSHC: the minimal head circuit that keeps a task's score
    tasks       the synthetic and corpus tasks the tools are scored on
"""
