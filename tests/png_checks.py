"""Checks of a written figure: a real, non-blank PNG, and pixel for pixel the figure its data draws."""

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path, min_side: int = 200) -> np.ndarray:
    """The image at `path` as (h, w, channels) floats in [0, 1], after checking it is a PNG of at least
    `min_side` pixels a side that is not blank (pixels vary, in more than two colours)."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert min(img.shape[:2]) >= min_side, f"{path}: {img.shape[1]} x {img.shape[0]} px"
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.01, f"{path} is blank"
    assert len(np.unique(rgb, axis=0)) > 2, f"{path} has at most two colours"
    return img


def assert_png_of(path: Path, fig: Figure, dpi: float, min_side: int = 200) -> np.ndarray:
    """`path` passes `read_png`, has the size of `fig` at `dpi`, and holds `fig` drawn at `dpi` (closed here)."""
    img = read_png(path, min_side)
    width, height = fig.get_size_inches() * dpi
    assert abs(img.shape[1] - width) <= 1 and abs(img.shape[0] - height) <= 1, (img.shape, width, height)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    np.testing.assert_array_equal(img, mpimg.imread(buf, format="png"), err_msg=f"{path} is not this figure")
    return img
