"""Features that cannot be combined are refused together, with an error naming both flags, before any work."""

from __future__ import annotations

import pytest

from distily.config import DistillationConfig, StudentArguments
from distily.errors import ConfigError


def test_on_policy_sampling_with_a_cross_tokenizer_loss_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--cross_tokenizer_loss aligns.*--lmbda 0 without --seq_kd"):
        DistillationConfig(
            output_dir=str(tmp_path), cross_tokenizer_loss="uld", lmbda=1.0, prompt_len=8, seq_len=32, use_cpu=True
        )
    with pytest.raises(ConfigError, match="--cross_tokenizer_loss aligns"):
        DistillationConfig(output_dir=str(tmp_path), cross_tokenizer_loss="hybrid", seq_kd=True, prompt_len=8,
                           seq_len=32, use_cpu=True)  # fmt: skip
    # each alone is fine
    assert DistillationConfig(output_dir=str(tmp_path), cross_tokenizer_loss="uld", use_cpu=True).lmbda == 0
    assert DistillationConfig(output_dir=str(tmp_path), lmbda=1.0, prompt_len=8, seq_len=32, use_cpu=True).lmbda == 1


def test_pruning_with_a_new_tokenizer_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--student_init prune.*--student_tokenizer"):
        StudentArguments(student_config={"num_hidden_layers": 2}, student_init="prune", student_tokenizer=str(tmp_path))
