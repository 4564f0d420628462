"""The one exception type for mistakes a user can make (bad config, bad table, missing file).

It is defined in `cxrflow_plan` (which Snakemake imports while planning, without the package's heavy
dependencies), so that an error raised while planning and one raised inside a job are the same class."""

from cxrflow_plan import CxrflowError

__all__ = ["CxrflowError"]
