"""The errors of reading a checkpoint (a leaf module: every reader imports it)."""


class CheckpointMismatchError(ValueError):
  """The checkpoint and the model disagree (missing, unexpected or misshapen keys)."""


class CheckpointCorruptError(ValueError):
  """The checkpoint's bytes cannot be read (truncated, flipped, not the format it claims)."""
