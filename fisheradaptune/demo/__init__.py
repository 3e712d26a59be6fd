"""The demo (``python -m fisheradaptune.demo``): not part of the library's import path.

``import fisheradaptune`` does not import this package, its models or its data.
"""
