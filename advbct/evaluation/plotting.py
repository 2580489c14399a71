"""matplotlib for the report figures: optional (pip install '.[plot]'), headless, written atomically."""

from advbct.io import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(plt, fig, path, **kw):
    """``fig`` as the PNG ``path`` (a complete file or none), then closed; returns ``path``."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, **kw)  # format named: the temporary file has no .png suffix
    finally:
        plt.close(fig)
    return path
