"""Training: ``prepare`` manifests into shards, ``train`` (one process or torchrun), ``export`` a checkpoint."""

from gpa.train.config import PrepareConfig, TrainConfig, load_train_config
from gpa.train.export import export
from gpa.train.loop import TrainResult, evaluate, train
from gpa.train.prepare import PrepareReport, prepare

__all__ = ["PrepareConfig", "PrepareReport", "TrainConfig", "TrainResult", "evaluate", "export", "load_train_config",
           "prepare", "train"]
