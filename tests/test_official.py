"""The full-size official layout: every parameter name and shape accepted strictly, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gpa


@pytest.mark.slow
def test_official_shaped_checkpoint_loads_strictly_and_runs(official_dir):
    model = gpa.load(official_dir, device="cpu")
    # Random BatchNorm running variances can be negative (NaN speaker codes); real ones are not.
    for m in model.bicodec.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_var.abs_()
    cfg = model.lm.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (28, 512, 180445)
    v = model.vocab
    assert (v.glm.offset, v.global_.offset, v.semantic.offset, v.end) == (151727, 168111, 172207, 151645)
    t = np.arange(16000) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    text = model.asr((speech, 16000), max_new_tokens=4)
    assert isinstance(text, str)
    wav, sr = model.tts("Hello.", (speech, 16000), max_new_tokens=4, seed=0)
    assert sr == 16000 and 0 < len(wav) <= 4 * 320
