"""The errors a user must act on, printed by the command line as one line."""


class PipelineError(RuntimeError):
  """A problem the user must fix (bad config, missing or stale input); printed as one line."""


class ConfigError(PipelineError, ValueError):
  """A config field with a bad value; the message names the field."""
