"""The pins in envs/*.yaml (for `--sdm conda`) agree with requirements.txt (for the venv), and every rule names an env."""

import re

import yaml

from conftest import ROOT


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s#]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_conda_env_pins_match_requirements():
    pins = requirement_pins()
    assert pins["torch"] and pins["torchvision"]
    for env_file in sorted((ROOT / "envs").glob("*.yaml")):
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        for spec in pip:
            name, version = spec.split("==")
            assert pins.get(name.lower()) == version, f"{env_file.name}: {spec} but requirements.txt pins {pins.get(name.lower())}"


def test_every_rule_has_a_conda_env_and_a_log():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        rules = re.findall(r"^rule (\w+):", text, flags=re.M)
        if smk.name == "common.smk":
            assert not rules
            continue
        # Directives at the start of a line: "external_catalog:" must not count as a log.
        assert len(re.findall(r"^\s+conda:", text, flags=re.M)) == len(rules), smk.name
        assert len(re.findall(r"^\s+log:", text, flags=re.M)) == len(rules), smk.name
