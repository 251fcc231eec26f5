"""The ``distily synth`` folder format now lives in the data layer: :mod:`distily.data.synth_format`."""

from ..data.synth_format import *  # noqa: F403
from ..data.synth_format import (  # noqa: F401  (names tests and older code import from here)
    CONFIG,
    FEATURES,
    MANIFEST,
    PROMPTS,
    REJECTED_PREFIX,
    REQUEST_COLUMN,
    SAMPLES_PREFIX,
    _rows,
    is_eval_prompt,
    is_synth_folder,
    load_synth_documents,
    pack_prompt_completion,
    pack_synth_dataset,
    plain_text,
    read_jsonl,
    read_samples,
    render_sample,
    shard_files,
)
