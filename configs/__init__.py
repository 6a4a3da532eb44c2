"""Experiment configs: each module's `get_config()` returns an ml_collections.ConfigDict.

Selected on the command line by path (`--config=configs/imagenet.py:l`), importable as the
package `configs` from the repository root (`from configs import quickstart`).
"""
