"""Offline FID for the notebook test: put on PYTHONPATH (with tests/) by ``test_notebook.py``.

Python imports this at start-up in the notebook's kernel and in every ``python main.py`` it runs. The project
folder is not yet on ``sys.path`` then, so a finder on ``sys.meta_path`` waits for ``evaluation.fid`` to be imported and
replaces its ``_build_inception`` with ``helpers.TinyFeatures``, as the FID tests do with monkeypatch. Nothing
is downloaded and clean-fid's weights file is never touched.
"""
import importlib.abc
import importlib.machinery
import sys

FID_MODULE = "evaluation.fid"  # tests/test_notebook.py checks that this module defines _build_inception


class _StandInInception(importlib.abc.Loader):
    """Runs the real ``fid`` module, then swaps its Inception builder for the stand-in."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        from helpers import TinyFeatures

        module._build_inception = lambda mode, device: TinyFeatures().eval()


class _FidFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != FID_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _StandInInception(spec.loader)
        return spec


sys.meta_path.insert(0, _FidFinder())
