"""Progress bars: tqdm's widget in JupyterLab, plain text on a console, and plain text inside the
notebooks the runner executes (it sets CLASSFILTERS_PROGRESS=text), so that their progress reaches
the runner's console instead of widget messages no one sees.

    from .progress import tqdm
"""
import os

if os.environ.get("CLASSFILTERS_PROGRESS") == "text":
    from tqdm.std import tqdm
else:
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
