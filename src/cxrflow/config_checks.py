"""Checks of the config that the JSON schema cannot express. They live in cxrflow_plan, which Snakemake imports to
plan the run without this package (numpy, pandas); the package and the tests use them from here."""

from cxrflow_plan import check_config, schema_errors

__all__ = ["check_config", "schema_errors"]
