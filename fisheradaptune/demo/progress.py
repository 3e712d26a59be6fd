"""tqdm when installed (a demo dependency), else a silent stand-in."""
try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a demo dependency
    def tqdm(it, **kw):
        return it

__all__ = ["tqdm"]
