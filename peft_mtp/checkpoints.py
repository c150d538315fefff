"""Resume training from the newest checkpoint that was written completely.

transformers' `Trainer` writes `checkpoint-N/` in place, file by file: the adapter, then the optimizer,
scheduler and RNG states, and `trainer_state.json` last (`Trainer._save_checkpoint`). A run killed in the
middle of a save leaves a partial `checkpoint-N/`, and `transformers.trainer_utils.get_last_checkpoint`
(what `resume_from_checkpoint=True` uses) picks it because it only looks at folder names. Resuming from
it then fails, or worse, restarts with a missing optimizer state.

`last_complete_checkpoint` picks the newest checkpoint whose `trainer_state.json` exists, parses, and
records step N: since that file is written last, its presence means everything before it was written.

    trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))
"""

from __future__ import annotations

import json
import logging
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# The file `Trainer._save_checkpoint` writes last (transformers.trainer.TRAINER_STATE_NAME).
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")

logger = logging.getLogger(__name__)


def is_complete_checkpoint(path: str) -> bool:
    """Whether a `checkpoint-N` folder was written completely by the Trainer.

    Args:
        path: a checkpoint folder (`.../checkpoint-N`).

    Returns:
        True if `trainer_state.json` exists in it, parses as JSON, and records `global_step == N`
        (a checkpoint folder whose name has no step number only needs the first two).
    """
    state_file = os.path.join(path, TRAINER_STATE_NAME)
    try:
        with open(state_file, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        # Missing (the save stopped earlier) or truncated (it stopped while writing this very file).
        return False
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return match is None or state.get("global_step") == int(match.group(1))


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-N` folder in `output_dir`, for `trainer.train(resume_from_checkpoint=...)`.

    Incomplete checkpoints (left by a run killed while saving) are skipped with a warning, not deleted.

    Args:
        output_dir: the Trainer's `output_dir`.

    Returns:
        The path of the complete checkpoint with the highest step, or None when there is none (or
        `output_dir` does not exist), so that the run starts from scratch.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(steps, reverse=True):
        if is_complete_checkpoint(path):
            return path
        logger.warning(
            "Skipping %s: it has no valid %s, so its save was interrupted. Resuming from an older checkpoint.",
            path, TRAINER_STATE_NAME,
        )
    return None
